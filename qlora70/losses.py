"""Chunked cross-entropy through the LM head, without the (B, T, V) fp32 logits.

Only the positions that carry a label (label != ignore_index) go through the head, in chunks of `chunk_size` rows.
Each chunk's logits (chunk, V) are computed in the compute dtype, reduced in fp32 to the loss and turned in place into
d loss / d logits (`qlora70.ops.cross_entropy_rows_`: on the CPU one cache-resident C pass per row, no fp32 copy), and
right away into the gradient with respect to the hidden rows, (softmax - onehot) @ W, which is all backward needs: the loss is a sum, so backward only
scales that saved (N, D) gradient by the incoming scalar. So no logits are kept between forward and backward and
nothing is recomputed (Liger-kernel style "gradient in forward"); the head matmul costs the same 2 passes as plain CE.
"""
from __future__ import annotations

import weakref

import torch

from .config import IGNORE_INDEX
from .ops import cross_entropy_rows_

_HEAD_CAST: dict = {}  # one entry: the last frozen CPU head weight's cast (weakref, version, dtype, tensor)


def _head_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LM head weight [V, D] in the compute dtype. On the CPU the cast of a frozen weight is kept between calls
    (a tied [V, D] embedding was otherwise cast on every step: ~2% of a bf16 step) and made again when the weight
    changes (its version), is replaced, or trains; elsewhere it is cast each call (GPU memory is dearer)."""
    if w.dtype == dtype or w.requires_grad or w.device.type != "cpu":
        return w.to(dtype)
    ent = _HEAD_CAST.get("w")
    if ent is not None and ent[0]() is w and ent[1] == w._version and ent[2] == dtype:
        return ent[3]
    _HEAD_CAST.clear()  # free the old cast before making the new one
    cast = w.detach().to(dtype)
    _HEAD_CAST["w"] = (weakref.ref(w), w._version, dtype, cast)
    return cast


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) for h (N, D), W (V, D), y (N,) -> fp32 scalar. Autocast is off inside; the caller
    casts h and W to the compute dtype."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk_size: int, need_grad: bool):
        n = h.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        need_dh = need_grad and ctx.needs_input_grad[0]
        need_dw = need_grad and ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_dh else None  # (N, D)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None  # (V, D)
        for s in range(0, n, chunk_size):
            hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]  # (n, D), (n,)
            p = hc @ w.t()  # (n, V) logits in the compute dtype, reduced in fp32; then d loss / d logits in place
            loss += cross_entropy_rows_(p, yc, grad=need_dh or need_dw)
            if need_dh or need_dw:
                if need_dh:
                    dh[s:s + chunk_size] = p @ w  # (n, D)
                if need_dw:
                    dw += (p.t() @ hc).float()  # (V, D)
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (need_dh, need_dw)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_dh, need_dw = ctx.has
        if (ctx.needs_input_grad[0] and not need_dh) or (ctx.needs_input_grad[1] and not need_dw):
            raise RuntimeError("chunked_cross_entropy: forward ran with grad disabled; cannot backpropagate")
        dh = dw = None
        if need_dh:
            dh = saved.pop(0)
            dh = dh * g.to(dh.dtype)
        if need_dw:
            dw = (saved.pop(0) * g).to(ctx.w_dtype)
        return dh, dw, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX,
                          shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-sum of cross-entropy and the number of labelled tokens.

    hidden (B, T, D) final-norm states, lm_head_weight (V, D), labels (B, T) long. With `shift` (HF convention)
    position t predicts labels[:, t + 1]; without it, position t predicts labels[:, t]. Positions whose target is
    `ignore_index` are skipped entirely (no logits computed). Returns (loss_sum fp32 scalar, count long scalar);
    the mean is loss_sum / count. Logits are formed in the autocast dtype when autocast is on, else in hidden's dtype,
    and reduced in fp32, at most `chunk_size` rows at a time.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"chunked_cross_entropy: hidden must be (B, T, D) and labels (B, T); got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"chunked_cross_entropy: lm_head_weight must be (V, {hidden.shape[2]}), got "
                         f"{tuple(lm_head_weight.shape)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"chunked_cross_entropy: labels must be int64, got {labels.dtype}")
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != ignore_index  # (B, T')
    y = labels[mask].long()  # (N,)
    count = mask.sum()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= lm_head_weight.shape[0]):
        raise ValueError(f"chunked_cross_entropy: labels must be in [0, {lm_head_weight.shape[0]}) or "
                         f"{ignore_index}; got range [{int(y.min())}, {int(y.max())}]")
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    h = hidden[mask].to(dtype)  # (N, D)
    w = _head_weight(lm_head_weight, dtype)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    with torch.autocast(dev, enabled=False):
        loss = ChunkedCrossEntropyFunction.apply(h, w, y, chunk_size, need_grad)
    return loss, count
