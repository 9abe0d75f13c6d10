"""qlora70.ops on the CPU: the reused decode workspace changes no bit of outputs or gradients and allocates no
weight-sized buffer in steady state; under autocast NF4LinearFunction decodes straight to the autocast dtype."""
from __future__ import annotations

import pytest
import torch

from qlora70 import native, ops
from qlora70.layers import Linear4bit
from qlora70.nf4 import dequantize_nf4, quantize_nf4

def _layers(seed: int, dtype: torch.dtype = torch.float32, bias: bool = True) -> list[Linear4bit]:
    """A chain of NF4 layers 70 -> 37 -> 130 -> 16 -> 257: odd shapes (partial last blocks, odd element counts,
    out != in), sizes that shrink and grow (the last is the largest and regrows the workspace)."""
    g = torch.Generator().manual_seed(seed)
    dims = [70, 37, 130, 16, 257]
    out = []
    for i in range(len(dims) - 1):
        w = torch.randn(dims[i + 1], dims[i], generator=g).to(dtype)
        b = torch.randn(dims[i + 1], generator=g).to(dtype) if bias else None
        out.append(Linear4bit(quantize_nf4(w, blocksize=64, double_quant=i % 2 == 0), b))
    return out


def _run(layers, x: torch.Tensor, workspace: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setattr(ops, "USE_CPU_WORKSPACE", workspace)
    ops.clear_workspace()
    x = x.detach().clone().requires_grad_(True)
    h = x
    for layer in layers:
        h = torch.nn.functional.silu(layer(h))
    g = torch.Generator().manual_seed(1)
    (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum().backward()
    return h.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_workspace_bit_identical_to_fresh_decode(dtype, bias, monkeypatch):
    """Forward and input gradients through a chain of layers of different shapes: the workspace is overwritten by
    every later layer before backward, so this fails if any output or backward read a stale decode."""
    layers = _layers(seed=3, dtype=dtype, bias=bias)
    x = torch.randn(3, 5, 70, generator=torch.Generator().manual_seed(2)).to(dtype)
    y_ws, g_ws = _run(layers, x, True, monkeypatch)
    y_ref, g_ref = _run(layers, x, False, monkeypatch)
    assert torch.equal(y_ws, y_ref) and torch.equal(g_ws, g_ref)
    # and both equal a plain torch reference (decode, matmul) for the first layer
    q = layers[0].quant
    ref = x.reshape(-1, 70) @ dequantize_nf4(q, dtype).t() + (layers[0].bias.to(dtype) if bias else 0)
    monkeypatch.setattr(ops, "USE_CPU_WORKSPACE", True)
    assert torch.equal(layers[0](x).reshape(-1, 37), ref)


def test_workspace_close_to_float64_reference(monkeypatch):
    layers = _layers(seed=4)
    x = torch.randn(4, 70, generator=torch.Generator().manual_seed(5))
    y, _ = _run(layers, x, True, monkeypatch)
    h = x.double()
    for layer in layers:
        h = torch.nn.functional.silu(h @ dequantize_nf4(layer.quant, torch.float64).t() + layer.bias.double())
    torch.testing.assert_close(y.double(), h, rtol=1e-4, atol=1e-4 * float(h.abs().max()))


def test_double_backward_does_not_read_the_workspace(monkeypatch):
    """create_graph=True: dx = dy @ W keeps W for the second derivative; a later decode must not overwrite it."""
    monkeypatch.setattr(ops, "USE_CPU_WORKSPACE", True)
    a, b = _layers(seed=6, bias=False)[:2]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 70, generator=g, requires_grad=True)
    dy = torch.randn(6, 37, generator=g, requires_grad=True)
    (dx,) = torch.autograd.grad(a(x), x, dy, create_graph=True)
    b(torch.randn(2, 37, generator=g))  # decodes another weight into the workspace
    (ddy,) = torch.autograd.grad((dx * dx).sum(), dy)
    w = dequantize_nf4(a.quant, torch.float32)
    dy_ref = dy.detach().requires_grad_(True)
    dx_ref = dy_ref @ w
    (ddy_ref,) = torch.autograd.grad((dx_ref * dx_ref).sum(), dy_ref)
    assert torch.equal(dx.detach(), dx_ref.detach()) and torch.equal(ddy, ddy_ref)


def _train_step(layers, x):
    h = x
    for layer in layers:
        h = layer(h)
    h.square().mean().backward()


@pytest.mark.skipif(not native.available(), reason=f"native path: {native.native_status()}")
def test_steady_state_allocates_no_weight_sized_buffer(monkeypatch):
    """After one warm-up step every decode writes into the same buffer (stable data_ptr), `native.empty` (the only
    weight-sized allocation of the decode path) is never called, and the profiler sees no allocation as large as a
    weight."""
    monkeypatch.setattr(ops, "USE_CPU_WORKSPACE", True)
    ops.clear_workspace()
    layers = _layers(seed=8, bias=False)
    x = torch.randn(2, 70, generator=torch.Generator().manual_seed(9), requires_grad=True)
    _train_step(layers, x)  # warm-up: grows the workspace to the largest weight
    ptrs, allocs = set(), []
    real_deq, real_empty = ops.dequantize_nf4, native.empty

    def spy_deq(q, dtype=None, *, out=None):
        ptrs.add(None if out is None else out.data_ptr())
        return real_deq(q, dtype, out=out)

    def spy_empty(n, dtype):
        allocs.append(n)
        return real_empty(n, dtype)

    monkeypatch.setattr(ops, "dequantize_nf4", spy_deq)
    monkeypatch.setattr(native, "empty", spy_empty)
    smallest = min(layer.quant.numel for layer in layers) * 4
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            _train_step(layers, x)
    assert allocs == [] and len(ptrs) == 1 and None not in ptrs
    big = [e for e in prof.events() if e.cpu_memory_usage >= smallest]
    assert big == [], [(e.name, e.cpu_memory_usage) for e in big]
    # control: without the workspace the same check sees the weight-sized decodes
    monkeypatch.setattr(ops, "USE_CPU_WORKSPACE", False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _train_step(layers, x)
    assert any(e.cpu_memory_usage >= smallest for e in prof.events())


@pytest.mark.parametrize("bias", [True, False])
def test_autocast_decodes_to_the_autocast_dtype(bias, monkeypatch):
    """fp32 model under bf16 autocast: W is decoded to bf16 (never fp32), and y equals x.bf16 @ W_bf16^T (+ b)."""
    layer = _layers(seed=10, bias=bias)[2]  # (16, 130)
    seen = []
    real = ops.dequantize_nf4

    def spy(q, dtype=None, *, out=None):
        seen.append(dtype)
        return real(q, dtype, out=out)

    monkeypatch.setattr(ops, "dequantize_nf4", spy)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, 130, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == [torch.bfloat16] and y.dtype == torch.bfloat16
    w = real(layer.quant, torch.bfloat16)
    ref = x.detach().bfloat16().reshape(-1, 130) @ w.t()
    if bias:
        ref = ref + layer.bias.bfloat16()
    assert torch.equal(y.detach().reshape(-1, 16), ref)
    dy = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(dy)
    assert seen == [torch.bfloat16] * 2 and x.grad.dtype == torch.float32
    assert torch.equal(x.grad.reshape(-1, 130), (dy.reshape(-1, 16) @ w).float())


def test_no_autocast_computes_in_the_input_dtype(monkeypatch):
    layer = _layers(seed=12, bias=False)[0]
    seen = []
    real = ops.dequantize_nf4
    monkeypatch.setattr(ops, "dequantize_nf4", lambda q, dtype=None, *, out=None: seen.append(dtype) or
                        real(q, dtype, out=out))
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        y = layer(torch.randn(2, 70).to(dt))
        assert y.dtype == dt and seen[-1] == dt
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp64 is never cast by autocast, nor here
        assert layer(torch.randn(2, 70, dtype=torch.float64)).dtype == torch.float64
