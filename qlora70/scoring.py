"""Scoring primitives: Wilson intervals and macro-F1, batched continuation log-likelihoods over any
`model(input_ids) -> logits` (the LM head only at scored positions for qlora70's Llama), greedy generation and
answer extraction.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Sequence

import torch

from .prompts import _encode

Z95 = 1.959963984540054

# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default). n == 0 gives (nan, nan)."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None) -> float:
    """Macro-averaged F1 over `labels` (default: the labels seen in gold or pred, as sklearn's f1_score does).
    A class never predicted has F1 0; unparsed predictions (None) count as wrong for their gold class."""
    if len(gold) != len(pred):
        raise ValueError(f"macro_f1: {len(gold)} gold labels but {len(pred)} predictions")
    if labels is None:
        labels = sorted({g for g in gold} | {p for p in pred if p is not None})
    if not labels:
        return math.nan
    f1s = []
    for c in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)




def _device_of(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _logits(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        raise ValueError(f"model must map input_ids {tuple(ids.shape)} to logits (B, T, V); got "
                         f"{getattr(out, 'shape', type(out))}")
    return out


def _lm_head_of(model: Any) -> torch.nn.Module | None:
    """The LM head when `model` can return final hidden states (qlora70's `Llama(..., return_hidden=True)`), so only
    the scored positions go through the (large-vocabulary) head; None for a plain logits callable."""
    head = getattr(model, "lm_head", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None
    try:
        return head if "return_hidden" in inspect.signature(model.forward).parameters else None
    except (TypeError, ValueError):
        return None


def _logits_at(model: Callable, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) float32 at (rows[i], pos[i]) of `model(ids)`, computing the head only there when possible."""
    head = _lm_head_of(model)
    if head is not None:
        h = model(ids, return_hidden=True)  # (B, T, D)
        if not isinstance(h, torch.Tensor) or h.shape[:2] != ids.shape:
            raise ValueError(f"model(..., return_hidden=True) must give (B, T, D), got {getattr(h, 'shape', type(h))}")
        return head(h[rows.to(h.device), pos.to(h.device)]).float()
    logits = _logits(model, ids)  # (B, T, V)
    return logits[rows.to(logits.device), pos.to(logits.device)].float()


@torch.inference_mode()
def loglikelihoods(model: Callable, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
                   pad_id: int = 0, device: torch.device | str | None = None, progress: bool = True,
                   desc: str = "scoring") -> list[float]:
    """Sum of log p(cont | ctx) for each (ctx_ids, cont_ids) request.

    The model reads `(ctx + cont)[:-1]`; requests whose input is a prefix of another request's input with the same
    context share that row (so all single-token continuations of one prompt cost one forward). Rows are sorted by
    length, batched with right padding (safe for a causal model) and scored at the continuation positions only.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _device_of(model)
    rows: list[list[int]] = []
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    where: list[int] = []
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("empty context: every request needs at least one context token (e.g. BOS)")
        inp = list(ctx) + list(cont[:-1])
        cands = by_ctx.setdefault(tuple(ctx), [])
        hit = next((r for r in cands if len(rows[r]) >= len(inp) and rows[r][:len(inp)] == inp), None)
        if hit is None:
            # an existing row that is a prefix of this longer input can be replaced by it
            grow = next((r for r in cands if len(rows[r]) < len(inp) and inp[:len(rows[r])] == rows[r]), None)
            if grow is not None:
                rows[grow] = inp
                hit = grow
            else:
                rows.append(inp)
                hit = len(rows) - 1
                cands.append(hit)
        where.append(hit)
    # requests per row
    per_row: dict[int, list[int]] = {}
    for qi, r in enumerate(where):
        per_row.setdefault(r, []).append(qi)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    out = [0.0] * len(requests)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc=desc, unit="batch", leave=False)
    for batch in it:
        T = max(len(rows[r]) for r in batch)
        ids = torch.full((len(batch), T), int(pad_id), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, :len(rows[r])] = torch.tensor(rows[r], dtype=torch.long)
        bi, pos, tok, qidx = [], [], [], []
        for b, r in enumerate(batch):
            for qi in per_row[r]:
                ctx, cont = requests[qi]
                for j, t in enumerate(cont):
                    bi.append(b)
                    pos.append(len(ctx) - 1 + j)
                    tok.append(int(t))
                    qidx.append(qi)
        sel = _logits_at(model, ids.to(device), torch.tensor(bi), torch.tensor(pos))  # (N, V)
        lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tok, device=sel.device)[:, None])[:, 0]
        for qi, v in zip(qidx, lp.double().cpu().tolist()):
            out[qi] += v
    return out


@torch.inference_mode()
def greedy_generate(model: Callable, tokenizer: Any, prompt: str, *, max_new_tokens: int = 16, add_bos: bool = True,
                    device: torch.device | str | None = None, stop_at_newline: bool = True) -> str:
    """Cache-free greedy decoding over any logits callable (slow: one full forward per new token). Stops at EOS or,
    with `stop_at_newline`, at the first newline after some text."""
    device = torch.device(device) if device is not None else _device_of(model)
    ids = _encode(tokenizer, prompt, add_bos)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = _logits(model, torch.tensor([ids + new], dtype=torch.long, device=device))
        nxt = int(logits[0, -1].argmax())
        if nxt == getattr(tokenizer, "eos_id", None):
            break
        new.append(nxt)
        text = tokenizer.decode(new)
        if stop_at_newline and "\n" in text.lstrip():
            break
    return tokenizer.decode(new)


_ANSWER_IS = re.compile(r"(?i:answer|option)\s*(?i:is)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def extract_answer(text: str, labels: Sequence[str], options: dict[str, str] | None = None) -> str | None:
    """The label a generated reply gives, or None.

    Letter labels: the reply starts with the letter ("C", "C.", "(C)", "C: text"), else "answer is C" / "Answer: C",
    else the reply starts with one option's text. Word labels (yes/no/maybe): the first word, else the first label word
    anywhere."""
    t = text.strip()
    if not t:
        return None
    if all(len(lab) == 1 for lab in labels):
        m = re.match(r"^\(?([A-Z])(?:$|[\s).:,\]-])", t)
        if m and m.group(1) in labels:
            return m.group(1)
        m = _ANSWER_IS.search(t)
        if m and m.group(1) in labels:
            return m.group(1)
        if options:
            low = t.lower()
            hits = [k for k, v in options.items() if v and low.startswith(v.lower())]
            if len(hits) == 1:
                return hits[0]
        return None
    words = re.findall(r"[a-z]+", t.lower())
    if words and words[0] in labels:
        return words[0]
    return next((w for w in words if w in labels), None)
