"""GGUF block codecs in torch: decoders for every llama.cpp type qlora70 reads, and the 32-weight block encoders.

Block layouts (llama.cpp ggml-common.h; "d"/"m"/"dmin" are fp16, QK_K = 256 weights per super-block):
    Q4_0  18 B: d, qs[16]                    w = d * (q - 8)        q 4 bits: low nibbles elements 0..15, high 16..31
    Q4_1  20 B: d, m, qs[16]                 w = d * q + m
    Q5_0  22 B: d, qh[4], qs[16]             w = d * (q - 16)       q = nibble | bit j of the LE uint32 qh << 4
    Q5_1  24 B: d, m, qh[4], qs[16]          w = d * q + m
    Q8_0  34 B: d, qs[32] int8               w = d * q
    Q2_K  84 B: scales[16], qs[64], d, dmin  16 sub-blocks of 16: w = d*(sc & 15)*q - dmin*(sc >> 4), q 2 bits
    Q3_K 110 B: hmask[32], qs[64], scales[12], d     16 x 16: w = d*(s6 - 32)*(q2 - 4*(1 - hbit))
    Q4_K 144 B: d, dmin, scales[12], qs[128]         8 x 32: w = d*sc*q - dmin*m, 6-bit sc/m packed in 12 bytes
    Q5_K 176 B: d, dmin, scales[12], qh[32], qs[128] 8 x 32: as Q4_K with a fifth bit from qh
    Q6_K 210 B: ql[128], qh[64], scales[16] int8, d  16 x 16: w = d*sc*(q - 32), q 6 bits
Each decoder does the float32 operations of gguf-py's reference decoders (`gguf.quants`) in the same order, so the
results are bit-identical (tests/test_gguf_quants.py). Encoders here are ggml's `quantize_row_*_ref`; the K-quant
encoders live in `gguf_kquants`.
"""
from __future__ import annotations

import math

import torch

QK_K = 256
# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
BLOCK = {v[0]: (v[1], v[2]) for v in GGML_TYPES.values()}  # name -> (weights per block, bytes per block)
DECODABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_CHUNK_WEIGHTS = 1 << 21  # weights (de)coded per step: bounds the temporaries to a few MB whatever the type


def row_bytes(type_name: str, cols: int) -> int:
    """Bytes of one row of `cols` weights stored as `type_name` (ValueError if cols is not a whole number of blocks)."""
    bs, bb = BLOCK[type_name]
    if cols % bs:
        raise ValueError(f"a row of {cols} weights is not a whole number of {type_name} blocks ({bs} weights each)")
    return cols // bs * bb


def _f16(b: torch.Tensor, lo: int) -> torch.Tensor:
    """fp16 at bytes [lo, lo+2) of each block row (nb, bb) -> fp32 (nb, 1)."""
    return b[:, lo:lo + 2].contiguous().view(torch.float16).float()


