"""Tokenizers: Llama-2 sentencepiece and byte-level BPE (GPT-2 style) behind one interface.

`load_tokenizer(path)` takes a sentencepiece `tokenizer.model`, an HF `tokenizer.json`, a `.gguf` file, or a directory
holding one of them (tried in that order), and returns a `Tokenizer`:

    tok = load_tokenizer("llama-2-7b/")               # SentencePieceTokenizer, add_bos_default True
    ids = tok.encode("Hello world", bos=True)         # [1, 15043, 3186]
    tok.decode(ids)                                   # "Hello world"

Conventions (all chosen to equal the reference tokenizers exactly):

* Sentencepiece (Llama-2). Plain text is encoded by the `sentencepiece` library itself, exactly as Meta's reference
  `Tokenizer.encode` does: the model's normalizer adds the dummy prefix, so "Hello" becomes "▁Hello" and
  " Hello" becomes "▁▁Hello" (Llama-2: identity normalization, no whitespace folding, byte fallback). BOS (1) / EOS (2)
  are added only by `bos=True` / `eos=True`. Llama-2 has no pad token: `pad_id` falls back to `eos_id` (2), the usual
  choice for right-padded training batches whose padded labels are masked anyway (HF leaves it None).
  With `parse_special=True` (default, as in HF) the control strings "<s>", "</s>", "<unk>" inside the text are
  encoded as their single ids and each text segment between them is encoded separately, so it gets its own dummy
  prefix: that is HF `LlamaTokenizer(legacy=True)` and Meta's chat format, which encodes every turn with its own call.
* Byte-level BPE (SmolLM2, GPT-2). Text is cut at special tokens (added tokens match first, longest first), each
  remaining segment is pre-tokenized (e.g. SmolLM2/"smollm": every digit isolated, then the GPT-2 regex; no prefix
  space), each piece is mapped byte-by-byte to GPT-2's printable alphabet and merged by merge rank.
  Two engines give identical ids: `tokenizers` (Rust, the HF reference implementation, built from the same vocab +
  merges + pre-tokenizer as a tokenizer.json; the default: native, and `encode_batch` runs on all cores) and a
  pure-Python one (`backend="python"`, no dependency: the classic rank-greedy merge loop with a per-piece cache, about
  as fast single-threaded once the cache is warm, ~2x slower cold; the regexes are translated from
  `\\p{L}`/`\\p{N}`/`\\s` to explicit Unicode classes so stdlib `re` matches Oniguruma's semantics). The tests check
  both against `transformers` / `tokenizers` references, so either engine can serve as the other's oracle.
  Note: transformers' own GGUF loader does not know the "smollm" pre-tokenizer and skips the digit split. No merge
  joins a digit to anything, so that only changes non-ASCII numerals (" ½") and whitespace runs before a digit
  ("% \n1": one "ĠĊ" for llama.cpp, the original tokenizer.json and us; "Ġ" + "Ċ" for transformers).

Decode inverts encode: `decode(encode(s), skip_special=False) == s` for any string (sentencepiece: for models with
identity normalization such as Llama-2). No file is ever unpickled: GGUF metadata is parsed here, JSON with `json`.
"""
from __future__ import annotations

import json
import os
import re
import struct
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Tokenizer", "SentencePieceTokenizer", "ByteBPETokenizer", "load_tokenizer", "read_gguf_metadata"]

# ----------------------------------------------------------------------------------------------------------------------
# Unicode classes for stdlib `re` (Oniguruma/`regex` semantics of \p{..} and \s)

# Unicode White_Space property: what `\s` means to tokenizers (Oniguruma) and llama.cpp, unlike str.isspace().
_WHITE_SPACE = "\\t-\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"


@lru_cache(maxsize=1)
def _category_ranges() -> dict[str, list[tuple[int, int]]]:
    """General category -> sorted code point ranges [lo, hi] (one pass over all of Unicode, ~0.15 s, cached)."""
    out: dict[str, list[tuple[int, int]]] = {}
    cat_of = unicodedata.category
    start, prev = 0, cat_of("\x00")
    for cp in range(1, 0x110000):
        c = cat_of(chr(cp))
        if c != prev:
            out.setdefault(prev, []).append((start, cp - 1))
            start, prev = cp, c
    out.setdefault(prev, []).append((start, 0x10FFFF))
    return out


