"""Training data: Medical Meadow / MedAlpaca, MedQA and PubMedQA -> prompt/answer entries -> token ids with
answer-only labels, cached on disk; length-grouped or packed batches with a resumable position; contamination check.

Pipeline (`build_dataset` does all of it):
    read_entries(paths)      JSON list / JSONL of {instruction, input, output}, a directory of such files, MedQA jsonl,
                             PubMedQA json (ori_pqal layout). Bad records are reported as `file:index` and skipped.
    clean_entries(entries)   drop empty and exact-duplicate entries (reasons and ids in the `DataReport`).
    tokenize_entries(...)    template -> (prompt, answer); labels are -100 on the prompt; EOS appended; sequences longer
                             than `seq_len` lose prompt tokens from the left (after BOS), and only an answer that does
                             not fit even then is cut (from the right, without EOS). Both counted.
    token cache              safetensors file keyed by data-file hashes + tokenizer fingerprint + template + settings.
    Batches                  deterministic (seed, epoch) shuffling, group-by-length or packing, `state_dict()` resume.

Labels follow the HF convention: `labels[t]` is the target for position t and the loss shifts (logits[:, :-1] vs
labels[:, 1:]). Nothing here logs record text: reports carry counts and ids.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .io import atomic_path

IGNORE_INDEX = -100
CACHE_VERSION = "qlora70-tokens-v1"
DEFAULT_SEQ_LEN = 1024

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


MEDALPACA_PRIMER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                    "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class PromptTemplate:
    """A named training template. `text` is the template as recorded with a run; `render(entry)` returns
    (prompt, answer) whose concatenation is the full training text (loss only on the answer)."""

    name: str
    text: str

    def render(self, e: Entry) -> tuple[str, str]:
        instruction, context, output = e.instruction.strip(), e.input.strip(), e.output.strip()
        if self.name == "sm70":
            body = " ".join(p for p in (context, instruction) if p)
            return f"Question: {body}\nAnswer:", f" {output}"
        if self.name == "medalpaca":
            return (f"{MEDALPACA_PRIMER}\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n",
                    output)
        raise ValueError(f"template {self.name!r} has no renderer; known: {sorted(TEMPLATES)}")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "text": self.text}


# The SM70 unified template, defined here and nowhere else. <context> is the entry's `input` (Alpaca: "an input that
# provides further context"; the abstract for PubMedQA), <instruction or question> its `instruction`; empty parts and
# their separating space are left out; fields are stripped; the answer continues after "Answer:" with one space.
SM70_TEMPLATE = PromptTemplate("sm70", "Question: {context} {instruction}\nAnswer: {output}")
# medAlpaca's Alpaca-style template (medalpaca/handler.py in kbressem/medAlpaca), for the template ablation.
MEDALPACA_TEMPLATE = PromptTemplate(
    "medalpaca", MEDALPACA_PRIMER + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}")
TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (SM70_TEMPLATE, MEDALPACA_TEMPLATE)}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


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
    from .tasks import format_options, load_medqa, load_pubmedqa
    from .tasks.pubmedqa import long_answer

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


# --------------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------------


def resolve_add_bos(tokenizer: Any, add_bos: bool | None) -> bool:
    """None -> the tokenizer's own convention (`add_bos_default`, or an `add_bos` / `add_bos_token` attribute; Llama-2:
    True, SmolLM2: False), else True when it has a BOS id."""
    if add_bos is not None:
        return bool(add_bos) and getattr(tokenizer, "bos_id", None) is not None
    for attr in ("add_bos_default", "add_bos", "add_bos_token"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, bool):
            return v and getattr(tokenizer, "bos_id", None) is not None
    return getattr(tokenizer, "bos_id", None) is not None


_PARSE_SPECIAL: dict[type, bool] = {}


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text, no BOS/EOS. Control strings inside data ("</s>", "<|im_end|>") stay text: a
    tokenizer whose `encode` takes `parse_special` (qlora70's) is called with `parse_special=False`."""
    cls = type(tokenizer)
    if cls not in _PARSE_SPECIAL:
        try:
            _PARSE_SPECIAL[cls] = "parse_special" in inspect.signature(tokenizer.encode).parameters
        except (TypeError, ValueError):
            _PARSE_SPECIAL[cls] = False
    if _PARSE_SPECIAL[cls]:
        return list(tokenizer.encode(text, bos=False, eos=False, parse_special=False))
    return list(tokenizer.encode(text, bos=False, eos=False))


