"""The one dispatch boundary between models and kernels.

Everything above this file (model, LoRA, trainer) calls `dequantize` / `nf4_linear`; everything below it is either the
pure-torch reference (`qlora70.nf4`) or the Triton kernels (`qlora70.kernels`, imported lazily, only here).

Backend choice, in order: the `backend=` argument, then the environment variable `QLORA70_BACKEND`
(`auto` | `torch` | `triton`), then auto: Triton on CUDA tensors (or anywhere under `TRITON_INTERPRET=1`), the torch
reference otherwise. Asking for Triton explicitly where it cannot run is an error, never a silent fallback.

The "torch" backend on CPU tensors runs the fused C loop of `qlora70.native` for NF4 decode when a C compiler is
available (bit-identical to the pure-torch code, which it replaces only for speed; `QLORA70_NATIVE=0` turns it off).
Inside `nf4_linear` on the CPU the weight is decoded into one reused workspace per (dtype, thread), never into a fresh
tensor: a fresh weight-sized buffer pays first-touch page faults on every call (the same call varied up to 10x). The
workspace is read by the matmul right away and never saved for backward (backward decodes again).

Under autocast `nf4_linear` decodes straight to the autocast dtype and casts its input to it (what autocast's matmul
would do, minus the full-precision decode and the weight cast). `resolve_compute_dtype` turns a config's
`compute_dtype` ("auto" | "bf16" | "fp32") into the dtype to autocast to, and says why.

The training step's elementwise and row work also dispatches here: `seeded_dropout` (LoRA dropout), `lora_sum` (base
+ scale * delta in fp32), `cross_entropy_rows_`, `rms_norm`, `swiglu`, `rope`. Each is an autograd Function over one
fused C loop of `qlora70.native` on the CPU (when built), with its torch formulation as the fallback and as the
reference the tests compare against; on other devices the torch formulation runs.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from . import native
from .nf4 import NF4Weight, dequantize_nf4, workspace_view

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
    with _decode_scope():
        if out is not None and not out.is_contiguous():
            return out.copy_(dequantize_nf4(q, dtype))
        return dequantize_nf4(q, dtype, out=out)


def resolve_compute_dtype(device: torch.device | str, requested: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype, reason) for `TrainConfig.compute_dtype`: "bf16" / "fp32" as asked; "auto": bf16 on CUDA, on the CPU
    `qlora70.native.cpu_compute_dtype()` (bf16 where the CPU makes bf16 matmuls faster, measured once and cached),
    fp32 on other devices. bf16 means bf16 autocast over fp32 master weights (LoRA weights and optimizer states stay
    fp32)."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"compute_dtype must be 'auto', 'bf16' or 'fp32', got {requested!r}")
    if requested == "bf16":
        return torch.bfloat16, "compute_dtype='bf16' requested"
    if requested == "fp32":
        return torch.float32, "compute_dtype='fp32' requested"
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16, "auto on CUDA: bf16"
    if dev.type == "cpu":
        dtype, why = native.cpu_compute_dtype()
        return dtype, "auto on CPU: " + why
    return torch.float32, f"auto on {dev.type}: fp32"


# ---- CPU decode workspace -------------------------------------------------------------------------------------------
USE_CPU_WORKSPACE = True  # False: decode into a fresh tensor every call (the reference the tests compare against)
_tls = threading.local()  # per thread: {dtype: flat buffer}, so concurrent callers never share one


def clear_workspace() -> None:
    """Free this thread's CPU decode buffers (they are regrown on the next call)."""
    _tls.__dict__.pop("bufs", None)


def _decode_scope():
    """A `qlora70::nf4_decode` range for torch.profiler (free when no profiler runs): the CPU decode is a ctypes call
    that the profiler would otherwise fold into its caller's self time."""
    if torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function("qlora70::nf4_decode")
    return contextlib.nullcontext()


