"""`load_tokenizer`: a sentencepiece tokenizer.model, an HF tokenizer.json, a .gguf file, or a directory holding
one, with special tokens, BOS convention and chat template read from the files next to it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import CHATML_TEMPLATE, LLAMA2_CHAT_TEMPLATE, Tokenizer, read_gguf_metadata
from .bpe import ByteBPETokenizer
from .pretokenize import GGUF_PRE_TOKENIZERS
from .sentencepiece import SentencePieceTokenizer, sentencepiece_proto

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
