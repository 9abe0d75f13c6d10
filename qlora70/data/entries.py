"""Training entries: Medical Meadow / MedAlpaca JSON(L), MedQA JSONL and PubMedQA JSON -> `Entry` records, with
the `DataReport` accounting (counts and `file:index` ids of what was dropped, never record text).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..tasks import format_options, load_medqa, load_pubmedqa
from ..tasks.pubmedqa import long_answer

# --------------------------------------------------------------------------------------------------------------------
# Entries and templates
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One training example in the Alpaca layout; `id` is `file:index` (or `file:PMID`)."""

    instruction: str
    input: str
    output: str
    id: str = ""



# --------------------------------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What was read, dropped (reason -> ids), and truncated. Ids only, never record text."""

    files: list[str] = field(default_factory=list)
    n_read: int = 0
    n_kept: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    prompt_truncated: list[str] = field(default_factory=list)
    answer_truncated: list[str] = field(default_factory=list)
    n_boundary_mismatch: int = 0  # enc(prompt + answer) did not start with enc(prompt); lm-eval's split was used

    def drop(self, reason: str, id: str) -> None:
        self.dropped.setdefault(reason, []).append(id)

    @property
    def n_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def drop_counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self.dropped.items())}

    def to_dict(self) -> dict:
        return {"files": self.files, "n_read": self.n_read, "n_kept": self.n_kept, "n_dropped": self.n_dropped,
                "dropped_counts": self.drop_counts(), "dropped_ids": self.dropped,
                "n_prompt_truncated": len(self.prompt_truncated), "n_answer_truncated": len(self.answer_truncated),
                "prompt_truncated_ids": self.prompt_truncated, "answer_truncated_ids": self.answer_truncated,
                "n_boundary_mismatch": self.n_boundary_mismatch}

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        return cls(files=list(d.get("files", [])), n_read=d.get("n_read", 0), n_kept=d.get("n_kept", 0),
                   dropped={k: list(v) for k, v in d.get("dropped_ids", {}).items()},
                   prompt_truncated=list(d.get("prompt_truncated_ids", [])),
                   answer_truncated=list(d.get("answer_truncated_ids", [])),
                   n_boundary_mismatch=d.get("n_boundary_mismatch", 0))

    def summary(self, max_ids: int = 5) -> str:
        """A few log lines: counts per reason with the first ids."""
        lines = [f"data: {self.n_read} read, {self.n_kept} kept, {self.n_dropped} dropped, "
                 f"{len(self.prompt_truncated)} prompts cut from the left, {len(self.answer_truncated)} answers cut"]
        for reason, ids in sorted(self.dropped.items()):
            more = f" (+{len(ids) - max_ids} more)" if len(ids) > max_ids else ""
            lines.append(f"  dropped {len(ids)} {reason}: {', '.join(ids[:max_ids])}{more}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".json", ".jsonl")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus every .json/.jsonl under directories (sorted). Missing paths: FileNotFoundError."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"training data: {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"training data: no .json/.jsonl files under {p}")
            out += found
        else:
            out.append(p)
    return out


def shipped_data_dir() -> Path:
    """The repo's `data/` folder (small real subsets with their licenses; see data/README.md)."""
    d = Path(__file__).resolve().parent.parent / "data"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} not found: the shipped data subsets live in the source checkout's data/ folder")
    return d


def _alpaca_entry(rec: Any, rid: str, report: DataReport) -> Entry | None:
    if not isinstance(rec, dict):
        report.drop("not_an_object", rid)
        return None
    if "output" not in rec or ("instruction" not in rec and "input" not in rec):
        report.drop("missing_field", rid)
        return None
    vals = {}
    for k in ("instruction", "input", "output"):
        v = rec.get(k)
        if v is None:
            v = ""
        if not isinstance(v, str):
            report.drop("bad_field_type", rid)
            return None
        vals[k] = v
    return Entry(vals["instruction"], vals["input"], vals["output"], rid)


def _read_alpaca_jsonl(path: Path, report: DataReport) -> list[Entry]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            report.n_read += 1
            rid = f"{path.name}:{i}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                report.drop("invalid_json", rid)
                continue
            e = _alpaca_entry(rec, rid, report)
            if e is not None:
                out.append(e)
    return out


def _first_jsonl_record(path: Path) -> Any:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
    return None


