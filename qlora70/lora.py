"""LoRA: `LoRALinear`, `inject_lora`, `merge_lora`, and PEFT-format adapter files (`save_adapter` / `load_adapter`).

A targeted linear (plain `nn.Linear` or 4-bit `Linear4bit`) is replaced by a `LoRALinear` that owns it as `base_layer`
(frozen) plus two small fp32 matrices: y = base(x) + lora_B(lora_A(dropout(x))) * scale, scale = alpha / r
(alpha / sqrt(r) with rsLoRA). Module names mirror PEFT (`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`), and
the adapter files are PEFT's: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
DoRA (`LoRAConfig(use_dora=True)`, math in `qlora70.dora`) adds a trained magnitude `lora_magnitude_vector` [out]
(PEFT's name and file key) over the row-normalized W + scale * B A; LoftQ starts live in `qlora70.loftq`.

Speed (CPU): LoRA dropout uses `FastDropout` (nn.Dropout's semantics; a seeded hash mask applied in one fused pass
and recomputed in backward, never stored), outside autocast the B projection and scale fold into one `addmm`, and
`keep_base_outputs_context_fn` lets a checkpointed layer keep its frozen base outputs instead of recomputing them
(`set_gradient_checkpointing(..., policy="keep_base_outputs")`, `qlora70.recompute`). Under autocast the base and
LoRA matmuls run in the autocast dtype and their sum is formed in fp32 (`qlora70.ops.lora_sum`): a bf16-rounded sum
would erase most of the small learned delta. Merged checkpoints are written by `qlora70.checkpoint.save_merged`.
"""
from __future__ import annotations

import collections
import json
import math
import os
from typing import Iterator

import torch
from torch import nn

from . import dora, ops
from .config import LoRAConfig
from .io import atomic_write_json
from .layers import Linear4bit
from .recompute import _current_phase
from .safetensors_io import atomic_save_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_BASE_TYPES = (nn.Linear, Linear4bit)