@lru_cache(maxsize=None)
def _class_body(prop: str) -> str:
    """Character-class body (no brackets) for a Unicode general category or major class, e.g. "L", "N", "Lu"."""
    cats = [c for c in _category_ranges() if c.startswith(prop)] if len(prop) == 1 else [prop]
    if not prop.isalpha() or not any(c in _category_ranges() for c in cats):
        raise ValueError(f"unsupported Unicode property \\p{{{prop}}} in a pre-tokenizer regex; "
                         "only general categories (L, N, Lu, Nd, M, P, ...) are supported, use backend='tokenizers'")
    ranges = sorted(r for c in cats for r in _category_ranges().get(c, []))
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


_PROP = re.compile(r"\\([pP])\{([A-Za-z_]+)\}")


@lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    """Compile an Oniguruma-style pre-tokenizer regex with stdlib `re`: \\p{X}, \\P{X}, \\s, \\S become explicit
    Unicode classes (inside and outside [...]); everything else passes through unchanged."""
    out, i, in_class, n = [], 0, False, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            m = _PROP.match(pattern, i)
            nxt = pattern[i + 1]
            if m or nxt in "sS":
                body = _class_body(m.group(2)) if m else _WHITE_SPACE
                neg = (m.group(1) == "P") if m else nxt == "S"
                if in_class and neg:
                    raise ValueError(f"negated class {pattern[i:i + 2]} inside [...] is not supported in {pattern!r}")
                out.append(body if in_class else ("[^" if neg else "[") + body + "]")
                i = m.end() if m else i + 2
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):  # a literal ']' first in a class
                out.append("\\]")
                i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return re.compile("".join(out))


# Pre-tokenizer regexes (tokenizers' ByteLevel uses GPT2_PATTERN when use_regex=True).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


