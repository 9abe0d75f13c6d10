"""The one dispatch boundary between models and kernels.

Everything above this file (model, LoRA, trainer) calls `dequantize` / `nf4_linear`; everything below it is either the
pure-torch reference (`qlora70.nf4`) or the Triton kernels (`qlora70.kernels`, imported lazily, only here).

Backend choice, in order: the `backend=` argument, then the environment variable `QLORA70_BACKEND`
(`auto` | `torch` | `triton`), then auto: Triton on CUDA tensors (or anywhere under `TRITON_INTERPRET=1`), the torch
reference otherwise. Asking for Triton explicitly where it cannot run is an error, never a silent fallback.

The "torch" backend on CPU tensors runs the fused C loop of `qlora70.native` for NF4 decode when a C compiler is
available (bit-identical to the pure-torch code, which it replaces only for speed; `QLORA70_NATIVE=0` turns it off).
"""
from __future__ import annotations

import functools
import os

import torch

from .nf4 import NF4Weight, dequantize_nf4

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> tuple[bool, str]:
    """(available, reason). Triton needs the package and either a CUDA device or TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"triton is not importable ({e})"
    return True, ""


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Resolve the backend ("torch" or "triton") for tensors on `device`."""
    choice = backend if backend is not None else os.environ.get("QLORA70_BACKEND", "auto")
    choice = choice.lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} "
                         f"({'argument' if backend is not None else 'env QLORA70_BACKEND'})")
    dev = torch.device(device)
    if choice == "torch":
        return "torch"
    ok, why = triton_available()
    runnable = ok and (dev.type == "cuda" or _interpret())
    if choice == "triton":
        if not ok:
            raise RuntimeError(f"backend 'triton' was requested but {why}; install triton or use backend='torch'")
        if not runnable:
            raise RuntimeError(f"backend 'triton' was requested for a {dev.type} tensor; Triton runs on CUDA, or on "
                               "CPU only with TRITON_INTERPRET=1 set before import. Use backend='torch' instead")
        return "triton"
    return "triton" if runnable else "torch"


def _kernels():
    from . import kernels  # noqa: F401  (qlora70.kernels == the repo's kernels/ folder)
    from .kernels import nf4_kernels
    return nf4_kernels


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Decode an NF4 weight to dense [out, in] in `dtype` (default: its original dtype), optionally into `out`."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize expects an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.device != q.device):
        raise ValueError(f"out buffer must be {tuple(q.shape)} {dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if get_backend(q.device, backend) == "triton":
        return _kernels().dequantize(q, dtype, out=out)
    if out is not None and not out.is_contiguous():
        return out.copy_(dequantize_nf4(q, dtype))
    return dequantize_nf4(q, dtype, out=out)


class NF4LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with W frozen in NF4.

    Saves only the packed weight (the NF4Weight is frozen; nothing dense is kept) and dequantizes again in backward.
    Gradients: with y = x W^T + b,  dL/dx = dL/dy W  (shape (M, K) = (M, N) @ (N, K)),  dL/db = sum_M dL/dy.
    W gets no gradient (it is frozen; LoRA adds its own trainable branch outside this Function).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Weight, backend: str) -> torch.Tensor:
        ctx.q, ctx.backend, ctx.has_bias = q, backend, bias is not None
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if backend == "triton":
            y = _kernels().linear_forward(x2, q, bias)
        else:
            y = x2 @ dequantize_nf4(q, x.dtype).t()
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, backend = ctx.q, ctx.backend
        dx = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N)
        if ctx.needs_input_grad[0]:
            if backend == "triton":
                dx = _kernels().linear_backward_input(dy2, q)
            else:
                dx = dy2 @ dequantize_nf4(q, dy.dtype)
            dx = dx.reshape(*dy.shape[:-1], q.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = dy2.sum(0)
        return dx, db, None, None


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) through a frozen NF4 weight [out, in]; computes in x's dtype."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_linear: input has {x.shape[-1]} features but the weight is {tuple(q.shape)} [out, in]")
    if x.device != q.device:
        raise ValueError(f"nf4_linear: input on {x.device} but weight on {q.device}; move the model with .to()")
    if not x.is_floating_point():
        raise TypeError(f"nf4_linear: input must be floating point, got {x.dtype}")
    return NF4LinearFunction.apply(x, bias, q, get_backend(x.device, backend))
