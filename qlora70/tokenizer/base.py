"""The `Tokenizer` interface (encode / decode / special tokens / chat templates) shared by both engines, and
GGUF metadata reading for tokenizers.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from ..config import pad_or_eos

# ----------------------------------------------------------------------------------------------------------------------
# GGUF metadata


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF (v2/v3, either byte order) file as Python values (arrays become lists):
    `qlora70.gguf_io.GGUFFile(path).metadata`. ValueError naming the file when it is not GGUF or is truncated."""
    from ..gguf_io import GGUFFile  # imported here: gguf_io needs torch, the tokenizer does not

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
        self.pad_id = pad_or_eos(pad_id, self.eos_id)
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
