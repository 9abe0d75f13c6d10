"""GGUF encoders for the K-quants (Q4_K, Q5_K, Q6_K), the `encode` dispatcher for every exportable type, and the
per-tensor type choice of llama.cpp's `llama-quantize` (the Q4_K_M / Q5_K_M mixtures and the row-size fallbacks).

The K-quant encoders follow ggml's `quantize_row_q{4,5,6}_K_ref` (ggml-quants.c: make_qkx2_quants for Q4_K/Q5_K,
make_qx_quants for Q6_K), which is what llama-quantize runs without an importance matrix. They are vectorized over
sub-blocks, but every sum over a sub-block's weights is accumulated sequentially in float32 in the C loop's order and
`nearest_int` is ggml's magic-number rounding, so the result can be compared byte for byte with ggml's. Tensors are
laid out (weights per sub-block, sub-blocks) so each sequential step is one contiguous vector op.
"""
from __future__ import annotations

import numpy as np
import torch

from .gguf_quants import BLOCK, _encode_blocks32, encode_rows

_F = np.float32


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml nearest_int: round half to even via (f + 1.5 * 2^23) and its low mantissa bits; int32."""
    return ((f + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _sdiv(a: float, t: torch.Tensor) -> torch.Tensor:
    """a / t in float32 (C float division; torch's `a / t` is `t.reciprocal() * a`, which rounds differently)."""
    return torch.full_like(t, a) / t


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in C loop order (((t0 + t1) + t2) + ...), float32; t (n, B) -> (B,)."""
    s = t[0].clone()
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml make_qkx2_quants (use_mad=false) for B sub-blocks at once. x, w: (n, B) fp32.
    Returns (scale (B,), the_min (B,) = -min >= 0, L (n, B) int32 in [0, nmax])."""
    mn = mn0 = torch.clamp(x.amin(dim=0), max=0.0)  # "if (min > 0) min = 0"
    mx = x.amax(dim=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = _sdiv(float(nmax), rng)
    scale = _sdiv(1.0, iscale)
    L = torch.clamp(_nearest_int(iscale * (x - mn)), 0, nmax)
    diff = scale * L.float() + mn - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        num = _F(_F(rmin) + _F(rdelta) * _F(step)) + _F(nmax)
        rng = torch.where(flat, torch.ones_like(mx), mx - mn)  # C reuses `min`, updated by the best trial so far
        iscale = _sdiv(float(num), rng)
        la = torch.clamp(_nearest_int(iscale * (x - mn)), 0, nmax)
        lf = la.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        diff = this_scale * lf + this_min - x
        cur = _seq_sum(w * (diff * diff))
        upd = (D > 0) & (cur < best)
        L = torch.where(upd, la, L)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -torch.where(flat, mn0, mn), L


def _make_qx(x: torch.Tensor, nmax: int):
    """ggml make_qx_quants(rmse_type=1, no importance weights) for B groups: x (n, B) fp32 ->
    (scale (B,), L (n, B) int32 in [0, 2 * nmax))."""
    amax, idx = x.abs().max(dim=0)  # first index of the largest |x| (C: strict '>')
    mx = torch.gather(x, 0, idx.unsqueeze(0))[0]
    zero = amax < 1e-15  # GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def trial(iscale):
        lv = torch.clamp(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = lv.float()
        return lv, _seq_sum(w * x * lf), _seq_sum(w * lf * lf)

    lv, sumlx, suml2 = trial(_sdiv(float(-nmax), mx))
    L = lv + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = trial(_sdiv(float(-(_F(nmax) + _F(0.1) * _F(step))), mx))
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(upd, lv + nmax, L)
        scale = torch.where(upd, sumlx / suml2, scale)
        best = torch.where(upd, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, torch.zeros_like(L), L)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 6-bit scales and mins (nb, 8) int -> the 12 packed bytes (nb, 12) uint8."""
    out = torch.zeros(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out.to(torch.uint8)


def _encode_q45k(x: torch.Tensor, t: str) -> torch.Tensor:
    """fp32 super-blocks (nb, 256) -> Q4_K (nb, 144) / Q5_K (nb, 176) bytes (ggml quantize_row_q{4,5}_K_ref)."""
    nb = x.shape[0]
    nmax, rmin, nstep = (15, -1.0, 20) if t == "Q4_K" else (31, -0.5, 15)
    xs = x.reshape(nb * 8, 32).t().contiguous()  # (32, nb*8): sub-blocks as columns
    # C sqrtf is correctly rounded; torch's vectorized float32 sqrt is not always (1 ulp off), float64 then round is
    av_x = torch.sqrt((_seq_sum(xs * xs) / 32).double()).float()
    w = av_x + xs.abs()
    scales, mins, L = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = scales.amax(dim=1, keepdim=True), mins.amax(dim=1, keepdim=True)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))  # +0.0 like C, never -0.0
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_s = torch.where(max_scale > 0, _sdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, _sdiv(63.0, max_min), torch.zeros_like(max_min))
    ls = torch.clamp(_nearest_int(inv_s * scales) & 0xFF, max=63)  # uint8 cast, then MIN(63)
    lm = torch.clamp(_nearest_int(inv_m * mins) & 0xFF, max=63)
    d16, dm16 = (max_scale / 63.0).half(), (max_min / 63.0).half()
    d = (d16.float() * ls.float()).reshape(nb * 8)  # (nb*8,)
    dm = (dm16.float() * lm.float()).reshape(nb * 8)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    L2 = torch.clamp(_nearest_int((xs + dm) / safe), 0, nmax)
    L = torch.where(d == 0, L, L2)  # a zero sub-block scale keeps make_qkx2's levels (C: `continue`)
    L = L.t().reshape(nb, 4, 2, 32)  # (block, pair of 64, half, 32)
    lo = (L & 0x0F)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(nb, 128)
    head = [d16.view(torch.uint8).reshape(nb, 2), dm16.view(torch.uint8).reshape(nb, 2), _pack_k_scales(ls, lm)]
    if t == "Q5_K":
        hb = (L >> 4).reshape(nb, 8, 32)  # bit k of qh[j] = high bit of element 32 k + j
        qh = (hb << torch.arange(8, dtype=torch.int32, device=x.device).reshape(1, 8, 1)).sum(dim=1)
        head.append(qh.to(torch.uint8))
    return torch.cat(head + [qs.to(torch.uint8)], dim=1)


def _encode_q6k(x: torch.Tensor) -> torch.Tensor:
    """fp32 super-blocks (nb, 256) -> Q6_K (nb, 210) bytes (ggml quantize_row_q6_K_ref)."""
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16).t().contiguous()  # (16, nb*16)
    scales, L = _make_qx(xs, 32)
    scales = scales.reshape(nb, 16)
    amax, idx = scales.abs().max(dim=1, keepdim=True)
    max_scale = torch.gather(scales, 1, idx)
    zero = amax < 1e-15
    iscale = _sdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d16 = _sdiv(1.0, iscale).half()
    sc = torch.clamp(_nearest_int(iscale * scales), max=127).to(torch.int8)  # C int8_t store wraps
    d = (d16.float() * sc.float()).reshape(nb * 16)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    L2 = torch.clamp(_nearest_int(xs / safe), -32, 31) + 32
    L = torch.where(d == 0, L, L2).t().reshape(nb, 2, 4, 32)  # (block, half of 128, quarter, 32)
    ql = (L[:, :, 0:2] & 0x0F) | ((L[:, :, 2:4] & 0x0F) << 4)  # (nb, 2, 2, 32): bytes l and l+32 of each 64
    qh = ((L >> 4) << torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=x.device).reshape(1, 1, 4, 1)).sum(dim=2)
    out = torch.cat([ql.reshape(nb, 128).to(torch.uint8), qh.reshape(nb, 64).to(torch.uint8),
                     sc.view(torch.uint8), d16.view(torch.uint8).reshape(nb, 2)], dim=1)
    return torch.where(zero, torch.zeros_like(out), out)


def _encode_blocks(x: torch.Tensor, t: str) -> torch.Tensor:
    if t in ("Q4_K", "Q5_K"):
        return _encode_q45k(x, t)
    if t == "Q6_K":
        return _encode_q6k(x)
    return _encode_blocks32(x, t)


ENCODABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def encode(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """A 2-D weight [rows, cols] (any float dtype) -> its GGUF bytes uint8 [rows, row bytes] (F32/F16/BF16 as their
    raw little-endian bytes; BF16 and F16 round to nearest even like ggml)."""
    if type_name not in ENCODABLE:
        raise ValueError(f"cannot encode GGUF type {type_name!r} (qlora70 encodes {', '.join(ENCODABLE)})")
    if type_name in ("F32", "F16", "BF16"):
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name]
        t = w.detach().to(torch.float32).to(dt).contiguous()
        return t.view(torch.uint8).reshape(t.shape[0], -1)
    return encode_rows(w, type_name, _encode_blocks)


# ---- llama-quantize's per-tensor type choice (llama.cpp src/llama-quant.cpp, llama_tensor_get_type) ----------------
# export name -> (llama_ftype id written as general.file_type, base tensor type)
FTYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"), "Q8_0": (7, "Q8_0"), "Q4_0": (2, "Q4_0"),
    "Q4_1": (3, "Q4_1"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"), "Q6_K": (18, "Q6_K"), "Q4_K_S": (14, "Q4_K"),
    "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
}
PURE_ALIASES = {"Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}  # one type for every weight (llama-quantize --pure)
EXPORT_QTYPES = tuple(FTYPES) + tuple(PURE_ALIASES)
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: str, cols: int) -> str:
    """A type whose block divides the row (llama.cpp tensor_type_fallback): K-quants -> 32-block types -> F16."""
    if cols % BLOCK[t][0]:
        t = _K_FALLBACK.get(t, t)
        if cols % BLOCK[t][0]:
            t = "F16"
    return t


def tensor_types(tensors: list[tuple[str, tuple[int, ...]]], qtype: str, n_layer: int, n_head: int,
                 n_head_kv: int, pure: bool = False) -> dict[str, str]:
    """{GGUF tensor name: tensor type} for an export as `qtype`, as llama-quantize composes it for a Llama
    (no importance matrix): `tensors` [(GGUF name, row-major shape)] in file order. 1-D tensors are F32. For the
    quantized types the output (or the tied token embedding) is Q6_K (Q8_0 if its rows are not whole 256-blocks);
    the _M mixtures give Q6_K to attn_v and ffn_down of the layers `use_more_bits` picks (the first and last eighth and
    every third between), _S gives Q5_K to the first 4 attn_v and the first eighth of ffn_down; a 70B-shaped model
    (80 layers, GQA) gets Q5_K attn_v for Q4_K. Rows that are not whole blocks fall back (Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0, then F16). `pure` (or qtype "Q4_K"/"Q5_K") skips the mixture rules, keeping the fallbacks."""
    if qtype in PURE_ALIASES:
        qtype, pure = PURE_ALIASES[qtype], True
    if qtype not in FTYPES:
        raise ValueError(f"GGUF export type must be one of {', '.join(EXPORT_QTYPES)}, got {qtype!r}")
    base = FTYPES[qtype][1]
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    n_v = sum(1 for n in names if n.endswith("attn_v.weight"))
    is_70b = n_layer == 80 and n_head != n_head_kv
    i_v = i_down = 0
    out = {}
    for name, shape in tensors:
        if len(shape) < 2:
            out[name] = "F32"
            continue
        cols = shape[-1]
        if base in ("F32", "F16", "BF16"):
            out[name] = base
            continue
        t = base
        if not pure:
            if name == "output.weight" or (tied and name == "token_embd.weight"):
                t = "Q8_0" if cols % BLOCK[base][0] else ("Q6_K" if base != "Q8_0" else base)
            elif name.endswith("attn_v.weight"):
                if qtype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_v, n_v):
                    t = "Q6_K"
                elif qtype == "Q4_K_S" and i_v < 4:
                    t = "Q5_K"
                if is_70b and t == "Q4_K":
                    t = "Q5_K"
                i_v += 1
            elif name.endswith("ffn_down.weight"):
                if qtype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_down, n_layer):
                    t = "Q6_K"
                elif qtype == "Q4_K_S" and i_down < n_layer // 8:
                    t = "Q5_K"
                i_down += 1
        out[name] = _fallback(t, cols)
    return out