_DIGITS_GPT2 = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level()]}
# tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer with the same splits (llama.cpp llama-vocab.cpp)
GGUF_PRE_TOKENIZERS: dict[str, dict] = {
    **{k: _byte_level() for k in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{k: _DIGITS_GPT2 for k in ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")},
    **{k: {"type": "Sequence", "pretokenizers": [_split(LLAMA3_PATTERN), _byte_level(False)]}
       for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{k: {"type": "Sequence", "pretokenizers": [_split(QWEN2_PATTERN), _byte_level(False)]}
       for k in ("qwen2", "stablelm2", "deepseek-r1-qwen")},
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves, the rest to U+0100..)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ----------------------------------------------------------------------------------------------------------------------
# GGUF metadata


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF (v2/v3, either byte order) file as Python values (arrays become lists):
    `qlora70.gguf_io.GGUFFile(path).metadata`. ValueError naming the file when it is not GGUF or is truncated."""
    from .gguf_io import GGUFFile  # imported here: gguf_io needs torch, the tokenizer does not

    return GGUFFile(path).metadata


# ----------------------------------------------------------------------------------------------------------------------
# Chat templates

LLAMA2_CHAT_TEMPLATE = "llama2"  # built-in names accepted by apply_chat_template(template=...)
CHATML_TEMPLATE = "chatml"


def _check_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r:.80}")
        out.append(dict(m))
    return out


def _render_chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    """ChatML: <|im_start|>{role}\\n{content}<|im_end|>\\n per message, then <|im_start|>assistant\\n."""
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _render_llama2(messages: list[dict], bos: str, eos: str) -> str:
    """Llama-2 chat, identical to the `chat_template` of meta-llama/Llama-2-*-chat-hf: each user turn is
    "<s>[INST] {content} [/INST]", each answer " {content} </s>", an optional first system message is wrapped in
    <<SYS>> into the first user turn. The string starts with "<s>": encode it with bos=False."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = []
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0) or m["role"] not in ("user", "assistant"):
            raise ValueError("Llama-2 chat roles must alternate user/assistant/user/... after an optional system "
                             f"message; message {i} has role {m['role']!r}")
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        out.append(f"{bos}[INST] {content.strip()} [/INST]" if m["role"] == "user" else f" {content.strip()} {eos}")
    return "".join(out)


@lru_cache(maxsize=16)
def _jinja_template(source: str):
    """Compile a chat template like transformers does: sandboxed Jinja2, trim_blocks, lstrip_blocks, loopcontrols."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


# ----------------------------------------------------------------------------------------------------------------------
# The interface


class Tokenizer:
    """Common interface. Subclasses set the attributes below and implement `_encode_text` / `_decode_ids`.

    Attributes: `name`, `kind` ("sentencepiece" | "byte_bpe"), `backend`, `source` (file), `vocab_size`,
    `bos_id`, `eos_id`, `unk_id` (int or None), `pad_id` (pad, else eos, else 0), `add_bos_default`,
    `chat_template` (Jinja source or None), `chat_format` ("llama2" | "chatml", used without a template),
    `special_ids` (ids dropped by decode(skip_special=True)), `added_tokens` (text -> id matched inside text).
    """

    kind = "base"
    backend = "none"
    name: str
    source: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int
    add_bos_default: bool
    chat_template: str | None
    chat_format: str
    special_ids: frozenset[int]
    added_tokens: dict[str, int]

    # -- subclass hooks
    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        raise NotImplementedError

    def _encode_texts(self, texts: list[str], parse_special: bool) -> list[list[int]]:
        return [self._encode_text(t, parse_special) for t in texts]

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (sentencepiece "▁the", byte-level "Ġthe", or a special token's text)."""
        raise NotImplementedError

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry spelled as `id_to_piece` returns it, or None."""
        raise NotImplementedError

    # -- public API
    def encode(self, text: str, bos: bool = False, eos: bool = False, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS / EOS ids added when asked. Special-token strings in the text
        (e.g. "<|im_start|>", "</s>") become their single ids unless parse_special=False."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for a list of texts")
        return self._wrap(self._encode_text(text, parse_special), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False, *,
                     parse_special: bool = True) -> list[list[int]]:
        """`[encode(t, bos, eos) for t in texts]`, computed in parallel by the native backend when there is one."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a list of str; use encode for a single text")
        return [self._wrap(ids, bos, eos) for ids in self._encode_texts(list(texts), parse_special)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of token ids (a list, tuple, numpy array or 1-D tensor). skip_special drops control tokens (BOS, EOS,
        <|im_start|>, ...); with skip_special=False, decode(encode(text)) == text (Llama-2, SmolLM2, GPT-2: any
        tokenizer without a normalizer or an added prefix space)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise TypeError(f"decode expects a flat sequence of int token ids, got {ids!r:.80}") from e
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range for {self.name} (vocab_size {self.vocab_size})")
        return self._decode_ids(ids, skip_special)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, *,
                            template: str | None = None) -> str:
        """Render a conversation [{"role": "system"|"user"|"assistant", "content": str}, ...] to prompt text.

        Uses `template` if given ("chatml", "llama2" or a Jinja source), else the model's own Jinja template
        (GGUF `tokenizer.chat_template` / tokenizer_config.json), else the built-in `chat_format`. The result holds
        special-token strings (e.g. "<s>" for Llama-2); encode it with bos=False.
        """
        msgs = _check_messages(messages)
        src = self.chat_template if template is None else template
        fmt = src or self.chat_format
        if src is not None and src not in (CHATML_TEMPLATE, LLAMA2_CHAT_TEMPLATE):
            try:
                import jinja2
            except ImportError:  # jinja2 ships with torch; without it fall back to the built-in format
                fmt = CHATML_TEMPLATE if "<|im_start|>" in src else LLAMA2_CHAT_TEMPLATE
            else:
                piece = lambda i: self.id_to_piece(i) if i is not None else ""  # noqa: E731
                try:
                    return _jinja_template(src).render(
                        messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=piece(self.bos_id),
                        eos_token=piece(self.eos_id), pad_token=piece(self.pad_id), unk_token=piece(self.unk_id))
                except jinja2.TemplateError as e:
                    raise ValueError(f"chat template of {self.source} failed: {e}") from e
        if fmt == CHATML_TEMPLATE:
            return _render_chatml(msgs, add_generation_prompt)
        if fmt == LLAMA2_CHAT_TEMPLATE:
            return _render_llama2(msgs, self.id_to_piece(self.bos_id), self.id_to_piece(self.eos_id))
        raise ValueError(f"unknown chat format {fmt!r}; use 'chatml', 'llama2' or a Jinja template string")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, backend={self.backend!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, add_bos_default={self.add_bos_default})")

    # -- helpers
    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos or eos:
            for flag, tid, what in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
                if flag and tid is None:
                    raise ValueError(f"{self.name} has no {what} token; call encode with {what.lower()}=False")
            ids = ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
        return ids

    def _finish_ids(self, pad_id: int | None) -> None:
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        self._special_rx = _alternation(self.added_tokens)
        self._nonspecial_rx = _alternation({t: i for t, i in self.added_tokens.items() if i not in self.special_ids})

    def _split_special(self, text: str, parse_special: bool) -> list[tuple[str, int | None]]:
        """[(segment, None) | (token text, id)] in order; empty segments dropped."""
        rx = self._special_rx if parse_special else self._nonspecial_rx
        if rx is None or rx.search(text) is None:
            return [(text, None)] if text else []
        out, last = [], 0
        for m in rx.finditer(text):
            if m.start() > last:
                out.append((text[last:m.start()], None))
            out.append((m.group(), self.added_tokens[m.group()]))
            last = m.end()
        if last < len(text):
            out.append((text[last:], None))
        return out


def _alternation(tokens: Mapping[str, int]) -> re.Pattern | None:
    """Regex matching any of `tokens` (longest first, so leftmost-longest like tokenizers' added-token matcher)."""
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


# ----------------------------------------------------------------------------------------------------------------------
# Sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama-2 `tokenizer.model`), encoded by the `sentencepiece` library (see module doc)."""

    kind = "sentencepiece"
    backend = "sentencepiece"

    def __init__(self, model: str | os.PathLike | bytes, *, name: str | None = None, source: str | None = None,
                 add_bos: bool = True, chat_template: str | None = None, pad_id: int | None = None,
                 num_threads: int | None = None):
        """model: path of a `tokenizer.model` or its serialized bytes. add_bos: the model's BOS convention."""
        import sentencepiece as spm

        self.source = str(source or (model if not isinstance(model, bytes) else "<sentencepiece proto>"))
        try:
            self.sp = (spm.SentencePieceProcessor(model_proto=model) if isinstance(model, bytes)
                       else spm.SentencePieceProcessor(model_file=str(model)))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.source} is not a valid sentencepiece model ({e}); pass a Llama-2 "
                             "tokenizer.model, a tokenizer.json or a .gguf file") from e
        sp = self.sp
        self.name = name or Path(self.source).parent.name or Path(self.source).name
        self.vocab_size = sp.get_piece_size()
        opt = lambda i: i if i >= 0 else None  # noqa: E731
        self.bos_id, self.eos_id, self.unk_id = opt(sp.bos_id()), opt(sp.eos_id()), opt(sp.unk_id())
        self.add_bos_default = bool(add_bos)
        self.chat_template, self.chat_format = chat_template, LLAMA2_CHAT_TEMPLATE
        self.num_threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        specials = [i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
        self.special_ids = frozenset(specials)
        self.added_tokens = {sp.id_to_piece(i): i for i in specials if sp.id_to_piece(i)}
        self._finish_ids(pad_id if pad_id is not None else opt(sp.pad_id()))

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        parts = self._split_special(text, parse_special)
        if len(parts) == 1 and parts[0][1] is None:
            return self.sp.encode(text)
        out: list[int] = []
        for seg, tid in parts:
            out.extend(self.sp.encode(seg) if tid is None else [tid])
        return out

    def _encode_texts(self, texts: list[str], parse_special: bool) -> list[list[int]]:
        rx = self._special_rx if parse_special else None
        plain = [i for i, t in enumerate(texts) if rx is None or rx.search(t) is None]
        out: list[list[int] | None] = [None] * len(texts)
        if plain:
            for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain], num_threads=self.num_threads)):
                out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self._encode_text(t, parse_special)
        return out  # type: ignore[return-value]

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        # Runs of ordinary ids decode separately (each strips its own dummy prefix), control tokens as their text.
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"token id {i} out of range for {self.name} (vocab_size {self.vocab_size})")
        return self.sp.id_to_piece(int(i))

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.sp.id_to_piece(i) else i


