"""Collation (right padding), packing (document ids + per-document positions) and `Batches`: deterministic (seed,
epoch) shuffling, group-by-length, rank dealing and a resumable position (`state_dict`).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence


import numpy as np
import torch

from ..config import IGNORE_INDEX
from .tokenized import TokenizedData

# Batching: collation, packing, resumable length-grouped batches
# --------------------------------------------------------------------------------------------------------------------


def collate(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs. Returns input_ids (B, T) long, labels (B, T) long (-100 on prompt and
    padding), attention_mask (B, T) long."""
    if not examples:
        raise ValueError("collate: empty batch")
    T = max(len(x) for x, _ in examples)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (x, y) in enumerate(examples):
        ids[b, :len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        labels[b, :len(y)] = torch.from_numpy(np.asarray(y, dtype=np.int64))
        mask[b, :len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_indices(lengths: np.ndarray, order: Sequence[int], seq_len: int, window: int = 32) -> list[list[int]]:
    """Greedy first-fit packing of examples (visited in `order`) into bins of at most `seq_len` tokens, looking at the
    `window` most recent open bins (O(N * window)). Returns the bins as lists of example indices."""
    bins: list[list[int]] = []
    fill: list[int] = []
    open_: list[int] = []  # indices into bins, oldest first
    for i in order:
        n = int(lengths[i])
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens > seq_len {seq_len}; tokenize with the same seq_len")
        for b in open_:
            if fill[b] + n <= seq_len:
                bins[b].append(int(i))
                fill[b] += n
                break
        else:
            bins.append([int(i)])
            fill.append(n)
            open_.append(len(bins) - 1)
            if len(open_) > window:
                open_.pop(0)
        open_ = [b for b in open_ if fill[b] < seq_len]
    return bins


def collate_packed(data: TokenizedData, bins: Sequence[Sequence[int]], pad_id: int,
                   seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate each bin's examples into one row. Returns input_ids, labels, attention_mask, position_ids,
    document_ids, all (B, T) long. `attention_mask` holds document ids 1, 1, 1, 2, 2, ... per row and 0 on padding
    (nonzero = real token, as an HF mask); `document_ids` = attention_mask - 1 (0-based, -1 on padding);
    `position_ids` restart at 0 for every example. The first token of every example gets label -100 (it has no
    in-document predecessor).

    Attention must stay inside each example: qlora70's `Llama.forward(input_ids, attention_mask=..., position_ids=...)`
    reads exactly these (document-id masks); for another model build the mask with `document_causal_mask` (B, 1, T, T)
    and pass the position ids to its rotary embedding. A model that only takes input_ids must not get packed rows."""
    rows = []
    for bin_ in bins:
        parts = [data.example(i) for i in bin_]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        pos = np.concatenate([np.arange(len(p[0])) for p in parts])
        doc = np.concatenate([np.full(len(p[0]), d + 1) for d, p in enumerate(parts)])
        starts = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
        y[starts] = IGNORE_INDEX
        rows.append((x, y, pos, doc))
    T = max(len(r[0]) for r in rows) if seq_len is None else seq_len
    B = len(rows)
    out = {"input_ids": torch.full((B, T), int(pad_id), dtype=torch.long),
           "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long),
           "position_ids": torch.zeros((B, T), dtype=torch.long)}
    for b, (x, y, pos, doc) in enumerate(rows):
        n = len(x)
        if n > T:
            raise ValueError(f"packed row of {n} tokens exceeds seq_len {T}")
        out["input_ids"][b, :n] = torch.from_numpy(x)
        out["labels"][b, :n] = torch.from_numpy(y)
        out["attention_mask"][b, :n] = torch.from_numpy(doc)
        out["position_ids"][b, :n] = torch.from_numpy(pos)
    out["document_ids"] = out["attention_mask"] - 1
    return out


class Batches:
    """Deterministic, resumable batches over a `TokenizedData`.

    Each epoch draws a permutation from (seed, epoch). With `group_by_length` (QLoRA's group_by_length, HF's
    megabatch scheme) the permutation is cut into megabatches of `mega_batch_mult` global batches, each sorted by
    length (longest first) and cut into batches; batch order is then shuffled, the batch holding the longest example
    first (an out-of-memory shows at step 1). With `packing`, examples are first-fit packed into rows of `seq_len`
    tokens in permutation order and `batch_size` counts rows. With `world_size` > 1 each global batch of
    `batch_size * world_size` units is dealt round-robin (unit r, r + world, ... go to rank r); a final batch with fewer
    units than ranks is dropped.

    Iterating yields collated dicts (see `collate` / `collate_packed`) from the current position to the end of the
    epoch, then moves to the next epoch. `state_dict()` -> {"epoch", "index" (batches already yielded this epoch),
    ...}; `load_state_dict()` continues exactly there.
    """

    def __init__(self, data: TokenizedData, batch_size: int, *, pad_id: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, packing: bool = False, seq_len: int | None = None,
                 drop_last: bool = False, mega_batch_mult: int = 50, rank: int = 0, world_size: int = 1,
                 pad_to_multiple_of: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if packing and seq_len is None:
            seq_len = int(data.meta.get("seq_len") or int(data.lengths.max()))
        if len(data) == 0:
            raise ValueError("Batches: the dataset is empty")
        self.data, self.batch_size, self.pad_id, self.seed = data, batch_size, pad_id, seed
        self.shuffle, self.group_by_length, self.packing, self.seq_len = shuffle, group_by_length, packing, seq_len
        self.drop_last, self.mega_batch_mult, self.rank, self.world_size = drop_last, mega_batch_mult, rank, world_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epoch, self.index = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list[list[Any]] = []

    # ---- planning ----
    def _units_and_lengths(self, rng: np.random.Generator) -> tuple[list[Any], np.ndarray]:
        n = len(self.data)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        lengths = self.data.lengths
        if not self.packing:
            return [int(i) for i in order], lengths[order]
        bins = pack_indices(lengths, order, self.seq_len)
        return bins, np.array([int(lengths[b].sum()) for b in bins])

    def plan(self, epoch: int) -> list[list[Any]]:
        """The global batches of `epoch` (lists of example indices, or of bins when packing)."""
        if self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        units, lens = self._units_and_lengths(rng)
        gb = self.batch_size * self.world_size
        if self.group_by_length and self.shuffle:
            mb = gb * self.mega_batch_mult
            groups: list[list[int]] = []  # batches as positions into `units`
            for s in range(0, len(units), mb):
                idx = sorted(range(s, min(s + mb, len(units))), key=lambda j: -lens[j])
                groups += [idx[k:k + gb] for k in range(0, len(idx), gb)]
            longest = int(np.argmax([lens[g[0]] for g in groups]))  # each group is sorted, longest first
            perm = [int(j) for j in rng.permutation(len(groups)) if j != longest]
            batches = [[units[j] for j in groups[g]] for g in [longest] + perm]
        else:
            batches = [units[k:k + gb] for k in range(0, len(units), gb)]
        # at most one batch is partial (the tail of the last megabatch); drop it when asked to, or when some rank
        # would get nothing
        batches = [b for b in batches if len(b) >= (gb if self.drop_last else self.world_size)]
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def local(self, batch: list[Any]) -> list[Any]:
        """This rank's share of a global batch."""
        return batch[self.rank::self.world_size]

    def collate(self, units: list[Any]) -> dict[str, torch.Tensor]:
        if self.packing:
            return collate_packed(self.data, units, self.pad_id, None)
        return collate([self.data.example(i) for i in units], self.pad_id, self.pad_to_multiple_of)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = self.plan(self.epoch)
        while self.index < len(batches):
            units = self.local(batches[self.index])
            self.index += 1
            yield self.collate(units)
        self.epoch += 1
        self.index = 0

    # ---- resume ----
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_examples": len(self.data),
                "batch_size": self.batch_size, "world_size": self.world_size, "packing": self.packing,
                "group_by_length": self.group_by_length, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "n_examples", "batch_size", "world_size", "packing", "group_by_length", "shuffle"):
            mine = self.state_dict()[k]
            if k in state and state[k] != mine:
                raise ValueError(f"data position was saved with {k}={state[k]!r} but this run has {k}={mine!r}; "
                                 f"resume with the same data and batch settings")
        if int(state["index"]) > len(self.plan(int(state["epoch"]))):
            raise ValueError(f"data position index {state['index']} is past the end of epoch {state['epoch']}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# --------------------------------------------------------------------------------------------------------------------
