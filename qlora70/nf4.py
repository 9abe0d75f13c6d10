"""NF4 + double quantization, byte-compatible with bitsandbytes (pure torch reference, CPU and CUDA).

Format (read from bitsandbytes' `functional.py` / `backends/default/ops.py`):
  * The weight is flattened row-major and split into blocks of `blocksize` (default 64) elements. Each block keeps its
    fp32 absmax; elements are scaled by the reciprocal `1/absmax` and mapped to the nearest of the 16 NF4 codes using
    the midpoints between adjacent codes (a value exactly on a midpoint goes to the lower code, as `torch.bucketize`).
  * An all-zero block has absmax 0 and its elements map to code 7 (0.0), as bitsandbytes' torch/CPU path does (its
    CUDA kernel yields code 0 = -1.0 from 0*inf; both dequantize to 0 * absmax = 0).
  * Two codes per byte, the even element in the high nibble; an odd element count is padded with code 7 (0.0).
    Packed tensor: uint8 of shape [(n + 1) // 2, 1].
  * Double quantization: offset = mean(absmax); (absmax - offset) is quantized blockwise with blocksize 256 to the signed
    8-bit dynamic map (nearest value), with fp32 per-256-block scales ("nested_absmax").
    Decode: absmax_i = nested_quant_map[code_i] * nested_absmax[i // 256] + offset.
  * Storage: 4 bits + 8/64 + 32/(64*256) = 4.127 bits per parameter with double quantization (4.5 without).

State-dict layout for a module prefix P (transformers + bitsandbytes): `P.weight` (packed uint8), `P.weight.absmax`,
`P.weight.quant_map`, `P.weight.nested_absmax`, `P.weight.nested_quant_map`,
`P.weight.quant_state.bitsandbytes__nf4` (UTF-8 JSON in a uint8 tensor).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Mapping

import torch

from . import native

NF4_CODES = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)
NF4_ZERO_CODE = 7
NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_BY_NAME = {v: k for k, v in _FLOAT_DTYPES.items()}
QS_KEY = "quant_state.bitsandbytes__nf4"


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic (exponent + fraction) code of Dettmers (2015), as bitsandbytes builds it. Sorted, fp32 [256]."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n_frac = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                     else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, n_frac, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_map(device: str, signed: bool = True) -> torch.Tensor:
    return create_dynamic_map(signed=signed).to(device)


@functools.lru_cache(maxsize=None)
def _midpoints(kind: str, device: str) -> torch.Tensor:
    """Midpoints between adjacent codes of "nf4", "dynamic" (signed map) or "dynamic_unsigned"."""
    if kind not in ("nf4", "dynamic", "dynamic_unsigned"):
        raise ValueError(f"unknown code table {kind!r}")
    code = NF4_CODES if kind == "nf4" else create_dynamic_map(signed=kind == "dynamic")
    return ((code[:-1] + code[1:]) / 2).to(device)


def _check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two in {VALID_BLOCKSIZES}, got {blocksize!r}")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int, clamp_tail: bool = True) -> torch.Tensor:
    """fp32 [n_blocks] absmax of a flat fp32 tensor; a partial last block uses its own elements.

    `clamp_tail`: store max(absmax, 1e-38) for a partial last block, as bitsandbytes' torch 4-bit path does (its C++
    8-bit blockwise path stores the raw value). Either way an all-zero block decodes to zeros."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        # bitsandbytes stores the clamped value for the remainder block (1e-38 when it is all zero)
        tail = flat[full:].abs().amax()
        absmax = torch.cat([absmax, (tail.clamp(min=1e-38) if clamp_tail else tail).reshape(1)])
    return absmax