def encode_example(entry: Entry, tokenizer: Any, template: PromptTemplate, seq_len: int, add_bos: bool,
                   add_eos: bool = True, min_prompt_tokens: int = 16) -> tuple[list[int], int, str, bool]:
    """(token ids, number of leading masked tokens, status, boundary_mismatch) for one entry.

    The answer tokens are lm-eval's split: enc(prompt + answer)[len(enc(prompt)):]; `boundary_mismatch` says that
    enc(prompt + answer) did not start with enc(prompt) (the prompt's own tokens are used then).
    status: "ok"; "prompt_truncated" (prompt tokens after BOS dropped from the left so that the whole answer + EOS
    fits); "answer_truncated" (the answer + EOS does not fit even beside min(prompt, `min_prompt_tokens`) prompt
    tokens: those are kept, the answer is cut from the right and gets no EOS); "empty_answer" (no answer tokens)."""
    prompt, answer = template.render(entry)
    head = [int(tokenizer.bos_id)] if add_bos else []
    p = encode_text(tokenizer, prompt)
    whole = encode_text(tokenizer, prompt + answer)
    mismatch = whole[:len(p)] != p
    a = whole[len(p):]
    if not a:
        return [], 0, "empty_answer", mismatch
    if add_eos:
        a = a + [int(tokenizer.eos_id)]
    if len(head) + len(p) + len(a) <= seq_len:
        return head + p + a, len(head) + len(p), "ok", mismatch
    keep = min(len(p), min_prompt_tokens)
    if len(head) + keep + len(a) <= seq_len:
        room = seq_len - len(head) - len(a)
        p = p[len(p) - room:]
        return head + p + a, len(head) + len(p), "prompt_truncated", mismatch
    p = p[len(p) - keep:] if keep else []
    a = a[:seq_len - len(head) - len(p)]  # cut from the right: no EOS, the answer does not end here
    return head + p + a, len(head) + len(p), "answer_truncated", mismatch


class TokenizedData:
    """Token ids of all examples in one flat array.

    tokens: (total,) int32; offsets: (N + 1,) int64 (example i is tokens[offsets[i]:offsets[i+1]]);
    prompt_lens: (N,) int32 leading masked positions (BOS + prompt); ids: N strings (`file:index`);
    meta: template, seq_len, tokenizer fingerprint, data report, cache info.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray, ids: list[str],
                 meta: dict | None = None) -> None:
        if offsets.ndim != 1 or len(offsets) != len(prompt_lens) + 1 or len(ids) != len(prompt_lens):
            raise ValueError(f"TokenizedData: inconsistent sizes: offsets {len(offsets)}, prompt_lens "
                             f"{len(prompt_lens)}, ids {len(ids)}")
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.prompt_lens = np.ascontiguousarray(prompt_lens, dtype=np.int32)
        self.ids = list(ids)
        self.meta = dict(meta or {})
        self.cache_hit = False
        self.cache_path: str | None = None

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 example lengths in tokens."""
        return np.diff(self.offsets)

    @property
    def report(self) -> DataReport:
        return DataReport.from_dict(self.meta.get("report", {}))

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_answer_tokens(self) -> int:
        return int(self.lengths.sum() - self.prompt_lens.sum())

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (L,) int64, labels (L,) int64 with -100 on the prompt)."""
        ids = self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)
        labels = ids.copy()
        labels[:self.prompt_lens[i]] = IGNORE_INDEX
        return ids, labels

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TokenizedData":
        idx = np.asarray(indices, dtype=np.int64)
        lens = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        tokens = (np.concatenate([self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in idx])
                  if len(idx) else np.zeros(0, np.int32))
        out = TokenizedData(tokens, offsets, self.prompt_lens[idx], [self.ids[i] for i in idx], self.meta)
        return out

    def split(self, val_size: int | float, seed: int = 0) -> tuple["TokenizedData", "TokenizedData"]:
        """(train, validation): a seeded random hold-out of `val_size` examples (int) or that fraction (float)."""
        n = len(self)
        k = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
        if not 0 < k < n:
            raise ValueError(f"validation size {val_size!r} gives {k} of {n} examples; need 0 < k < {n}")
        perm = np.random.default_rng(seed).permutation(n)
        return self.subset(np.sort(perm[k:])), self.subset(np.sort(perm[:k]))

    # ---- persistence (safetensors, no pickle) ----
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (`qlora70.io.atomic_path`)."""
        from safetensors.numpy import save_file

        arrays = {"tokens": self.tokens, "offsets": self.offsets, "prompt_lens": self.prompt_lens,
                  "ids_utf8": np.frombuffer("\n".join(self.ids).encode("utf-8"), dtype=np.uint8).copy(),
                  "meta_utf8": np.frombuffer(json.dumps(self.meta).encode("utf-8"), dtype=np.uint8).copy()}
        with atomic_path(path) as tmp:
            save_file(arrays, tmp, metadata={"format": CACHE_VERSION})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenizedData":
        from safetensors.numpy import load_file

        try:
            a = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"token cache {path} is unreadable ({e}); delete it to rebuild") from None
        missing = {"tokens", "offsets", "prompt_lens", "ids_utf8", "meta_utf8"} - set(a)
        if missing:
            raise ValueError(f"token cache {path} lacks {sorted(missing)}; delete it to rebuild")
        ids_text = a["ids_utf8"].tobytes().decode("utf-8")
        ids = ids_text.split("\n") if len(a["prompt_lens"]) else []
        return cls(a["tokens"], a["offsets"], a["prompt_lens"], ids, json.loads(a["meta_utf8"].tobytes()))


