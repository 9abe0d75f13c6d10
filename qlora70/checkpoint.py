"""Streaming checkpoint loading (HF safetensors, bitsandbytes 4-bit, GGUF) and atomic saving (bnb 4-bit, HF, GGUF).

Loading builds the model skeleton on the meta device and then fills it tensor by tensor: each tensor is read with one
positioned read (our own safetensors header parser; no mmap, so file pages never pile up in the process RSS), checked
against the config's shape, moved to `device`, and for a decoder linear quantized to NF4 right away (or, for a
bitsandbytes checkpoint, adopted byte for byte, never re-quantized). `quantize_nf4` never makes an fp32 copy of a
weight (the CPU fast path reads bf16/fp16 directly; the torch path works over 16M-element chunks), so peak host memory
is about the final model plus the largest tensor as stored plus ~0.2 GB of chunk temporaries (measured: 1.10x of model + largest tensor for the Llama-2-7B shape, benchmarks/bench_load.py).

Saving writes every file to a temporary name in the destination directory and renames it into place (a new
directory is assembled under a temporary name and renamed as a whole). Tensors are produced one at a time, so
`save_hf` of a 4-bit model never holds the dense model in memory.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import gguf_io
from .config import LlamaConfig
from .io import atomic_dir, atomic_write_json, parse_size  # noqa: F401 (parse_size: public here since 0.1)
from .layers import Linear4bit
from .model import Llama, decoder_linears
from .lora import load_adapter, lora_modules, merge_lora
from .nf4 import QS_KEY, NF4Weight, quantize_nf4
from .safetensors_io import SafetensorsFile, write_safetensors  # noqa: F401 (public here since 0.1)
from .tokenizer import load_tokenizer, tokenizer_metadata

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NF4_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QS_KEY)
_IGNORED_KEY = re.compile(r".*rotary_emb\.inv_freq$")
_OUR_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


@contextmanager
def _output_dir(out_dir: str) -> Iterator[str]:
    """A new directory is assembled under a temporary name and renamed into place; an existing one gets files
    replaced one by one (each atomically) and stale model shards of an earlier save removed afterwards."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"{out_dir} exists and is not a directory")
        yield out_dir
        return
    with atomic_dir(out_dir) as tmp:
        yield tmp


