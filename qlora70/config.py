"""Configuration dataclasses: model shape (`LlamaConfig`), adapters (`LoRAConfig`), training (`TrainConfig`).

Field names follow HF's `LlamaConfig` so `config.json` maps one-to-one; every config validates in `__post_init__`
and raises `ValueError` naming the offending field and value.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VERSION = "0.1.0"  # qlora70.__version__ (written into exported files); setup.py says the same

IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding): HF / PyTorch convention


def pad_or_eos(pad_id: int | None, eos_id: int | None) -> int:
    """The one pad-id default: the pad id, else EOS (Llama-2 has no pad token; padded labels are masked anyway), else
    0. (Whether to prepend BOS has its one home too: `qlora70.data.resolve_add_bos`.)"""
    return int(pad_id) if pad_id is not None else (int(eos_id) if eos_id is not None else 0)


# gradient-checkpointing recompute policies (implemented in qlora70.recompute; "auto" resolves by device there)
CHECKPOINT_POLICIES = ("auto", "full", "keep_base_outputs")


@dataclass
class LlamaConfig:
    """Shape of a Llama-architecture decoder. Names mirror HF `config.json`."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> equal to num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LlamaConfig.{f} must be a positive int, got {v!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named size ("llama2-7b", "llama2-13b", "llama2-70b", "smollm2-135m", "tiny") with field overrides."""
        key = name.lower().replace("_", "-")
        if key not in _NAMED:
            raise ValueError(f"unknown model name {name!r}; known: {sorted(_NAMED)}")
        kw = dict(_NAMED[key])
        kw.update(overrides)
        kw.setdefault("name", key)
        return cls(**kw)

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "LlamaConfig":
        """Read an HF Llama `config.json` (a path to the file or its directory, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            d, where = path_or_dict, "config dict"
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: config.json not found; an HF Llama directory needs one")
            try:
                with open(p, encoding="utf-8") as fh:
                    d = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None
            where = p
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "mistral"):
            raise ValueError(f"{where}: model_type={arch!r} is not a Llama-architecture model")
        d = dict(d)
        rp = d.get("rope_parameters")  # transformers >= 5 spelling
        if isinstance(rp, dict):
            if rp.get("rope_type", "default") != "default":
                raise ValueError(f"{where}: rope_parameters.rope_type={rp.get('rope_type')!r} is not supported yet "
                                 "(only the default rotary embedding)")
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp["rope_theta"])
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        if d.get("rope_scaling"):
            raise ValueError(f"{where}: rope_scaling={d['rope_scaling']!r} is not supported yet")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "name"}
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in kw]
        if missing:
            raise ValueError(f"{where}: missing required keys {missing}")
        kw["name"] = d.get("_name_or_path") or "hf"
        if isinstance(kw.get("torch_dtype"), str) is False:
            kw.pop("torch_dtype", None)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The HF `config.json` dict (architectures LlamaForCausalLM)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", attention_bias=False,
                 mlp_bias=False, attention_dropout=0.0, initializer_range=0.02, use_cache=True, rope_scaling=None,
                 pretraining_tp=1)
        return d

    def num_params(self, include_embeddings: bool = True) -> int:
        h, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
        n = L * per_layer + h
        if include_embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n


_NAMED: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
}


@dataclass
class LoRAConfig:
    """LoRA adapter settings. scale = alpha / r (or alpha / sqrt(r) with use_rslora)."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LLAMA_TARGETS
    use_rslora: bool = False
    use_dora: bool = False  # DoRA: a trained magnitude per output feature over the normalized W + scale * B A
    init_lora_weights: str = "default"  # "default" (Kaiming A, zero B) | "loftq" (needs the full-precision weights)
    loftq_iters: int = 1  # LoftQ alternations (quantize W - s B A, rank-r SVD of W - dequant(Q)); used with "loftq"

    def __post_init__(self) -> None:
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoRAConfig.use_dora must be a bool, got {self.use_dora!r}")
        if self.init_lora_weights not in ("default", "loftq"):
            raise ValueError(f"LoRAConfig.init_lora_weights must be 'default' or 'loftq', got "
                             f"{self.init_lora_weights!r}")
        if not isinstance(self.loftq_iters, int) or isinstance(self.loftq_iters, bool) or self.loftq_iters < 1:
            raise ValueError(f"LoRAConfig.loftq_iters must be an int >= 1, got {self.loftq_iters!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive int, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError("LoRAConfig.targets is empty; name at least one module, e.g. ('q_proj', 'v_proj')")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r ** 0.5) if self.use_rslora else self.alpha / self.r


@dataclass
class TrainConfig:
    """Training-loop settings (QLoRA / SM70 defaults). `batch_size` is the global batch in sequences per optimizer step;
    it is reached by gradient accumulation over micro-batches of `micro_batch_size`. `max_steps` (when set) overrides
    `epochs`. `save_every` / `eval_every` / `log_every` count optimizer steps (0 = only at epoch ends / the end)."""

    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    micro_batch_size: int = 4
    seq_len: int = 1024
    warmup_ratio: float = 0.03
    lr_schedule: str = "constant"  # "constant" | "cosine"
    max_grad_norm: float | None = 0.3  # None or 0 disables clipping
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    save_every: int = 100
    eval_every: int = 0
    log_every: int = 1
    val_fraction: float = 0.0
    val_size: int = 0
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    gradient_checkpointing: bool = True
    offload: bool = False  # offload checkpointed layer inputs to CPU
    # "full": recompute each checkpointed layer entirely; "keep_base_outputs": keep the frozen base matmul outputs of the
    # LoRA layers from the forward (one (tokens, out) tensor per targeted linear and layer: +0.4 GB for SmolLM2-135M at
    # 4x256 tokens, +13.7 GB bf16 for Llama-2-70B at 1x1024) for ~20% less compute; "auto": keep on CPU, full on CUDA
    checkpoint_policy: str = "auto"
    optim_bits: int = 32  # 32 | 8
    paged: bool = True  # optimizer states on the GPU when they fit, else offloaded (False: always on the GPU)
    optim_offload: bool = False  # always offload optimizer states to pinned host memory (qlora70.optim)
    group_by_length: bool = True
    packing: bool = False
    chunk_size: int = 1024  # rows per chunk of the chunked cross-entropy
    compute_dtype: str = "auto"  # "auto" (CUDA: bf16; CPU: bf16 where measured faster) | "bf16" | "fp32"
    out_dir: str = "runs/qlora70"
    progress: bool = True

    def __post_init__(self) -> None:
        def pos_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ValueError(f"TrainConfig.{name} must be an int >= {0 if allow_zero else 1}, got {v!r}")

        for f in ("epochs", "batch_size", "micro_batch_size", "seq_len", "chunk_size"):
            pos_int(f)
        for f in ("save_every", "eval_every", "log_every", "val_size"):
            pos_int(f, allow_zero=True)
        if self.max_steps is not None:
            pos_int("max_steps")
        if self.early_stopping_patience is not None:
            pos_int("early_stopping_patience")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of "
                             f"micro_batch_size={self.micro_batch_size} (gradient accumulation steps = the ratio)")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"TrainConfig.adam_betas must be two values in [0, 1), got {self.adam_betas!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.val_fraction and self.val_size:
            raise ValueError("TrainConfig: set val_fraction or val_size, not both")
        if self.early_stopping_patience is not None and not (self.val_fraction or self.val_size):
            raise ValueError("TrainConfig.early_stopping_patience needs a validation split (val_fraction or val_size)")
        if self.optim_bits not in (8, 32):
            raise ValueError(f"TrainConfig.optim_bits must be 32 or 8, got {self.optim_bits!r}")
        if self.checkpoint_policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"TrainConfig.checkpoint_policy must be one of {CHECKPOINT_POLICIES}, got "
                             f"{self.checkpoint_policy!r}")
        if self.compute_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.compute_dtype must be 'auto', 'bf16' or 'fp32', got {self.compute_dtype!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"TrainConfig.out_dir must be a non-empty path string, got {self.out_dir!r}")

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


