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


# ---- seeded LoRA dropout ----------------------------------------------------------------------------------------------
_M = 0xFFFFFFFF
GOLDEN_HASH = [3873005110, 590261775, 3977829849, 3990932482]  # _py_hash(i, 12345678901234567), i = 0..3


def _py_mix32(x: int) -> int:
    """lowbias32 in Python integers (independent of the torch/C code under test)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M
    return x ^ (x >> 16)


def _py_hash(i: int, seed: int) -> int:
    return _py_mix32((_py_mix32((i & _M) ^ (seed & _M)) + (((i >> 32) * 0x9E3779B9 & _M) ^ (seed >> 32))) & _M)


SEEDS = [0, 1, 12345678901234567, 2 ** 63 + 99, 2 ** 64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_dropout_hash_matches_python_integers(seed):
    from qlora70.ops import dropout_hash

    idx = [0, 1, 2, 3, 1000, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1, 2 ** 33 + 5, 2 ** 40 + 7]
    got = dropout_hash(torch.tensor(idx, dtype=torch.int64), seed).tolist()
    assert got == [_py_hash(i, seed) for i in idx]


def test_dropout_hash_golden():
    """Pinned: a change of the hash changes every mask of every run (resumed runs would train differently)."""
    from qlora70.ops import dropout_hash

    assert dropout_hash(torch.arange(4), 12345678901234567).tolist() == [_py_hash(i, 12345678901234567)
                                                                        for i in range(4)]
    assert [_py_hash(i, 12345678901234567) for i in range(4)] == GOLDEN_HASH


@pytest.mark.skipif(not native.available(), reason="no C compiler: the reference path is the only one")
@pytest.mark.parametrize("n", [1, 3, 65535, 65537, 200003])
@pytest.mark.parametrize("seed", SEEDS[1:4])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.float32, torch.float16)])
def test_native_dropout_bit_identical_to_reference(n, seed, dtypes, monkeypatch):
    """The C loop (threads split at 2^16-element boundaries) and the pure-torch reference give the same bits."""
    from qlora70 import ops

    din, dout = dtypes
    thr, scale = ops.dropout_threshold(0.37)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(din)
    x[::97] = float("inf")  # a dropped inf is NaN (inf * 0), as in torch's x * mask * scale
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    fast = ops._apply_keep(x, seed, thr, scale, dout)
    monkeypatch.setattr(native, "available", lambda: False)
    ref = ops._apply_keep(x, seed, thr, scale, dout)
    assert fast.dtype == ref.dtype == dout
    nan = fast.isnan()
    assert torch.equal(nan, ref.isnan())
    bits = {2: torch.int16, 4: torch.int32}[dout.itemsize]  # NaN payload/sign bits may differ: compared above
    assert torch.equal(fast[~nan].view(bits), ref[~nan].view(bits))
    keep = ops.dropout_keep_reference(n, seed, thr)
    expect = torch.where(keep, x.float() * scale, x.float() * 0.0).to(dout)  # fp32 product, one rounding
    torch.testing.assert_close(ref, expect, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_seeded_dropout_statistics(p):
    """Keep rate 1 - p, E[y] = x, masks of successive calls and of neighbouring elements independent."""
    from qlora70 import ops

    n = 400_000
    torch.manual_seed(0)
    x = torch.ones(n)
    y1, y2 = ops.seeded_dropout(x, p), ops.seeded_dropout(x, p)
    k1, k2 = (y1 != 0).float(), (y2 != 0).float()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(k1.mean().item() - (1 - p)) < 5 * sd
    assert abs(y1.double().mean().item() - 1.0) < 5 * sd / (1 - p)
    assert abs((k1 * k2).mean().item() - (1 - p) ** 2) < 5 * sd, "two calls must draw independent masks"
    for lag in (1, 2, 4, 16):  # neighbouring (and same-64-bit-word) elements uncorrelated
        c = ((k1[:-lag] - k1.mean()) * (k1[lag:] - k1.mean())).mean().item() / (p * (1 - p))
        assert abs(c) < 0.01, (lag, c)
    thr, scale = ops.dropout_threshold(p)
    assert y1[y1 != 0].unique().tolist() == [pytest.approx(scale, rel=1e-7)]
    assert abs(thr / 2 ** 32 - p) <= 2 ** -33 and scale == 2 ** 32 / (2 ** 32 - thr)


def test_seeded_dropout_backward_recomputes_the_mask():
    from qlora70 import ops

    x = torch.randn(7, 33, 5, requires_grad=True)
    g = torch.randn(7, 33, 5)
    torch.manual_seed(3)
    y = ops.seeded_dropout(x, 0.25)
    y.backward(g)
    keep, scale = y.detach() != 0, ops.dropout_threshold(0.25)[1]
    torch.testing.assert_close(x.grad, torch.where(keep, g * scale, 0.0), rtol=1e-6, atol=0)
    torch.manual_seed(3)
    assert torch.equal(ops.seeded_dropout(x.detach(), 0.25), y.detach()), "seeded: the same mask again"
    xt = torch.randn(33, 7).t()  # non-contiguous input: the mask follows the logical (row-major) order
    torch.manual_seed(4)
    yt = ops.seeded_dropout(xt, 0.25)
    torch.manual_seed(4)
    assert torch.equal(yt, ops.seeded_dropout(xt.contiguous(), 0.25))
    with pytest.raises(ValueError, match="dropout p"):
        ops.seeded_dropout(x, 1.0)


def test_seeded_dropout_under_profiler_with_shapes():
    """torch.profiler(record_shapes=True) records a Function's scalar arguments as int64: the seed must fit."""
    from torch.profiler import ProfilerActivity, profile

    from qlora70 import ops

    x = torch.randn(64, 9, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True):
        for s in range(20):  # seeds of both signs
            torch.manual_seed(s)
            ops.seeded_dropout(x, 0.1).sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 65537)])
