"""DoRA (weight-decomposed low-rank adaptation, arXiv 2402.09353) on a frozen dense or NF4 base, as PEFT computes it.

The adapted weight is  W' = m * (W + s B A) / ||W + s B A||_row : a trained magnitude m [out] per output feature times
the unit-norm direction of the LoRA-updated weight (W dequantized when 4-bit, s = alpha / r). Written against the base
output y = x W^T + b, the extra output is

    (m / n - 1) * (x_d W^T) + (m / n) * s * B A x_d,    n = ||W + s B A||_row  (detached, section 4.3 of the paper)

with x_d = dropout(x). Like PEFT (`peft/tuners/lora/variants.py: DoraLinearVariant.forward`): without active dropout
(eval, or p = 0) x_d = x and x_d W^T is the base output minus its bias (no second matmul: the fast path); with dropout
in training x_d W^T is a second base matmul on the dropped input. The norm carries no gradient; m and A, B do.

This module only does the math on tensors; `qlora70.lora.LoRALinear(use_dora=True)` owns the magnitude parameter
(`lora_magnitude_vector`, PEFT's key) and calls `dora_delta` from its forward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import ops
from .layers import Linear4bit


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The frozen base weight [out, in] in `dtype` (dequantized when 4-bit), without gradient."""
    if isinstance(base, Linear4bit):
        return base.dequantize(dtype)
    return base.weight.detach().to(dtype)


@torch.no_grad()
def weight_norm(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """n = ||W + scale * B A||_2 over the input dim, fp32 [out]; W [out, in], A [r, in], B [out, r]. No gradient."""
    return torch.linalg.norm(w.float() + scale * (lora_B.detach().float() @ lora_A.detach().float()), dim=1)


def init_magnitude(base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """DoRA's initial magnitude m = ||W + s B A||_row (fp32 [out]), so the fresh adapter leaves W' = W + s B A."""
    return weight_norm(base_weight(base), lora_A, lora_B, scale)


def _base_matmul(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T without the bias, (..., in) -> (..., out); through the NF4 autograd Function when 4-bit (saves no dense
    weight for backward)."""
    if isinstance(base, Linear4bit):
        return ops.nf4_linear(x, base.quant, None, backend=base.backend)
    return F.linear(x, base.weight)


def dora_delta(x: torch.Tensor, y: torch.Tensor, base: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear,
               magnitude: torch.Tensor, scale: float, dropout: nn.Module, dropout_active: bool) -> torch.Tensor:
    """DoRA's output minus the base output y = base(x) (bias included), shape (..., out), in y's dtype.

    x (..., in); magnitude fp32 [out]; `dropout_active` says whether `dropout` changes x (training and p > 0).
    """
    with torch.no_grad():
        n = weight_norm(base_weight(base, torch.float32), lora_A.weight, lora_B.weight, scale)  # (out,)
    mns = magnitude / n  # (out,) fp32, grad to the magnitude only
    if dropout_active:
        xd = dropout(x)
        base_res = _base_matmul(base, xd)  # (..., out)
    else:
        xd = x
        base_res = y if base.bias is None else y - base.bias.to(y.dtype)
    if torch.is_autocast_enabled(x.device.type):
        lora_res = lora_B(lora_A(xd))
    else:
        lora_res = lora_B(lora_A(xd.to(lora_A.weight.dtype)))  # fp32 branch (the LoRA weights are fp32)
    out = (mns - 1) * base_res + (mns * scale) * lora_res
    return out.to(y.dtype)


@torch.no_grad()
def merged_weight(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = m / ||W + dW||_row * (W + dW), fp32 [out, in]; w the base weight, delta = s B A (both [out, in])."""
    v = w.float() + delta.float()
    return v * (magnitude.detach().float() / torch.linalg.norm(v, dim=1)).unsqueeze(1)