def _cpu_weight(q: NF4Weight, dtype: torch.dtype, keep: bool) -> torch.Tensor:
    """W [N, K] decoded to `dtype`: into this thread's workspace (as large as the largest weight seen) unless the result
    must outlive the caller's matmul (`keep`: autograd would save it) or the workspace is off."""
    with _decode_scope():
        if keep or not USE_CPU_WORKSPACE or q.device.type != "cpu":
            return dequantize_nf4(q, dtype)
        out = workspace_view(_tls.__dict__.setdefault("bufs", {}), dtype, tuple(q.shape), dtype, native.empty)
        return dequantize_nf4(q, dtype, out=out)


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: the autocast dtype when autocast is on for x's device (fp64 is never cast,
    as autocast leaves it), else x's own."""
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class NF4LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with W frozen in NF4.

    Saves only the packed weight (the NF4Weight is frozen; nothing dense is kept) and dequantizes again in backward.
    Computes in `compute_dtype_of(x)`: under autocast W is decoded straight to the autocast dtype and x cast to it.
    Gradients: with y = x W^T + b,  dL/dx = dL/dy W  (shape (M, K) = (M, N) @ (N, K)),  dL/db = sum_M dL/dy.
    W gets no gradient (it is frozen; LoRA adds its own trainable branch outside this Function).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Weight, backend: str) -> torch.Tensor:
        ctx.q, ctx.backend, ctx.has_bias, ctx.x_dtype = q, backend, bias is not None, x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype_of(x))  # (M, K); no copy outside autocast
        if backend == "triton":
            y = _kernels().linear_forward(x2, q, bias)
        else:  # the forward of a Function records nothing: the workspace is free again once mm returns
            y = x2 @ _cpu_weight(q, x2.dtype, keep=False).t()
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
            else:  # create_graph: autograd would save W for the double backward, so it gets its own tensor
                dx = dy2 @ _cpu_weight(q, dy.dtype, keep=torch.is_grad_enabled() and dy.requires_grad)
            dx = dx.reshape(*dy.shape[:-1], q.shape[1]).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = dy2.sum(0)
        return dx, db, None, None


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) through a frozen NF4 weight [out, in]; computes in x's dtype, or in the autocast
    dtype when autocast is on for x's device (the weight is decoded straight to it)."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_linear: input has {x.shape[-1]} features but the weight is {tuple(q.shape)} [out, in]")
    if x.device != q.device:
        raise ValueError(f"nf4_linear: input on {x.device} but weight on {q.device}; move the model with .to()")
    if not x.is_floating_point():
        raise TypeError(f"nf4_linear: input must be floating point, got {x.dtype}")
    return NF4LinearFunction.apply(x, bias, q, get_backend(x.device, backend))


# ---- the fused CPU training loops: one rule for when they run ----------------------------------------------------------
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes nf4_cpu.c's loops read and write


def _fused_cpu(*ts: torch.Tensor, dtypes: tuple = _FUSED_DTYPES) -> bool:
    """Whether the C loops of `qlora70.native` take these tensors: all on the CPU, each dtype in `dtypes`, and the
    library built (else the torch formulation runs)."""
    return all(t.device.type == "cpu" and t.dtype in dtypes for t in ts) and native.available()


# ---- LoRA dropout: a seeded, stored-nothing mask ---------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (c split into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, as nf4_cpu.c's mix32 (a bijection of uint32), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_hash(i: torch.Tensor, seed: int) -> torch.Tensor:
    """h(i) for int64 element indices i >= 0 (int64 tensor of uint32 values): mix32(mix32(lo32(i) ^ lo32(seed)) +
    (hi32(seed) ^ hi32(i) * 0x9E3779B9 mod 2^32)) mod 2^32, as nf4_cpu.c's seeded dropout computes it."""
    key = ((i >> 32) * 0x9E3779B9 & _M32) ^ ((seed >> 32) & _M32)
    return _mix32((_mix32((i & _M32) ^ (seed & _M32)) + key) & _M32)


