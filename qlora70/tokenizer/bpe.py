"""Byte-level BPE (GPT-2 style: SmolLM2, Llama-3): `tokenizers` engine or the pure-Python merge loop, identical ids.
"""
from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from typing import Any, Mapping

from .base import CHATML_TEMPLATE, Tokenizer
from .pretokenize import GPT2_PATTERN, _compile, bytes_to_unicode

# ----------------------------------------------------------------------------------------------------------------------
# Byte-level BPE


def _pre_tokenizer_steps(pt: Mapping | None, where: str) -> list[tuple[str, re.Pattern | None]]:
    """A tokenizer.json pre_tokenizer as steps: ("split", regex) splits each piece keeping matches and gaps
    (behavior "Isolated"); ("prefix", None) prepends a space to pieces not starting with one (ByteLevel's
    add_prefix_space). The byte mapping itself follows the last step."""
    if pt is None:
        raise ValueError(f"{where}: no pre_tokenizer; only byte-level BPE (ByteLevel pre-tokenizer) is supported")
    kind = pt.get("type")
    if kind == "Sequence":
        subs = pt.get("pretokenizers") or []
        steps = [s for sub in subs[:-1] for s in _pre_tokenizer_steps(sub, where) if s[0] != "bytelevel"]
        if not subs or subs[-1].get("type") != "ByteLevel" or any(s.get("type") == "ByteLevel" for s in subs[:-1]):
            raise ValueError(f"{where}: pre_tokenizer Sequence must end with its only ByteLevel step, got "
                             f"{[s.get('type') for s in subs]}; only byte-level BPE is supported")
        return steps + _pre_tokenizer_steps(subs[-1], where)
    if kind == "ByteLevel":
        return ([("prefix", None)] if pt.get("add_prefix_space", True) else []) + \
               ([("split", _compile(GPT2_PATTERN))] if pt.get("use_regex", True) else []) + [("bytelevel", None)]
    if kind == "Digits":
        return [("split", _compile(r"\p{N}" if pt.get("individual_digits", False) else r"\p{N}+"))]
    if kind == "Split":
        pat = pt.get("pattern") or {}
        if pt.get("behavior") not in ("Isolated", "isolated") or pt.get("invert", False):
            raise ValueError(f"{where}: Split pre-tokenizer with behavior {pt.get('behavior')!r} "
                             f"invert={pt.get('invert')} is not supported (only Isolated, invert false)")
        rx = _compile(pat["Regex"]) if "Regex" in pat else re.compile(re.escape(pat.get("String", "")))
        return [("split", rx)]
    raise ValueError(f"{where}: pre-tokenizer {kind!r} is not byte-level BPE; supported: ByteLevel, or a Sequence of "
                     "Digits/Split steps ending with ByteLevel (for sentencepiece-style BPE pass the tokenizer.model)")


def _normalizer_forms(norm: Mapping | None, where: str) -> list[str]:
    if norm is None:
        return []
    kind = norm.get("type")
    if kind == "Sequence":
        return [f for n in norm.get("normalizers", []) for f in _normalizer_forms(n, where)]
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return [kind]
    raise ValueError(f"{where}: normalizer {kind!r} is not supported for byte-level BPE (supported: NFC/NFD/NFKC/NFKD)")


@lru_cache(maxsize=None)
def _splitter(rx: re.Pattern) -> re.Pattern | None:
    """`rx` wrapped in one capturing group, so re.split returns gaps and matches in order (None if rx has groups)."""
    return re.compile(f"({rx.pattern})", rx.flags) if rx.groups == 0 else None


def _isolated_split(rx: re.Pattern, s: str) -> list[str]:
    """Split `s` into the matches of `rx` and the gaps between them, dropping empty strings ("Isolated")."""
    sp = _splitter(rx)
    if sp is not None:
        return [x for x in sp.split(s) if x]
    out, last = [], 0
    for m in rx.finditer(s):
        a, b = m.span()
        if a == b:
            continue
        if a > last:
            out.append(s[last:a])
        out.append(s[a:b])
        last = b
    if last < len(s):
        out.append(s[last:])
    return out


class ByteBPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 / SmolLM2 / Llama-3 style) from a tokenizer.json-shaped dict (see module doc).

    spec: {"model": {"type": "BPE", "vocab": {token: id}, "merges": ["a b", ...] or [["a", "b"], ...],
    "ignore_merges": bool}, "added_tokens": [{"id", "content", "special"}], "normalizer", "pre_tokenizer"}.
    backend: "auto" (tokenizers when installed), "tokenizers" or "python".
    """

    kind = "byte_bpe"
    _CACHE_MAX = 200_000

    def __init__(self, spec: Mapping[str, Any], *, name: str, source: str, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, chat_format: str = CHATML_TEMPLATE, backend: str = "auto"):
        if backend not in ("auto", "tokenizers", "python"):
            raise ValueError(f"backend must be 'auto', 'tokenizers' or 'python', got {backend!r}")
        where = source
        model = spec.get("model") or {}
        if model.get("type", "BPE") != "BPE" or "merges" not in model:
            raise ValueError(f"{where}: tokenizer model type {model.get('type')!r} (merges present: "
                             f"{'merges' in model}) is not supported; only byte-level BPE (GPT-2 style) with merges, "
                             "or a sentencepiece tokenizer.model")
        for key, default in (("dropout", None), ("continuing_subword_prefix", None), ("end_of_word_suffix", None),
                             ("byte_fallback", False)):
            if model.get(key, default) not in (default, "") and not (key == "dropout" and model[key] == 0):
                raise ValueError(f"{where}: BPE option {key}={model[key]!r} is not supported for byte-level BPE")
        self.name, self.source = name, source
        self.vocab: dict[str, int] = dict(model["vocab"])
        added = list(spec.get("added_tokens") or [])
        for t in added:
            if self.vocab.setdefault(t["content"], t["id"]) != t["id"]:
                raise ValueError(f"{where}: added token {t['content']!r} has id {t['id']} but the vocab says "
                                 f"{self.vocab[t['content']]}")
        self.vocab_size = max(self.vocab.values()) + 1
        self._pieces: list[str | None] = [None] * self.vocab_size
        for tok, i in self.vocab.items():
            self._pieces[i] = tok
        self.added_tokens = {t["content"]: t["id"] for t in added}
        self.special_ids = frozenset(t["id"] for t in added if t.get("special", False))
        self._added_ids = frozenset(self.added_tokens.values())
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        bad = next((m for m in merges if len(m) != 2 or m[0] + m[1] not in self.vocab), None)
        if bad is not None:
            raise ValueError(f"{where}: merge {bad!r} does not produce a vocabulary token; the file is corrupt")
        self._ranks = {m: r for r, m in enumerate(merges)}  # a duplicated merge keeps its last rank, as tokenizers
        self._ignore_merges = bool(model.get("ignore_merges", False))
        self._norm = _normalizer_forms(spec.get("normalizer"), where)
        self._steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), where)
        b2u = bytes_to_unicode()
        self._byte_table = str.maketrans({chr(b): c for b, c in b2u.items()})  # latin-1 char -> byte-level char
        self._byte_decoder = {c: b for b, c in b2u.items()}
        self._cache: dict[str, list[int]] = {}
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.add_bos_default = bool(add_bos)
        self.chat_template, self.chat_format = chat_template, chat_format
        self._finish_ids(pad_id)
        self._spec = {
            "version": "1.0", "truncation": None, "padding": None, "post_processor": None,
            "added_tokens": [{"id": t["id"], "content": t["content"], "single_word": bool(t.get("single_word")),
                              "lstrip": bool(t.get("lstrip")), "rstrip": bool(t.get("rstrip")),
                              "normalized": bool(t.get("normalized", False)), "special": bool(t.get("special"))}
                             for t in added],
            "normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"),
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self._ignore_merges, "vocab": self.vocab, "merges": [list(m) for m in merges]},
        }
        self._hf = self._hf_raw = None
        if backend in ("auto", "tokenizers"):
            try:
                self._hf = self._build_hf(encode_special_tokens=False)
            except ImportError as e:
                if backend == "tokenizers":
                    raise ImportError("backend='tokenizers' needs the `tokenizers` package (pip install tokenizers); "
                                      "or use backend='python'") from e
        self.backend = "tokenizers" if self._hf is not None else "python"
        odd = next((t["content"] for t in added if t.get("single_word") or t.get("lstrip") or t.get("rstrip")), None)
        if self.backend == "python" and odd is not None:
            raise ValueError(f"{where}: added token {odd!r} uses single_word/lstrip/rstrip, which the python backend "
                             "does not implement; install `tokenizers` and use backend='tokenizers'")

    # -- engines
    def _build_hf(self, encode_special_tokens: bool):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_str(json.dumps(self._spec))
        except Exception as e:  # tokenizers raises its own Exception type on a bad spec
            raise ValueError(f"{self.source}: tokenizers cannot build this byte-level BPE ({e})") from e
        tok.encode_special_tokens = encode_special_tokens
        for text, i in self.added_tokens.items():
            if tok.token_to_id(text) != i:
                raise ValueError(f"{self.source}: added token {text!r} got id {tok.token_to_id(text)} instead of {i}")
        return tok

    def _hf_for(self, parse_special: bool):
        if parse_special:
            return self._hf
        if self._hf_raw is None:
            self._hf_raw = self._build_hf(encode_special_tokens=True)
        return self._hf_raw

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        if self._hf is not None:
            return self._hf_for(parse_special).encode(text, add_special_tokens=False).ids
        return self._py_encode(text, parse_special)

    def _encode_texts(self, texts: list[str], parse_special: bool) -> list[list[int]]:
        if self._hf is not None:
            return [e.ids for e in self._hf_for(parse_special).encode_batch_fast(texts, add_special_tokens=False)]
        return [self._py_encode(t, parse_special) for t in texts]

    def _py_encode(self, text: str, parse_special: bool) -> list[int]:
        """Pure-Python reference: added tokens, normalizer, pre-tokenizer steps, byte map, cached BPE."""
        out: list[int] = []
        cache, bpe = self._cache, self._bpe
        for seg, tid in self._split_special(text, parse_special):
            if tid is not None:
                out.append(tid)
                continue
            for form in self._norm:
                seg = unicodedata.normalize(form, seg)
            pieces = [seg]
            for kind, rx in self._steps:
                if kind == "split":
                    pieces = [x for p in pieces for x in _isolated_split(rx, p)]
                elif kind == "prefix":
                    pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            for p in pieces:
                ids = cache.get(p)
                if ids is None:
                    ids = bpe(p.encode("utf-8").decode("latin-1").translate(self._byte_table))
                    if len(cache) >= self._CACHE_MAX:
                        cache.clear()
                    cache[p] = ids
                out.extend(ids)
        return out

    def _bpe(self, word: str) -> list[int]:
        """Merge `word` (byte-level characters): repeatedly merge every occurrence of the lowest-rank pair."""
        vocab = self.vocab
        if self._ignore_merges and word in vocab:
            return [vocab[word]]
        parts, ranks = list(word), self._ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged, i, n = [], 0, len(parts)
            while i < n:
                if i < n - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            return [vocab[p] for p in parts]
        except KeyError as e:
            raise ValueError(f"{self.source}: byte-level piece {e.args[0]!r} is not in the vocabulary") from None

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        out, run = [], []
        dec, pieces = self._byte_decoder, self._pieces

        def flush():
            if run:
                data = bytes(dec[c] for c in "".join(run) if c in dec)
                out.append(data.decode("utf-8", errors="replace"))
                run.clear()

        for i in ids:
            if i in self._added_ids:
                flush()
                if not (skip_special and i in self.special_ids):
                    out.append(pieces[i])
            elif pieces[i] is None:
                raise ValueError(f"token id {i} has no vocabulary entry in {self.source}")
            else:
                run.append(pieces[i])
        flush()
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self.vocab_size or self._pieces[i] is None:
            raise ValueError(f"token id {i} out of range or unused for {self.name} (vocab_size {self.vocab_size})")
        return self._pieces[i]  # type: ignore[return-value]

    def token_to_id(self, piece: str) -> int | None:
        return self.vocab.get(piece)
