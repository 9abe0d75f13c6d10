"""Token ids with answer-only labels (`TokenizedData`), the tokenization rules (prompt cut from the left, never the
answer) and the on-disk token cache keyed by data hashes + tokenizer fingerprint + template + settings.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..config import IGNORE_INDEX
from ..io import atomic_path, file_sha256
from .entries import DataReport, Entry, clean_entries, expand_paths, read_entries
from .templates import PromptTemplate, get_template

CACHE_VERSION = "qlora70-tokens-v1"
DEFAULT_SEQ_LEN = 1024

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
