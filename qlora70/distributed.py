"""Multi-process QLoRA with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) under `torchrun`.

    torchrun --nproc_per_node N -m qlora70.cli train ...      (or `launch(N, argv)`: torchrun on 127.0.0.1)

    info = init_distributed()                                  # gloo on CPU, nccl + cuda:LOCAL_RANK on GPUs
    model = build_sharded(lambda: load_model(path, device="cpu"), lora_cfg, seed=cfg.seed)   # or pass it unsharded
    DistributedTrainer(model, cfg, data, lora_config=lora_cfg).train()   # cfg.batch_size = GLOBAL batch

What is sharded (world size W, mesh = all ranks, dim 0 of every parameter split as `torch.chunk`):
  * every decoder layer is one FSDP unit and the root (embeddings, final norm, lm_head) another;
  * the frozen NF4 weights stay 4-bit: the packed uint8 `weight` Parameter AND its quantization state (absmax codes,
    nested absmax, code maps; buffers turned into frozen Parameters by `shard_model`) are sharded, and each unit's
    all-gather moves exactly those bytes. FSDP2 packs a unit with mixed dtypes into one uint8 all-gather buffer, so the
    base weight crosses the wire as 0.5 byte/param (+ ~1/64 byte of absmax codes), never dequantized;
  * LoRA parameters are sharded DTensors; their gradients are reduce-scattered as a SUM (divide factor 1) because the
    loss of every rank is already divided by the GLOBAL number of trained tokens of the accumulation window;
  * optimizer states: `ShardedOptimizer` runs `PagedAdamW` on each rank's local shards, so states are 1/W per rank.

`DistributedTrainer` is `qlora70.trainer.Trainer` with: rank-dealt global batches (`Batches(rank=, world_size=)`,
`micro_batch_size` per rank, accumulation steps = batch_size / (micro_batch_size * W)), token counts and losses
all-reduced over the window, a global gradient-norm clip, and checkpoints / adapters gathered to rank 0 and written in
the single-process layout (a 2-process checkpoint resumes on 1 process and vice versa).

Not supported on a sharded model: `load_state_dict` of base weights (load before sharding), `merge_lora` /
`save_merged` and generation from one rank (save the adapter, then merge / evaluate in one process), optim_bits=8.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import IGNORE_INDEX, LoRAConfig, TrainConfig
from .layers import Linear4bit
from .data import Batches, TokenizedData
from .lora import PEFT_PREFIX, adapter_tensors, get_lora_config, inject_lora, lora_modules, write_adapter
from .optim import PagedAdamW
from .launch import launch, strip_nproc  # noqa: F401 (public here)
from .train_state import base_checksum
from .trainer import Trainer

log = logging.getLogger("qlora70.distributed")

# Linear4bit buffers that hold the quantization state; `shard_model` turns them into frozen Parameters so FSDP shards
# them with the packed weight (FSDP2 replicates buffers)
_QUANT_STATE = ("weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---- process group ------------------------------------------------------------------------------------------------

def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    backend: None -> "nccl" when CUDA is available, else "gloo". Selects cuda:LOCAL_RANK. Without WORLD_SIZE in the
    env (a plain `python` run) returns rank 0 of 1 and creates no group. Calling it again returns the same info.
    """
    env = os.environ
    if "WORLD_SIZE" not in env:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(0, 1, 0, dev)
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"init_distributed: bad torchrun environment ({e}); launch with `torchrun --nproc_per_node N` "
                         "which sets RANK, WORLD_SIZE and LOCAL_RANK") from None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"init_distributed: backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("init_distributed: backend 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        import datetime
        kw: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return DistInfo(rank, world, local, dev)


