"""PagedAdamW: equals torch.optim.AdamW in 32-bit mode, stays close in 8-bit mode, resumes from its state_dict."""
from __future__ import annotations

import pytest
import torch

from qlora70.nf4 import create_dynamic_map
from qlora70.optim import PagedAdamW, dequantize_state, quantize_state




def make_params(seed: int = 0, shapes=((300, 37), (7,), (64, 129), (5000,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def run(opt_cls, params, steps: int, seed: int = 1, schedule=None, **kw):
    """A few steps of a noisy quadratic; returns the parameter trajectory's end and the optimizer."""
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=g) for p in params]
    for t in range(steps):
        if schedule:
            for group in opt.param_groups:
                group["lr"] = schedule(t)
        opt.zero_grad()
        loss = sum(((p - tg) ** 2 * (1 + i)).sum() for i, (p, tg) in enumerate(zip(params, targets)))
        loss = loss + sum((p * torch.randn(p.shape, generator=g)).sum() for p in params)  # gradient noise
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_torch_adamw_32bit(paged, wd):
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    ref = make_params()
    ours = make_params()
    sched = lambda t: 3e-3 * min(1.0, (t + 1) / 10)  # noqa: E731  (changing lr is read every step)
    run(torch.optim.AdamW, ref, 200, schedule=sched, foreach=False, **kw)
    run(PagedAdamW, ours, 200, schedule=sched, paged=paged, page_min_numel=1000, **kw)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_8bit_close_to_adamw_and_uses_uint8_states():
    kw = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    ref, ours = make_params(), make_params()
    start = [p.detach().clone() for p in ref]
    run(torch.optim.AdamW, ref, 100, **kw)
    opt = run(PagedAdamW, ours, 100, optim_bits=8, min_8bit_size=4096, **kw)
    for p0, a, b in zip(start, ref, ours):
        moved = (a - p0).norm()
        assert (b - a).norm() < 0.05 * moved, "8-bit trajectory must stay close to the fp32 one"
    big, small = ours[0], ours[1]
    assert opt.state[big]["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in opt.state[big]
    assert opt.state[small]["exp_avg"].dtype == torch.float32, "tensors below min_8bit_size keep fp32 states"


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_state_quantization_error(signed):
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    if not signed:
        x = x.abs()
    codes, absmax = quantize_state(x, signed=signed)
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    y = dequantize_state(codes, absmax, signed=signed)
    cm = create_dynamic_map(signed=signed)
    # nearest code: the error is at most half the local gap of the map, times the block scale
    gaps = (cm[1:] - cm[:-1]).max()
    assert ((y - x).abs() <= 0.5 * gaps * absmax.repeat_interleave(256)[:1000] + 1e-12).all()
    big = x.abs() > 0.1 * absmax.repeat_interleave(256)[:1000]
    assert ((y - x).abs()[big] / x.abs()[big]).max() < 0.1


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_resume_is_exact(bits):
    kw = dict(lr=1e-2, optim_bits=bits, page_min_numel=1000)
    full = make_params()
    run(PagedAdamW, full, 20, **kw)
    part = make_params()
    opt = run(PagedAdamW, part, 10, **kw)
    sd = opt.state_dict()
    # the saved state is a copy: mutating the live optimizer does not change it
    snap = {k: v.clone() for k, v in sd["state"][0].items() if torch.is_tensor(v)}
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in part]
    opt2 = PagedAdamW(resumed, **kw)
    opt2.load_state_dict(sd)
    assert all(torch.equal(sd["state"][0][k], v) for k, v in snap.items())
    # continue: the same 10 remaining steps (same noise stream as the uninterrupted run's steps 10..19)
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=g) for p in resumed]
    for _ in range(10):  # replay the first 10 steps' noise draws
        for p in resumed:
            torch.randn(p.shape, generator=g)
    for _ in range(10):
        opt2.zero_grad()
        loss = sum(((p - tg) ** 2 * (1 + i)).sum() for i, (p, tg) in enumerate(zip(resumed, targets)))
        loss = loss + sum((p * torch.randn(p.shape, generator=g)).sum() for p in resumed)
        loss.backward()
        opt2.step()
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def test_load_state_dict_mismatch_errors():
    opt = run(PagedAdamW, make_params(), 2, lr=1e-3)
    sd = opt.state_dict()
    other = PagedAdamW(make_params(shapes=((300, 37), (7,))), lr=1e-3)
    with pytest.raises(ValueError, match="parameter groups do not match"):
        other.load_state_dict(sd)
    wrong = PagedAdamW(make_params(shapes=((300, 38), (7,), (64, 129), (5000,))), lr=1e-3)
    with pytest.raises(ValueError, match="elements, expected"):
        wrong.load_state_dict(sd)
    with pytest.raises(ValueError, match="optim_bits"):
        PagedAdamW(make_params(), lr=1e-3, optim_bits=8).load_state_dict(sd)


@pytest.mark.parametrize("kw, match", [(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
                                       (dict(optim_bits=4), "optim_bits"), (dict(weight_decay=-0.1), "weight_decay")])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW(make_params(), **kw)


def test_states_live_on_host_for_cpu_params_and_bf16_params_update():
    p = torch.nn.Parameter(torch.randn(200_000, dtype=torch.bfloat16))
    opt = PagedAdamW([p], lr=0.1)  # > bf16 spacing for |p| < 16
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["exp_avg"].device.type == "cpu" and opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.all(p < before), "a positive gradient moves every weight down"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_paged_equals_unpaged(bits):
    ref = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    ours = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    o1 = PagedAdamW(ref, lr=1e-2, paged=False, optim_bits=bits)
    o2 = PagedAdamW(ours, lr=1e-2, paged=True, page_min_numel=1000, optim_bits=bits)
    for _ in range(20):
        for params, opt in ((ref, o1), (ours, o2)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in params).backward()
            opt.step()
    key = "exp_avg" if bits == 32 else "exp_avg_codes"
    assert o2.state[ours[0]][key].device.type == "cpu" and o2.state[ours[0]][key].is_pinned()
    assert o1.state[ref[0]][key].device.type == "cuda"
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