def test_lora_sum_matches_torch_arithmetic(dtype, shape, monkeypatch):
    """fp32 y + s*d and its gradients: the fused path (C loop where built) equals the torch formula bit for bit."""
    g0 = torch.Generator().manual_seed(sum(shape))
    y0, d0 = torch.randn(shape, generator=g0).mul(30).to(dtype), torch.randn(shape, generator=g0).to(dtype)
    gout = torch.randn(shape, generator=g0)
    res = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(native, "available", lambda: False)
        y, d = y0.clone().requires_grad_(), d0.clone().requires_grad_()
        out = ops.lora_sum(y, d, 0.37)
        out.backward(gout)
        res.append((out.detach(), y.grad, d.grad))
    for a, b in zip(*res):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert res[0][0].dtype == torch.float32 and res[0][1].dtype == res[0][2].dtype == dtype
    torch.testing.assert_close(res[0][0].double(), y0.double() + 0.37 * d0.double(), rtol=2e-7, atol=1e-6)
    with pytest.raises(ValueError, match="share shape and dtype"):
        ops.lora_sum(y0, d0.float() if dtype != torch.float32 else d0.half(), 0.5)


def _ce_reference(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loss sum and softmax - onehot."""
    l64 = logits.double()
    loss = torch.nn.functional.cross_entropy(l64, y, reduction="sum")
    g = torch.softmax(l64, dim=-1)
    g[torch.arange(len(y)), y] -= 1.0
    return loss, g


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 33), (17, 32001)])
def test_cross_entropy_rows_against_float64(native_on, dtype, tol, shape, monkeypatch):
    if native_on and not native.available():
        pytest.skip("no C compiler")
    if not native_on:
        monkeypatch.setattr(native, "available", lambda: False)
    g = torch.Generator().manual_seed(shape[1])
    logits = (torch.randn(shape, generator=g) * 6).to(dtype)
    y = torch.randint(0, shape[1], (shape[0],), generator=g)
    ref_loss, ref_grad = _ce_reference(logits, y)
    work = logits.clone()
    loss = ops.cross_entropy_rows_(work, y, grad=True)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and work.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * max(1.0, abs(ref_loss.item()))
    # d loss / d logits in the logits' dtype: within its rounding of the float64 value (and 1e-7 absolute)
    err = (work.double() - ref_grad).abs() / (ref_grad.abs() + 1e-7 / tol)
    assert err.max().item() <= tol, err.max().item()
    nograd = logits.clone()
    assert ops.cross_entropy_rows_(nograd, y, grad=False).item() == loss.item()


@pytest.mark.skipif(not native.available(), reason="no C compiler")
def test_cross_entropy_rows_non_finite_gives_nan():
    logits = torch.randn(4, 50)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    y = torch.tensor([0, 1, 2, 3])
    assert torch.isnan(native.cross_entropy_rows_(logits.clone(), y, False)[1:3]).all()
    assert torch.isfinite(native.cross_entropy_rows_(logits.clone(), y, False)[[0, 3]]).all()
    assert torch.isnan(ops.cross_entropy_rows_(logits.clone(), y, True))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        native.cross_entropy_rows_(torch.randn(3, 4, 5), y[:3], False)


def _grads(fn, inputs, gout, need=None):
    need = [True] * len(inputs) if need is None else need
    ins = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, need)]
    out = fn(*ins)
    out.backward(gout.to(out.dtype))
    return out.detach(), [t.grad for t in ins]


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 576), (4, 2049)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_against_float64(native_on, shape, train_weight, monkeypatch):
    if native_on and not native.available():
        pytest.skip("no C compiler")
    if not native_on:
        monkeypatch.setattr(native, "available", lambda: False)
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    gout = torch.randn(shape, generator=g)

    def ref(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    y, (dx, dw) = _grads(lambda x, w: ops.rms_norm(x, w, 1e-5), [x, w], gout, need=[True, train_weight])
    y64, (dx64, dw64) = _grads(ref, [x.double(), w.double()], gout.double())
    assert y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-4, atol=1e-5)
    if train_weight:
        torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-4)
    else:
        assert dw is None


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 65537)])
def test_swiglu_against_float64(native_on, dtype, tol, shape, monkeypatch):
    if native_on and not native.available():
        pytest.skip("no C compiler")
    if not native_on:
        monkeypatch.setattr(native, "available", lambda: False)
    g = torch.Generator().manual_seed(shape[-1])
    a = (torch.randn(shape, generator=g) * 4).to(dtype)
    a.view(-1)[:1] = -100.0  # deep in the negative tail: silu ~ -0 and its gradient ~ 0, no NaN
    b = torch.randn(shape, generator=g).to(dtype)
    gout = torch.randn(shape, generator=g)
    y, (da, db) = _grads(ops.swiglu, [a, b], gout)
    y64, (da64, db64) = _grads(lambda a, b: torch.nn.functional.silu(a) * b, [a.double(), b.double()],
                               gout.to(dtype).double())
    assert y.dtype == da.dtype == db.dtype == dtype
    for got, want in ((y, y64), (da, da64), (db, db64)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("out_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 5, 3, 8), (3, 17, 4, 64)])
def test_rope_against_float64(native_on, out_dtype, tol, shape, monkeypatch):
    """RoPE (rotate-half) with the head transpose: (B, T, H, hd) -> (B, H, T, hd), values and gradient."""
    if native_on and not native.available():
        pytest.skip("no C compiler")
    if not native_on:
        monkeypatch.setattr(native, "available", lambda: False)
    from qlora70.model import rope_cos_sin

    B, T, H, hd = shape
    g = torch.Generator().manual_seed(T * hd)
    x = torch.randn(shape, generator=g) * 2
    pos = torch.randint(0, 4096, (B, T), generator=g)
    cos, sin = rope_cos_sin(pos, hd, 10000.0, torch.float32)
    gout = torch.randn(B, H, T, hd, generator=g)

    def ref(x):
        xt = x.transpose(1, 2)
        x1, x2 = xt.chunk(2, dim=-1)
        c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
        return xt * c + torch.cat((-x2, x1), dim=-1) * s

    y, (dx,) = _grads(lambda x: ops.rope(x, cos, sin, out_dtype), [x], gout)
    y64, (dx64,) = _grads(ref, [x.double()], gout.to(out_dtype).double())
    assert y.shape == (B, H, T, hd) and y.dtype == out_dtype and dx.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
