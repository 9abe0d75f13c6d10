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

from .base import CHATML_TEMPLATE, LLAMA2_CHAT_TEMPLATE, Tokenizer, read_gguf_metadata
from .bpe import ByteBPETokenizer, _isolated_split
from .gguf_meta import tokenizer_metadata
from .load import load_tokenizer
from .pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, _compile, bytes_to_unicode
from .sentencepiece import SentencePieceTokenizer, sentencepiece_proto

__all__ = ["Tokenizer", "SentencePieceTokenizer", "ByteBPETokenizer", "load_tokenizer", "read_gguf_metadata",
           "tokenizer_metadata", "sentencepiece_proto", "bytes_to_unicode", "GPT2_PATTERN", "LLAMA3_PATTERN",
           "QWEN2_PATTERN", "LLAMA2_CHAT_TEMPLATE", "CHATML_TEMPLATE"]
