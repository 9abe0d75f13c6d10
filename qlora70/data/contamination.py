"""Contamination check: 13-gram overlap of evaluation questions with the training data (counts and ids only).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..tasks import load_task
from .entries import Entry, read_entries

# Contamination check
# --------------------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def normalize_words(text: str) -> list[str]:
    """Lowercase alphanumeric words (punctuation and whitespace ignored), as GPT-3's overlap analysis normalizes."""
    return _WORD.findall(text.lower())


@dataclass
class ContaminationReport:
    """Per task: `n_items`, `n_contaminated` (overlap fraction >= min_overlap) with `ids`, `n_any_overlap` (GPT-3's
    "dirty": at least one shared n-gram) with `any_ids`, `overlap` (id -> largest fraction of the question's n-grams
    found in a single training entry, for items with any overlap) and `matches` (id -> up to 5 training entry ids)."""

    n: int
    min_overlap: float
    per_task: dict[str, dict[str, Any]]
    n_train: int
    ignored_common_ngrams: int = 0

    def to_dict(self) -> dict:
        return {"n": self.n, "min_overlap": self.min_overlap, "n_train": self.n_train,
                "ignored_common_ngrams": self.ignored_common_ngrams, "per_task": self.per_task}

    def to_markdown(self) -> str:
        lines = [f"Contamination: {self.n}-gram overlap of evaluation questions with {self.n_train} training entries "
                 f"(contaminated = one training entry holds at least {self.min_overlap:.0%} of a question's {self.n}-grams)",
                 "", "| task | questions | contaminated | fraction | any overlap |", "|---|---|---|---|---|"]
        for t, v in self.per_task.items():
            frac = v["n_contaminated"] / v["n_items"] if v["n_items"] else 0.0
            lines.append(f"| {t} | {v['n_items']} | {v['n_contaminated']} | {frac:.3f} | {v['n_any_overlap']} |")
        return "\n".join(lines) + "\n"


def contamination_check(train: Iterable[Entry], eval_sets: dict[str, Sequence[Any]], *, n: int = 13,
                        min_overlap: float = 0.3, max_item_frequency: int | None = 10,
                        progress: bool = True) -> ContaminationReport:
    """Which evaluation questions share normalized word `n`-grams with the training entries.

    eval_sets: task name -> items with `id`, `question` and optional `context` (e.g. `TaskData.items`); the context +
    question text is checked. Questions shorter than n words are checked as a whole. A question is *contaminated* when
    one training entry (instruction + input + output) holds at least `min_overlap` of its distinct n-grams; any shared
    n-gram at all (GPT-3's criterion) is reported separately, because clinical vignettes share stock phrases ("is
    brought to the emergency department because of a 2-day history of", standard lab panels) without being copies:
    on the shipped MedQA test vs dev subsets, 39 of 200 questions share a 13-gram, the largest share is 0.18. N-grams found in more
    than `max_item_frequency` distinct evaluation items are boilerplate and ignored (None keeps all).
    Memory stays small: only the evaluation n-grams are held; training text is streamed.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
    grams: dict[tuple[str, ...], set[tuple[str, str]]] = {}
    for task, items in eval_sets.items():
        for it in items:
            words = normalize_words(f"{getattr(it, 'context', '') or ''} {it.question}")
            m = min(n, len(words))
            for j in range(len(words) - m + 1 if m else 0):
                grams.setdefault(tuple(words[j:j + m]), set()).add((task, str(it.id)))
    ignored = 0
    if max_item_frequency is not None:
        common = [g for g, owners in grams.items() if len(owners) > max_item_frequency]
        ignored = len(common)
        for g in common:
            del grams[g]
    total: dict[tuple[str, str], int] = {}
    for owners in grams.values():
        for o in owners:
            total[o] = total.get(o, 0) + 1
    sizes = sorted({len(g) for g in grams})
    found: set[tuple[str, ...]] = set()
    best: dict[tuple[str, str], int] = {}  # most distinct n-grams of the item found in ONE training entry
    matches: dict[tuple[str, str], list[str]] = {}
    n_train = 0
    it: Iterable[Entry] = train
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(train, desc="contamination", unit="ex", mininterval=1.0)
    for e in it:
        n_train += 1
        words = normalize_words(f"{e.instruction} {e.input} {e.output}")
        local: dict[tuple[str, ...], set[tuple[str, str]]] = {}
        for m in sizes:
            for j in range(len(words) - m + 1):
                g = tuple(words[j:j + m])
                owners = grams.get(g)
                if owners:
                    local[g] = owners
        if not local:
            continue
        found.update(local)
        per_owner: dict[tuple[str, str], int] = {}
        for owners in local.values():
            for o in owners:
                per_owner[o] = per_owner.get(o, 0) + 1
        for o, c in per_owner.items():
            best[o] = max(best.get(o, 0), c)
            lst = matches.setdefault(o, [])
            if len(lst) < 5:
                lst.append(e.id)
    any_hit = {o for g in found for o in grams[g]}
    per_task = {}
    for task, items in eval_sets.items():
        keys = [(task, str(i.id)) for i in items]
        overlap = {k[1]: round(best[k] / total[k], 4) for k in keys if k in any_hit}
        ids = [i for i, f in overlap.items() if f >= min_overlap]
        per_task[task] = {"n_items": len(items), "n_contaminated": len(ids), "ids": ids,
                          "n_any_overlap": len(overlap), "any_ids": list(overlap), "overlap": overlap,
                          "matches": {i: matches[(task, i)] for i in overlap}}
    return ContaminationReport(n=n, min_overlap=min_overlap, per_task=per_task, n_train=n_train,
                               ignored_common_ngrams=ignored)


def contamination_check_paths(train_paths: str | os.PathLike | Sequence[str | os.PathLike],
                              eval_paths: dict[str, Any], *, n: int = 13, min_overlap: float = 0.3,
                              max_item_frequency: int | None = 10, progress: bool = True) -> ContaminationReport:
    """`contamination_check` on files: training data as `read_entries` reads it, eval_paths task -> path as
    `qlora70.tasks.load_task` reads it: {"medqa": path, "pubmedqa": path, "usmle": path}, or name -> (task, path)
    to check several files of one task, e.g. {"medqa-5": ("medqa", path)}."""
    entries, _ = read_entries(train_paths)
    sets = {name: (load_task(*p) if isinstance(p, tuple) else load_task(name, p)).items
            for name, p in eval_paths.items()}
    return contamination_check(entries, sets, n=n, min_overlap=min_overlap, max_item_frequency=max_item_frequency,
                               progress=progress)