def _pb_varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int32 fields are written as 10-byte varints, as protobuf does
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _pb(field: int, value: int | float | bytes | str) -> bytes:
    """One protobuf field: varint for int/bool, fixed32 for float, length-delimited for bytes/str."""
    if isinstance(value, float):
        return _pb_varint(field << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data
    return _pb_varint(field << 3) + _pb_varint(int(value))


def sentencepiece_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                        unk_id: int = 0, bos_id: int = 1, eos_id: int = 2, pad_id: int = -1,
                        add_dummy_prefix: bool = True, byte_fallback: bool | None = None) -> bytes:
    """Serialize a BPE sentencepiece ModelProto (Llama-2 settings: identity normalization, whitespace kept) from
    a GGUF `tokenizer.ggml.model == "llama"` vocabulary (token types: 1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte -- the same enum as sentencepiece)."""
    if byte_fallback is None:
        byte_fallback = any(t == 6 for t in types)
    body = b"".join(_pb(1, _pb(1, p) + _pb(2, float(s)) + _pb(3, int(t))) for p, s, t in zip(pieces, scores, types))
    trainer = (_pb(3, 2) + _pb(4, len(pieces)) + _pb(35, byte_fallback)
               + _pb(40, unk_id) + _pb(41, bos_id) + _pb(42, eos_id) + _pb(43, pad_id))
    normalizer = _pb(1, "identity") + _pb(3, add_dummy_prefix) + _pb(4, False) + _pb(5, True)
    return body + _pb(2, trainer) + _pb(3, normalizer)


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


