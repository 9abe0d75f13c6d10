"""Chunked cross-entropy equals plain cross-entropy (value and gradients) and never keeps full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora70.losses import chunked_cross_entropy




def make(B=3, T=17, D=24, V=101, seed=0, mask_frac=0.4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dtype) * 0.3).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < mask_frac] = -100
    return h, w, y


def reference(h, w, y, shift=True):
    logits = (h @ w.t()).float()
    if shift:
        logits, y = logits[:, :-1], y[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum",
                           ignore_index=-100), (y != -100).sum()


@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("shape", [(3, 17, 24, 101), (1, 9, 8, 7)])
def test_equals_plain_ce(chunk, shift, shape):
    B, T, D, V = shape
    h, w, y = make(B, T, D, V)
    s, n = chunked_cross_entropy(h, w, y, chunk_size=chunk, shift=shift)
    dh, dw = torch.autograd.grad(s / n, (h, w))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rs, rn = reference(h2, w2, y, shift)
    rdh, rdw = torch.autograd.grad(rs / rn, (h2, w2))
    assert int(n) == int(rn)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, rdh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-6)


def test_frozen_head_and_second_order_scale():
    h, w, y = make()
    w = w.detach()
    s, n = chunked_cross_entropy(h, w, y, chunk_size=4)
    (3.5 * s).backward()
    h2 = h.detach().clone().requires_grad_()
    (3.5 * reference(h2, w, y)[0]).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_all_masked_gives_zero():
    h, w, y = make()
    y[:] = -100
    s, n = chunked_cross_entropy(h, w, y)
    assert int(n) == 0 and float(s.detach()) == 0.0
    s.backward()
    assert torch.count_nonzero(h.grad) == 0


def test_no_full_logits_are_saved():
    """Nothing of size (N, V) is kept for backward: only (N, D)-sized tensors survive the forward."""
    B, T, D, V, chunk = 2, 64, 16, 1000, 8
    h, w, y = make(B, T, D, V, mask_frac=0.0)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        s, n = chunked_cross_entropy(h, w.detach(), y, chunk_size=chunk)
    assert sizes and max(sizes) < chunk * V, f"a saved tensor has {max(sizes)} elements (logits chunk is {chunk * V})"
    s.backward()


def test_no_grad_forward_matches():
    h, w, y = make()
    with torch.no_grad():
        s, n = chunked_cross_entropy(h, w, y, chunk_size=3)
    torch.testing.assert_close(s, reference(h, w, y)[0].detach(), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close():
    h, w, y = make(V=257)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, n = chunked_cross_entropy(h, w, y, chunk_size=16)
    assert s.dtype == torch.float32
    rs, _ = reference(h.detach(), w.detach(), y)
    torch.testing.assert_close(s, rs, rtol=2e-2, atol=0)
    s.backward()
    assert h.grad is not None and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("kw, err", [
    (dict(labels=torch.zeros(3, 16, dtype=torch.long)), ValueError),
    (dict(chunk_size=0), ValueError),
    (dict(labels=torch.zeros(3, 17)), TypeError),
    (dict(labels=torch.full((3, 17), 101)), ValueError),
    (dict(lm_head_weight=torch.zeros(101, 23)), ValueError),
])
def test_bad_input(kw, err):
    h, w, y = make()
    args = dict(hidden=h, lm_head_weight=w, labels=y)
    args.update(kw)
    with pytest.raises(err):
        chunked_cross_entropy(**args)


def test_frozen_head_cast_is_reused_and_refreshed():
    """Under CPU autocast the bf16 cast of a frozen head is made once, and again after the weight changes in place
    or is replaced; the loss always matches the current weight."""
    import qlora70.losses as L

    h, w, y = make(V=97)
    w = w.detach()
    casts = []
    real = L._head_weight

    def spy(weight, dtype):
        out = real(weight, dtype)
        casts.append(out.data_ptr())
        return out

    L._HEAD_CAST.clear()
    L._head_weight = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s1, _ = chunked_cross_entropy(h, w, y)
            s2, _ = chunked_cross_entropy(h, w, y)
            assert casts[0] == casts[1] and torch.equal(s1, s2)
            with torch.no_grad():
                w.mul_(2.0)  # bumps the version: the old cast is stale
            s3, _ = chunked_cross_entropy(h, w, y)
            w2 = w.clone()
            s4, _ = chunked_cross_entropy(h, w2, y)
            s5, _ = chunked_cross_entropy(h, w.requires_grad_(), y)  # trainable: never cached
        ref3, _ = reference(h.detach(), w.detach().bfloat16().float(), y)
        torch.testing.assert_close(s3, ref3, rtol=2e-2, atol=0)
        assert not torch.equal(s3, s1) and torch.equal(s3, s4) and torch.equal(s3, s5)
        assert len(set(casts[2:4])) == 2 and L._HEAD_CAST["w"][0]() is w2
    finally:
        L._head_weight = real
        L._HEAD_CAST.clear()