def _quantize_codes(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, midpoints: torch.Tensor,
                    chunk: int = 1 << 22, divide: bool = False) -> torch.Tensor:
    """Nearest-code indices (uint8) of flat fp32 values scaled blockwise by 1/absmax; ties go to the lower code.

    One clamp convention: the scale is max(absmax, 1e-38), so an all-zero block maps every element to the code of 0.
    `divide=False` multiplies by the reciprocal (bitsandbytes' quantize_blockwise / 4-bit kernels); `divide=True`
    divides by the scale (bitsandbytes' 8-bit optimizer kernels). The two can differ by one ulp before rounding."""
    n = flat.numel()
    out = torch.empty(n, dtype=torch.uint8, device=flat.device)
    scale = absmax.clamp(min=1e-38)
    factor = scale if divide else 1.0 / scale
    apply = torch.div if divide else torch.mul
    step = max(blocksize, (chunk // blocksize) * blocksize)
    for s in range(0, n, step):  # chunked: keeps the fp32 temporaries cache- and memory-friendly
        e = min(n, s + step)
        x = flat[s:e]
        nb_full = (e - s) // blocksize
        b0 = s // blocksize
        scaled = torch.empty_like(x)
        if nb_full:
            scaled[: nb_full * blocksize] = apply(
                x[: nb_full * blocksize].view(nb_full, blocksize), factor[b0:b0 + nb_full, None]).view(-1)
        if nb_full * blocksize < e - s:
            scaled[nb_full * blocksize:] = apply(x[nb_full * blocksize:], factor[b0 + nb_full])
        scaled.clamp_(-1.0, 1.0)
        out[s:e] = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return out


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, *, signed: bool = True,
                            divide: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization to the dynamic map, the one codec of the library: double quantization (signed,
    reciprocal scale, byte-exact with bitsandbytes) and the 8-bit optimizer states (`qlora70.optim`: m signed, v
    unsigned, `divide=True` as bitsandbytes' 8-bit optimizers). x: [n] -> (codes uint8 [n], absmax fp32
    [ceil(n / blocksize)]); a partial last block uses its own elements' absmax."""
    flat = x.reshape(-1).float()
    absmax = _blockwise_absmax(flat, blocksize, clamp_tail=False)
    mids = _midpoints("dynamic" if signed else "dynamic_unsigned", str(flat.device))
    codes = _quantize_codes(flat, absmax, blocksize, mids, divide=divide)
    return codes, absmax


def dynamic_zero_code(signed: bool = True) -> int:
    """The code whose value in the dynamic map is 0.0 (an all-zero 8-bit state)."""
    return int(torch.argmin(create_dynamic_map(signed=signed).abs()))


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
                              code_map: torch.Tensor | None = None, *, signed: bool = True) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: fp32 [n] = code_map[codes] * absmax[i // blocksize] (code_map: the
    dynamic map, signed or not, unless given)."""
    cm = _dynamic_map(str(codes.device), signed) if code_map is None else code_map.float()
    vals = cm[codes.reshape(-1).long()]
    n = vals.numel()
    full = n - n % blocksize
    out = torch.empty_like(vals)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1)
    if full < n:
        out[full:] = vals[full:] * absmax[-1]
    return out


@dataclass
class NF4Weight:
    """A frozen NF4-quantized weight: packed 4-bit codes + (double-)quantized absmax + original shape and dtype.

    It never re-quantizes: `.to(device)` moves bytes, `.dequantize(dtype)` decodes. Shapes:
      packed           uint8 [(n + 1) // 2, 1]  (n = out * in)
      absmax           uint8 [n_blocks] with double quantization, else fp32 [n_blocks]
      quant_map        fp32 [16]
      nested_absmax    fp32 [ceil(n_blocks / 256)]        (double quantization only)
      nested_quant_map fp32 [256]                         (double quantization only)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_map: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.quant_map is None:
            self.quant_map = NF4_CODES.to(self.packed.device)
        if self.double_quant and self.nested_quant_map is None:
            self.nested_quant_map = _dynamic_map(str(self.packed.device))
        self.validate()

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of quantized storage (packed codes + scales; the 16/256-entry code tables excluded)."""
        n = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            n += self.nested_absmax.numel() * 4 + 4
        return n

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def validate(self) -> None:
        """Check that all parts agree with each other; raises ValueError naming the part."""
        _check_blocksize(self.blocksize)
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"NF4Weight.packed must be uint8, got {self.packed.dtype}")
        if self.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"NF4Weight.dtype must be one of {list(_FLOAT_DTYPES)}, got {self.dtype}")
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight.shape must be 2-D [out, in], got {tuple(self.shape)}")
        if self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(f"NF4Weight.packed has {self.packed.numel()} bytes but shape {tuple(self.shape)} needs "
                             f"{(self.numel + 1) // 2}")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(f"NF4Weight.absmax has {self.absmax.numel()} entries but shape {tuple(self.shape)} with "
                             f"blocksize {self.blocksize} needs {self.n_blocks}")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"with double quantization absmax must be uint8 codes, got {self.absmax.dtype}")
            _check_blocksize(self.nested_blocksize, "nested_blocksize")
            need = -(-self.n_blocks // self.nested_blocksize)
            if self.nested_absmax.numel() != need:
                raise ValueError(f"NF4Weight.nested_absmax has {self.nested_absmax.numel()} entries, expected {need}")
            if self.offset is None:
                raise ValueError("NF4Weight with double quantization needs `offset`")
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"without double quantization absmax must be float32, got {self.absmax.dtype}")

    # ---- decode ----------------------------------------------------------------------------------------------
    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales, fp32 [n_blocks] (decodes the double quantization)."""
        if not self.double_quant:
            return self.absmax
        am = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_blocksize, self.nested_quant_map)
        return am + torch.tensor(self.offset, dtype=torch.float32, device=am.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: the original dtype); computed in fp32, cast once."""
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy on `device` (bytes moved, never re-quantized)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(packed=mv(self.packed), absmax=mv(self.absmax), shape=self.shape, dtype=self.dtype,
                         blocksize=self.blocksize, quant_map=mv(self.quant_map), nested_absmax=mv(self.nested_absmax),
                         nested_quant_map=mv(self.nested_quant_map), offset=self.offset,
                         nested_blocksize=self.nested_blocksize)

    # ---- bitsandbytes state-dict layout ---------------------------------------------------------------------
    def quant_state_json(self) -> dict:
        d = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _FLOAT_DTYPES[self.dtype],
             "shape": list(self.shape)}
        if self.double_quant:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=float(self.offset))
        return d

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors in the bitsandbytes layout under `prefix` (e.g. "model.layers.0.self_attn.q_proj")."""
        p = f"{prefix}.weight" if prefix else "weight"
        sd = {p: self.packed, f"{p}.absmax": self.absmax, f"{p}.quant_map": self.quant_map}
        if self.double_quant:
            sd[f"{p}.nested_absmax"] = self.nested_absmax
            sd[f"{p}.nested_quant_map"] = self.nested_quant_map
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        sd[f"{p}.{QS_KEY}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", source: str = "state dict") -> "NF4Weight":
        """Read the bitsandbytes layout under `prefix`. `source` names the file in error messages."""
        p = f"{prefix}.weight" if prefix else "weight"

        def need(key: str) -> torch.Tensor:
            if key not in sd:
                raise KeyError(f"{source}: missing key {key!r} (a bitsandbytes NF4 weight needs {p}, {p}.absmax, "
                               f"{p}.quant_map and {p}.{QS_KEY}); the checkpoint is truncated or not 4-bit")
            return sd[key]

        blob = need(f"{p}.{QS_KEY}")
        try:
            qs = json.loads(bytes(blob.to(torch.uint8).cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: {p}.{QS_KEY} is not valid UTF-8 JSON ({e})") from None
        if qs.get("quant_type") != "nf4":
            raise ValueError(f"{source}: {p} has quant_type={qs.get('quant_type')!r}; only 'nf4' is supported")
        if qs.get("dtype") not in _DTYPE_BY_NAME:
            raise ValueError(f"{source}: {p} has unsupported dtype {qs.get('dtype')!r}")
        nested = "nested_blocksize" in qs
        try:
            return cls(packed=need(p).view(-1, 1) if need(p).dtype == torch.uint8 else need(p),
                       absmax=need(f"{p}.absmax"), shape=torch.Size(qs["shape"]), dtype=_DTYPE_BY_NAME[qs["dtype"]],
                       blocksize=int(qs["blocksize"]), quant_map=need(f"{p}.quant_map").float(),
                       nested_absmax=need(f"{p}.nested_absmax").float() if nested else None,
                       nested_quant_map=need(f"{p}.nested_quant_map").float() if nested else None,
                       offset=float(qs["nested_offset"]) if nested else None,
                       nested_blocksize=int(qs.get("nested_blocksize", NESTED_BLOCKSIZE)))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {p}: {e}") from None


def _quantize_torch(flat: torch.Tensor, blocksize: int, chunk: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pure-torch reference: float flat [n] -> (packed uint8 [(n + 1) // 2, 1], absmax fp32 [n_blocks], #NaN/inf).

    Works over chunks of whole blocks (`chunk` elements), so the fp32 working copy and the code temporaries are one
    chunk (16M elements = 64 MB fp32) instead of ~5.5 bytes per element of the whole weight."""
    n = flat.numel()
    step = max(blocksize, chunk // blocksize * blocksize)  # whole blocks, an even count: byte ranges line up
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    mids = _midpoints("nf4", str(flat.device))
    bad = 0
    for s in range(0, n, step):
        x = flat[s:s + step].float()
        bad += int((~torch.isfinite(x)).sum())
        if bad:
            continue  # keep counting; the codes are not used
        am = _blockwise_absmax(x, blocksize)  # a partial block can only be the last one
        codes = _quantize_codes(x, am, blocksize, mids)
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
        packed[s // 2:s // 2 + codes.numel() // 2, 0] = (codes[0::2] << 4) | codes[1::2]
        absmax[s // blocksize:s // blocksize + am.numel()] = am
    return packed, absmax, bad


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
                 dtype: torch.dtype | None = None) -> NF4Weight:
    """Quantize a 2-D float weight [out, in] to NF4 (bitsandbytes byte layout), with optional double quantization.

    Computes in fp32 on w's device, a chunk at a time (no fp32 copy of the whole weight); never modifies w.
    `dtype`: the original dtype to record (default w.dtype) -- e.g. a bf16 checkpoint tensor loaded into an fp32
    model is quantized from its bf16 values (exact in fp32) and recorded as fp32, without an fp32 copy.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4 expects a float32/float16/bfloat16 weight, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"quantize_nf4 expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4 got an empty weight of shape {tuple(w.shape)}")
    _check_blocksize(blocksize)
    dtype = w.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4: dtype (the original dtype to record) must be float32/float16/bfloat16, "
                        f"got {dtype}")
    if w.device.type == "cpu" and native.available():  # fused C loop, same bytes, no fp32 copy of w
        packed, absmax, bad = native.quantize(w.reshape(-1).contiguous(), blocksize, _midpoints("nf4", "cpu"),
                                              NF4_ZERO_CODE)
        packed = packed.unsqueeze(1)
    else:
        packed, absmax, bad = _quantize_torch(w.reshape(-1), blocksize)
    if bad:
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} has {bad} NaN/inf values; "
                         "fix the checkpoint (or the training run that produced it) before quantizing")
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=dtype, blocksize=blocksize)
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Weight(packed=packed, absmax=qabsmax, shape=w.shape, dtype=dtype, blocksize=blocksize,
                     nested_absmax=nested_absmax, offset=float(offset.item()))


def workspace_view(bufs: dict, key, shape: tuple[int, ...], dtype: torch.dtype, alloc) -> torch.Tensor:
    """A `shape` view of the reusable flat buffer `bufs[key]` (a `dequantize_nf4(out=)` target), grown with
    `alloc(numel, dtype)` when too small; the smaller buffer is freed first. The one workspace rule of the CPU
    decode (`ops`) and the GPU kernels (`qlora70.kernels`)."""
    numel = math.prod(shape)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs.pop(key, None)  # free the smaller buffer before allocating the larger one
        buf = bufs[key] = alloc(numel, dtype)
    return buf[:numel].view(shape)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode an `NF4Weight` to a dense [out, in] tensor (fp32 math, one cast). Reference path for the kernels.

    `out`: an optional contiguous [out, in] buffer of `dtype` on q's device to write into (and return).
    On CPU this runs the fused C loop of `qlora70.native` when it is available (bit-identical, several times faster),
    else `_dequantize_torch`.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4 expects an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES and dtype != torch.float64:
        raise TypeError(f"dequantize_nf4: dtype must be float32/float16/bfloat16/float64, got {dtype}")
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise ValueError(f"dequantize_nf4: out must be a contiguous {tuple(q.shape)} {dtype} tensor on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})")
    if q.device.type == "cpu" and native.available():
        buf = native.empty(q.numel, dtype) if out is None else out.view(-1)
        return native.dequantize_into(q, buf).view(q.shape)
    w = _dequantize_torch(q, dtype)
    return w if out is None else out.copy_(w)


def _dequantize_torch(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Pure-torch decode. On CPU it works through cache-sized chunks of packed bytes (byte -> two code values by a
    256-entry table, scaled in place by the block's absmax, then cast into the output), ~5x faster than one pass."""
    absmax = q.absmax_fp32().float()
    n, bs = q.numel, q.blocksize
    packed = q.packed.reshape(-1)
    b = torch.arange(256, device=q.device)  # the table is built on q's device: no host sync
    lut = torch.stack([q.quant_map[b >> 4], q.quant_map[b & 0xF]], 1).float()  # (256, 2) codes of every byte
    out = torch.empty(n, dtype=dtype, device=q.device)
    nbytes = packed.numel()
    chunk = nbytes if q.device.type != "cpu" else min(nbytes, _DEQUANT_CHUNK_BYTES)  # multiple of bs // 2
    # Each byte's two fp32 code values viewed as one int64: a 1-D table lookup is ~7x faster than a row gather.
    lut64 = lut.contiguous().view(torch.int64).view(-1)  # (256,)
    scratch = torch.empty(chunk, dtype=torch.int64, device=q.device)
    idx = torch.empty(chunk, dtype=torch.int32 if q.device.type == "cpu" else torch.int64, device=q.device)
    for s in range(0, nbytes, chunk):
        e = min(nbytes, s + chunk)
        idx[: e - s].copy_(packed[s:e])
        torch.index_select(lut64, 0, idx[: e - s], out=scratch[: e - s])
        v0, v1 = 2 * s, min(2 * e, n)  # element range of this chunk
        vals = scratch[: e - s].view(torch.float32)[: v1 - v0]  # (high nibble, low nibble) pairs in order
        nfull, b0 = (v1 - v0) // bs, v0 // bs
        vals[: nfull * bs].view(nfull, bs).mul_(absmax[b0:b0 + nfull, None])
        if nfull * bs < vals.numel():
            vals[nfull * bs:].mul_(absmax[b0 + nfull])
        out[v0:v1].copy_(vals)
    return out.view(q.shape)


_DEQUANT_CHUNK_BYTES = 1 << 19
