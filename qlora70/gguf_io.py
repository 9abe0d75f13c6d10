"""llama.cpp GGUF files: a small reader (header, metadata, tensor index, block dequantization in torch) and a writer.

Reading parses the header through a short-lived mmap and reads each tensor with one positioned read (tensor data is
never mapped). Tensor types read: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
(block codecs and their layouts in `gguf_quants`).
GGUF lists dims fastest-first, so a ggml [in, out] tensor is a row-major torch [out, in] tensor.

llama.cpp stores Q and K weights row-permuted for its interleaved ("normal") RoPE; HF uses rotate-half:
    gguf = w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)          (`permute_qk`)
    w    = gguf.reshape(n_head, hd/2, 2, in).swapaxes(1, 2).reshape(out, in)       (`unpermute_qk`)
with n_head = num_key_value_heads for K.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import VERSION, LlamaConfig
from . import gguf_kquants, gguf_quants
from .gguf_quants import DECODABLE, GGML_TYPES, dequantize, quantize_q8_0  # noqa: F401 (re-exported)
from .io import atomic_path, file_sha256  # noqa: F401 (file_sha256: re-exported)


# metadata value types
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
V_STRING, V_ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # row-major torch order (GGUF dims reversed)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"type {self.ggml_type}",))[0]


class GGUFFile:
    """Index of a GGUF v2/v3 file (either byte order): `metadata` {key: value} (arrays as lists), `types` {key:
    (vtype, subtype)}, `tensors` {name: GGUFTensor}, `byteorder` "<" or ">". `read(name)` -> dequantized fp32 tensor.

    Only the header is parsed, in one pass over a read-only mmap that is closed before the constructor returns (no
    tensor page is touched): ~0.1 s for SmolLM2's 49k-token vocabulary, where `gguf.GGUFReader` takes seconds.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        self.size = os.path.getsize(self.path)
        if self.size < 24:
            raise ValueError(f"{self.path} is not a GGUF file ({self.size} bytes, too short for a GGUF header)")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                self._parse(mm)
            except struct.error as e:
                raise ValueError(f"{self.path}: truncated or corrupt GGUF header ({e}); re-download or "
                                 "re-convert it") from None

    def _parse(self, buf: mmap.mmap) -> None:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (magic {buf[:4]!r}, expected b'GGUF')")
        (version,) = struct.unpack_from("<I", buf, 4)
        end = "<" if version in (2, 3) else ">"  # a big-endian file reads as version 2 or 3 << 24
        if end == ">" and struct.unpack_from(">I", buf, 4)[0] not in (2, 3):
            raise ValueError(f"{self.path}: unsupported GGUF version {version} (supported: 2 and 3)")
        self.byteorder = end
        n_tensors, n_kv = struct.unpack_from(end + "QQ", buf, 8)
        u32, u64 = struct.Struct(end + "I"), struct.Struct(end + "Q")
        scalars = {vt: struct.Struct(end + c) for vt, c in _SCALARS.items()}
        off = 24

        def string() -> str:
            nonlocal off
            (n,) = u64.unpack_from(buf, off)
            s = buf[off + 8: off + 8 + n]
            if len(s) != n:
                raise struct.error("a string runs past the end of the file")
            off += 8 + n
            return s.decode("utf-8", errors="replace")

        def value(vt: int) -> Any:
            nonlocal off
            if vt == V_STRING:
                return string()
            if vt in scalars:
                (v,) = scalars[vt].unpack_from(buf, off)
                off += scalars[vt].size
                return v
            if vt == V_ARRAY:
                (sub,), (count,) = u32.unpack_from(buf, off), u64.unpack_from(buf, off + 4)
                off += 12
                if sub in _SCALARS:  # one unpack for the whole array
                    st = struct.Struct(f"{end}{count}{_SCALARS[sub]}")
                    vals = list(st.unpack_from(buf, off))
                    off += st.size
                    return vals
                return [value(sub) for _ in range(count)]
            raise ValueError(f"{self.path}: unknown GGUF metadata value type {vt} at byte {off}")

        self.metadata: dict[str, Any] = {}
        self.types: dict[str, tuple[int, int | None]] = {}
        for _ in range(n_kv):
            key = string()
            (vt,) = u32.unpack_from(buf, off)
            off += 4
            self.types[key] = (vt, u32.unpack_from(buf, off)[0] if vt == V_ARRAY else None)
            self.metadata[key] = value(vt)
        infos = []
        for _ in range(n_tensors):
            name = string()
            (nd,) = u32.unpack_from(buf, off)
            dims = struct.unpack_from(f"{end}{nd}Q", buf, off + 4)
            ttype, toff = struct.unpack_from(end + "IQ", buf, off + 4 + 8 * nd)
            off += 4 + 8 * nd + 12
            infos.append((name, tuple(int(d) for d in dims), ttype, toff))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-off // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ttype, toff in infos:
            _, bs, bb = GGML_TYPES.get(ttype, ("?", 1, 0))
            t = GGUFTensor(name, ttype, tuple(reversed(dims)), data_start + toff, math.prod(dims) // bs * bb)
            if t.offset + t.nbytes > self.size:
                raise ValueError(f"{self.path} is truncated: tensor {name!r} needs bytes up to {t.offset + t.nbytes} "
                                 f"but the file has {self.size}; re-download or re-convert it")
            self.tensors[name] = t

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes, uint8 [nbytes]."""
        t = self.tensors[name]
        return read_bytes(self.path, t.offset, t.nbytes, what=f"tensor {name!r}")

    def read(self, name: str) -> torch.Tensor:
        """Dequantized fp32 tensor in row-major shape. ValueError for unsupported types (naming file and tensor)."""
        t = self.tensors[name]
        if self.byteorder != "<":
            raise ValueError(f"{self.path} is a big-endian GGUF file; qlora70 reads tensors of little-endian files "
                             "only (convert it with gguf-py's gguf_convert_endian.py)")
        if t.type_name not in DECODABLE:
            raise ValueError(f"{self.path}: tensor {name!r} has GGUF type {t.type_name}, which qlora70 does not read "
                             f"(supported: {', '.join(DECODABLE)}); re-quantize the file with llama-quantize "
                             "to one of those")
        return dequantize(self.raw(name), t.type_name, t.shape)


def read_bytes(path: str, offset: int, nbytes: int, what: str = "data") -> torch.Tensor:
    """uint8 [nbytes] read from `path` at `offset` (positioned reads into a fresh buffer; no mmap)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    mv = memoryview(buf.numpy()).cast("B")
    got = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while got < nbytes:
            k = f.readinto(mv[got:])
            if not k:
                raise ValueError(f"{path} is truncated: {what} needs {nbytes} bytes at offset {offset}, "
                                 f"only {got} could be read; re-download or re-save the file")
            got += k
    return buf


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows. w [n_head * hd, in]."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp interleaved rows -> HF rotate-half rows (inverse of `permute_qk`)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


# ---- names ---------------------------------------------------------------------------------------------------------
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
_BLK_RX = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_HF_RX = re.compile(r"model\.layers\.(\d+)\.(\w+\.\w+|\w+)\.weight")


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for unknown names."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLK_RX.fullmatch(name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    return None


def hf_to_gguf_name(name: str) -> str:
    if name in _GLOBAL_INV:
        return _GLOBAL_INV[name]
    m = _HF_RX.fullmatch(name)
    if not m or m.group(2) not in _BLOCK_INV:
        raise ValueError(f"no GGUF name for tensor {name!r}")
    return f"blk.{m.group(1)}.{_BLOCK_INV[m.group(2)]}.weight"


def config_from_gguf(g: GGUFFile) -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata (ValueError naming the file for other architectures or missing keys)."""
    md = g.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{g.path}: general.architecture={arch!r}; qlora70 reads only Llama-architecture GGUF files "
                         "('llama')")
    scaling = md.get("llama.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in g.tensors:
        raise ValueError(f"{g.path}: RoPE scaling ({scaling or 'rope_freqs.weight'}) is not supported")

    def need(k: str) -> Any:
        if f"llama.{k}" not in md:
            raise ValueError(f"{g.path}: missing GGUF metadata key 'llama.{k}'")
        return md[f"llama.{k}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    emb = g.tensors.get("token_embd.weight")
    vocab = md.get("llama.vocab_size") or (len(md["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in md
                                           else (emb.shape[0] if emb else None))
    if vocab is None:
        raise ValueError(f"{g.path}: cannot tell the vocabulary size (no llama.vocab_size, tokens or token_embd)")
    kw = dict(vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
              num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
              num_key_value_heads=int(md.get("llama.attention.head_count_kv", heads)),
              head_dim=int(md.get("llama.attention.key_length", md.get("llama.rope.dimension_count", hidden // heads))),
              max_position_embeddings=int(md.get("llama.context_length", 4096)),
              rms_norm_eps=float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
              rope_theta=float(md.get("llama.rope.freq_base", 10000.0)),
              tie_word_embeddings="output.weight" not in g.tensors,
              bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
              pad_token_id=md.get("tokenizer.ggml.padding_token_id"), torch_dtype="float32",
              name=str(md.get("general.name", os.path.basename(g.path))))
    return LlamaConfig(**kw)



# ---- writer --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provenance:
    """Where an exported model came from, written as `general.*` (name, license, base model, datasets) and
    `qlora70.*` keys (merge base, adapter path + sha256 of its weights file, training data files + sha256)."""
    name: str | None = None
    base_model: str | None = None
    license: str | None = None
    adapter_path: str | None = None
    adapter_sha256: str | None = None
    training_data: tuple[tuple[str, str], ...] = ()  # (path, sha256)
    merge_base: str | None = None  # "nf4-dequantized" | "full-precision"; None: no adapter merged
    nf4_blocksize: int | None = None
    nf4_double_quant: bool | None = None


def array_value(vals: list, sub: int) -> tuple[list, int, int]:
    """A metadata array value (vals, V_ARRAY, element type)."""
    return (vals, V_ARRAY, sub)


_arr = array_value


def provenance_metadata(p: Provenance) -> dict[str, tuple[Any, int, int | None]]:
    """{key: (value, vtype, subtype)} for `p` (keys whose value is unknown are left out)."""
    md: dict = {"general.type": ("model", V_STRING, None), "general.quantized_by": ("qlora70", V_STRING, None),
                "qlora70.version": (VERSION, V_STRING, None),
                "qlora70.merge_base": (p.merge_base or "none (no adapter merged)", V_STRING, None)}
    if p.license:
        md["general.license"] = (p.license, V_STRING, None)
    if p.base_model:
        md["general.base_model.count"] = (1, 4, None)
        md["general.base_model.0.name"] = (p.base_model, V_STRING, None)
    if p.nf4_blocksize is not None:
        md["qlora70.nf4.blocksize"] = (int(p.nf4_blocksize), 4, None)
        md["qlora70.nf4.double_quant"] = (bool(p.nf4_double_quant), 7, None)
    if p.adapter_path:
        md["general.finetune"] = (os.path.basename(os.path.normpath(p.adapter_path)), V_STRING, None)
        md["qlora70.adapter.path"] = (os.fspath(p.adapter_path), V_STRING, None)
    if p.adapter_sha256:
        md["qlora70.adapter.sha256"] = (p.adapter_sha256, V_STRING, None)
    if p.training_data:
        md["general.dataset.count"] = (len(p.training_data), 4, None)
        for i, (path, _) in enumerate(p.training_data):
            md[f"general.dataset.{i}.name"] = (os.path.basename(path), V_STRING, None)
        md["qlora70.training_data.files"] = _arr([os.fspath(f) for f, _ in p.training_data], V_STRING)
        md["qlora70.training_data.sha256"] = _arr([h for _, h in p.training_data], V_STRING)
    return md


def _hparams(w: Any, c: LlamaConfig) -> None:
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_vocab_size(c.vocab_size)


GGUF_QTYPES = gguf_kquants.EXPORT_QTYPES


def write_gguf(path: str | os.PathLike, config: LlamaConfig, specs: list, qtype: str = "F16",
               tokenizer_md: dict | None = None, name: str = "qlora70", progress: bool = True, *,
               pure: bool = False, provenance: Provenance | None = None) -> str:
    """Write a llama.cpp GGUF (architecture 'llama') atomically and return its path.

    specs: [(hf_name, shape, produce)] in file order; `produce()` returns the weight (any float dtype, HF layout),
    called once per tensor just before its bytes are written, so host memory stays near one tensor. Tensor types
    follow llama-quantize for `qtype` (`gguf_kquants.tensor_types`: e.g. Q4_K_M mixes Q4_K/Q6_K and falls back to
    Q5_0/Q8_0 for rows that are not whole 256-blocks); 1-D tensors are F32; Q/K rows are permuted to llama.cpp's
    layout. tokenizer_md: {key: (value, vtype, subtype)} from `tokenizer_metadata`; provenance: see `Provenance`.
    """
    import gguf  # the writer of llama.cpp's own python package
    from tqdm import tqdm

    qtype = qtype.upper()
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"export qtype must be one of {', '.join(GGUF_QTYPES)}, got {qtype!r}")
    path = os.fspath(path)
    c = config
    gnames = [(hf_to_gguf_name(n), tuple(shape)) for n, shape, _ in specs]
    types = gguf_kquants.tensor_types(gnames, qtype, c.num_hidden_layers, c.num_attention_heads,
                                      c.num_key_value_heads, pure=pure)
    ftype = gguf_kquants.FTYPES[gguf_kquants.PURE_ALIASES.get(qtype, qtype)][0]
    name = (provenance.name if provenance else None) or name
    meta = {"general.name": (name, V_STRING, None), "general.file_type": (ftype, 4, None)}
    meta |= provenance_metadata(provenance or Provenance(name=name))
    meta |= tokenizer_md or {}
    with atomic_path(path) as tmp, contextlib.closing(gguf.GGUFWriter(tmp, "llama")) as w:
        _hparams(w, c)
        for key, (val, vt, sub) in meta.items():
            w.add_key_value(key, val, gguf.GGUFValueType(vt), sub_type=None if sub is None else gguf.GGUFValueType(sub))
        w.add_quantization_version(2)
        for (gname, shape), (hf_name, _, _) in zip(gnames, specs):
            t = types[gname]
            rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
            nb = rows * gguf_quants.row_bytes(t, cols)
            byte_shape = (rows, nb // rows) if len(shape) == 2 else (nb,)
            w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nb, raw_dtype=gguf.GGMLQuantizationType[t])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (gname, shape), (hf_name, _, produce) in tqdm(list(zip(gnames, specs)), desc=f"export gguf {qtype}",
                                                         unit="tensor", disable=not progress):
            t = produce().detach().float().cpu()
            if hf_name.endswith("q_proj.weight"):
                t = permute_qk(t, c.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                t = permute_qk(t, c.num_key_value_heads)
            w.write_tensor_data(gguf_kquants.encode(t.reshape(-1, shape[-1]), types[gname]).numpy().reshape(-1))
            del t
    return path
