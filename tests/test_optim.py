"""PagedAdamW: equals torch.optim.AdamW in 32-bit mode, stays close in 8-bit mode, resumes from its state_dict."""
from __future__ import annotations

import pytest
import torch

from qlora70.nf4 import create_dynamic_map
from qlora70.optim import (PagedAdamW, choose_placement, dequantize_state, placement_margin, quantize_state,
                           state_bytes)

GiB = 1024 ** 3
ODD = ((300, 37), (7,), (64, 129), (5000,), (1,), (257, 3))  # partial 8-bit blocks, one-element and tiny tensors


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


# ---- the 8-bit codec (one home: qlora70.nf4.quantize_blockwise_8bit, divide=True) -----------------------------------
def test_state_codec_golden_bytes():
    """Pinned from the optimizer's codec before it moved to qlora70.nf4 (the bytes of existing 8-bit checkpoints)."""
    x = torch.sin(torch.arange(1000, dtype=torch.float32) * 0.37) * torch.logspace(-6, 0, 1000)
    for signed, total, head, tail in ((True, 126442, [127, 159, 163, 165, 167, 167], [14, 2, 0, 7]),
                                      (False, 122869, [0, 64, 71, 76, 79, 79], [226, 249, 255, 240])):
        codes, absmax = quantize_state(x if signed else x.abs(), signed=signed)
        assert int(codes.long().sum()) == total and codes[:6].tolist() == head and codes[-4:].tolist() == tail
        assert absmax.tolist() == pytest.approx([3.157669e-05, 0.001076015, 0.03667758, 0.97882998], rel=1e-6)


def test_state_codec_all_zero_and_tiny_blocks():
    x = torch.zeros(600)
    x[300:310] = 1e-33  # a block whose absmax is below 1e-30 keeps its relative precision (one clamp: 1e-38)
    for signed in (True, False):
        codes, absmax = quantize_state(x, signed=signed)
        y = dequantize_state(codes, absmax, signed=signed)
        assert torch.equal(y[:256], torch.zeros(256)) and torch.allclose(y[300:310], x[300:310], rtol=1e-6, atol=0)


# ---- placement policy ------------------------------------------------------------------------------------------------
def _trajectory(placement: str, bits: int, steps: int = 7, params=None, opt_kw=None):
    params = params if params is not None else make_params(seed=3, shapes=ODD)
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.05, optim_bits=bits, placement=placement, page_min_numel=8,
                     min_8bit_size=64, **(opt_kw or {}))
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


def _sd_equal(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a.get("optim_bits") != b.get("optim_bits") or \
            a["state"].keys() != b["state"].keys():
        return False
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        if sa.keys() != sb.keys():
            return False
        for k in sa:
            va, vb = sa[k], sb[k]
            same = (torch.is_tensor(va) and torch.is_tensor(vb) and va.dtype == vb.dtype and torch.equal(va, vb)) or \
                (not torch.is_tensor(va) and va == vb)
            if not same:
                return False
    return True


@pytest.mark.parametrize("bits", [32, 8])
def test_every_placement_gives_bit_identical_updates_and_state_dicts(bits):
    runs = {pl: _trajectory(pl, bits) for pl in ("device", "offload", "auto")}
    ref_params, ref_opt = runs["device"]
    for pl, (params, opt) in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(ref_params, params)), pl
        assert _sd_equal(ref_opt.state_dict(), opt.state_dict()), pl
    # the offload path really ran: working copies, not the stored states, were updated and written back
    params, opt = runs["offload"]
    big = params[0]
    assert opt._offloaded(big) and not opt._offloaded(params[4])  # (1,) < page_min_numel stays next to its param
    st = opt.state[big]
    work = opt._fetch(big, st)
    assert all(work[k] is not st[k] and torch.equal(work[k], st[k]) for k in work)
    if bits == 8:
        assert st["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" in opt.state[params[1]]  # (7,) < min_8bit_size


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("first, second", [("offload", "device"), ("device", "offload"), ("auto", "offload")])
def test_state_dict_round_trip_across_placements(bits, first, second):
    full, _ = _trajectory("device", bits, steps=8)
    part, opt = _trajectory(first, bits, steps=4)
    sd = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in part]
    opt2 = PagedAdamW(resumed, lr=1e-2, weight_decay=0.05, optim_bits=bits, placement=second, page_min_numel=8,
                      min_8bit_size=64)
    opt2.load_state_dict(sd)
    assert _sd_equal(opt2.state_dict(), sd)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):  # replay the first 4 steps' gradients, then continue
        for p in resumed:
            torch.randn(p.shape, generator=g)
    for _ in range(4):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=g)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_placement_arguments():
    ps = make_params()
    assert PagedAdamW(ps).placement == "auto"
    assert PagedAdamW(ps, paged=False).placement == "device"
    assert PagedAdamW(ps, offload=True).placement == "offload"
    assert PagedAdamW(ps, paged=False, offload=True).placement == "offload"  # --optim-offload wins
    assert PagedAdamW(ps, placement="device", offload=True).placement == "device"  # an explicit placement wins
    opt = PagedAdamW(ps)
    assert opt.placement_of("cpu") == "device"  # auto on a CPU: states are already in host memory
    assert opt.placement_of("cuda:0") == "pending"  # decided at the first step on that GPU
    assert PagedAdamW(ps, offload=True).placement_of("cpu") == "offload"
    with pytest.raises(ValueError, match="placement must be one of"):
        PagedAdamW(ps, placement="gpu")


def test_choose_placement_rule_by_hand():
    total = 80 * GiB
    margin = placement_margin(total)
    assert margin == 1 * GiB + 4 * GiB  # 1 GiB + 5% of 80 GiB
    assert choose_placement(6 * GiB, 11 * GiB, total) == "device"  # 6 <= 11 - 5
    assert choose_placement(6 * GiB + 1, 11 * GiB, total) == "offload"
    assert choose_placement(1, 0, total) == "offload"
    assert state_bytes(1000, 32) == 8000
    assert state_bytes(1000, 8, min_8bit_size=4096) == 8000  # below min_8bit_size: fp32 states
    assert state_bytes(5000, 8) == 2 * (5000 + 4 * 20)  # codes + one fp32 absmax per 256 (20 blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_placements_bit_identical(bits):
    runs = {}
    for pl in ("device", "offload", "auto"):
        ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(seed=3, shapes=ODD)]
        opt = PagedAdamW(ps, lr=1e-2, placement=pl, page_min_numel=8, min_8bit_size=64, optim_bits=bits)
        for _ in range(12):
            opt.zero_grad()
            sum(((p - 0.5) ** 2).sum() for p in ps).backward()
            opt.step()
        runs[pl] = (ps, opt)
    key = "exp_avg" if bits == 32 else "exp_avg_codes"
    dev_ps, dev_opt = runs["device"]
    off_ps, off_opt = runs["offload"]
    assert off_opt.state[off_ps[0]][key].device.type == "cpu" and off_opt.state[off_ps[0]][key].is_pinned()
    assert dev_opt.state[dev_ps[0]][key].device.type == "cuda"
    auto_ps, auto_opt = runs["auto"]
    assert auto_opt.placement_of(auto_ps[0].device) == "device"  # a few KB of states always fit
    for pl, (ps, opt) in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(dev_ps, ps)), pl
        assert _sd_equal(dev_opt.state_dict(), opt.state_dict()), pl