def _save_sharded(out_dir: str, specs: list, max_shard_size: int | str, progress: bool, desc: str) -> list[str]:
    """Write specs into model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from tqdm import tqdm

    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    total = 0
    for spec in specs:
        nb = math.prod(spec[1]) * torch.empty((), dtype=spec[2]).element_size()
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nb
        total += nb
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    bar = tqdm(total=len(specs), desc=desc, unit="tensor", disable=not progress)

    def counted(spec):
        def produce():
            t = spec[3]()
            bar.update(1)
            return t
        return (*spec[:3], produce)

    for fname, shard in zip(names, shards):
        write_safetensors(os.path.join(out_dir, fname), [counted(s) for s in shard])
    bar.close()
    if n > 1:
        atomic_write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                          {"metadata": {"total_size": total},
                           "weight_map": {s[0]: f for f, sh in zip(names, shards) for s in sh}})
    for f in os.listdir(out_dir):  # stale shards / index of an earlier save into the same directory
        if _OUR_FILES.fullmatch(f) and f not in names and not (n > 1 and f == "model.safetensors.index.json"):
            os.remove(os.path.join(out_dir, f))
    return names


# ---- sources: where each tensor comes from ----------------------------------------------------------------------
class _SafetensorsDir:
    """The tensors of an HF / bitsandbytes checkpoint directory (one file or index + shards)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    wmap = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
            for key, fname in wmap.items():
                if fname not in self.files:
                    fp = os.path.join(path, fname)
                    if not os.path.isfile(fp):
                        raise FileNotFoundError(f"{index} lists shard {fname} (holding tensor {key!r}, among others) "
                                                f"but {fp} does not exist; re-download the missing shard")
                    self.files[fname] = SafetensorsFile(fp)
                if key not in self.files[fname].entries:
                    raise ValueError(f"{index} maps tensor {key!r} to {fname}, but that file does not hold it")
                self.where[key] = self.files[fname]
        else:
            cands = [single] if os.path.isfile(single) else sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not cands:
                extra = (" (pickle *.bin checkpoints are never loaded: convert them to safetensors)"
                         if any(f.endswith(".bin") for f in os.listdir(path)) else "")
                raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                                        f"file{extra}")
            for fp in cands:
                sf = SafetensorsFile(fp)
                self.files[os.path.basename(fp)] = sf
                for k in sf.entries:
                    self.where[k] = sf

    def keys(self) -> set[str]:
        return set(self.where)

    def file_of(self, name: str) -> str:
        return self.where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get(name)

    def get_nf4(self, prefix: str) -> NF4Weight | None:
        """The bitsandbytes NF4 weight under `prefix`, or None when the weight is stored dense."""
        w = f"{prefix}.weight"
        if f"{w}.{QS_KEY}" not in self.where:
            if any(k.startswith(f"{w}.quant_state.") for k in self.where):
                bad = next(k for k in self.where if k.startswith(f"{w}.quant_state."))
                raise ValueError(f"{self.file_of(bad)}: {bad!r} is not NF4; only bitsandbytes nf4 weights are "
                                 "supported (not fp4 / int8)")
            return None
        parts = {w: self.get(w)}
        if parts[w].dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: same bytes, other dtype
            parts[w] = parts[w].reshape(-1).view(torch.uint8).reshape(-1, 1)
        for s in _NF4_PARTS:
            if f"{w}.{s}" in self.where:
                parts[f"{w}.{s}"] = self.get(f"{w}.{s}")
        try:
            return NF4Weight.from_state_dict(parts, prefix, source=self.file_of(f"{w}.{QS_KEY}"))
        except KeyError as e:
            raise ValueError(e.args[0]) from None