def _shifts(*vals: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(nb, 16) bytes -> (nb, 32) values: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(nb, 4) bytes of a little-endian uint32 -> (nb, 32) bits, bit j = element j."""
    return ((qh.unsqueeze(-1) >> _shifts(*range(8), device=qh.device)) & 1).reshape(-1, 32)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12 packed bytes (nb, 12) -> 6-bit scales and mins (nb, 8) (llama.cpp get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _decode_blocks(b: torch.Tensor, t: str) -> torch.Tensor:
    """uint8 blocks (nb, bytes per block) of type `t` -> fp32 (nb, weights per block)."""
    nb, dev = b.shape[0], b.device
    if t == "Q8_0":
        return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()
    if t in ("Q4_0", "Q4_1"):
        q = _nibbles(b[:, -16:]).float()
        return _f16(b, 0) * (q - 8.0) if t == "Q4_0" else _f16(b, 0) * q + _f16(b, 2)
    if t in ("Q5_0", "Q5_1"):
        q = (_nibbles(b[:, -16:]) | (_bits32(b[:, -20:-16]) << 4)).float()
        return _f16(b, 0) * (q - 16.0) if t == "Q5_0" else _f16(b, 0) * q + _f16(b, 2)
    if t == "Q2_K":
        sc, d, dmin = b[:, :16], _f16(b, 80), _f16(b, 82)
        dl = (d * (sc & 0x0F).float()).reshape(nb, 16, 1)
        ml = (dmin * (sc >> 4).float()).reshape(nb, 16, 1)
        q = (b[:, 16:80].reshape(nb, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 1, 4, 1)) & 3
        return (dl * q.reshape(nb, 16, 16).float() - ml).reshape(nb, QK_K)
    if t == "Q3_K":
        hmask, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b, 108)
        lo = (s[:, :8].reshape(nb, 1, 8) >> _shifts(0, 4, device=dev).reshape(1, 2, 1)).reshape(nb, 16)
        hi = (s[:, 8:].reshape(nb, 1, 4) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 4, 1)).reshape(nb, 16)
        sc = ((lo & 0x0F) | ((hi & 3) << 4)).to(torch.int8) - 32
        dl = (d * sc.float()).reshape(nb, 16, 1)
        ql = (qs.reshape(nb, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 1, 4, 1)).reshape(nb, 16, 16) & 3
        qh = (hmask.reshape(nb, 1, 1, 32) >> _shifts(*range(8), device=dev).reshape(1, 1, 8, 1)).reshape(nb, 16, 16) & 1
        q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)  # a set hmask bit means no -4 offset
        return (dl * q.float()).reshape(nb, QK_K)
    if t in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scale_min(b[:, 4:16])
        dl = (d * sc.float()).reshape(nb, 8, 1)
        ml = (dmin * mn.float()).reshape(nb, 8, 1)
        q = (b[:, -128:].reshape(nb, 4, 1, 32) >> _shifts(0, 4, device=dev).reshape(1, 1, 2, 1)) & 0x0F
        q = q.reshape(nb, 8, 32)
        if t == "Q5_K":
            qh = (b[:, 16:48].reshape(nb, 1, 1, 32) >> _shifts(*range(8), device=dev).reshape(1, 1, 8, 1)) & 1
            q = q | (qh.reshape(nb, 8, 32) << 4)
        return (dl * q.float() - ml).reshape(nb, QK_K)
    if t == "Q6_K":
        d = _f16(b, 208)
        dl = (d * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(nb, 16, 1)
        ql = (b[:, :128].reshape(nb, 2, 1, 64) >> _shifts(0, 4, device=dev).reshape(1, 1, 2, 1)) & 0x0F
        qh = (b[:, 128:192].reshape(nb, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 1, 4, 1)) & 3
        q = (ql.reshape(nb, 8, 32) | (qh.reshape(nb, 8, 32) << 4)).to(torch.int8) - 32
        return (dl * q.reshape(nb, 16, 16).float()).reshape(nb, QK_K)
    raise ValueError(f"unsupported GGUF tensor type {t} (qlora70 decodes {', '.join(DECODABLE)})")


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """GGUF bytes (uint8 [nbytes]) of `type_name` -> fp32 tensor of `shape` (row-major), decoded in chunks of
    `_CHUNK_WEIGHTS` weights so the temporaries stay small next to the one output tensor."""
    n = math.prod(shape)
    if type_name == "F32":
        return raw.view(torch.float32).reshape(shape).clone()
    if type_name in ("F16", "BF16"):
        return raw.view(torch.float16 if type_name == "F16" else torch.bfloat16).float().reshape(shape)
    if type_name not in DECODABLE:
        raise ValueError(f"unsupported GGUF tensor type {type_name} (qlora70 decodes {', '.join(DECODABLE)})")
    bs, bb = BLOCK[type_name]
    if n % bs or raw.numel() != n // bs * bb:
        raise ValueError(f"{type_name} tensor of shape {tuple(shape)}: expected {n // bs * bb} bytes "
                         f"({n / bs:g} blocks of {bb}), got {raw.numel()}")
    blocks = raw.view(-1, bb)
    out = torch.empty(n // bs, bs, dtype=torch.float32, device=raw.device)
    step = max(1, _CHUNK_WEIGHTS // bs)
    for s in range(0, blocks.shape[0], step):
        out[s:s + step] = _decode_blocks(blocks[s:s + step], type_name)
    return out.reshape(shape)


# ---- encoders for the 32-weight block types (ggml's quantize_row_*_ref, bit-exact) ---------------------------------
def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(nb, 32) values < 16 -> (nb, 16) bytes: element j in the low nibble of byte j, element j + 16 in the high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp32 (nb, 1) -> its fp16 (round to nearest even, as GGML_FP32_TO_FP16) as (nb, 2) bytes."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per row (the first one on ties), (nb, 1)."""
    return torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)  # C 1.0f/d (not reciprocal())


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero."""
    a = x.abs()
    fl = a.floor()
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _encode_blocks32(x: torch.Tensor, t: str) -> torch.Tensor:
    """fp32 blocks (nb, 32) -> uint8 (nb, bytes per block) for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0."""
    if t == "Q8_0":
        d = x.abs().amax(dim=1, keepdim=True) / 127
        q = _round_away(x * _inv(d)).to(torch.int8).view(torch.uint8)
        return torch.cat([_half_bytes(d), q], dim=1)
    if t in ("Q4_0", "Q5_0"):
        half = 8.0 if t == "Q4_0" else 16.0
        d = _absmax_signed(x) / -half
        q = torch.trunc(x * _inv(d) + (half + 0.5)).clamp(0, 2 * half - 1).to(torch.uint8)
        head = [_half_bytes(d)]
    else:  # Q4_1 / Q5_1
        top = 15.0 if t == "Q4_1" else 31.0
        mn, mx = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        d = (mx - mn) / top
        q = torch.trunc((x - mn) * _inv(d) + 0.5).clamp(0, top).to(torch.uint8)
        head = [_half_bytes(d), _half_bytes(mn)]
    if t in ("Q5_0", "Q5_1"):
        bits = (q >> 4).reshape(-1, 4, 8) << torch.arange(8, dtype=torch.uint8, device=x.device)
        head.append(bits.sum(dim=2, dtype=torch.uint8))  # disjoint bits: the sum is the OR
        q = q & 0x0F
    return torch.cat(head + [_pack_nibbles(q)], dim=1)


def encode_rows(w: torch.Tensor, type_name: str, encode_blocks) -> torch.Tensor:
    """fp32 [rows, cols] -> uint8 [rows, row_bytes], encoding `_CHUNK_WEIGHTS` weights at a time with
    `encode_blocks(blocks (nb, block weights) fp32, type_name) -> (nb, block bytes) uint8`."""
    if w.dim() != 2:
        raise ValueError(f"encode {type_name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    rb = row_bytes(type_name, cols)
    bs, bb = BLOCK[type_name]
    x = w.detach().to(torch.float32).contiguous().reshape(-1, bs)
    if not torch.isfinite(x).all():
        raise ValueError(f"encode {type_name}: the weight has NaN/Inf values; fix the model before exporting")
    out = torch.empty(x.shape[0], bb, dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK_WEIGHTS // bs)
    for s in range(0, x.shape[0], step):
        out[s:s + step] = encode_blocks(x[s:s + step], type_name)
    return out.reshape(rows, rb)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, cols] (cols % 32 == 0) -> Q8_0 bytes uint8 [rows, cols / 32 * 34], bit-exact with ggml's reference
    (d = absmax / 127, q = round-half-away(x / d), d stored as fp16)."""
    return encode_rows(w, "Q8_0", _encode_blocks32)
