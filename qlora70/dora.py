"""DoRA (weight-decomposed low-rank adaptation, arXiv 2402.09353) on a frozen dense or NF4 base, as PEFT computes it.

The adapted weight is  W' = m * (W + s B A) / ||W + s B A||_row : a trained magnitude m [out] per output feature times
the unit-norm direction of the LoRA-updated weight (W dequantized when 4-bit, s = alpha / r). Written against the base
output y = x W^T + b, the extra output is

    (m / n - 1) * (x_d W^T) + (m / n) * s * B A x_d,    n = ||W + s B A||_row  (detached, section 4.3 of the paper)

with x_d = dropout(x). Like PEFT (`peft/tuners/lora/variants.py: DoraLinearVariant.forward`): without active dropout
(eval, or p = 0) x_d = x and x_d W^T is the base output minus its bias (no second matmul: the fast path); with dropout
in training x_d W^T is a second base matmul on the dropped input. The norm carries no gradient; m and A, B do.

This module only does the math on tensors; `qlora70.lora.LoRALinear(use_dora=True)` owns the magnitude parameter
(`lora_magnitude_vector`, PEFT's key) and the cached ||W||^2_row, and calls `dora_forward` from its forward.
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


def _base_matmul(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T without the bias, (..., in) -> (..., out); through the NF4 autograd Function when 4-bit (saves no dense
    weight for backward; fused dequant-matmul kernel on CUDA)."""
    if isinstance(base, Linear4bit):
        return ops.nf4_linear(x, base.quant, None, backend=base.backend)
    return F.linear(x, base.weight.to(x.dtype))


@torch.no_grad()
def weight_sq_norm(base: nn.Module) -> torch.Tensor:
    """||W||^2 per output row, fp32 [out] (the frozen part of DoRA's norm; callers cache it per base)."""
    return base_weight(base, torch.float32).pow(2).sum(1)


@torch.no_grad()
def fast_weight_norm(base: nn.Module, w_sq: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """||W + s B A||_row without forming any [out, in] matrix, fp32 [out]:

        n^2 = ||W||^2_row + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)

    W A^T [out, r] is one r-row pass through the base (the NF4 kernel on CUDA), so the cost is an r-token base matmul
    and no dense (out, in) temporaries (3 fp32 copies of W for the direct formula: 2.8 GB per 70B MLP weight).
    Equals `weight_norm` up to fp32 rounding (it is the same sum expanded); clamped at 0 against cancellation.
    """
    a, b = lora_A.detach().float(), lora_B.detach().float()  # (r, in), (out, r)
    p = _base_matmul(base, a).float().t()  # (out, r) = W A^T
    n2 = w_sq + (2.0 * scale) * (b * p).sum(1) + (scale * scale) * ((b @ (a @ a.t())) * b).sum(1)
    return n2.clamp_min_(0.0).sqrt_()


def dora_forward(x: torch.Tensor, y: torch.Tensor, base: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear,
                 magnitude: torch.Tensor, scale: float, dropout: nn.Module, dropout_active: bool,
                 w_sq: torch.Tensor) -> torch.Tensor:
    """DoRA's output (..., out) in y's dtype (fp32 under autocast), from the base output y = base(x) (bias included).

    x (..., in); magnitude fp32 [out]; w_sq = `weight_sq_norm(base)`; `dropout_active`: whether `dropout` changes x
    (training and p > 0). With mns = m / n (n detached):
      no active dropout:  mns * (y - b + s B A x) + b               (= y + (mns - 1)(y - b) + mns s B A x, PEFT's form)
      active dropout:     y - x_d W^T + mns * (x_d W^T + s B A x_d)  (= y + (mns - 1) x_d W^T + mns s B A x_d)
    """
    n = fast_weight_norm(base, w_sq, lora_A.weight, lora_B.weight, scale)  # (out,), no grad
    mns = magnitude / n  # (out,) fp32, grad to the magnitude only
    bias = None if base.bias is None else base.bias.to(y.dtype)
    if dropout_active:
        xd = dropout(x)
        y0 = _base_matmul(base, xd)  # (..., out)
    else:
        xd = x
        y0 = y if bias is None else y - bias
    a, b = lora_A.weight, lora_B.weight  # (r, in), (out, r)
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:  # the sum in fp32, and the output fp32, as LoRALinear's (a bf16 sum would erase the small delta)
        z = ops.lora_sum(y0, lora_B(lora_A(xd)), scale)
    elif y0.dtype != b.dtype:
        z = y0 + (lora_B(lora_A(xd.to(a.dtype))) * scale).to(y0.dtype)
    else:  # one fused op: y0 + s * (x A^T) B^T, the LoRA weights' fp32
        h = lora_A(xd.to(a.dtype))
        z = torch.addmm(y0.reshape(-1, y0.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale).view(y0.shape)
    out = z * mns  # fp32 multiply (mns in bf16 would round the magnitude to ~0.4% steps); in place below: fewer
    out_dtype = torch.float32 if autocast else y.dtype
    if dropout_active:  # fresh (tokens, out) buffers (mul saves z and mns, not its output)
        return out.add_(y).sub_(y0).to(out_dtype)
    return (out if bias is None else out.add_(bias)).to(out_dtype)


@torch.no_grad()
def merged_weight(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = m / ||W + dW||_row * (W + dW), fp32 [out, in]; w the base weight, delta = s B A (both [out, in])."""
    v = w.float() + delta.float()
    return v * (magnitude.detach().float() / torch.linalg.norm(v, dim=1)).unsqueeze(1)