# ----------------------------------------------------------------------------------------------------------------------
# Loading

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a str or as {"content": str, ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download the tokenizer files") from e


def _tokenizer_config(dir_: Path) -> dict:
    cfg_path = dir_ / "tokenizer_config.json"
    return _read_json(cfg_path) if cfg_path.is_file() else {}


def _chat_template_of(cfg: Mapping) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    return tpl if isinstance(tpl, str) else None


def _load_sentencepiece(path: Path) -> SentencePieceTokenizer:
    cfg = _tokenizer_config(path.parent)
    return SentencePieceTokenizer(path, name=path.parent.name or path.stem, source=str(path),
                                  add_bos=cfg.get("add_bos_token", True), chat_template=_chat_template_of(cfg))


def _template_bos(post: Mapping | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts first in a single sequence (HF's add-BOS)."""
    if not isinstance(post, Mapping):
        return None
    if post.get("type") == "Sequence":
        return next((b for p in post.get("processors") or [] if (b := _template_bos(p))), None)
    single = post.get("single") or [] if post.get("type") == "TemplateProcessing" else []
    first = single[0] if single else {}
    return first.get("SpecialToken", {}).get("id") if isinstance(first, Mapping) else None


def _load_tokenizer_json(path: Path, backend: str) -> ByteBPETokenizer:
    spec = _read_json(path)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("model"), Mapping):
        raise ValueError(f"{path} has no 'model' section; it is not an HF tokenizer.json")
    if spec["model"].get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: tokenizer model type {spec['model'].get('type')!r} is not supported; only "
                         "byte-level BPE tokenizer.json files (or a sentencepiece tokenizer.model) can be loaded")
    cfg = _tokenizer_config(path.parent)
    vocab = dict(spec["model"].get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens") or []})

    def tid(key: str, fallbacks: Sequence[str] = ()) -> int | None:
        text = _token_text(cfg.get(key))
        if text is not None:
            if text not in vocab:
                raise ValueError(f"{path.parent / 'tokenizer_config.json'}: {key} {text!r} is not in {path.name}")
            return vocab[text]
        return next((vocab[t] for t in fallbacks if t in vocab), None)

    post_bos = _template_bos(spec.get("post_processor"))  # e.g. Llama-3 adds <|begin_of_text|> in its post-processor
    eos = tid("eos_token", ("<|endoftext|>", "</s>", "<|end_of_text|>"))
    bos = tid("bos_token", tuple(t for t in (post_bos, "<|endoftext|>", "<s>", "<|begin_of_text|>") if t))
    tpl = _chat_template_of(cfg)
    fmt = CHATML_TEMPLATE if "<|im_start|>" in vocab else LLAMA2_CHAT_TEMPLATE
    return ByteBPETokenizer(spec, name=path.parent.name or path.stem, source=str(path), bos_id=bos, eos_id=eos,
                            pad_id=tid("pad_token"), unk_id=tid("unk_token"),
                            add_bos=bool(cfg.get("add_bos_token", post_bos is not None)), chat_template=tpl,
                            chat_format=fmt,
                            backend=backend)


def _load_gguf(path: Path, backend: str) -> Tokenizer:
    meta = read_gguf_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path} has no tokenizer metadata (tokenizer.ggml.model); load the tokenizer from the "
                         "original model's tokenizer.model / tokenizer.json instead")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: tokenizer.ggml.tokens is missing or empty; the GGUF tokenizer is unusable")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    for k, v in ids.items():
        if v is not None and not 0 <= v < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{k}_token_id {v} is outside the vocabulary ({len(tokens)})")
    name = meta.get("general.name") or path.stem
    tpl = meta.get("tokenizer.chat_template")
    if model == "llama":  # sentencepiece vocabulary (Llama-2 GGUFs): rebuild the model proto, encode with sentencepiece
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.scores missing or of the wrong length for a 'llama' tokenizer")
        proto = sentencepiece_proto(
            tokens, scores, types, unk_id=ids["unknown"] if ids["unknown"] is not None else 0,
            bos_id=-1 if ids["bos"] is None else ids["bos"], eos_id=-1 if ids["eos"] is None else ids["eos"],
            add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        return SentencePieceTokenizer(proto, name=name, source=str(path),
                                      add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                                      chat_template=tpl, pad_id=ids["padding"])
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2' byte-level "
                         "BPE, 'llama' sentencepiece); load the original tokenizer.json / tokenizer.model instead")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                         f"{sorted(GGUF_PRE_TOKENIZERS)}); load the original tokenizer.json instead")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{path}: tokenizer.ggml.merges is missing; a 'gpt2' tokenizer needs its merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    # 2 unknown / 3 control: special tokens (matched in text, skipped by decode); 4 user-defined: matched, kept.
    added = [{"id": i, "content": t, "special": ty in (2, 3)} for i, (t, ty) in enumerate(zip(tokens, types))
             if ty in (2, 3, 4) and vocab[t] == i]
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": GGUF_PRE_TOKENIZERS[pre]}
    tok = ByteBPETokenizer(spec, name=name, source=str(path), bos_id=ids["bos"], eos_id=ids["eos"],
                           pad_id=ids["padding"], unk_id=ids["unknown"],
                           add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), chat_template=tpl,
                           chat_format=CHATML_TEMPLATE if "<|im_start|>" in vocab else LLAMA2_CHAT_TEMPLATE,
                           backend=backend)
    tok.vocab_size, tok._pieces = len(tokens), list(tokens)  # GGUF ids are list positions (duplicates included)
    return tok