def tokenize_entries(entries: Sequence[Entry], tokenizer: Any, *, template: str | PromptTemplate = "sm70",
                     seq_len: int = DEFAULT_SEQ_LEN, add_bos: bool | None = None, add_eos: bool = True,
                     min_prompt_tokens: int = 16, report: DataReport | None = None,
                     progress: bool = True) -> TokenizedData:
    """Tokenize entries with the template (see `encode_example`); counts truncations in `report`."""
    if not isinstance(seq_len, int) or seq_len < 8:
        raise ValueError(f"seq_len must be an int >= 8, got {seq_len!r}")
    tpl = get_template(template)
    bos = resolve_add_bos(tokenizer, add_bos)
    if add_eos and getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_id")
    report = report if report is not None else DataReport(n_read=len(entries))
    chunks: list[np.ndarray] = []
    lens, plens, ids = [], [], []
    it: Iterable[Entry] = entries
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(entries, desc="tokenizing", unit="ex", mininterval=1.0)
    for e in it:
        toks, plen, status, mismatch = encode_example(e, tokenizer, tpl, seq_len, bos, add_eos, min_prompt_tokens)
        if status == "empty_answer":
            report.drop("empty_answer_tokens", e.id)
            continue
        if status == "prompt_truncated":
            report.prompt_truncated.append(e.id)
        elif status == "answer_truncated":
            report.answer_truncated.append(e.id)
        report.n_boundary_mismatch += mismatch
        chunks.append(np.asarray(toks, dtype=np.int32))
        lens.append(len(toks))
        plens.append(plen)
        ids.append(e.id)
    if not chunks:
        raise ValueError(f"no usable training entries remain after tokenization:\n{report.summary()}")
    report.n_kept = len(chunks)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    meta = {"template": tpl.to_dict(), "seq_len": seq_len, "add_bos": bos, "add_eos": add_eos,
            "min_prompt_tokens": min_prompt_tokens, "report": report.to_dict()}
    return TokenizedData(np.concatenate(chunks), offsets, np.asarray(plens, np.int32), ids, meta)


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------

_PROBE = ("Hello world! A 45-year-old man with HbA1c 7.2% and eGFR <60 mL/min/1.73 m² — naïve café 東京 🙂\n"
          "  indented\ttab   spaces 12345 1,000.50 \"quoted\" <s></s> [INST] ### Response:")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes when the tokenizer changes: its own `fingerprint()` if it has one, the bytes of its model
    file (`source` / `path` / `model_path` / `model_file` attribute) if it names one, special ids, every piece, and the encoding
    of a probe text (covers merges and normalization)."""
    h = hashlib.sha256()
    fp = getattr(tokenizer, "fingerprint", None)
    if callable(fp):
        h.update(str(fp()).encode())
    for attr in ("source", "path", "model_path", "model_file"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
            h.update(file_sha256(v).encode())
            break
    h.update(repr((type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None), getattr(tokenizer, "bos_id", None),
                   getattr(tokenizer, "eos_id", None), getattr(tokenizer, "pad_id", None))).encode())
    n = getattr(tokenizer, "vocab_size", None)
    piece = getattr(tokenizer, "id_to_piece", None)
    if isinstance(n, int) and callable(piece):
        h.update("\x00".join(str(piece(i)) for i in range(n)).encode("utf-8", "surrogatepass"))
    h.update(repr(encode_text(tokenizer, _PROBE)).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$QLORA70_CACHE/tokens, else $XDG_CACHE_HOME/qlora70/tokens, else ~/.cache/qlora70/tokens."""
    if os.environ.get("QLORA70_CACHE"):
        return Path(os.environ["QLORA70_CACHE"]) / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qlora70" / "tokens"