def detect_kind(path: str | os.PathLike) -> str:
    """"alpaca" | "medqa" | "pubmedqa" from the file's content; ValueError when it is none of them."""
    p = Path(path)
    if p.suffix == ".jsonl":
        rec = _first_jsonl_record(p)
        if isinstance(rec, dict) and "options" in rec and "question" in rec:
            return "medqa"
        if isinstance(rec, dict) and "output" in rec:
            return "alpaca"
        raise ValueError(f"{p}: JSONL records have neither {{instruction, input, output}} nor MedQA fields")
    with open(p, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        return "alpaca"
    if head.startswith("{") and '"QUESTION"' in head:
        return "pubmedqa"
    raise ValueError(f"{p}: not a JSON list of {{instruction, input, output}} nor PubMedQA records (ori_pqal layout)")


def read_entries(paths: str | os.PathLike | Sequence[str | os.PathLike], *, kind: str = "auto",
                 pubmedqa_long_answer: bool = False, report: DataReport | None = None) -> tuple[list[Entry], DataReport]:
    """Read training entries from files or directories.

    kind: "auto" (per file, by content), "alpaca", "medqa" or "pubmedqa".
    MedQA record -> instruction "<question>\\nA. ..\\nB. ..", output "<letter>. <option text>" (the same option block as
    the evaluation prompts). PubMedQA record -> input = abstract (contexts joined by newlines), instruction = question,
    output = yes/no/maybe (plus ". <LONG_ANSWER>" with `pubmedqa_long_answer`).
    A file that cannot be read or recognised is reported (reason `unreadable_file`, id = file name) and skipped; bad
    records are reported as `file:index` and skipped. Raises ValueError only when nothing usable remains.
    """
    if kind not in ("auto", "alpaca", "medqa", "pubmedqa"):
        raise ValueError(f"unknown kind {kind!r}; choose auto, alpaca, medqa or pubmedqa")
    report = report if report is not None else DataReport()
    entries: list[Entry] = []
    for p in expand_paths(paths):
        report.files.append(str(p))
        try:
            k = detect_kind(p) if kind == "auto" else kind
            if k == "alpaca":
                if p.suffix == ".jsonl":
                    entries += _read_alpaca_jsonl(p, report)
                else:
                    with open(p, encoding="utf-8") as f:
                        recs = json.load(f)
                    if not isinstance(recs, list):
                        raise ValueError("expected a JSON list of {instruction, input, output}")
                    for i, rec in enumerate(recs):
                        report.n_read += 1
                        e = _alpaca_entry(rec, f"{p.name}:{i}", report)
                        if e is not None:
                            entries.append(e)
            elif k == "medqa":
                td = load_medqa(p)
                report.n_read += len(td.items) + len(td.excluded)
                for ex in td.excluded:
                    report.drop(ex.reason, ex.id)
                for it in td.items:
                    entries.append(Entry(f"{it.question}\n{format_options(it.options)}", "",
                                         f"{it.answer}. {it.options[it.answer]}", it.id))
            elif k == "pubmedqa":
                td = load_pubmedqa(p)
                longs = long_answer(p) if pubmedqa_long_answer else {}
                report.n_read += len(td.items) + len(td.excluded)
                for ex in td.excluded:
                    report.drop(ex.reason, f"{p.name}:{ex.id}")
                for it in td.items:
                    out = f"{it.answer}. {longs[it.id]}" if it.id in longs else it.answer
                    entries.append(Entry(it.question, it.context, out, f"{p.name}:{it.id}"))
        except (ValueError, OSError, UnicodeDecodeError) as err:
            report.drop("unreadable_file", p.name)
            report.files[-1] += f" (skipped: {type(err).__name__}: {str(err)[:200]})"
    if not entries:
        raise ValueError(f"no usable training entries in {[str(p) for p in expand_paths(paths)]}:\n{report.summary()}")
    return entries, report


def clean_entries(entries: Sequence[Entry], report: DataReport | None = None) -> tuple[list[Entry], DataReport]:
    """Drop entries with an empty output (`empty_output`) or with neither instruction nor input (`empty_prompt`),
    and exact duplicates after stripping whitespace (`duplicate`, the first occurrence is kept)."""
    report = report if report is not None else DataReport(n_read=len(entries))
    seen: set[bytes] = set()
    out = []
    for e in entries:
        if not e.output.strip():
            report.drop("empty_output", e.id)
            continue
        if not e.instruction.strip() and not e.input.strip():
            report.drop("empty_prompt", e.id)
            continue
        key = hashlib.sha1("\x00".join((e.instruction.strip(), e.input.strip(), e.output.strip()))
                           .encode("utf-8", "surrogatepass")).digest()
        if key in seen:
            report.drop("duplicate", e.id)
            continue
        seen.add(key)
        out.append(e)
    report.n_kept = len(out)
    if not out:
        raise ValueError(f"no usable training entries remain after cleaning:\n{report.summary()}")
    return out, report