class _GGUFSource:
    """The tensors of a GGUF file under HF names, dequantized to fp32 with Q/K rows un-permuted."""

    def __init__(self, g: gguf_io.GGUFFile, config: LlamaConfig):
        self.g, self.config, self.path = g, config, g.path
        self.names: dict[str, str] = {}
        for n in g.tensors:
            hf = gguf_io.gguf_to_hf_name(n)
            if hf is None:
                raise ValueError(f"{g.path}: unexpected tensor {n!r} for a Llama model (this GGUF architecture or "
                                 "variant is not supported)")
            self.names[hf] = n

    def keys(self) -> set[str]:
        return set(self.names)

    def file_of(self, name: str) -> str:
        return f"{self.path} (tensor {self.names[name]})"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.g.tensors[self.names[name]].shape

    def get(self, name: str) -> torch.Tensor:
        w = self.g.read(self.names[name])
        if name.endswith("q_proj.weight"):
            w = gguf_io.unpermute_qk(w, self.config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = gguf_io.unpermute_qk(w, self.config.num_key_value_heads)
        return w

    def get_nf4(self, prefix: str) -> None:
        return None


# ---- loading --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[], Any] | None:
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc `malloc_trim`; a no-op elsewhere). Between tensors
    this keeps the RSS at the live size: without it, freed quantization temporaries stay resident in per-thread heaps
    (measured: +0.05..0.36 GB after a 2-layer 7B-shaped load, varying run to run)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def read_hf_config(path: str) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, raw dict) from `path/config.json`; accepts the transformers 4 and 5 spellings
    (`rope_theta` / `rope_parameters.rope_theta`, `torch_dtype` / `dtype`)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json; an HF Llama checkpoint directory needs its config.json next "
                                "to the *.safetensors files (copy it from the original model)")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    d = dict(raw)
    rp = d.get("rope_parameters") or {}
    if rp.get("rope_type", "default") != "default":
        raise ValueError(f"{cfg_path}: rope_parameters.rope_type={rp.get('rope_type')!r} is not supported")
    if "rope_theta" not in d and "rope_theta" in rp:
        d["rope_theta"] = rp["rope_theta"]
    if not isinstance(d.get("torch_dtype"), str) and isinstance(d.get("dtype"), str):
        d["torch_dtype"] = d["dtype"]
    try:
        return LlamaConfig.from_hf(d), raw
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def load_model(path: str | os.PathLike, quantize: str | None = "nf4", double_quant: bool = True, blocksize: int = 64,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", progress: bool = True) -> Llama:
    """Load a Llama from an HF safetensors directory, a bitsandbytes 4-bit directory saved by transformers (packed
    weights adopted as they are; `blocksize`/`double_quant` then do not apply), or a `.gguf` file (F32/F16/BF16/Q8_0/
    Q4_0/Q4_1/Q5_0/Q5_1 and the K-quants Q2_K..Q6_K, decoded one tensor at a time). With quantize="nf4" every decoder
    linear becomes a `Linear4bit`; with None all weights are dense `dtype`. Embeddings, norms and lm_head are always
    `dtype`. Returns the model in eval mode on `device`."""
    p = os.fspath(path)
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if not os.path.exists(p):
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    if os.path.isfile(p):
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{p} is a file but not GGUF (magic {magic!r}); pass an HF checkpoint directory or a "
                             ".gguf file")
        g = gguf_io.GGUFFile(p)
        config = gguf_io.config_from_gguf(g)
        src: Any = _GGUFSource(g, config)
    else:
        config, raw = read_hf_config(p)
        qc = raw.get("quantization_config")
        if qc and not (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")
                       and qc.get("bnb_4bit_quant_type", "nf4") == "nf4"):
            raise ValueError(f"{p}/config.json: quantization_config {qc.get('quant_method')!r} "
                             f"(load_in_4bit={qc.get('load_in_4bit')}, type={qc.get('bnb_4bit_quant_type')!r}) is not "
                             "supported; qlora70 reads dense checkpoints and bitsandbytes nf4 4-bit ones")
        src = _SafetensorsDir(p)
    model = _materialize(config, src, quantize, blocksize, double_quant, dtype, torch.device(device), progress)
    model.source_path = p
    return model.eval()


def weight_reader(path: str | os.PathLike) -> Callable[[str], torch.Tensor]:
    """`get(hf_name) -> tensor`: one full-precision tensor at a time from an HF safetensors directory or a `.gguf`
    file (decoded to fp32, Q/K rows un-permuted), e.g. LoftQ's source (`qlora70.loftq.apply_loftq(model,
    weight_reader(path))`). Raises ValueError for a bitsandbytes 4-bit checkpoint (it has no full-precision weights)."""
    p = os.fspath(path)
    if os.path.isfile(p):
        g = gguf_io.GGUFFile(p)
        src: Any = _GGUFSource(g, gguf_io.config_from_gguf(g))
    else:
        config, raw = read_hf_config(p)
        if raw.get("quantization_config"):
            raise ValueError(f"{p}: a quantized checkpoint has no full-precision weights to read (LoftQ needs the "
                             "original fp16/bf16/fp32 checkpoint)")
        src = _SafetensorsDir(p)

    def get(name: str) -> torch.Tensor:
        if name not in src.keys():
            raise ValueError(f"{src.path}: no tensor {name!r} (does the checkpoint match the model?)")
        return src.get(name)
    return get