class FastDropout(nn.Module):
    """Inverted dropout (nn.Dropout's semantics: keep with probability 1 - p, scale 1 / (1 - p)) that is cheap on CPU.

    torch's CPU dropout draws one Mersenne-Twister number per element and saves a mask; here (`qlora70.ops.
    seeded_dropout`) the mask is a hash of one seed drawn from torch's generator and the element index, applied in
    one fused pass (C loop when built) and recomputed in backward, never stored. p is realized to within 2^-33
    (threshold round(p * 2^32)) and the scale uses that exact value, so E[y] = x. Seeding and gradient-checkpoint
    recomputation (which restores the RNG state) reproduce the mask. Under CPU autocast the output is in the
    autocast dtype (the cast the LoRA A matmul would do, fused). On CUDA (or with p = 0) it is `F.dropout`.
    """

    def __init__(self, p: float):
        super().__init__()
        ops.dropout_threshold(p)  # raises ValueError for p outside [0, 1)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        return ops.seeded_dropout(x, self.p, ops.compute_dtype_of(x))  # the cast lora_A would do, fused

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _FrozenBase(torch.autograd.Function):
    """y = base(x) for a frozen base, computed here (y_cached None) or taken from the recording; saves no tensors
    (so the first forward and the recomputation save the same set). Backward: dx = dy @ W (W dequantized)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module, y_cached: torch.Tensor | None) -> torch.Tensor:
        ctx.base, ctx.x_dtype = base, x.dtype
        if y_cached is not None:
            return y_cached.view_as(y_cached)
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        base = ctx.base
        w = base.dequantize(dy.dtype) if isinstance(base, Linear4bit) else base.weight.to(dy.dtype)  # (out, in)
        dx = dy.reshape(-1, dy.shape[-1]) @ w  # (M, in)
        return dx.reshape(*dy.shape[:-1], w.shape[1]).to(ctx.x_dtype), None, None


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update.

    x (..., in) -> base(x) + lora_B(lora_A(dropout(x))) * scale, shape (..., out). lora_A [r, in] is Kaiming-uniform
    (a = sqrt(5), as PEFT), lora_B [out, r] is zero, so a fresh adapter leaves the output unchanged. LoRA weights are
    fp32 (master weights); the branch runs in the input's dtype (or the autocast dtype) and is added in the base
    output's dtype. With `use_dora`, the output is DoRA's (`qlora70.dora.dora_forward`) and the magnitude
    `lora_magnitude_vector` (fp32 [out], initialised to ||W + s B A||_row) trains too.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False):
        super().__init__()
        if not isinstance(base_layer, _BASE_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear or Linear4bit, got {type(base_layer).__name__}")
        LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)  # raises ValueError
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, float(alpha), bool(use_rslora)
        self.scale = self.alpha / math.sqrt(r) if use_rslora else self.alpha / r
        dev = next(base_layer.parameters()).device
        self.lora_dropout = FastDropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.use_dora = use_dora
        if use_dora:  # DoRA magnitude [out] fp32 (PEFT's name), m = ||W + s B A||_row; see qlora70.dora
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=dev, dtype=torch.float32))
        self.reset_lora_parameters()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    @property
    def dropout(self) -> float:
        return getattr(self.lora_dropout, "p", 0.0)

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform(a=sqrt(5)) as PEFT; B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = ||W + s B A||_row from the current base and A, B (call after changing them, e.g. LoftQ)."""
        if self.use_dora:
            # the expanded norm (no dense [out, in] temporaries at inject time), which also fills the ||W||^2 cache
            self.lora_magnitude_vector.copy_(dora.fast_weight_norm(self.base_layer, self._dora_w_sq(),
                                                                   self.lora_A.weight, self.lora_B.weight, self.scale))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """base_layer(x), recorded / replayed when running under `keep_base_outputs_context_fn` checkpointing."""
        ph = _current_phase()
        if ph is None:
            return self.base_layer(x)
        queue = ph.cache.store.setdefault(id(self), collections.deque())
        if ph.phase == "record":
            y = _FrozenBase.apply(x, self.base_layer, None)
            queue.append(y.detach())
            return y
        return _FrozenBase.apply(x, self.base_layer, queue.popleft() if queue else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self._base(x)  # (..., out)
        if self.use_dora:
            active = self.training and self.dropout > 0
            return dora.dora_forward(x, y, self.base_layer, self.lora_A, self.lora_B, self.lora_magnitude_vector,
                                     self.scale, self.lora_dropout, active, self._dora_w_sq())
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, in), (out, r)
        h = self.lora_dropout(x)
        if torch.is_autocast_enabled(x.device.type):
            # Both matmuls in the autocast dtype, the sum in fp32 and returned in fp32: rounding y + delta to bf16
            # would quantize the small learned delta with the step of the large base output (2^-8 |y|) and erase a
            # good part of each update from the forward; the demo's bf16 loss curve then lags fp32 by up to 2.2%
            # (within 0.3% with the fp32 sum; benchmarks/RESULTS.md). Backward casts the gradients back to bf16.
            d = self.lora_B(self.lora_A(h))  # (..., out) in the autocast dtype
            return ops.lora_sum(y, d, self.scale)
        h = self.lora_A(h.to(a.dtype))  # (..., r), fp32 branch outside autocast (the LoRA weights are fp32)
        if y.dtype != b.dtype:
            return y + (self.lora_B(h) * self.scale).to(y.dtype)
        # one fused op: y + scale * h @ B^T
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                           alpha=self.scale).view(y.shape)

    def _dora_w_sq(self) -> torch.Tensor:
        """||W||^2_row of the frozen base (fp32 [out]), cached while the base keeps the same bytes and device (a new
        NF4 state, as from load_state_dict or LoftQ, or a move recomputes it; FSDP all-gathers keep it)."""
        b = self.base_layer
        # the cache holds the keyed object itself (compared with `is`), so a freed one cannot alias a new one
        owner = b._meta if isinstance(b, Linear4bit) else b.weight
        version = 0 if isinstance(b, Linear4bit) else b.weight._version
        cached = self.__dict__.get("_w_sq_cache")
        if cached is None or cached[0] is not owner or cached[1:3] != (version, b.weight.device):
            cached = self.__dict__["_w_sq_cache"] = (owner, version, b.weight.device, dora.weight_sq_norm(b))
        return cached[3]

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, fp32 [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight [out, in] in `dtype` (dequantized when 4-bit)."""
        return dora.base_weight(self.base_layer, dtype)

    def merged_weight(self) -> torch.Tensor:
        """The adapted weight [out, in] fp32: W + s B A (LoRA) or m * (W + s B A) / ||W + s B A||_row (DoRA)."""
        w = self.base_weight(torch.float32)
        delta = self.delta_weight().to(w.device)
        return dora.merged_weight(w, delta, self.lora_magnitude_vector) if self.use_dora else w + delta

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}"
                + (", dora" if self.use_dora else ""))


# ---- injection --------------------------------------------------------------------------------------------------

def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the full name equals the target or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every `LoRALinear` in `model`, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Replace every linear whose name ends with a target (e.g. "q_proj") by a `LoRALinear`, in place; freeze the rest.

    Afterwards only LoRA parameters require grad. Raises ValueError naming the available linear layers when a target
    matches nothing, and when the model already has LoRA layers. Returns `model`.
    """
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"inject_lora expects a LoRAConfig, got {type(cfg).__name__}")
    if any(True for _ in lora_modules(model)):
        raise ValueError("inject_lora: the model already has LoRA layers; merge them (merge_lora) or start from a "
                         "fresh base model")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, _BASE_TYPES)]
    chosen = [(n, m) for n, m in linears if any(_matches(n, t) for t in cfg.targets)]
    unmatched = [t for t in cfg.targets if not any(_matches(n, t) for n, _ in chosen)]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"inject_lora: target(s) {unmatched} match no linear layer of the model; linear layer names "
                         f"end with {suffixes} (e.g. {[n for n, _ in linears[:3]]})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in chosen:
        _set_submodule(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.use_dora))
    model.lora_config = cfg  # recorded for save_adapter / checkpoints
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) of the parameters that require grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in PEFT's key layout: `base_model.model.<module>.lora_{A,B}.weight` -> fp32 CPU tensor."""
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
        if m.use_dora:  # PEFT's file key: no ".weight" suffix (it reads ".lora_magnitude_vector.default.weight" in)
            sd[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = \
                m.lora_magnitude_vector.detach().float().cpu().contiguous()
    return sd


def get_lora_config(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig of an injected model (recorded by inject_lora, else read back from its LoRA layers)."""
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, LoRAConfig(...)) first")
    cfg = getattr(model, "lora_config", None)
    if isinstance(cfg, LoRAConfig):
        return cfg
    m0 = mods[0][1]
    targets = tuple(sorted({n.rsplit(".", 1)[-1] for n, _ in mods}))
    return LoRAConfig(r=m0.r, alpha=m0.alpha, dropout=m0.dropout, targets=targets, use_rslora=m0.use_rslora,
                      use_dora=m0.use_dora)


# ---- merge -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype = torch.bfloat16, requantize: bool = False,
               cast_model: bool = True) -> nn.Module:
    """Fold every LoRA update into its base, in place: W = dequant(W0) + scale * B @ A in fp32 (DoRA: that times
    m / ||.||_row, `LoRALinear.merged_weight`), stored in `dtype`.

    Each `LoRALinear` becomes a plain `nn.Linear` in `dtype` (or, only with `requantize=True`, a `Linear4bit` quantized
    from the merged weight). With `cast_model`, the other floating parameters (norms, embeddings, untargeted plain
    linears; not the 4-bit ones) are cast to `dtype` too so the model runs in one dtype. Returns `model`.
    """
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("merge_lora: the model has no LoRA layers to merge")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"merge_lora: dtype must be float32/float16/bfloat16, got {dtype}")
    for name, m in mods:
        b = m.base_layer
        w = m.merged_weight()  # (out, in) fp32
        bias = None if b.bias is None else b.bias.detach()
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias.to(dtype))
        if requantize:
            lin = Linear4bit.from_linear(lin, blocksize=b.quant.blocksize if isinstance(b, Linear4bit) else 64,
                                         double_quant=(b.quant.double_quant if isinstance(b, Linear4bit) else True))
        lin.requires_grad_(False)
        _set_submodule(model, name, lin)
    if cast_model:
        for mod in model.modules():
            if isinstance(mod, Linear4bit):
                continue
            for pn, p in mod.named_parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype:
                    setattr(mod, pn, nn.Parameter(p.detach().to(dtype), requires_grad=False))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---- PEFT adapter files ----------------------------------------------------------------------------------------

def adapter_config_dict(cfg: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
    """PEFT's `adapter_config.json` for a LoRA adapter on a causal LM."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets), "bias": "none",
        # init_lora_weights stays True for LoftQ starts too: the file holds the weights, and "loftq" would make PEFT
        # re-run LoftQ on load (the LoftQ base is the NF4 checkpoint saved with it)
        "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }


def write_adapter(sd: dict[str, torch.Tensor], cfg: LoRAConfig, out_dir: str | os.PathLike,
                  base_model_name_or_path: str | None = None) -> str:
    """Write an adapter state dict (PEFT key layout) and its config in PEFT's format (`adapter_model.safetensors`,
    `adapter_config.json`); returns the dir."""
    out_dir = os.fspath(out_dir)
    atomic_save_safetensors(sd, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(os.path.join(out_dir, ADAPTER_CONFIG), adapter_config_dict(cfg, base_model_name_or_path),
                      sort_keys=True)
    return out_dir


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> str:
    """Write the model's adapter in PEFT's format (`write_adapter`); returns the dir."""
    return write_adapter(lora_state_dict(model), get_lora_config(model), out_dir, base_model_name_or_path)


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Parse a PEFT `adapter_config.json` into a LoRAConfig; ValueError for what this library cannot represent."""
    path = os.path.join(os.fspath(adapter_dir), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type={d.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {"bias": ("none", None), "use_dora": (False, True, None), "fan_in_fan_out": (False, None),
                   "modules_to_save": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                   "layers_to_transform": (None,), "target_parameters": (None, [])}
    for k, ok in unsupported.items():
        if k in d and d[k] not in ok:
            raise ValueError(f"{path}: {k}={d[k]!r} is not supported (expected {ok[0]!r})")
    targets = d.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules={targets!r} is a regex/keyword; only a list of module names "
                         "(e.g. ['q_proj', 'v_proj']) is supported")
    try:
        return LoRAConfig(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                          targets=tuple(targets or ()), use_rslora=bool(d.get("use_rslora", False)),
                          use_dora=bool(d.get("use_dora", False)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def canonical_adapter_key(k: str) -> str:
    """PEFT's spellings -> ours: with the adapter name ("lora_A.default.weight") and DoRA's magnitude as saved
    ("...lora_magnitude_vector") or as a module parameter ("...lora_magnitude_vector[.default].weight")."""
    k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    for suffix in (".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.weight"):
        if k.endswith(suffix):
            return k[: -len(suffix)] + ".lora_magnitude_vector"
    return k


@torch.no_grad()
def adapter_tensors(model: nn.Module, adapter_dir: str | os.PathLike,
                    inject: bool = True) -> tuple[LoRAConfig, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Read and validate a PEFT adapter against `model`: (its LoRAConfig, [(model parameter, file tensor)]).

    The one reader of adapter files (`load_adapter`, and `distributed.load_adapter_sharded`, which copies each rank's
    shard). Injects LoRA first when the model has none and `inject`; validates r, alpha, targets, rsLoRA / DoRA and
    every tensor's key, shape (the parameter's global shape, also for sharded DTensors) and dtype, raising ValueError
    naming the file and the mismatch (an adapter of another model or LoRA config never loads silently).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = os.fspath(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    wpath = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"{wpath} not found (adapter_model.bin pickles are not read; re-save as safetensors)")
    try:
        sd = load_file(wpath)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{wpath}: not a readable safetensors file ({e})") from None
    if any(True for _ in lora_modules(model)):
        have = get_lora_config(model)
        diffs = [f"{k}: model {a!r} vs adapter {b!r}" for k, a, b in
                 (("r", have.r, cfg.r), ("alpha", float(have.alpha), float(cfg.alpha)),
                  ("targets", sorted(have.targets), sorted(cfg.targets)),
                  ("use_rslora", have.use_rslora, cfg.use_rslora), ("use_dora", have.use_dora, cfg.use_dora))
                 if a != b]
        if diffs:
            raise ValueError(f"{adapter_dir}: adapter LoRA config differs from the model's LoRA layers "
                             f"({'; '.join(diffs)})")
    elif inject:
        inject_lora(model, cfg)
    else:
        raise ValueError(f"{adapter_dir}: the model has no LoRA layers to load the adapter into; inject_lora first")
    expected = {}
    for name, m in lora_modules(model):
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
        if m.use_dora:
            expected[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    sd = {canonical_adapter_key(k): v for k, v in sd.items()}
    _check_adapter_keys(wpath, cfg, set(expected), set(sd))
    pairs = []
    for k, param in expected.items():
        t = sd[k]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{wpath}: {k} has shape {tuple(t.shape)} but the model needs {tuple(param.shape)} "
                             "(another model size or LoRA rank)")
        if not t.is_floating_point():
            raise ValueError(f"{wpath}: {k} has dtype {t.dtype}; expected a float tensor")
        pairs.append((param, t))
    return cfg, pairs


def _check_adapter_keys(wpath: str, cfg: LoRAConfig, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    mag = [k for k in missing + unexpected if k.endswith(".lora_magnitude_vector")]
    if mag and len(mag) == len(missing) + len(unexpected):
        raise ValueError(f"{wpath}: adapter_config.json says use_dora={cfg.use_dora} but the file "
                         f"{'lacks' if missing else 'has'} {len(mag)} lora_magnitude_vector tensors (e.g. {mag[0]}); "
                         "fix use_dora in adapter_config.json or re-save the adapter")
    if missing or unexpected:
        raise ValueError(f"{wpath}: adapter keys do not match the model (missing {len(missing)}: {missing[:3]}, "
                         f"unexpected {len(unexpected)}: {unexpected[:3]}); it was trained for another model or with "
                         "other target modules")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (injecting LoRA first if the model has none). Returns `model`.
    Validation: `adapter_tensors`."""
    cfg, pairs = adapter_tensors(model, adapter_dir)
    with torch.no_grad():
        for param, t in pairs:
            param.copy_(t.to(param.dtype))
    model.lora_config = cfg
    return model

