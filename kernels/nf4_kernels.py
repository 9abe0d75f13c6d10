"""Triton kernels for NF4 (+ double quantization) weights in the bitsandbytes byte layout.

Three launchers, called only by `qlora70.ops` (each checks its inputs, allocates the output and launches):
  dequantize(q, dtype, out=None)          packed NF4 -> dense [N, K] in one kernel (nested absmax decoded inside)
  linear_forward(x2d, q, bias=None)       y = x @ W^T   (M, K) -> (M, N)
  linear_backward_input(dy2d, q)          dx = dy @ W   (M, N) -> (M, K)
W is [N, K] = [out_features, in_features], flattened row-major, packed two codes per byte (even element in the high
nibble), scaled per `blocksize` elements. Both codes of a byte are decoded with one 8-byte lookup in a 256-entry pair
table built from quant_map. Decoding is fp32 math then one cast, without FMA contraction (enable_fp_fusion=False), so it
is bit-exact with `qlora70.nf4.dequantize_nf4` on GPU as well as in the interpreter.

Matmul strategy: for M <= FUSED_MAX_M a fused kernel decodes W tiles inside the reduction loop (weight bytes are read
once, 4.1 bits per weight, the dense weight is never materialized) and splits the reduction over extra programs so
small-N shapes still fill the GPU; for larger M the weight is decoded into a reusable workspace and cuBLAS does the
matmul (at large M the matmul is compute-bound and the decode is amortized over M rows).

All index math that can pass 2^31 (flat element and byte offsets) is int64: the program ids and row indices are cast to
int64 before they are multiplied by a row length.

Works on triton 3.6 (GPU) and 3.8, and under TRITON_INTERPRET=1 on CPU (fp32/fp16 there; the interpreter gets bf16
arithmetic wrong). TRITON_INTERPRET must be set before this module is imported.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from qlora70.nf4 import NF4Weight, workspace_view

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"



def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}; unset it to use {default}") \
            from None


# Largest M that uses the fused dequant-matmul kernels; above it: dequantize to a workspace + cuBLAS.
# UNMEASURED default (no GPU was available when this was written): `python benchmarks/bench_kernels.py --quick` on a
# GPU prints "recommended FUSED_MAX_M": the largest tested M for which (and for every smaller tested M) the fused
# kernels beat the buffer path, forward + backward, summed over one Llama-2-70B decoder layer. Env override:
# QLORA70_FUSED_MAX_M.
FUSED_MAX_M = _env_int("QLORA70_FUSED_MAX_M", 16)

# Launch configurations. GPU defaults were chosen WITHOUT a GPU, from ptxas register / spill / shared-memory counts
# for sm_90 (`python benchmarks/bench_kernels.py --compile-check`): no spills, <= 128 registers per thread at M <= 16.
# On a GPU, `bench_kernels.py` also times alternatives (its "tune" section; --no-tune skips it) and prints the best.
# The interpreter configs use big tiles (few programs).
DEQUANT_CONFIG = {"elements": 4096, "num_warps": 8}  # elements per program (whole quant blocks)
FWD_CONFIG = {"block_m": None, "block_n": 32, "block_k": None, "split": None, "num_warps": 4, "num_stages": 2}
BWD_CONFIG = {"block_m": None, "block_n": 64, "block_k": 64, "split": None, "num_warps": 4, "num_stages": 2}
BWD_CONFIG_FP32 = {**BWD_CONFIG, "block_n": 32, "block_k": 32}  # exact-fp32 dot: bigger tiles spill registers
INTERPRET_DEQUANT_CONFIG = {"elements": 1 << 16, "num_warps": 4}
INTERPRET_FWD_CONFIG = {"block_m": None, "block_n": 128, "block_k": 256, "split": None, "num_warps": 4, "num_stages": 1}
INTERPRET_BWD_CONFIG = {"block_m": None, "block_n": 256, "block_k": 128, "split": None, "num_warps": 4, "num_stages": 1}

# Reuse one dense scratch buffer per (device, dtype) for the large-M path instead of allocating [N, K] each call.
USE_WORKSPACE = True

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------------
# Triton device code
# ---------------------------------------------------------------------------------------------------------------------
@triton.jit
def _absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, blk, mask,
            DQ: tl.constexpr, NESTED_BS: tl.constexpr):
    """fp32 scale of quant blocks `blk` (int64, any shape). With double quantization:
    absmax = nested_map[code] * nested_absmax[blk // NESTED_BS] + offset (same op order as the reference)."""
    if DQ:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        am = tl.load(nested_map_ptr + code) * scale + offset
    else:
        am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return am


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, lut_ptr, nested_absmax_ptr, nested_map_ptr, out_ptr, offset,
                    n_elements, n_bytes, n_blocks,
                    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, DQ: tl.constexpr, NESTED_BS: tl.constexpr):
    """Each program decodes ROWS whole quant blocks: a (ROWS, BLOCKSIZE // 2) tile of packed bytes (contiguous in
    memory, loaded as wide vectors), one scale per row, one 8-byte lookup per byte in the 256-entry pair table, and one
    contiguous store of ROWS * BLOCKSIZE elements."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) quant-block ids, int64
    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    p = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0x77).to(tl.int32)
    am = _absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, rows, rows < n_blocks, DQ, NESTED_BS)
    pair = tl.load(lut_ptr + (p * 2)[:, :, None] + tl.arange(0, 2)[None, None, :])  # (ROWS, HALF, 2): both codes
    vals = tl.reshape(pair * am[:, None, None], (ROWS, BLOCKSIZE))
    elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, vals.to(out_ptr.dtype.element_ty), mask=elem < n_elements)


@triton.jit
def _w_tile(packed_ptr, absmax_ptr, lut_ptr, nested_absmax_ptr, nested_map_ptr, offset, offs_n, k0, N, K,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, SUB: tl.constexpr,
            DQ: tl.constexpr, NESTED_BS: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_K) tile of W: rows offs_n (int64), columns k0 .. k0 + BLOCK_K. Out-of-range entries are
    finite (code 7 = 0.0 where the bytes are masked); callers zero the matching x/dy entries.

    ALIGNED (K % BLOCKSIZE == 0, so rows start on byte and quant-block boundaries): the tile is read as
    (BLOCK_N, BLOCK_K // SUB, SUB // 2) contiguous bytes with one scale per SUB-element sub-block (SUB = min(BLOCK_K,
    BLOCKSIZE)). Otherwise every element computes its own flat index, byte, nibble and quant block (odd K)."""
    if ALIGNED:
        NSUB: tl.constexpr = BLOCK_K // SUB
        ks = k0 + tl.arange(0, NSUB) * SUB  # (NSUB,) first column of each sub-block
        m2 = (offs_n[:, None] < N) & (ks[None, :] < K)  # (BLOCK_N, NSUB)
        blk = offs_n[:, None] * (K // BLOCKSIZE) + ks[None, :] // BLOCKSIZE
        am = _absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, blk, m2, DQ, NESTED_BS)
        byte = (offs_n[:, None] * (K // 2) + ks[None, :] // 2)[:, :, None] + tl.arange(0, SUB // 2)[None, None, :]
        p = tl.load(packed_ptr + byte, mask=m2[:, :, None], other=0x77).to(tl.int32)  # (BLOCK_N, NSUB, SUB // 2)
        pair = tl.load(lut_ptr + (p * 2)[:, :, :, None] + tl.arange(0, 2)[None, None, None, :])  # (.., SUB // 2, 2)
        w = tl.reshape(pair * am[:, :, None, None], (BLOCK_N, BLOCK_K))
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (k[None, :] < K)
        idx = offs_n[:, None] * K + k[None, :]  # (BLOCK_N, BLOCK_K) flat element index, int64
        p = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0x77).to(tl.int32)
        am = _absmax(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, idx // BLOCKSIZE, mask, DQ, NESTED_BS)
        w = tl.load(lut_ptr + p * 2 + (idx & 1)) * am  # even element: high nibble (pair slot 0)
    return w


@triton.jit
def _fwd_kernel(x_ptr, packed_ptr, absmax_ptr, lut_ptr, nested_absmax_ptr, nested_map_ptr, offset, bias_ptr, out_ptr,
                M, N, K, stride_xm, stride_xk, stride_os, stride_om, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                SUB: tl.constexpr, DQ: tl.constexpr, NESTED_BS: tl.constexpr, ALIGNED: tl.constexpr,
                HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """out[s, m, n] = sum_{k in split s} x[m, k] * W[n, k]  (+ bias[n]; cast to out's dtype). Grid (M/BM, N/BN, S).

    Computed transposed, acc (BN, BM) += W_tile (BN, BK) @ x_tile^T (BK, BM): the decoded W tile is the dot's left
    operand in its natural layout (no register transpose of the big operand; the weight rows fill the MMA's M side,
    which small M cannot), and x^T is read straight from memory through strides."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_s * k_per_split  # k_per_split is a multiple of BLOCK_K, so tiles never straddle two splits
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None] * stride_xk,
                     mask=(offs_m[None, :] < M) & (kk[:, None] < K), other=0.0)  # (BK, BM)
        w = _w_tile(packed_ptr, absmax_ptr, lut_ptr, nested_absmax_ptr, nested_map_ptr, offset, offs_n, k0, N, K,
                    BLOCK_N, BLOCK_K, BLOCKSIZE, SUB, DQ, NESTED_BS, ALIGNED)  # (BN, BK) fp32
        acc += tl.dot(w.to(xt.dtype), xt, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


@triton.jit
def _bwd_kernel(dy_ptr, packed_ptr, absmax_ptr, lut_ptr, nested_absmax_ptr, nested_map_ptr, offset, out_ptr,
                M, N, K, stride_dm, stride_dn, stride_os, stride_om, n_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                SUB: tl.constexpr, DQ: tl.constexpr, NESTED_BS: tl.constexpr, ALIGNED: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """out[s, m, k] = sum_{n in split s} dy[m, n] * W[n, k]. Grid (M/BM, K/BK, S). Each program walks down the rows of
    its column slice of W in natural [N, K] layout (no transpose needed: W tile (BN, BK) is the dot's right operand)."""
    pid_m, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k.to(tl.int64) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        nn = tl.arange(0, BLOCK_N).to(tl.int64) + n0
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + nn[None, :] * stride_dn,
                     mask=(offs_m[:, None] < M) & (nn[None, :] < N), other=0.0)  # (BM, BN)
        w = _w_tile(packed_ptr, absmax_ptr, lut_ptr, nested_absmax_ptr, nested_map_ptr, offset, nn, k0, N, K,
                    BLOCK_N, BLOCK_K, BLOCKSIZE, SUB, DQ, NESTED_BS, ALIGNED)  # (BN, BK) fp32
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=DOT_PREC)
    out = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_k[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------------------------------
# Host-side launchers
# ---------------------------------------------------------------------------------------------------------------------
def _check_weight(q: NF4Weight, who: str) -> None:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"{who}: expected an NF4Weight, got {type(q).__name__}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{who}: the weight is on {q.device}; the Triton kernels need CUDA tensors (or "
                         "TRITON_INTERPRET=1 set before import). Use backend='torch' for CPU tensors")
    if q.blocksize % 2:
        raise ValueError(f"{who}: blocksize must be even, got {q.blocksize}")


_LUT_BY_CONTENT: dict[tuple[torch.device, bytes], torch.Tensor] = {}  # (device, fp32 bytes of the table) -> LUT
_LUT_MEMO: dict[int, tuple[weakref.ref, int, tuple[torch.device, bytes]]] = {}  # id(table) -> (ref, _version, key)


def clear_lut_cache() -> None:
    """Forget every pair table (needed only after a quant_map was changed without a torch op seeing it)."""
    _LUT_BY_CONTENT.clear()
    _LUT_MEMO.clear()


def _table_key(quant_map: torch.Tensor) -> tuple[torch.device, bytes]:
    """(device, the table's fp32 bytes). Reading the 64 bytes of a CUDA table synchronizes the stream, so the key of
    each table tensor is remembered while that tensor object lives and its in-place version is unchanged."""
    memo = _LUT_MEMO.get(id(quant_map))
    if memo is not None and memo[0]() is quant_map and memo[1] == quant_map._version:
        return memo[2]
    key = (quant_map.device, quant_map.detach().reshape(-1).float().cpu().numpy().tobytes())
    if len(_LUT_MEMO) >= 4096:
        for k in [k for k, m in _LUT_MEMO.items() if m[0]() is None]:
            del _LUT_MEMO[k]
        if len(_LUT_MEMO) >= 4096:
            _LUT_MEMO.clear()
    _LUT_MEMO[id(quant_map)] = (weakref.ref(quant_map), quant_map._version, key)
    return key


def _pair_lut(quant_map: torch.Tensor) -> torch.Tensor:
    """fp32 [256, 2]: (quant_map[b >> 4], quant_map[b & 15]) for every byte b, so a kernel decodes both codes of a
    byte with one 8-byte lookup. Cached by the table's CONTENT (and device): every layer's NF4 table shares one LUT, and
    a new or changed table never hits another table's entry, whatever its address (FSDP's all-gather re-allocates the
    tables at every step and reuses addresses across layers). A table changed behind torch's back (no in-place op,
    e.g. through numpy or under `_unsafe_preserve_version_counter`) keeps its old LUT until `clear_lut_cache()`."""
    key = _table_key(quant_map)
    lut = _LUT_BY_CONTENT.get(key)
    if lut is None:
        if len(_LUT_BY_CONTENT) >= 64:
            _LUT_BY_CONTENT.clear()
        qm = quant_map.detach().reshape(-1).float()
        b = torch.arange(256, device=quant_map.device)
        lut = torch.stack([qm[b >> 4], qm[b & 15]], dim=1).contiguous()  # (256, 2)
        _LUT_BY_CONTENT[key] = lut
    return lut


def _weight_args(q: NF4Weight) -> tuple:
    """(packed, absmax, pair_lut, nested_absmax, nested_map, offset) as contiguous device tensors + a float.
    Without double quantization the nested slots get the absmax tensor as a never-read placeholder."""
    packed = q.packed.reshape(-1).contiguous()
    absmax = q.absmax.contiguous()
    lut = _pair_lut(q.quant_map)
    if q.double_quant:
        return (packed, absmax, lut, q.nested_absmax.float().contiguous(), q.nested_quant_map.float().contiguous(),
                float(q.offset))
    return packed, absmax, lut, absmax, absmax, 0.0


def _launch_opts(config: dict, defaults: dict, allowed: tuple[str, ...], who: str) -> dict:
    unknown = set(config) - set(allowed)
    if unknown:
        raise ValueError(f"{who}: unknown config keys {sorted(unknown)}; allowed: {list(allowed)}")
    return {**defaults, **{k: v for k, v in config.items() if v is not None}}


def _check_pow2(who: str, name: str, v: int, lo: int) -> None:
    if not isinstance(v, int) or v < lo or v & (v - 1):
        raise ValueError(f"{who}: {name} must be a power of two >= {lo}, got {v!r}")


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None, *,
               config: dict | None = None) -> torch.Tensor:
    """Decode `q` to a dense [N, K] tensor of `dtype` (default q.dtype) in one kernel launch.

    out: optional caller-owned buffer of shape q.shape and `dtype` on q's device (e.g. a reused workspace);
    non-contiguous buffers are filled through a temporary. config: overrides of DEQUANT_CONFIG
    ("elements" per program, a power of two, rounded up to whole quant blocks; "num_warps").
    """
    _check_weight(q, "dequantize")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize: dtype must be float32/float16/bfloat16, got {dtype}")
    cfg = _launch_opts(config or {}, INTERPRET_DEQUANT_CONFIG if INTERPRET else DEQUANT_CONFIG,
                       ("elements", "num_warps"), "dequantize")
    _check_pow2("dequantize", "config['elements']", cfg["elements"], 1)
    if out is not None:
        if tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.device != q.device:
            raise ValueError(f"dequantize: out must be {tuple(q.shape)} {dtype} on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if not out.is_contiguous():
            out.copy_(dequantize(q, dtype, config=config))
            return out
    else:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows = max(1, cfg["elements"] // q.blocksize)  # quant blocks per program
    packed, absmax, lut, nabs, nmap, offset = _weight_args(q)
    grid = (triton.cdiv(q.n_blocks, rows),)
    _dequant_kernel[grid](packed, absmax, lut, nabs, nmap, out, offset, q.numel, packed.numel(), q.n_blocks,
                          BLOCKSIZE=q.blocksize, ROWS=rows, DQ=q.double_quant, NESTED_BS=q.nested_blocksize,
                          num_warps=cfg["num_warps"], enable_fp_fusion=False)  # no FMA: bit-exact with the reference
    return out


# ---- matmul ---------------------------------------------------------------------------------------------------------
_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def clear_workspace() -> None:
    """Free the dense scratch buffers of the large-M path."""
    _WORKSPACE.clear()


def _dense_weight(q: NF4Weight, dtype: torch.dtype, keep: bool) -> torch.Tensor:
    """W decoded to [N, K] `dtype`, into the shared workspace unless the result must outlive this call (`keep`).
    The workspace is reused by the next call on the same device; kernels on one stream run in order, so the
    matmul that reads it finishes before the next decode overwrites it."""
    if keep or not USE_WORKSPACE:
        return dequantize(q, dtype)
    out = workspace_view(_WORKSPACE, (q.device, dtype), tuple(q.shape), dtype,
                         lambda n, dt: torch.empty(n, dtype=dt, device=q.device))
    return dequantize(q, dtype, out=out)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products unless torch itself allows TF32 matmuls; ignored for 16-bit inputs."""
    if dtype == torch.float32 and not (not INTERPRET and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


_FUSED_KEYS = ("block_m", "block_n", "block_k", "split", "num_warps", "num_stages")


def _fused_plan(M: int, R: int, O: int, device: torch.device, aligned: bool, config: dict | None, defaults: dict,
                red: str, who: str) -> dict:
    """Resolve tiles, warps, stages and the reduction split for a fused kernel. R: reduction length (K forward,
    N backward), O: the output length besides M; `red` names the reduction block key ("block_k" or "block_n")."""
    cfg = _launch_opts(config or {}, defaults, _FUSED_KEYS, who)
    if cfg.get("block_m") is None:
        cfg["block_m"] = max(16, min(64, triton.next_power_of_2(M)))
    if cfg.get("block_k") is None:  # forward reduction tile; smaller for bigger M tiles (triton 3.6 spills otherwise)
        cfg["block_k"] = 128 if cfg["block_m"] <= 16 else 64 if aligned else 32
    if not aligned and not (config or {}).get("num_stages"):
        cfg["num_stages"] = 1  # per-element gathers (odd K): pipelining them only costs shared memory and registers
    for k in ("block_m", "block_n", "block_k"):
        _check_pow2(who, f"config[{k!r}]", cfg[k], 16)
    br = cfg[red]
    bo = cfg["block_k" if red == "block_n" else "block_n"]
    split = cfg.get("split")
    if split is None:  # enough programs for ~4 resident per SM when there are few output tiles (small M or O)
        tiles = triton.cdiv(M, cfg["block_m"]) * triton.cdiv(O, bo)
        split = 1 if INTERPRET else max(1, min(triton.cdiv(4 * _num_sms(device), tiles), R // (4 * br)))
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"{who}: config['split'] must be an int >= 1, got {split!r}")
    per_split = triton.cdiv(triton.cdiv(R, split), br) * br  # a multiple of the reduction block
    cfg["split"], cfg["per_split"] = triton.cdiv(R, per_split), per_split
    return cfg


def _check_act(a: torch.Tensor, q: NF4Weight, feat: int, who: str, name: str) -> None:
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        raise ValueError(f"{who}: {name} must be a 2-D tensor, got {getattr(a, 'shape', type(a).__name__)}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: {name} must be float32/float16/bfloat16, got {a.dtype}")
    if a.shape[1] != feat:
        raise ValueError(f"{who}: {name} has {a.shape[1]} columns but the weight {tuple(q.shape)} needs {feat}")
    if a.device != q.device:
        raise ValueError(f"{who}: {name} is on {a.device} but the weight is on {q.device}")


def _bwd_defaults(dtype: torch.dtype) -> dict:
    if INTERPRET:
        return INTERPRET_BWD_CONFIG
    return BWD_CONFIG_FP32 if _dot_precision(dtype) == "ieee" else BWD_CONFIG


def _use_fused(M: int, fused: bool | None) -> bool:
    return M <= FUSED_MAX_M if fused is None else bool(fused)


def linear_forward(x2d: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None, *, fused: bool | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """y (M, N) = x2d (M, K) @ W^T (+ bias), in x2d's dtype, fp32 accumulation. No autograd (`qlora70.ops` wraps it).

    fused: None = fused kernel iff M <= FUSED_MAX_M; True / False forces the fused / workspace + cuBLAS path.
    config: overrides of FWD_CONFIG (block_m, block_n, block_k: powers of two >= 16; split: K splits, default enough
    programs to fill the GPU; num_warps, num_stages)."""
    _check_weight(q, "linear_forward")
    _check_act(x2d, q, q.shape[1], "linear_forward", "x")
    (M, K), N = x2d.shape, q.shape[0]
    if bias is not None and (tuple(bias.shape) != (N,) or bias.device != q.device):
        raise ValueError(f"linear_forward: bias must have shape ({N},) on {q.device}, got {tuple(bias.shape)} "
                         f"on {bias.device}")
    if M == 0:
        return x2d.new_empty((0, N))
    if not _use_fused(M, fused):
        keep = torch.is_grad_enabled() and x2d.requires_grad  # autograd would save the workspace view
        return torch.nn.functional.linear(x2d, _dense_weight(q, x2d.dtype, keep),
                                          None if bias is None else bias.to(x2d.dtype))
    aligned = K % q.blocksize == 0
    c = _fused_plan(M, K, N, x2d.device, aligned, config, INTERPRET_FWD_CONFIG if INTERPRET else FWD_CONFIG,
                    "block_k", "linear_forward")
    split = c["split"]
    out = torch.empty((split, M, N), dtype=x2d.dtype if split == 1 else torch.float32, device=x2d.device)
    packed, absmax, lut, nabs, nmap, offset = _weight_args(q)
    fuse_bias = bias is not None and split == 1
    grid = (triton.cdiv(M, c["block_m"]), triton.cdiv(N, c["block_n"]), split)
    _fwd_kernel[grid](x2d, packed, absmax, lut, nabs, nmap, offset, bias if fuse_bias else out, out,
                      M, N, K, x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1), c["per_split"],
                      BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], BLOCKSIZE=q.blocksize,
                      SUB=min(c["block_k"], q.blocksize), DQ=q.double_quant, NESTED_BS=q.nested_blocksize,
                      ALIGNED=aligned, HAS_BIAS=fuse_bias, DOT_PREC=_dot_precision(x2d.dtype),
                      num_warps=c["num_warps"], num_stages=c["num_stages"])
    if split == 1:
        return out[0]
    y = out.sum(0)  # (M, N) fp32
    if bias is not None:
        y += bias.float()
    return y.to(x2d.dtype)


def linear_backward_input(dy2d: torch.Tensor, q: NF4Weight, *, fused: bool | None = None,
                          config: dict | None = None) -> torch.Tensor:
    """dx (M, K) = dy2d (M, N) @ W, in dy2d's dtype with fp32 accumulation. W is stored [N, K]; the fused kernel
    reads (BN, BK) tiles in that natural layout (the tile is the dot's right operand), so W is never transposed.

    fused: as in `linear_forward`. config: overrides of BWD_CONFIG (split: N splits)."""
    _check_weight(q, "linear_backward_input")
    _check_act(dy2d, q, q.shape[0], "linear_backward_input", "dy")
    (M, N), K = dy2d.shape, q.shape[1]
    if M == 0:
        return dy2d.new_empty((0, K))
    if not _use_fused(M, fused):
        keep = torch.is_grad_enabled() and dy2d.requires_grad  # double backward would save the workspace view
        return dy2d @ _dense_weight(q, dy2d.dtype, keep)
    aligned = K % q.blocksize == 0
    c = _fused_plan(M, N, K, dy2d.device, aligned, config, _bwd_defaults(dy2d.dtype), "block_n",
                    "linear_backward_input")
    split = c["split"]
    out = torch.empty((split, M, K), dtype=dy2d.dtype if split == 1 else torch.float32, device=dy2d.device)
    packed, absmax, lut, nabs, nmap, offset = _weight_args(q)
    grid = (triton.cdiv(M, c["block_m"]), triton.cdiv(K, c["block_k"]), split)
    _bwd_kernel[grid](dy2d, packed, absmax, lut, nabs, nmap, offset, out,
                      M, N, K, dy2d.stride(0), dy2d.stride(1), out.stride(0), out.stride(1), c["per_split"],
                      BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], BLOCKSIZE=q.blocksize,
                      SUB=min(c["block_k"], q.blocksize), DQ=q.double_quant, NESTED_BS=q.nested_blocksize,
                      ALIGNED=aligned, DOT_PREC=_dot_precision(dy2d.dtype),
                      num_warps=c["num_warps"], num_stages=c["num_stages"])
    return out[0] if split == 1 else out.sum(0).to(dy2d.dtype)