def dist_info() -> DistInfo:
    """Rank / world size of the current process group (rank 0 of 1 when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(0, 1, 0, torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- sharding ------------------------------------------------------------------------------------------------------

def _quant_state_to_params(model: nn.Module) -> int:
    """Re-register every Linear4bit quantization-state buffer as a frozen Parameter (same name, same tensor); returns
    how many. `Linear4bit.quant` / its state dict read them by attribute, so behaviour is unchanged."""
    n = 0
    for mod in model.modules():
        if not isinstance(mod, Linear4bit):
            continue
        for name in _QUANT_STATE:
            t = mod._buffers.get(name)
            if t is None:
                continue
            del mod._buffers[name]
            mod.register_parameter(name, nn.Parameter(t, requires_grad=False))
            n += 1
    return n


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True, shard_quant_state: bool = True,
                mesh: Any = None) -> nn.Module:
    """Apply FSDP2 `fully_shard` to each decoder layer (`model.model.layers[i]`) and then to the root, in place.

    Call after LoRA injection and before building the optimizer. Needs an initialized process group (any size, 1
    included). The packed uint8 NF4 weights (and, with `shard_quant_state`, their absmax / code-map tensors) are
    sharded as frozen Parameters and all-gathered per layer in their stored 4-bit form. Gradients are SUMMED across
    ranks (divide factor 1): normalize the loss by the global token count (as `DistributedTrainer` does).
    Returns `model` (its class becomes FSDP's subclass of it).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_model: no process group; call qlora70.distributed.init_distributed() first (under "
                         "torchrun)")
    if isinstance(model, FSDPModule):
        raise ValueError("shard_model: the model is already sharded")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"shard_model expects a qlora70 Llama (model.model.layers), got {type(model).__name__}")
    if any(True for _ in lora_modules(model)):  # Trainer's base-weight fingerprint, taken while still unsharded
        model._qlora70_base_checksum = base_checksum(model)
    if shard_quant_state:
        _quant_state_to_params(model)
    if mesh is None:
        mesh = default_mesh()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root unit (embeddings, final norm, lm_head) stays gathered between forward and backward: the trainer's
    # chunked cross-entropy reads `model.lm_head.weight` outside the model's forward
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):  # plain SUM (gloo has no PREMUL_SUM); 1.0 = no divide
                m.set_force_sum_reduction_for_comms(True)
    return model