# ---- one experiment: model + LoRA + training + template + evaluation -----------------------------------------------
TEMPLATE_NAMES = ("sm70", "medalpaca")  # the training templates of qlora70.data.templates (a test keeps them equal)
EVAL_TASKS = ("medqa", "pubmedqa", "usmle")  # the shipped held-out benchmarks a run can evaluate


def parse_eval_tasks(spec: str | None) -> tuple[str, ...] | None:
    """`--eval`: None (the preset's default set), "none" (no benchmark), or a comma list of `EVAL_TASKS`."""
    if spec is None:
        return None
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in EVAL_TASKS]
    if bad or not names:
        raise ValueError(f"--eval {spec!r}: choose a comma list of {', '.join(EVAL_TASKS)}, or none")
    return tuple(dict.fromkeys(names))


@dataclass
class EvalConfig:
    """Benchmarks around a training run: `tasks` (None = the preset's default set, () = none), a seeded sample of
    `limit` items per task (None = all), and whether to evaluate at each epoch end (the SM70 protocol)."""

    tasks: tuple[str, ...] | None = None
    limit: int | None = None
    each_epoch: bool = False
    target_accuracy: float | None = None  # run report: held-out confidence threshold reaching this accuracy

    def __post_init__(self) -> None:
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ValueError(f"EvalConfig.target_accuracy must be in (0, 1], got {self.target_accuracy!r}")
        if self.tasks is not None:
            self.tasks = tuple(self.tasks)
            bad = [t for t in self.tasks if t not in EVAL_TASKS]
            if bad:
                raise ValueError(f"EvalConfig.tasks: unknown task(s) {bad}; choose from {EVAL_TASKS}")
        if self.limit is not None and (not isinstance(self.limit, int) or isinstance(self.limit, bool)
                                       or self.limit < 1):
            raise ValueError(f"EvalConfig.limit (--eval-limit) must be an int >= 1, got {self.limit!r}")


