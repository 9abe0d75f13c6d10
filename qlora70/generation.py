"""Autoregressive generation with the KV cache: greedy (temperature 0) or temperature + top-p sampling.

`generate_ids` works on token ids, a single sequence or a left-padded batch; `generate` wraps it with a tokenizer and
stop strings. Only the last position goes through `lm_head` at each step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .model import KVCache, Llama


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature <= 0: argmax. Else softmax(logits / T) restricted to the smallest
    set of most likely tokens whose probability reaches top_p, then one draw."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(dim=-1) - sp >= top_p  # tokens after the nucleus is already full
        sp = sp.masked_fill(drop, 0.0)
        choice = torch.multinomial(sp, 1, generator=generator)  # (B, 1) index into the sorted order
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: Llama, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, eos_id: int | Sequence[int] | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                 stop_fn: Callable[[int, list[int]], bool] | None = None) -> list[int] | list[list[int]]:
    """Generate up to `max_new_tokens` after `input_ids` (list / (T,) for one sequence -> list[int]; (B, T) with a
    left-padding `attention_mask` (B, T) of 0/1 -> list of B lists). Generation of a row stops at `eos_id` (included in
    the output) or when `stop_fn(row, new_ids)` returns True. `use_cache=False` recomputes the whole sequence at every
    step (the reference the cached path is tested against)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    dev = model.device
    single = not isinstance(input_ids, torch.Tensor) or input_ids.dim() == 1
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=dev).reshape(1, -1) if single else input_ids.to(dev)
    B, T = ids.shape
    if T == 0:
        raise ValueError("generate_ids needs at least one prompt token (e.g. BOS)")
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev).long()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    padded = bool((mask == 0).any())
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding does not shift the real positions
    eos = set() if eos_id is None else ({eos_id} if isinstance(eos_id, int) else set(eos_id))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)

    def last_logits(x, **kw) -> torch.Tensor:  # (B, t) -> (B, V) for the last position only
        h = model(x, return_hidden=True, **kw)[:, -1]
        return model.lm_head(h).float()

    cache = KVCache.for_model(model, B, T + max_new_tokens) if use_cache else None
    logits = last_logits(ids, cache=cache, position_ids=pos, attention_mask=mask if padded else None)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    seq, seq_mask, seq_pos = ids, mask, pos
    next_pos = pos[:, -1:] + 1  # (B, 1)
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, gen)  # (B,)
        for b in range(B):
            if not done[b]:
                t = int(tok[b])
                out[b].append(t)
                done[b] = t in eos or (stop_fn is not None and stop_fn(b, out[b]))
        if all(done) or step == max_new_tokens - 1:
            break
        tok = tok[:, None]  # (B, 1)
        if use_cache:
            logits = last_logits(tok, cache=cache, start_pos=T + step, position_ids=next_pos)
        else:
            seq = torch.cat([seq, tok], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(tok)], 1)
            seq_pos = torch.cat([seq_pos, next_pos], 1)
            logits = last_logits(seq, position_ids=seq_pos, attention_mask=seq_mask if padded else None)
        next_pos = next_pos + 1
    return out[0] if single else out


def generate(model: Llama, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stop: str | Sequence[str] | None = None, seed: int | None = None,
             add_bos: bool | None = None) -> str | list[str]:
    """The continuation of `prompt` (not including it) as text; a list of prompts is generated as one left-padded
    batch and returns a list. Stops at the tokenizer's EOS or at the first `stop` string (which is cut off). BOS is
    added per the tokenizer's convention (`add_bos_default`, Llama-2: yes, SmolLM2: no) unless `add_bos` says."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("generate needs a prompt")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    bos = getattr(tokenizer, "add_bos_default", False) if add_bos is None else add_bos
    encoded = [tokenizer.encode(p, bos=bos) for p in prompts]
    eos = getattr(tokenizer, "eos_id", None)

    def cut(text: str) -> tuple[str, bool]:
        hits = [text.find(s) for s in stops if s and s in text]
        return (text[: min(hits)], True) if hits else (text, False)

    def stop_fn(_row: int, new: list[int]) -> bool:
        return bool(stops) and cut(tokenizer.decode(new))[1]

    if len(encoded) == 1:
        rows = [generate_ids(model, encoded[0], max_new_tokens, temperature, top_p, eos, seed, stop_fn=stop_fn)]
    else:
        T = max(len(e) for e in encoded)
        pad = getattr(tokenizer, "pad_id", 0) or 0
        ids = torch.tensor([[pad] * (T - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in encoded])
        rows = generate_ids(model, ids, max_new_tokens, temperature, top_p, eos, seed, attention_mask=mask,
                            stop_fn=stop_fn)
    texts = [cut(tokenizer.decode(r))[0] for r in rows]
    return texts[0] if isinstance(prompt, str) else texts
