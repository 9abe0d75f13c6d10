"""Common types for evaluation tasks: one question (`EvalItem`), a loaded task (`TaskData`), validation helpers.

Loaders never crash on one bad record: they append an `Excluded(id, reason)` and go on. Ids are stable strings
(`file:line`, a PMID, `step2:115`) so reports can name items without carrying their text.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# "Answer E: ..." inside another option's text: the option was merged into its neighbour when scraped.
_MERGED_OPTION = re.compile(r"(?:^|\n)\s*(?:Answer|Option)\s+[A-Z]\s*[:.)]", re.IGNORECASE)


@dataclass(frozen=True)
class EvalItem:
    """One multiple-choice question.

    `options` maps a label ("A".."I", or "yes"/"no"/"maybe") to its text, in display order; `answer` is one of its keys.
    `context` is extra text shown before the question (PubMedQA abstract); `group` names a subset (USMLE step, MedQA
    `meta_info`) for per-group accuracy.
    """

    id: str
    question: str
    options: dict[str, str]
    answer: str
    context: str = ""
    group: str = ""

    @property
    def labels(self) -> list[str]:
        return list(self.options)

    @property
    def gold(self) -> int:
        """Index of the answer in `labels`."""
        return self.labels.index(self.answer)


@dataclass(frozen=True)
class Excluded:
    id: str
    reason: str


@dataclass
class TaskData:
    """Items of one task plus what was excluded (with reasons) and which files were read."""

    task: str
    items: list[EvalItem] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    label_words: bool = False  # True when labels are answer words (PubMedQA), False when letters
    split: str = ""  # which part of the benchmark the items are (reports always state it); "" -> the file names

    def split_name(self) -> str:
        """What was loaded, for reports: `split` if the loader set it, else the data file names."""
        return self.split or ", ".join(os.path.basename(f) for f in self.files)

    def exclude(self, id: str, reason: str) -> None:
        self.excluded.append(Excluded(str(id), reason))

    def exclusion_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.reason for e in self.excluded).items()))

    def excluded_ids(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in self.excluded:
            out.setdefault(e.reason, []).append(e.id)
        return out

    def __len__(self) -> int:
        return len(self.items)


def format_options(options: dict[str, str], sep: str = ". ") -> str:
    """`A. text\\nB. text...`: the option block shared by the eval prompts and the MedQA training entries."""
    return "\n".join(f"{k}{sep}{v}" for k, v in options.items())


def option_problem(options: Any, min_options: int = 2) -> str | None:
    """Why an options mapping is unusable (a reason string), or None when it is fine."""
    if not isinstance(options, dict):
        return "bad_options"
    if not options:
        return "no_options"
    for k, v in options.items():
        if not isinstance(k, str) or len(k) != 1 or k not in LETTERS:
            return "bad_option_label"
        if not isinstance(v, str):
            return "bad_option_text"
        if _MERGED_OPTION.search(v):
            return "merged_option_text"
        if not v.strip():
            return "empty_option_text"
    if len(options) < min_options:
        return "too_few_options"
    if list(options) != list(LETTERS[: len(options)]):
        return "non_consecutive_option_labels"
    return None


def check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} does not exist")
    return p


def read_json(path: Path, what: str) -> Any:
    """Parse a whole JSON file; a file that is not valid JSON is a clear ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno}); pass the file as "
                         f"distributed") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({e.reason})") from None


def iter_jsonl(path: Path):
    """Yield (line_index, parsed object or None, error reason or None) for each non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except json.JSONDecodeError:
                yield i, None, "invalid_json"


def collect_items(data: "TaskData", rows, name: str, make_item) -> "TaskData":
    """Turn (index, record, read_error) rows into items of `data`; each bad record is excluded with its id
    (`name:index`) and reason, never raised. `make_item(record, rid) -> (EvalItem | None, reason)`."""
    for i, rec, err in rows:
        rid = f"{name}:{i}"
        if err:
            data.exclude(rid, err)
            continue
        if not isinstance(rec, dict):
            data.exclude(rid, "not_an_object")
            continue
        item, reason = make_item(rec, rid)
        if item is None:
            data.exclude(rid, reason)
        else:
            data.items.append(item)
    return data