def load_tokenizer(path: str | os.PathLike, *, backend: str = "auto") -> Tokenizer:
    """Load a tokenizer from a sentencepiece `tokenizer.model`, an HF byte-level BPE `tokenizer.json`, a `.gguf`
    file (`tokenizer.ggml.model` "gpt2" or "llama"), or a directory holding one of them (tokenizer.model first,
    then tokenizer.json, then a single *.gguf). A sibling tokenizer_config.json supplies bos/eos/pad tokens,
    add_bos_token and chat_template. backend ("auto" | "tokenizers" | "python") picks the byte-level BPE engine.
    """
    if backend not in ("auto", "tokenizers", "python"):
        raise ValueError(f"backend must be 'auto', 'tokenizers' or 'python', got {backend!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist; pass a tokenizer.model, tokenizer.json, "
                                ".gguf file or a directory holding one")
    if p.is_dir():
        found = [p / n for n in _TOKENIZER_FILES if (p / n).is_file()]
        ggufs = sorted(p.glob("*.gguf"))
        if not found and len(ggufs) > 1:
            raise ValueError(f"directory {p} holds several GGUF files ({[g.name for g in ggufs]}); pass one of them")
        found += ggufs
        if not found:
            raise FileNotFoundError(f"no tokenizer.model, tokenizer.json or .gguf file in directory {p}; pass the "
                                    "model directory that holds the tokenizer, or the tokenizer file itself")
        p = found[0]
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(p, backend)
    if p.suffix == ".json":
        return _load_tokenizer_json(p, backend)
    if p.suffix == ".gguf":
        raise ValueError(f"{p} is not a GGUF file (magic {magic!r}); re-download it")
    return _load_sentencepiece(p)
