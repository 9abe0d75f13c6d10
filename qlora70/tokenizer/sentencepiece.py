"""Llama-2 sentencepiece tokenizer (encoded by the `sentencepiece` library itself) and a tiny protobuf writer
that builds a `tokenizer.model` from pieces (GGUF vocabularies).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

from .base import LLAMA2_CHAT_TEMPLATE, Tokenizer

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
