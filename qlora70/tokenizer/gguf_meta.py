"""`tokenizer.*` GGUF metadata for export (`qlora70.checkpoint.export_gguf`): from a GGUF file, a sentencepiece
tokenizer.model, a tokenizer.json, a directory holding one, or a qlora70 Tokenizer. (Lives with the tokenizers, not in
`qlora70.gguf_io`, so the GGUF codec never imports the tokenizers: one import direction.)
"""
from __future__ import annotations

import os
from typing import Any

from ..gguf_io import V_STRING, array_value as _arr
from .load import load_tokenizer

# ---- tokenizer metadata for export -----------------------------------------------------------------------------------
def tokenizer_metadata(source: Any) -> dict[str, tuple[Any, int, int | None]]:
    """`tokenizer.*` GGUF metadata {key: (value, vtype, subtype)} from a GGUF file, a sentencepiece tokenizer.model,
    a tokenizer.json, a directory holding one, or a qlora70 Tokenizer (its `.source` file)."""
    path = getattr(source, "source", source)
    path = os.fspath(path)
    if os.path.isdir(path):
        for n in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, n)):
                path = os.path.join(path, n)
                break
        else:
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer source {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from ..gguf_io import GGUFFile  # imported here: gguf_io needs torch, the tokenizer does not

        g = GGUFFile(path)
        md = {k: (v, *g.types[k]) for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    else:
        if isinstance(source, (str, os.PathLike)):  # a file path: its special ids / BOS convention via our tokenizer
            source = load_tokenizer(path)
        md = _bpe_json_metadata(path, source) if path.endswith(".json") else _sentencepiece_metadata(path, source)
    return md | _chat_metadata(None if isinstance(source, (str, os.PathLike)) else source, md)


# Jinja chat templates written when the tokenizer has none of its own (llama.cpp matches them to its built-in
# "llama2" / "chatml" formats); LLAMA2_JINJA is the chat_template of meta-llama/Llama-2-*-chat-hf.
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
_EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _chat_metadata(tok: Any, md: dict) -> dict:
    """tokenizer.chat_template and tokenizer.ggml.eot_token_id (the end-of-turn stop token) when `md` lacks them:
    the tokenizer's own template, else the built-in Llama-2 (sentencepiece) or ChatML (byte BPE with <|im_start|>)."""
    out: dict = {}
    tokens = md.get("tokenizer.ggml.tokens", ([],))[0]
    index = {t: i for i, t in enumerate(tokens) if t.startswith("<")} if tokens else {}
    if "tokenizer.chat_template" not in md:
        tpl = getattr(tok, "chat_template", None)
        if not tpl:
            model = md.get("tokenizer.ggml.model", (None,))[0]
            fmt = getattr(tok, "chat_format", "llama2" if model == "llama" else "chatml")
            tpl = LLAMA2_JINJA if fmt == "llama2" else CHATML_JINJA if "<|im_start|>" in index else None
        if tpl:
            out["tokenizer.chat_template"] = (tpl, V_STRING, None)
    if "tokenizer.ggml.eot_token_id" not in md:
        eot = next((index[t] for t in _EOT_TOKENS if t in index), None)
        if eot is not None:
            out["tokenizer.ggml.eot_token_id"] = (int(eot), 4, None)
    return out


def _sentencepiece_metadata(path: str, tok: Any) -> dict:
    import sentencepiece as spm  # the tokenizer file is a sentencepiece protobuf

    sp = spm.SentencePieceProcessor(model_file=path)
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]
    md = {"tokenizer.ggml.model": ("llama", V_STRING, None), "tokenizer.ggml.pre": ("default", V_STRING, None),
          "tokenizer.ggml.tokens": _arr([sp.id_to_piece(i) for i in range(n)], V_STRING),
          "tokenizer.ggml.scores": _arr([float(sp.get_score(i)) for i in range(n)], 6),
          "tokenizer.ggml.token_type": _arr(types, 5),
          "tokenizer.ggml.add_bos_token": (bool(getattr(tok, "add_bos_default", True)), 7, None),
          "tokenizer.ggml.add_eos_token": (False, 7, None)}
    return md | _special_ids(tok, sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())


def _bpe_json_metadata(path: str, tok: Any) -> dict:
    import json

    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    vocab = dict(spec["model"]["vocab"])
    types = {}
    for a in spec.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        types[a["id"]] = 3 if a.get("special") else 4
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    md = {"tokenizer.ggml.model": ("gpt2", V_STRING, None), "tokenizer.ggml.pre": ("default", V_STRING, None),
          "tokenizer.ggml.tokens": _arr(tokens, V_STRING), "tokenizer.ggml.token_type": _arr(
              [types.get(i, 1) for i in range(n)], 5), "tokenizer.ggml.merges": _arr(merges, V_STRING),
          "tokenizer.ggml.add_bos_token": (bool(getattr(tok, "add_bos_default", False)), 7, None)}
    return md | _special_ids(tok, None, None, None, None)


def _special_ids(tok: Any, bos: int | None, eos: int | None, unk: int | None, pad: int | None) -> dict:
    out = {}
    for key, attr, dflt in (("bos", "bos_id", bos), ("eos", "eos_id", eos), ("unknown", "unk_id", unk),
                            ("padding", "pad_id", pad)):
        v = getattr(tok, attr, None) if not isinstance(tok, (str, os.PathLike)) else None
        v = dflt if v is None else v
        if v is not None and v >= 0:
            out[f"tokenizer.ggml.{key}_token_id"] = (int(v), 4, None)
    return out
