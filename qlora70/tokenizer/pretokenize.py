"""Pre-tokenizer regexes for stdlib `re` with Oniguruma semantics (\\p{L}, \\p{N}, \\s as tokenizers means
them), the named split patterns (GPT-2, Llama-3, Qwen2) and GPT-2's byte-to-unicode alphabet.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

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