def dataset_cache_key(files: Sequence[Path], tokenizer_fp: str, settings: dict) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for f in files:
        h.update(f"{f.name}\x00{file_sha256(f)}\x00".encode())
    h.update(tokenizer_fp.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def build_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any, *,
                  template: str | PromptTemplate = "sm70", seq_len: int = DEFAULT_SEQ_LEN, kind: str = "auto",
                  add_bos: bool | None = None, add_eos: bool = True, min_prompt_tokens: int = 16,
                  pubmedqa_long_answer: bool = False, cache_dir: str | os.PathLike | None | bool = None,
                  progress: bool = True) -> TokenizedData:
    """Read, clean and tokenize training data, reusing the on-disk token cache when nothing changed.

    The cache file `<cache_dir>/<key[:32]>.safetensors` is keyed by the SHA-256 of every data file, the tokenizer
    fingerprint, the template (name and text), seq_len and the other settings; any change builds a new file.
    cache_dir: None -> `default_cache_dir()`; False -> no cache. `result.cache_hit` says whether it was reused.
    """
    tpl = get_template(template)
    files = expand_paths(paths)
    bos = resolve_add_bos(tokenizer, add_bos)
    settings = {"template": tpl.to_dict(), "seq_len": seq_len, "kind": kind, "add_bos": bos, "add_eos": add_eos,
                "min_prompt_tokens": min_prompt_tokens, "pubmedqa_long_answer": pubmedqa_long_answer}
    cache_file = None
    if cache_dir is not False:
        tok_fp = tokenizer_fingerprint(tokenizer)
        key = dataset_cache_key(files, tok_fp, settings)
        cache_file = Path(cache_dir if cache_dir not in (None, True) else default_cache_dir()) / f"{key[:32]}.safetensors"
        if cache_file.exists():
            try:
                data = TokenizedData.load(cache_file)
                if data.meta.get("cache_key") == key:
                    data.cache_hit, data.cache_path = True, str(cache_file)
                    return data
            except ValueError:
                pass  # damaged cache: rebuild below and overwrite atomically
    entries, report = read_entries(files, kind=kind, pubmedqa_long_answer=pubmedqa_long_answer)
    entries, report = clean_entries(entries, report)
    data = tokenize_entries(entries, tokenizer, template=tpl, seq_len=seq_len, add_bos=bos, add_eos=add_eos,
                            min_prompt_tokens=min_prompt_tokens, report=report, progress=progress)
    data.meta["files"] = [str(f) for f in files]
    if cache_file is not None:
        data.meta["cache_key"] = key
        data.save(cache_file)
        data.cache_path = str(cache_file)
    return data


# --------------------------------------------------------------------------------------------------------------------
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


def document_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids (0 = padding, as `collate_packed` returns) -> (B, 1, T, T) bool mask for SDPA, True where
    query i may attend key j: same document, key not padding, j <= i. Every position also sees itself, so padding rows
    are never fully masked (no NaN)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    same = attention_mask[:, :, None] == attention_mask[:, None, :]  # (B, T, T)
    allowed = same & causal & (attention_mask[:, None, :] != 0)
    allowed |= torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return allowed[:, None]


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
    from .tasks import load_task

    entries, _ = read_entries(train_paths)
    sets = {name: (load_task(*p) if isinstance(p, tuple) else load_task(name, p)).items
            for name, p in eval_paths.items()}
    return contamination_check(entries, sets, n=n, min_overlap=min_overlap, max_item_frequency=max_item_frequency,
                               progress=progress)


__all__ = ["Entry", "PromptTemplate", "SM70_TEMPLATE", "MEDALPACA_TEMPLATE", "TEMPLATES", "get_template", "DataReport",
           "read_entries", "clean_entries", "detect_kind", "expand_paths", "shipped_data_dir", "encode_example",
           "tokenize_entries", "TokenizedData", "encode_text", "resolve_add_bos", "build_dataset", "tokenizer_fingerprint", "default_cache_dir",
           "collate", "pack_indices", "collate_packed", "document_causal_mask", "Batches", "IGNORE_INDEX",
           "normalize_words", "contamination_check", "contamination_check_paths", "ContaminationReport",
           "DEFAULT_SEQ_LEN"]