def default_mesh() -> Any:
    """A 1-D DeviceMesh over all ranks (cuda with NCCL, else cpu)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (dist.get_world_size(),))


def build_sharded(make_model: Callable[[], nn.Module], lora_config: LoRAConfig, seed: int = 0, *,
                  stagger: bool = True, **shard_kw: Any) -> nn.Module:
    """Build the model on every rank with bounded host memory: `make_model()` (e.g. `lambda: load_model(path,
    device="cpu")`, which quantizes while streaming), LoRA injection seeded with `seed` (as `Trainer`), `shard_model`.

    With `stagger`, the ranks of a node do this one after another (barriers between), so at most one full 4-bit
    model is in host memory at a time and each rank then keeps only its 1/W shards (moved to its GPU under NCCL).
    Collective: every rank calls it. Returns the sharded model, ready for `DistributedTrainer`.
    """
    info = dist_info()
    mesh = default_mesh()
    model = None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    for turn in range(local_world if stagger else 1):
        if not stagger or info.local_rank == turn:
            model = make_model()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                inject_lora(model, lora_config)
            shard_model(model, mesh=mesh, **shard_kw)
            gc.collect()  # the full copies are gone once their shards exist
        if stagger:
            barrier()
    return model


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor as a plain leaf tensor sharing its storage (t itself when not a DTensor)."""
    return t.to_local().detach() if _is_dtensor(t) else t.detach()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective on DTensors: every rank must call it in the same order)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 shard of `full` for a parameter `like` (DTensor Shard(0) = torch.chunk semantics)."""
    if not _is_dtensor(like):
        return full
    world, rank = like.device_mesh.size(), like.device_mesh.get_local_rank()
    chunks = torch.chunk(full, world, dim=0)
    part = chunks[rank] if rank < len(chunks) else full[:0]
    loc = like.to_local()
    if tuple(part.shape) != tuple(loc.shape):
        raise ValueError(f"cannot shard a tensor of shape {tuple(full.shape)} like {tuple(like.shape)}: rank {rank} "
                         f"expects a local shard {tuple(loc.shape)}, chunking gives {tuple(part.shape)}")
    return part


# ---- adapters ------------------------------------------------------------------------------------------------------

def gather_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in PEFT's key layout (fp32 CPU), gathered from the shards. Collective: call on every rank."""
    sd = {}
    for name, m in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight
            sd[f"{PEFT_PREFIX}{name}.{part}.weight"] = _full(w.detach()).float().cpu().contiguous()
        if m.use_dora:  # DoRA magnitude, PEFT's key (no ".weight")
            sd[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = \
                _full(m.lora_magnitude_vector.detach()).float().cpu().contiguous()
    return sd


def save_adapter_sharded(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None) -> str:
    """Gather the LoRA weights and write the PEFT adapter on rank 0; every rank must call it (ends with a barrier)."""
    sd = gather_lora_state_dict(model)
    if dist_info().is_main:
        write_adapter(sd, get_lora_config(model), out_dir, base_model_name_or_path)
    barrier()
    return out_dir


@torch.no_grad()
def load_adapter_sharded(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Load a PEFT adapter into a sharded model that already has the same LoRA layers (each rank copies its shard);
    reading and validation: `lora.adapter_tensors`."""
    _, pairs = adapter_tensors(model, adapter_dir, inject=False)
    with torch.no_grad():
        for p, t in pairs:
            _local(p).copy_(_shard_of(t.to(p.dtype), p).to(_local(p).device))
    return model


# ---- optimizer ----------------------------------------------------------------------------------------------------

class ShardedOptimizer:
    """`PagedAdamW` over each rank's local shards of (DTensor) parameters: element-wise AdamW, so the update equals the
    single-process one and each rank keeps 1/W of the states. `state_dict()` gathers full states (collective) in
    `PagedAdamW.state_dict()`'s layout; `load_state_dict()` takes that layout and keeps this rank's shards.
    Only 32-bit states (8-bit blockwise states would depend on the shard boundaries).
    """

    def __init__(self, params: list[torch.Tensor], **kw: Any):
        if kw.get("optim_bits", 32) != 32:
            raise ValueError("ShardedOptimizer: optim_bits=8 is not supported with FSDP (blockwise 8-bit states would "
                             "depend on the shard boundaries); LoRA states are small, use optim_bits=32")
        self.params = list(params)
        self.locals = [_local(p) for p in self.params]
        self.inner = PagedAdamW(self.locals, **kw)
        self.param_groups = self.inner.param_groups
        self.optim_bits = 32
        self.gathered: dict | None = None  # set by DistributedTrainer while rank 0 writes a checkpoint

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, lp in zip(self.params, self.locals):
            p.grad = None
            lp.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, lp in zip(self.params, self.locals):
            lp.grad = None if p.grad is None else _local(p.grad)
        self.inner.step()
        for lp in self.locals:
            lp.grad = None

    def state_dict(self) -> dict[str, Any]:
        if self.gathered is not None:
            return self.gathered
        sd = self.inner.state_dict()
        for i, st in sd["state"].items():
            p = self.params[i]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and _is_dtensor(p):
                    from torch.distributed.tensor import DTensor
                    dt = DTensor.from_local(v.to(_local(p).device), p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride())
                    st[k] = dt.full_tensor().cpu()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        sd = dict(sd)
        state = {}
        for i, st in sd["state"].items():
            p = self.params[int(i)]
            state[int(i)] = {k: (_shard_of(v.reshape(p.shape), p) if torch.is_tensor(v) else v) for k, v in st.items()}
        sd["state"] = state
        self.inner.load_state_dict(sd)


class _GlobalPositionLoader:
    """One rank's `Batches` whose saved position reads in single-process terms (batch_size = micro x world, world 1):
    the global batches of both are the same (except a final batch of fewer units than ranks, which W > 1 drops), so
    checkpoints resume across world sizes with the same global micro-batch."""

    def __init__(self, batches: Any):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict[str, Any]:
        sd = self.batches.state_dict()
        sd["batch_size"], sd["world_size"] = self.batches.batch_size * self.batches.world_size, 1
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        gmb = self.batches.batch_size * self.batches.world_size
        if "batch_size" in state:
            saved = int(state["batch_size"]) * int(state.get("world_size", 1))
            if saved != gmb:
                raise ValueError(f"data position was saved with a global micro-batch of {saved} sequences but this run "
                                 f"has {self.batches.batch_size} x {self.batches.world_size} ranks = {gmb}; resume "
                                 "with micro_batch_size x world size unchanged")
            state["batch_size"], state["world_size"] = self.batches.batch_size, self.batches.world_size
        self.batches.load_state_dict(state)


# ---- trainer -------------------------------------------------------------------------------------------------------

class DistributedTrainer(Trainer):
    """`Trainer` for one rank of an FSDP2 run; every rank builds it with the same model, config and data.

    Pass the UNSHARDED model: it is LoRA-injected (seeded with cfg.seed, as `Trainer`) unless it has LoRA layers, then
    sharded with `shard_model` (when a process group exists). `cfg.batch_size` is the GLOBAL batch; `cfg.micro_batch_size` is per rank; batch_size must be a multiple of
    micro_batch_size * world_size. With W ranks and micro-batch m the run equals a single process with micro-batch
    m * W (same global batches, same token-normalized loss) except that a final training batch of fewer sequences
    than ranks is dropped, and LoRA dropout masks differ. Validation covers every held-out example (ranks without a
    sequence in the last batch run a masked dummy forward so the FSDP collectives line up).
    Only rank 0 writes files (metrics, plots, checkpoints, adapters).
    """

    optimizer_cls = ShardedOptimizer

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_data: Any, val_data: Any = None, *,
                 lora_config: LoRAConfig | None = None, **kw: Any):
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule) and not hasattr(model, "_qlora70_base_checksum"):
            raise ValueError("DistributedTrainer: the model was sharded without qlora70.distributed.shard_model (after "
                             "LoRA injection); pass the unsharded model or use build_sharded / shard_model")
        info = dist_info()
        self.rank, self.world_size = info.rank, info.world_size
        if cfg.batch_size % (cfg.micro_batch_size * self.world_size):
            raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} (global) must be a multiple of "
                             f"micro_batch_size={cfg.micro_batch_size} x world_size={self.world_size}")
        self._gathered: dict | None = None
        if self.rank != 0 and cfg.progress:
            cfg = dataclasses.replace(cfg, progress=False)  # one progress bar (rank 0)
        super().__init__(model, cfg, train_data, val_data, lora_config=lora_config, **kw)

    # ---- Trainer hooks: set-up -------------------------------------------------------------------------------------
    def _prepare_model(self, model: nn.Module) -> None:
        """Shard the LoRA-injected model (when a process group exists; a plain process trains unsharded, exactly as
        Trainer). `shard_model` records the unsharded base checksum, so checkpoints resume across world sizes."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule) and dist.is_available() and dist.is_initialized():
            shard_model(model)

    def _accum_steps(self) -> int:
        return self.cfg.batch_size // (self.cfg.micro_batch_size * self.world_size)

    # ---- data: deal global batches to ranks --------------------------------------------------------------------
    def _build_loaders(self, train_data: Any, val_data: Any):
        cfg = self.cfg
        if not isinstance(train_data, TokenizedData):
            raise TypeError("DistributedTrainer: train_data must be a TokenizedData (its global batches are dealt "
                            "to ranks by qlora70.data.Batches)")
        if (cfg.val_fraction or cfg.val_size) and val_data is not None:
            raise ValueError("DistributedTrainer: val_data was given and the config also asks for a validation split")
        if cfg.val_fraction or cfg.val_size:
            train_data, val_data = train_data.split(cfg.val_size or float(cfg.val_fraction), seed=cfg.seed)
        if val_data is not None and not isinstance(val_data, TokenizedData):
            raise TypeError("DistributedTrainer: val_data must be a TokenizedData")

        def batches(data: TokenizedData, shuffle: bool, rank: int, world: int, size: int) -> Batches:
            return Batches(data, size, pad_id=self.pad_id, seed=cfg.seed, shuffle=shuffle,
                           group_by_length=cfg.group_by_length and shuffle, packing=cfg.packing,
                           seq_len=cfg.seq_len if cfg.packing else None, rank=rank, world_size=world)

        train_loader = _GlobalPositionLoader(batches(train_data, True, self.rank, self.world_size,
                                                     cfg.micro_batch_size))
        if len(train_loader) == 0:
            raise ValueError("DistributedTrainer: the training data yields no batches")
        # validation: the single-process plan of global micro-batches, dealt in `evaluate` (nothing dropped)
        val_loader = None if val_data is None else batches(val_data, False, 0, 1, cfg.micro_batch_size * self.world_size)
        if cfg.early_stopping_patience is not None and val_loader is None:
            raise ValueError("DistributedTrainer: early_stopping_patience needs validation data")
        return train_loader, val_loader

    # ---- Trainer hooks: global sums and the global gradient norm ---------------------------------------------------
    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            if dist.get_backend() == "nccl":
                t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    @torch.no_grad()
    def _clip_gradients(self) -> float:
        """Global L2 norm of the sharded gradients: one `torch._foreach_norm` over this rank's local shards, one
        all-reduce of the sum of squares; clipped as `torch.nn.utils.clip_grad_norm_` does (coef max/(norm+1e-6))."""
        grads = [_local(p.grad) for _, p in self.params if p.grad is not None]
        sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum() if grads else torch.zeros((), dtype=torch.float64)
        grad_norm = math.sqrt(self._all_sum([float(sq)])[0])
        if self.cfg.max_grad_norm and math.isfinite(grad_norm):
            coef = min(1.0, self.cfg.max_grad_norm / (grad_norm + 1e-6))
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        return grad_norm

    def _val_batches(self):
        """This rank's share of each global validation batch (a dummy, uncounted forward where it has none, so every
        rank runs the same collectives)."""
        plan = self.val_loader
        for gb in plan.plan(0):
            units = gb[self.rank::self.world_size]
            batch = plan.collate(units or gb[:1])
            if not units:
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            yield batch

    # ---- Trainer hooks: files (rank 0 writes, everyone waits) -------------------------------------------------------
    def _log(self, rec: dict) -> None:
        if self.is_main:
            super()._log(rec)
        else:
            self.history.append(rec)

    def _plot(self) -> None:
        if self.is_main:
            super()._plot()

    def _truncate_metrics(self, step: int) -> None:
        if self.is_main:
            super()._truncate_metrics(step)
        barrier()
        if not self.is_main:
            self.history = self.run_dir.read_metrics(step)

    def _save_adapter(self, out_dir: str) -> None:
        """Inside save_checkpoint / _save_best (rank 0 only) the adapter was gathered beforehand; elsewhere (the final
        adapter) this is collective: every rank gathers, rank 0 writes."""
        if self._gathered is not None:
            write_adapter(self._gathered, self.lora_config, out_dir, self.base_model_name_or_path)
        else:
            save_adapter_sharded(self.model, out_dir, self.base_model_name_or_path)

    def _load_adapter(self, adapter_dir: str) -> None:
        """Every rank reads the full adapter and keeps its shards."""
        load_adapter_sharded(self.model, adapter_dir)

    def _run_on_main(self, fn, *args):
        """Gather adapter and optimizer states (collective), run `fn` on rank 0 only, then barrier."""
        self._gathered = gather_lora_state_dict(self.model)
        self.optimizer.gathered = self.optimizer.state_dict()
        out = None
        try:
            if self.is_main:
                out = fn(*args)
        finally:
            self._gathered = None
            self.optimizer.gathered = None
        barrier()
        return out

    def save_checkpoint(self, boundary: dict | None = None) -> str:
        """The single-process checkpoint layout (full adapter and optimizer states), written by rank 0."""
        path = self._run_on_main(super().save_checkpoint, boundary)
        return path or os.path.join(self.ckpt_root, f"step-{self.step:06d}")

    def _save_best(self) -> None:
        self._run_on_main(super()._save_best)

    def load_checkpoint(self, path: str) -> None:
        """Every rank reads the (full) checkpoint and keeps its shards."""
        super().load_checkpoint(path)
        barrier()