def dropout_keep_reference(n: int, seed: int, threshold: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (bool [n]) of `seeded_dropout`: keep(i) = dropout_hash(i, seed) >= threshold. Pure torch, the
    reference for the C loop (same bits) and the path without a C compiler."""
    return dropout_hash(torch.arange(n, dtype=torch.int64, device=device), seed) >= threshold


def _apply_keep(x: torch.Tensor, seed: int, threshold: int, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x * (keep ? scale : 0) in out_dtype (fp32 product, one rounding): the C loop when built, else the reference."""
    x, seed = x.contiguous(), seed % 2 ** 64  # the Function carries it signed (int64: the profiler records it)
    if out_dtype in _FUSED_DTYPES and _fused_cpu(x):
        return native.seeded_dropout(x, seed, threshold, scale, out_dtype)
    keep = dropout_keep_reference(x.numel(), seed, threshold).view(x.shape)
    m = torch.where(keep, scale, 0.0).to(torch.float32)
    return (x.to(torch.promote_types(x.dtype, torch.float32)) * m).to(out_dtype)


class SeededDropoutFunction(torch.autograd.Function):
    """y = x * keep * scale with keep a pure function of (seed, element index): backward is the same call on the
    gradient (dL/dx = dL/dy * keep * scale), so no mask is saved (0 bytes per element instead of 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, threshold: int, scale: float, out_dtype: torch.dtype):
        ctx.args, ctx.x_dtype = (seed, threshold, scale), x.dtype
        return _apply_keep(x, seed, threshold, scale, out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _apply_keep(g, *ctx.args, ctx.x_dtype), None, None, None, None


def dropout_threshold(p: float) -> tuple[int, float]:
    """(threshold, keep scale) of `seeded_dropout` for drop probability p: threshold = round(p * 2^32), so p is
    realized to within 2^-33, and the scale 2^32 / (2^32 - threshold) makes E[y] = x exactly for that p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
    thr = min(int(round(p * 2 ** 32)), 2 ** 32 - 1)
    return thr, 2 ** 32 / (2 ** 32 - thr)


def seeded_dropout(x: torch.Tensor, p: float, out_dtype: torch.dtype | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout on a CPU tensor x (any shape): keep with probability 1 - p, scale 1 / (1 - p), output in
    `out_dtype` (default x.dtype; under autocast pass the autocast dtype: the cast is fused). One 64-bit seed is
    drawn from torch's generator per call, so `torch.manual_seed` and gradient checkpointing (which restores the RNG
    state) reproduce the mask; the mask is never stored: backward recomputes it from the seed."""
    thr, scale = dropout_threshold(p)
    seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, generator=generator))
    return SeededDropoutFunction.apply(x, seed, thr, scale, x.dtype if out_dtype is None else out_dtype)


# ---- LoRA sum under autocast: base + scale * delta, formed in fp32 --------------------------------------------------
class LoRASumFunction(torch.autograd.Function):
    """out = y + scale * d in fp32 from y, d in the autocast dtype (one fused C pass on the CPU). Backward:
    dL/dy = g and dL/dd = scale * g, each rounded to that dtype (what `y.float() + d.float() * scale` gives)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.dtype = scale, y.dtype
        return native.lora_sum(y.contiguous(), d.contiguous(), scale)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gy, gd = native.lora_sum_backward(g.contiguous().float(), ctx.dtype, ctx.scale)
        return gy, gd, None


def lora_sum(y: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 y + scale * d for the base output y and the LoRA delta d (same shape and dtype). Rounding the sum to
    bf16 would quantize the small learned delta with the step of the large base output, so the sum stays fp32.
    CPU with the C library: one fused pass each way; elsewhere the same arithmetic in torch ops."""
    if y.shape != d.shape or y.dtype != d.dtype:
        raise ValueError(f"lora_sum: y and d must share shape and dtype, got {y.dtype} {tuple(y.shape)} and "
                         f"{d.dtype} {tuple(d.shape)}")
    if _fused_cpu(y, d):
        return LoRASumFunction.apply(y, d, float(scale))
    return y.float() + d.float() * scale


# ---- cross-entropy of a chunk of logits -------------------------------------------------------------------------------
def cross_entropy_rows_(logits: torch.Tensor, y: torch.Tensor, grad: bool) -> torch.Tensor:
    """Sum over rows of CE(logits (n, V), y (n,)) as an fp32 scalar, reduced in fp32 from the logits' values. The
    logits are consumed: with `grad` they are overwritten by d loss / d logits = softmax - onehot(y) (in their own
    dtype), else left in an unspecified state. CPU with the C library: one cache-resident pass per row (no fp32
    copy of the chunk); elsewhere torch ops (fp32 copy, in-place exp)."""
    if logits.is_contiguous() and _fused_cpu(logits):
        return native.cross_entropy_rows_(logits, y, grad).double().sum().float()
    lf = logits.float()  # (n, V); the same tensor when already fp32
    target = lf.gather(1, y[:, None]).squeeze(1)  # (n,)
    mx = lf.amax(dim=-1, keepdim=True)  # (n, 1)
    e = lf.sub_(mx).exp_()  # exp(logits - max), in place
    total = e.sum(dim=-1)  # (n,)
    loss = (total.log() + mx.squeeze(1) - target).sum()  # logsumexp - target logit
    if grad:
        p = e.div_(total[:, None])  # softmax
        p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
        if p.data_ptr() != logits.data_ptr():
            logits.copy_(p)
    return loss


# ---- RMSNorm and SwiGLU: one fused pass each way on the CPU -----------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    """y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) over the last dim (fp32). Saves x and r [rows]. Backward, with
    xhat = x r and gw = g w:  dL/dx = r (gw - xhat * mean(gw * xhat)),  dL/dw = sum_rows g * xhat."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        y, rstd = native.rmsnorm_forward(x, w.detach().contiguous(), eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        g = g.contiguous().float()
        dx = native.rmsnorm_backward(x, w.detach().contiguous(), rstd, g)
        dw = None
        if ctx.needs_input_grad[1]:
            xhat = x.reshape(-1, x.shape[-1]) * rstd[:, None]
            dw = (g.reshape(-1, x.shape[-1]) * xhat).sum(0).to(w.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (HF Llama's): normalized in fp32, cast back to x's dtype, times the weight. fp32 CPU tensors with the
    C library: `RMSNormFunction` (one pass forward, one backward, instead of ~6 + ~8 torch ops)."""
    if weight.shape == x.shape[-1:] and _fused_cpu(x, weight, dtypes=(torch.float32,)):
        return RMSNormFunction.apply(x, weight, float(eps))
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(a) * b; saves a and b. Backward, with s = sigmoid(a): dL/db = g * a s,
    dL/da = g * b * s (1 + a (1 - s))."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return native.swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b = ctx.saved_tensors
        return native.swiglu_backward(a, b, g.contiguous().to(a.dtype))


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (Llama's MLP gate). CPU fp32/bf16 tensors of one shape and dtype with the C library:
    `SwiGLUFunction` (one pass each way); else torch's F.silu(a) * b."""
    if a.dtype == b.dtype and a.shape == b.shape and _fused_cpu(a, b, dtypes=(torch.float32, torch.bfloat16)):
        return SwiGLUFunction.apply(a, b)
    return torch.nn.functional.silu(a) * b


# ---- rotary embedding fused with the head transpose (and, under autocast, the cast SDPA would do) ---------------------
class RoPEFunction(torch.autograd.Function):
    """x (B, T, H, hd) -> rotate-half RoPE, as (B, H, T, hd) in out_dtype. A rotation per pair: backward applies the
    transposed rotation to the gradient (dx_i = dy_i c_i + dy_{i+h} s_{i+h}, dx_{i+h} = dy_{i+h} c_{i+h} - dy_i s_i).
    cos/sin are constants (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return native.rope(x.contiguous(), cos, sin, out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return native.rope(g.contiguous(), cos, sin, torch.float32, backward=True), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """HF Llama's rotary embedding of x (B, T, H, hd) with cos, sin (B, T, hd), returned as (B, H, T, hd) in
    `out_dtype` (default x.dtype; under autocast pass its dtype: SDPA would cast to it anyway). fp32 CPU tensors
    with the C library: `RoPEFunction` (rotation, transpose and cast in one pass); else torch ops."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype in _FUSED_DTYPES and x.shape[-1] % 2 == 0 and _fused_cpu(x, cos, sin, dtypes=(torch.float32,)):
        return RoPEFunction.apply(x, cos, sin, out_dtype)
    x = x.transpose(1, 2)  # (B, H, T, hd)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * c + torch.cat((-x2, x1), dim=-1) * s).to(out_dtype)
