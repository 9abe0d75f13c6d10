"""LoftQ initialisation (arXiv 2310.08659): start the adapter at the NF4 quantization error of the base.

For a full-precision weight W [out, in], alternate T times (as `peft/utils/loftq_utils.py: loftq_init`):

    Q_t  = NF4(W - s B_{t-1} A_{t-1})          (B_0 A_0 = 0, so Q_1 is plain NF4 of W)
    L R  = rank-r SVD of W - dequant(Q_t)       (L = U_r sqrt(S_r) [out, r], R = sqrt(S_r) V_r^T [r, in])
    s B_t A_t = L R

The base keeps the NF4 bytes of the last Q_T (same blocksize / double quantization as the model's other 4-bit layers)
and the adapter starts at A_T, B_T, so dequant(Q_T) + s B A ~ W at step 0. The rank-r residual error is exact from the
singular values: ||E - L R||_F = sqrt(sum_{k > r} S_k^2).

Scaling convention. PEFT assigns A = R, B = L whatever the LoRA scale s = alpha / r, so its start reconstructs
dequant(Q) + s L R, which is W's quantization error only when alpha = r (PEFT's LoftQ examples use alpha = r for that
reason). Here A = R / sqrt(s), B = L / sqrt(s), so s B A = L R for any alpha (identical to PEFT when s = 1).

Streaming: `apply_loftq(model, get_weight)` walks the model's LoRA layers and asks `get_weight(name)` for one
full-precision weight at a time (e.g. a reader of the HF safetensors or GGUF checkpoint, decoded to float), so peak
extra memory is one fp32 weight plus its SVD.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layers import Linear4bit
from .lora import LoRALinear, lora_modules
from .nf4 import NF4Weight, quantize_nf4


@dataclass
class LoftQResult:
    """One weight's LoftQ start: the NF4 base, A [r, in], B [out, r] (fp32), and the relative reconstruction errors
    ||W - (dequant(Q) + s B A)||_F / ||W||_F: `nf4_error` for plain NF4 (B A = 0), `errors[t]` after iteration t+1."""

    q: NF4Weight
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    nf4_error: float
    errors: list[float]


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, scale: float = 1.0, iters: int = 1, blocksize: int = 64,
          double_quant: bool = True) -> LoftQResult:
    """LoftQ for one weight [out, in] (any float dtype; the math runs in fp32 on its device). See the module doc."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"loftq: weight must be a 2-D float tensor [out, in], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"loftq: rank r={r!r} must be an int in [1, min(out, in) = {min(weight.shape)}]")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"loftq: iters must be an int >= 1, got {iters!r}")
    if not scale > 0:
        raise ValueError(f"loftq: scale must be > 0, got {scale!r}")
    w = weight.float()
    w_norm = torch.linalg.norm(w).item() or 1.0
    res, errors, nf4_error = w, [], None
    for t in range(iters):
        q = quantize_nf4(res, blocksize, double_quant, dtype=weight.dtype)
        err = w - q.dequantize(torch.float32)  # (out, in)
        if nf4_error is None:
            nf4_error = torch.linalg.norm(err).item() / w_norm
        u, s, vh = torch.linalg.svd(err, full_matrices=False)
        root = s[:r].sqrt()
        left, right = u[:, :r] * root, root.unsqueeze(1) * vh[:r]  # (out, r), (r, in)
        errors.append(s[r:].pow(2).sum().sqrt().item() / w_norm)
        if t + 1 < iters:
            res = w - left @ right
        del u, vh, err
    k = 1.0 / math.sqrt(scale)
    return LoftQResult(q=q, lora_A=(right * k).contiguous(), lora_B=(left * k).contiguous(), nf4_error=nf4_error,
                       errors=errors)


def loftq_init(weight: torch.Tensor, r: int, alpha: float, iters: int = 1, blocksize: int = 64,
               double_quant: bool = True, use_rslora: bool = False) -> tuple[NF4Weight, torch.Tensor, torch.Tensor]:
    """(NF4 base, A [r, in], B [out, r]) with dequant(Q) + s B A ~ weight, s = alpha / r (alpha / sqrt(r) rsLoRA)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"loftq_init: rank r={r!r} must be a positive int")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"loftq_init: alpha must be > 0, got {alpha!r}")
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    res = loftq(weight, r, scale, iters, blocksize, double_quant)
    return res.q, res.lora_A, res.lora_B


@torch.no_grad()
def apply_loftq(model: nn.Module, get_weight: Callable[[str], torch.Tensor], iters: int | None = None,
                progress: bool = False) -> list[dict]:
    """LoftQ-initialise every LoRA layer of `model` in place, streaming: `get_weight("<module>.weight")` returns that
    layer's full-precision weight [out, in] (read, used, dropped before the next). Each NF4 base is replaced by the
    last iteration's NF4 bytes (its blocksize / double quantization kept), A and B start at LoftQ's, DoRA magnitudes
    are re-initialised from the new base. `iters` defaults to the model's `lora_config.loftq_iters`.

    Call after `inject_lora` and before sharding / building the optimizer. Returns one record per layer (name,
    nf4_error, loftq_error, errors (after each iteration), seconds). Raises TypeError for a dense base (LoftQ is
    for quantized bases).
    """
    if iters is None:
        cfg = getattr(model, "lora_config", None)
        iters = getattr(cfg, "loftq_iters", 1)
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("apply_loftq: the model has no LoRA layers; call inject_lora(model, LoRAConfig(...)) first")
    report = []
    for i, (name, m) in enumerate(mods):
        base = m.base_layer
        if not isinstance(base, Linear4bit):
            raise TypeError(f"apply_loftq: {name} has a dense {type(base).__name__} base; LoftQ initialises adapters "
                            "on a 4-bit base (load the model with quantize='nf4')")
        t0 = time.perf_counter()
        w = get_weight(f"{name}.weight")
        if tuple(w.shape) != (m.out_features, m.in_features):
            raise ValueError(f"apply_loftq: the full-precision weight for {name} has shape {tuple(w.shape)}, the "
                             f"model's layer is {(m.out_features, m.in_features)}; wrong checkpoint?")
        qb = base.quant
        res = loftq(w.to(base.weight.device), m.r, m.scale, iters, qb.blocksize, qb.double_quant)
        _replace_base(m, res.q)
        m.lora_A.weight.copy_(res.lora_A)
        m.lora_B.weight.copy_(res.lora_B)
        m.reset_magnitude()
        report.append(dict(name=name, nf4_error=res.nf4_error, loftq_error=res.errors[-1], errors=res.errors,
                           seconds=time.perf_counter() - t0))
        del w, res
        if progress:
            print(f"loftq {i + 1}/{len(mods)} {name}: rel. error {report[-1]['nf4_error']:.4f} -> "
                  f"{report[-1]['loftq_error']:.4f}", flush=True)
    model.loftq_applied = True  # the Trainer refuses a LoftQ config whose start was never computed
    return report


def _replace_base(m: LoRALinear, q: NF4Weight) -> None:
    """Swap the NF4 bytes of `m.base_layer` for `q` (same module, so hooks and names stay)."""
    base = m.base_layer
    q = q.to(base.weight.device)
    base.weight = nn.Parameter(q.packed, requires_grad=False)
    base.weight_absmax, base.weight_quant_map = q.absmax, q.quant_map
    base.weight_nested_absmax, base.weight_nested_quant_map = q.nested_absmax, q.nested_quant_map
    base._meta = dict(shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, offset=q.offset,
                      nested_blocksize=q.nested_blocksize)