@dataclass
class RunConfig:
    """One experiment (`qlora70.run.run_experiment`): model source, LoRA, training loop, template, validation split
    and evaluation. The recipe presets (`qlora70.recipe.PRESETS`) are RunConfig values; command-line flags replace
    fields. Every field is validated here, before anything is loaded. `val_size`: held-out entries (a whole number
    >= 1) or a fraction (< 1) of the training data; a fraction that rounds to 0 entries still holds out one."""

    preset: str = "sm70"
    model: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    template: str = "sm70"
    val_size: float = 0.0
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"RunConfig.template (--template) must be one of {TEMPLATE_NAMES}, got {self.template!r}")
        v = self.val_size
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or (v >= 1 and v != int(v)):
            raise ValueError(f"RunConfig.val_size (--val-size) must be a whole number of entries (>= 1), a fraction "
                             f"in [0, 1), or 0 for none; got {v!r}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or (self.device.startswith("cuda:")
                                                                   and self.device[5:].isdigit())):
            raise ValueError(f"RunConfig.device (--device) must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name, typ in (("lora", LoRAConfig), ("train", TrainConfig), ("eval", EvalConfig)):
            if not isinstance(getattr(self, name), typ):
                raise TypeError(f"RunConfig.{name} must be a {typ.__name__}, got {type(getattr(self, name)).__name__}")

    def flat(self) -> dict[str, Any]:
        """The flat settings record saved as `run` in run_config.json (the key names of the command line)."""
        t, lo = self.train, self.lora
        return {"preset": self.preset, "model": self.model, "tokenizer": self.tokenizer, "device": self.device,
                "seq_len": t.seq_len, "batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size,
                "epochs": t.epochs, "max_steps": t.max_steps, "lr": t.lr, "lora_r": lo.r, "lora_alpha": lo.alpha,
                "lora_dropout": lo.dropout, "warmup_ratio": t.warmup_ratio, "lr_schedule": t.lr_schedule,
                "max_grad_norm": t.max_grad_norm, "paged": t.paged, "optim_offload": t.optim_offload, "compute_dtype": t.compute_dtype, "optim_bits": t.optim_bits,
                "gradient_checkpointing": t.gradient_checkpointing, "offload": t.offload,
                "eval_each_epoch": self.eval.each_epoch, "eval_limit": self.eval.limit,
                "eval": None if self.eval.tasks is None else list(self.eval.tasks), "val_size": self.val_size,
                "save_every": t.save_every, "eval_every": t.eval_every, "template": self.template,
                "early_stopping": t.early_stopping_patience, "seed": t.seed}