def _materialize(config: LlamaConfig, src: Any, quantize: str | None, blocksize: int, double_quant: bool,
                 dtype: torch.dtype, device: torch.device, progress: bool) -> Llama:
    from tqdm import tqdm

    with torch.device("meta"):
        model = Llama(config)
    linears = {f"{n}.weight": (parent, attr) for n, parent, attr, _ in decoder_linears(model)}
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied: lm_head.weight is not listed
    keys = src.keys()
    nf4_keys = {f"{n}.{s}" for n in linears for s in _NF4_PARTS}
    missing = [n for n in expected if n not in keys]
    if missing:
        raise ValueError(f"{src.path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} of {len(expected)}); the checkpoint does not match its config")
    extra = sorted(k for k in keys - set(expected) - nf4_keys
                   if not _IGNORED_KEY.fullmatch(k) and not (k == "lm_head.weight" and config.tie_word_embeddings))
    if extra:
        raise ValueError(f"{src.path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         f"({len(extra)}); the checkpoint is not a plain Llama model (biases, another architecture?)")
    for name in tqdm(list(expected), desc=f"load {os.path.basename(src.path.rstrip('/'))}", unit="tensor",
                     disable=not progress):
        want = expected[name]
        q = src.get_nf4(name[: -len(".weight")]) if name in linears else None
        if q is not None:
            if tuple(q.shape) != want:
                raise ValueError(f"{src.file_of(name)}: tensor {name!r} has shape {tuple(q.shape)} but the config "
                                 f"needs {want}")
            parent, attr = linears[name]
            if quantize:
                setattr(parent, attr, Linear4bit.from_weight(q.to(device)))
            else:
                getattr(parent, attr).weight = nn.Parameter(q.to(device).dequantize(dtype))
            continue
        got = src.shape(name)
        if tuple(got) != want:
            raise ValueError(f"{src.file_of(name)}: tensor {name!r} has shape {tuple(got)} but the config needs {want}")
        t = src.get(name).to(device)
        if not t.is_floating_point():
            raise ValueError(f"{src.file_of(name)}: tensor {name!r} has dtype {t.dtype}, expected a float weight")
        if name in linears:
            parent, attr = linears[name]
            if quantize:
                # fp16/bf16 -> fp32 is exact, so an fp32 load quantizes the stored weight without an fp32 copy of it
                w = t if dtype == torch.float32 else t.to(dtype)
                setattr(parent, attr, Linear4bit.from_weight(quantize_nf4(w, blocksize, double_quant, dtype=dtype)))
            else:
                getattr(parent, attr).weight = nn.Parameter(t.to(dtype))
        else:
            mod_name, pname = name.rsplit(".", 1)
            setattr(model.get_submodule(mod_name), pname, nn.Parameter(t.to(dtype)))
        t = w = None  # drop the tensor in flight before reading the next one
        if name in linears and device.type == "cpu":
            release_freed_memory()
    model.tie_weights_()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a bug guard: every tensor must have been materialized
        raise RuntimeError(f"{src.path}: tensors left on the meta device after loading: {left[:5]}")
    return model


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a CUDA device is available, else "cpu"; a CUDA device that is not there is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def load_pretrained(path: str, adapter: str | None = None, quantize: str | None = "nf4",
                    dtype: torch.dtype = torch.float32, device: str = "auto", progress: bool = True) -> Llama:
    """`load_model` onto `resolve_device(device)`, plus a PEFT adapter (`qlora70.lora.load_adapter`) when given;
    in eval mode (what the commands that do not train use)."""
    m = load_model(path, quantize=quantize, dtype=dtype, device=resolve_device(device), progress=progress)
    if adapter:
        load_adapter(m, adapter)
    return m.eval()


def tokenizer_for(model: str, tokenizer: str | None = None) -> Any:
    """The tokenizer of a run: `tokenizer` when given (a file or directory), else the one in the model's GGUF or
    directory (a model file other than .gguf: its directory)."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    path = model
    if os.path.isfile(path) and not path.endswith(".gguf"):
        path = os.path.dirname(path)
    return load_tokenizer(path)


# ---- saving ---------------------------------------------------------------------------------------------------------
def _layer_modules(model: Llama) -> Iterator[tuple[str, nn.Module, str]]:
    """(HF parameter name, module, kind) in HF order; kind is "linear" for the decoder linears, else "param"."""
    m = model.model
    yield "model.embed_tokens.weight", m.embed_tokens, "param"
    lin = {n: mod for n, _, _, mod in decoder_linears(model)}
    for i, layer in enumerate(m.layers):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"):
            yield f"model.layers.{i}.{n}.weight", lin[f"model.layers.{i}.{n}"], "linear"
        yield f"model.layers.{i}.input_layernorm.weight", layer.input_layernorm, "param"
        yield f"model.layers.{i}.post_attention_layernorm.weight", layer.post_attention_layernorm, "param"
    yield "model.norm.weight", m.norm, "param"
    if not model.config.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head, "param"


def _dense(name: str, mod: nn.Module, kind: str) -> tuple[tuple[int, ...], Callable[[], torch.Tensor]]:
    """(shape, produce fp32-or-native weight) for a dense export; LoRA wrappers must be merged first."""
    if kind == "param" or type(mod) is nn.Linear:
        return tuple(mod.weight.shape), lambda: mod.weight.detach()
    if isinstance(mod, Linear4bit):
        return (mod.out_features, mod.in_features), lambda: mod.dequantize(torch.float32)
    raise TypeError(f"{name}: a {type(mod).__name__} cannot be exported dense; merge LoRA first "
                    "(qlora70.lora.merge_lora) or use save_adapter")


def save_hf(model: Llama, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
            max_shard_size: int | str = "5GB", progress: bool = True) -> str:
    """Write a plain HF Llama checkpoint (config.json + safetensors shards) with dense `dtype` weights; 4-bit linears
    are dequantized one at a time. Returns the directory."""
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"save_hf: dtype must be float32/float16/bfloat16, got {dtype}")
    specs = []
    for name, mod, kind in _layer_modules(model):
        shape, produce = _dense(name, mod, kind)
        specs.append((name, shape, dtype, (lambda f: lambda: f().to("cpu", dtype))(produce)))
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = _DTYPE_NAMES[dtype]
    out_dir = os.path.abspath(os.fspath(out_dir))
    with _output_dir(out_dir) as d:
        _save_sharded(d, specs, max_shard_size, progress, "save hf")
        atomic_write_json(os.path.join(d, "config.json"), cfg)
    return out_dir


def save_quantized(model: Llama, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                   progress: bool = True) -> str:
    """Write the NF4 model as transformers + bitsandbytes saves a 4-bit model: config.json with `quantization_config`
    and safetensors in the bitsandbytes key layout (`...q_proj.weight`, `.weight.absmax`, ...,
    `.weight.quant_state.bitsandbytes__nf4`). `load_model(out_dir)` reads it back bit-identically. Returns the dir."""
    dq = set()
    for name, _, _, mod in decoder_linears(model):
        if not isinstance(mod, Linear4bit):
            hint = "merge LoRA first" if type(mod) is not nn.Linear else "call quantize_model_(model) first"
            raise ValueError(f"save_quantized: {name} is a {type(mod).__name__}, not Linear4bit; {hint} "
                             "(or use save_hf for a dense checkpoint)")
        dq.add(mod.quant.double_quant)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    specs = [(k, tuple(v.shape), v.dtype, (lambda t: lambda: t)(v)) for k, v in sd.items()]
    compute = _DTYPE_NAMES.get(model.dtype, "float32")
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = compute
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": dq == {True}, "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
    out_dir = os.path.abspath(os.fspath(out_dir))
    with _output_dir(out_dir) as d:
        _save_sharded(d, specs, max_shard_size, progress, "save nf4")
        atomic_write_json(os.path.join(d, "config.json"), cfg)
    return out_dir


def export_gguf(model: Llama, path: str | os.PathLike, tokenizer: Any = None, qtype: str = "F16", *,
                gguf_type: str | None = None, progress: bool = True, pure: bool = False,
                provenance: gguf_io.Provenance | None = None) -> str:
    """Write a llama.cpp GGUF of `model` as `qtype` (gguf_io.GGUF_QTYPES: F16/BF16/F32, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1,
    Q6_K, Q4_K_S/Q4_K_M/Q5_K_S/Q5_K_M, or pure Q4_K/Q5_K; tensor types chosen as llama-quantize does; norms F32).

    LoRA layers are merged tensor by tensor as `qlora70.lora.merge_lora` does (W = base_weight(fp32) + scale * B @ A)
    onto the base the adapter wraps: the NF4-dequantized weights for a model loaded with quantize="nf4" (what the
    adapter was trained against, and `qlora70 merge`'s default) or the dense ones; which one goes into the metadata
    (`qlora70.merge_base`), with `provenance`. Only one merged tensor is dense at a time. Tokenizer metadata comes from
    `tokenizer` (a qlora70 Tokenizer, or a path to a .gguf / tokenizer.model / tokenizer.json / directory) or, when
    None, from the GGUF / directory the model was loaded from (if it holds one); without either the file has no
    vocabulary (llama.cpp then cannot run it). `gguf_type` is an alias of `qtype`. Returns the path."""
    import dataclasses

    from .lora import LoRALinear

    qtype = (gguf_type or qtype).upper()
    src = str(getattr(model, "source_path", ""))
    if tokenizer is None and src and (src.endswith(".gguf") or any(
            os.path.isfile(os.path.join(src, n)) for n in ("tokenizer.model", "tokenizer.json"))):
        tokenizer = src
    tok_md = tokenizer_metadata(tokenizer) if tokenizer is not None else None
    specs, bases = [], set()
    for name, mod, kind in _layer_modules(model):
        if isinstance(mod, LoRALinear):
            b = mod.base_layer
            bases.add(("nf4-dequantized", b.quant.blocksize, b.quant.double_quant) if isinstance(b, Linear4bit)
                      else ("full-precision", None, None))
            specs.append((name, (mod.out_features, mod.in_features), mod.merged_weight))
        else:
            shape, produce = _dense(name, mod, kind)
            specs.append((name, shape, produce))
    if len(bases) > 1:
        raise ValueError(f"export_gguf: the LoRA layers wrap different kinds of base weights "
                         f"{sorted(map(str, bases))}; load the base once, either NF4 or full precision")
    prov = provenance or gguf_io.Provenance(name=str(model.config.name))
    if bases:
        merge_base, blocksize, dq = bases.pop()
        prov = dataclasses.replace(prov, merge_base=merge_base, nf4_blocksize=blocksize, nf4_double_quant=dq)
    return gguf_io.write_gguf(path, model.config, specs, qtype=qtype, tokenizer_md=tok_md,
                              name=str(model.config.name), progress=progress, pure=pure, provenance=prov)


def save_merged(model: Llama, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                format: str = "hf", gguf_type: str = "f16", inplace: bool = False, **kwargs: Any) -> str:
    """Merge the adapter and write a deployable checkpoint: `format` "hf" (standard HF Llama safetensors in `dtype`),
    "bnb4" (re-quantized NF4 in the bitsandbytes layout; explicit) or "gguf" (`out_dir` is then the .gguf file path,
    `gguf_type` "f16" | "q8_0"; pass `tokenizer=` for the vocabulary).

    Without `inplace` the model is deep-copied first (the caller's adapter model stays usable); with `inplace=True`
    no copy is made (needed for models that fill the memory). Extra kwargs go to the checkpoint writer. Returns the
    path written (a directory, or the .gguf file).
    """
    import copy

    formats = ("hf", "bnb4", "gguf")
    if format not in formats:
        raise ValueError(f"save_merged: format must be one of {formats}, got {format!r}")
    if not any(True for _ in lora_modules(model)):
        raise ValueError("save_merged: the model has no LoRA layers; use qlora70.checkpoint.save_hf for a plain model")
    if format == "gguf":  # merged one tensor at a time in fp32 while writing (no bf16 rounding before F16)
        return export_gguf(model, out_dir, qtype=gguf_type.upper(), **kwargs)
    m = model if inplace else copy.deepcopy(model)
    if format == "bnb4":
        merge_lora(m, dtype=dtype, requantize=True)
        return save_quantized(m, out_dir, **kwargs)
    merge_lora(m, dtype=dtype)
    return save_hf(m, out_dir, dtype=dtype, **kwargs)
