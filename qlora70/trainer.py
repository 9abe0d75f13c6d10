"""The plain QLoRA training loop: accumulation, schedule, clipping, validation, checkpoints and exact resume.

One optimizer step = one window of `grad_accum_steps` micro-batches. The window's loss is the sum of token
cross-entropies divided by the number of trained tokens (labels != -100) in the WHOLE window, so every trained token
weighs the same whatever micro-batch it landed in (not a mean of per-micro-batch means).

Data: `train_data` is a `qlora70.data.TokenizedData` (the trainer holds out the validation split and builds
`qlora70.data.Batches` of `micro_batch_size`, length-grouped) or any loader with the same protocol: iterating yields
micro-batch dicts (`input_ids`, `labels` (B, T) long, optional `attention_mask`, `position_ids`, `document_ids`) from
the current position to the end of the epoch and then moves to the next epoch; `len()` is micro-batches per epoch;
`state_dict()` / `load_state_dict()` save and restore the position (JSON-serializable).

The run directory (metrics, loss curve, checkpoints, best and final adapter) is `qlora70.train_state.RunDir`. The
loop calls small hooks that `qlora70.distributed.DistributedTrainer` overrides, and nothing else: `_prepare_model`
(sharding), `_make_optimizer`, `_accum_steps`, `_build_loaders`, `_all_sum` (global sums), `_clip_gradients`,
`_val_batches`, and the file hooks (`_log`, `_plot`, `_truncate_metrics`, `save_checkpoint`, `_save_best`,
`load_checkpoint`, `_save_adapter`, `_load_adapter`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from itertools import islice
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import native
from .config import IGNORE_INDEX, LoRAConfig, TrainConfig, pad_or_eos
from .data import Batches, TokenizedData
from .losses import chunked_cross_entropy
from .lora import get_lora_config, inject_lora, load_adapter, lora_modules, save_adapter
from .model import set_gradient_checkpointing
from .ops import resolve_compute_dtype
from .optim import PagedAdamW
from .recompute import resolve_policy
from .train_state import (RESUME_FIXED, RunDir, base_checksum, fingerprint,  # noqa: F401 (RESUME_FIXED: public)
                          fingerprint_diffs, latest_checkpoint, rng_state, seed_everything, set_rng_state)

log = logging.getLogger("qlora70.trainer")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup (step+1)/warmup, then constant or cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def apply_gradient_checkpointing(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """`qlora70.model.set_gradient_checkpointing` with the config's offload and recompute policy
    (`qlora70.recompute.resolve_policy`: "auto" is keep_base_outputs on CPU, full on CUDA)."""
    policy = resolve_policy(cfg.checkpoint_policy, device.type)
    try:
        set_gradient_checkpointing(model, enabled=cfg.gradient_checkpointing, offload=cfg.offload, policy=policy)
    except TypeError as e:  # not a qlora70 Llama (e.g. a test stub): train without checkpointing
        log.warning("gradient checkpointing not enabled: %s", e)


def default_pad_id(model: nn.Module) -> int:
    """The pad id when none is given: the model config's pad_token_id, else its eos_token_id, else 0 (padded labels
    are masked, so any id works; the tokenizer's own `pad_id` is preferred by `qlora70.run`)."""
    c = getattr(model, "config", None)
    return pad_or_eos(getattr(c, "pad_token_id", None), getattr(c, "eos_token_id", None))


class _ListLoader:
    """A fixed list of batch dicts (validation data given as a list)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Trainer:
    """Train the LoRA parameters of `model` (a `qlora70.model.Llama`, 4-bit or not) on answer-only labelled data.

    model: with LoRA already injected, or without (then `lora_config` is injected, seeded with `cfg.seed`).
    train_data / val_data: see the module docstring. `callbacks`: functions f(trainer, record) called after every
    optimizer step with that step's metrics record. `pad_id` pads micro-batches built from TokenizedData.
    """

    rank, world_size = 0, 1  # one process (the distributed trainer sets its own)

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_data: Any, val_data: Any = None, *,
                 lora_config: LoRAConfig | None = None, pad_id: int | None = None,
                 callbacks: Iterable[Callable[["Trainer", dict], None]] = (),
                 base_model_name_or_path: str | None = None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"{type(self).__name__} expects a TrainConfig, got {type(cfg).__name__}")
        self.cfg, self.model = cfg, model
        self.callbacks = list(callbacks)
        self.base_model_name_or_path = base_model_name_or_path
        self._ensure_lora(model, lora_config)
        self._prepare_model(model)
        # the unsharded base's checksum (recorded by shard_model on a sharded model): resumes across world sizes
        self._checksum = getattr(model, "_qlora70_base_checksum", None) or base_checksum(model)
        self.lora_config = get_lora_config(model)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters")
        self.device = next(p for _, p in self.params).device
        # bf16 autocast over fp32 masters, or None (fp32); the reason goes into the run report
        self.autocast_dtype, self.compute_dtype_reason = self._select_autocast_dtype()
        if self.device.type == "cpu":
            native.keep_freed_memory()  # no page faults on the buffers every step reallocates
        self.pad_id = int(pad_id if pad_id is not None else default_pad_id(model))
        self.train_loader, self.val_loader = self._build_loaders(train_data, val_data)
        self.accum = self._accum_steps()
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / self.accum))
        self.total_steps = cfg.max_steps if cfg.max_steps else cfg.epochs * self.steps_per_epoch
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.optimizer = self._make_optimizer([p for _, p in self.params])
        if cfg.gradient_checkpointing or cfg.offload:
            apply_gradient_checkpointing(model, cfg, self.device)
        # loop state (all of it goes into checkpoints)
        self.step = 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self.tokens_seen = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.history: list[dict] = []
        self._boundary: dict | None = None
        self._in_update = False
        self._pending_interrupt = False
        self.out_dir = cfg.out_dir
        self.run_dir = RunDir(self.out_dir)
        self.ckpt_root = self.run_dir.ckpt_root

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (the only one here)."""
        return self.rank == 0

    # ---- set-up hooks ----------------------------------------------------------------------------------------------
    def _ensure_lora(self, model: nn.Module, lora_config: LoRAConfig | None) -> None:
        """Inject `lora_config` (seeded with cfg.seed, the global RNG left as it was) unless the model has LoRA."""
        name = type(self).__name__
        if not any(True for _ in lora_modules(model)):
            if lora_config is None:
                raise ValueError(f"{name}: the model has no LoRA layers; pass lora_config=LoRAConfig(...) or call "
                                 "inject_lora first")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                inject_lora(model, lora_config)
        elif lora_config is not None and lora_config != get_lora_config(model):
            raise ValueError(f"{name}: lora_config {lora_config} differs from the model's LoRA layers "
                             f"{get_lora_config(model)}")
        if get_lora_config(model).init_lora_weights == "loftq" and not getattr(model, "loftq_applied", False):
            raise ValueError(f"{name}: the LoRA config asks for a LoftQ start (init_lora_weights='loftq') but "
                             "apply_loftq was never run on this model, so training would silently start from the "
                             "default init; call qlora70.loftq.apply_loftq(model, qlora70.checkpoint.weight_reader("
                             "PATH)) after inject_lora (`qlora70 train --lora-init loftq` does)")

    def _prepare_model(self, model: nn.Module) -> None:
        """After LoRA injection, before the trainable parameters are collected (the distributed trainer shards)."""

    def _select_autocast_dtype(self) -> tuple[torch.dtype | None, str]:
        """The compute dtype (autocast) of the loop and why: bf16 when asked, "auto" on CUDA, "auto" on a CPU whose
        bf16 matmuls measure faster (`ops.resolve_compute_dtype`); None = the weights' dtype (fp32)."""
        compute, reason = resolve_compute_dtype(self.device, self.cfg.compute_dtype)
        return (None if compute == torch.float32 else compute), reason

    def _accum_steps(self) -> int:
        """Micro-batches per optimizer step (per process)."""
        return self.cfg.grad_accum_steps

    optimizer_cls: type = PagedAdamW  # DistributedTrainer: ShardedOptimizer (same arguments)

    def _make_optimizer(self, params: list[torch.Tensor]) -> Any:
        cfg = self.cfg
        return self.optimizer_cls(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, optim_bits=cfg.optim_bits, paged=cfg.paged,
                                  offload=cfg.optim_offload and self.device.type == "cuda")  # on a CPU: no-op

    # ---- data -----------------------------------------------------------------------------------------------------
    def _build_loaders(self, train_data: Any, val_data: Any):
        cfg = self.cfg

        def batches(data: TokenizedData, shuffle: bool) -> Batches:
            return Batches(data, cfg.micro_batch_size, pad_id=self.pad_id, seed=cfg.seed, shuffle=shuffle,
                           group_by_length=cfg.group_by_length and shuffle, packing=cfg.packing,
                           seq_len=cfg.seq_len if cfg.packing else None)

        if isinstance(train_data, TokenizedData):
            if (cfg.val_fraction or cfg.val_size) and val_data is None:
                train_data, val_data = train_data.split(cfg.val_size or float(cfg.val_fraction), seed=cfg.seed)
            elif (cfg.val_fraction or cfg.val_size) and val_data is not None:
                raise ValueError("Trainer: val_data was given and the config also asks for a validation split "
                                 "(val_fraction/val_size); use one of them")
            train_loader = batches(train_data, shuffle=True)
        else:
            if cfg.val_fraction or cfg.val_size:
                raise ValueError("Trainer: val_fraction/val_size split a TokenizedData; with a ready loader pass "
                                 "val_data instead")
            for need in ("__iter__", "__len__", "state_dict", "load_state_dict"):
                if not hasattr(train_data, need):
                    raise TypeError(f"Trainer: train_data must be a TokenizedData or a loader with __iter__, __len__, "
                                    f"state_dict and load_state_dict; {type(train_data).__name__} lacks {need}")
            train_loader = train_data
        if len(train_loader) == 0:
            raise ValueError("Trainer: the training data yields no batches")
        if val_data is None:
            val_loader = None
        elif isinstance(val_data, TokenizedData):
            val_loader = batches(val_data, shuffle=False)
        elif isinstance(val_data, (list, tuple)):
            val_loader = _ListLoader(list(val_data))
        else:
            val_loader = val_data
        if cfg.early_stopping_patience is not None and val_loader is None:
            raise ValueError("Trainer: early_stopping_patience needs validation data")
        return train_loader, val_loader

    # ---- one micro-batch ----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token CE, number of labelled tokens) of one micro-batch (HF label convention, shift inside)."""
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        kw = {}
        if "document_ids" in batch:  # packed rows: attend within each example only
            kw["attention_mask"] = (batch["document_ids"] + 1).to(self.device)
            if "position_ids" in batch:
                kw["position_ids"] = batch["position_ids"].to(self.device)
        with self._autocast():
            hidden = self.model(ids, return_hidden=True, **kw)  # (B, T, D); right padding is causal-safe
            return chunked_cross_entropy(hidden, self.model.lm_head.weight, labels, chunk_size=self.cfg.chunk_size)

    @staticmethod
    def _n_labelled(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def _n_tokens(batch: dict[str, torch.Tensor]) -> int:
        m = batch.get("attention_mask")
        return int(m.sum()) if m is not None else batch["input_ids"].numel()

    # ---- validation --------------------------------------------------------------------------------------------
    def _val_batches(self):
        """This process's validation batches, from the start (the distributed trainer yields its rank's share)."""
        if hasattr(self.val_loader, "load_state_dict"):
            self.val_loader.load_state_dict({"epoch": 0, "index": 0})
        yield from self.val_loader

    def _all_sum(self, values: list[float]) -> list[float]:
        """Sum over processes: one process here (the distributed trainer all-reduces)."""
        return values

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean validation cross-entropy (dropout off, no RNG consumed), over all processes."""
        name = type(self).__name__
        if self.val_loader is None:
            raise ValueError(f"{name}.evaluate: no validation data")
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in self._val_batches():
                s, n = self._forward_loss(batch)
                total += float(s.double())
                count += int(n)
        finally:
            self.model.train(was_training)
        total, count = self._all_sum([total, count])
        if count == 0:
            raise ValueError(f"{name}.evaluate: the validation data has no labelled tokens")
        return total / count

    # ---- the loop --------------------------------------------------------------------------------------------------
    def train(self, resume: bool | str = "auto") -> dict:
        """Run to `total_steps` (or early stop). resume: "auto" (continue from out_dir's latest checkpoint if any),
        True (require one), False (start fresh; refuses a non-empty checkpoint dir), or a checkpoint path.
        Returns a summary dict. Raises FloatingPointError on a NaN/inf loss (the last good checkpoint is kept) and
        re-raises KeyboardInterrupt after saving a resumable checkpoint."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        os.makedirs(self.ckpt_root, exist_ok=True)
        ckpt = self._find_checkpoint(resume)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            log.info("resumed from %s (step %d)", ckpt, self.step)
        else:
            seed_everything(cfg.seed)
            self._truncate_metrics(0)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not cfg.progress,
                   dynamic_ncols=True)
        old_handler = self._install_sigint()
        t_start, tokens_at_start = time.perf_counter(), self.tokens_seen
        try:
            while self.step < self.total_steps and not self.stopped_early:
                if cfg.max_steps is None and self.epoch >= cfg.epochs:
                    break
                n_micro = len(self.train_loader)
                it = iter(self.train_loader)
                while self.step < self.total_steps and self.micro_in_epoch < n_micro:
                    self._boundary = self._snapshot()
                    window = list(islice(it, min(self.accum, n_micro - self.micro_in_epoch)))
                    if not window:
                        break
                    rec = self._train_step(window)  # sets _in_update before the optimizer step: Ctrl-C waits
                    self.step += 1
                    self.tokens_seen += rec["tokens"]
                    self.micro_in_epoch += len(window)
                    end_of_epoch = self.micro_in_epoch >= n_micro
                    if end_of_epoch:
                        next(it, None)  # let the loader roll over to the next epoch
                        self.epoch += 1
                        self.micro_in_epoch = 0
                    self._in_update = False
                    elapsed = time.perf_counter() - t_start
                    rec["tokens_per_s"] = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                    if self.step % max(cfg.log_every, 1) == 0 or self.step == self.total_steps:
                        self._log(rec)
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
                    if self.val_loader is not None and (end_of_epoch or (cfg.eval_every and
                                                                         self.step % cfg.eval_every == 0)):
                        self._validate(epoch_end=end_of_epoch)
                    for cb in self.callbacks:
                        cb(self, rec)
                    last = self.step >= self.total_steps or self.stopped_early or (
                        cfg.max_steps is None and self.epoch >= cfg.epochs)
                    if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                        self.save_checkpoint()
                    if self._pending_interrupt:
                        raise KeyboardInterrupt
                    if end_of_epoch or self.stopped_early:
                        break
        except KeyboardInterrupt:
            path = self._save_interrupted()
            bar.close()
            log.warning("interrupted: saved a resumable checkpoint at step %d in %s", self.step, path)
            raise
        finally:
            self._restore_sigint(old_handler)
        bar.close()
        if self.stopped_early and self.best_step is not None:
            self._load_adapter(os.path.join(self.out_dir, "best_adapter"))
        self._save_adapter(self.out_dir)
        self._plot()
        return {"step": self.step, "epoch": self.epoch, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "best_step": self.best_step, "stopped_early": self.stopped_early,
                "final_loss": next((r["loss"] for r in reversed(self.history) if "loss" in r), None)}

    def _train_step(self, window: list[dict[str, torch.Tensor]]) -> dict:
        """One optimizer step over `window`; every process runs the same number of micro-batches (collectives line
        up). Token counts and the loss are global sums (`_all_sum`); the gradient norm is global (`_clip_gradients`)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        n_lab, n_tok = (int(v) for v in self._all_sum([sum(self._n_labelled(b) for b in window),
                                                       sum(self._n_tokens(b) for b in window)]))
        lr = cfg.lr * lr_factor(self.step, self.total_steps, self.warmup_steps, cfg.lr_schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i, b in enumerate(window):
            s, _ = self._forward_loss(b)
            if self.world_size == 1 and not torch.isfinite(s):  # one process: name the micro-batch, stop at once
                self._fail(f"loss is {float(s.detach())} in micro-batch {i + 1}/{len(window)} of step {self.step + 1}")
            if n_lab:
                (s / n_lab).backward()
            loss_sum += float(s.detach())
        loss_sum = self._all_sum([loss_sum])[0]
        if not math.isfinite(loss_sum):
            self._fail(f"loss is {loss_sum} in step {self.step + 1}")
        grad_norm = None
        if n_lab:
            grad_norm = self._clip_gradients()
            if not math.isfinite(grad_norm):
                self._fail(f"gradient norm is {grad_norm} at step {self.step + 1}")
            self._in_update = True  # cleared by the loop once the step counters are updated
            self.optimizer.step()
        else:
            log.warning("step %d: no labelled tokens in the window; optimizer step skipped", self.step + 1)
        return self._close_step(window, t0, lr, loss_sum, n_lab, n_tok, grad_norm)

    def _clip_gradients(self) -> float:
        """The gradient norm over all trainable parameters, clipped to cfg.max_grad_norm when set."""
        params = [p for _, p in self.params]
        if self.cfg.max_grad_norm:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        return float(torch.linalg.vector_norm(
            torch.stack([p.grad.float().norm() for p in params if p.grad is not None])))

    def _close_step(self, window: list, t0: float, lr: float, loss_sum: float, n_lab: int, n_tok: int,
                    grad_norm: float | None) -> dict:
        """Release the gradients and build the step's metrics record (shared with DistributedTrainer)."""
        self._in_update = True
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_sum / n_lab if n_lab else float("nan")
        epoch = self.epoch + (self.micro_in_epoch + len(window)) / len(self.train_loader)
        return {"step": self.step + 1, "epoch": epoch,
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": n_lab, "tokens": n_tok,
                "step_time_s": time.perf_counter() - t0}

    def _fail(self, what: str) -> None:
        latest = self._latest_path()
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        raise FloatingPointError(f"training stopped: {what}; nothing was saved for this step and {where}. Lower the "
                                 "learning rate or check the data, then resume from that checkpoint")

    def _validate(self, epoch_end: bool) -> None:
        val = self.evaluate()
        rec = {"step": self.step, "epoch": self.epoch, "val_loss": val, "epoch_end": epoch_end}
        improved = self.best_val is None or val < self.best_val
        if improved:
            self.best_val, self.best_step, self.bad_evals = val, self.step, 0
            self._save_best()
        else:
            self.bad_evals += 1
            if self.cfg.early_stopping_patience and self.bad_evals >= self.cfg.early_stopping_patience:
                self.stopped_early = True
                log.warning("early stopping at step %d: validation loss did not improve for %d evaluations "
                            "(best %.4f at step %d)", self.step, self.bad_evals, self.best_val, self.best_step)
        rec["best_val"] = self.best_val
        self._log(rec)
        self._plot()


    # ---- interrupt handling ------------------------------------------------------------------------------------
    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._in_update:  # never leave a half-applied optimizer step: stop right after it
                self._pending_interrupt = True
            else:
                raise KeyboardInterrupt

        self._pending_interrupt = False
        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint(old) -> None:
        if old is not None:
            signal.signal(signal.SIGINT, old)

    def _snapshot(self) -> dict:
        """Data position, loop counters and RNG at a step boundary (what a checkpoint of this step holds)."""
        return {"step": self.step, "loader": self.train_loader.state_dict(), "rng": rng_state(),
                "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch}

    def _save_interrupted(self) -> str:
        """After Ctrl-C mid-window: the model and optimizer are still those of the last completed step, so save them
        with the data position and RNG captured at that step boundary."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._boundary is not None and self._boundary["step"] == self.step:
            return self.save_checkpoint(boundary=self._boundary)
        return self.save_checkpoint()

    # ---- adapter I/O (hooks: qlora70.distributed.DistributedTrainer gathers the shards to rank 0 here) -----------
    def _save_adapter(self, out_dir: str) -> None:
        save_adapter(self.model, out_dir, self.base_model_name_or_path)

    def _load_adapter(self, adapter_dir: str) -> None:
        load_adapter(self.model, adapter_dir)

    # ---- files (qlora70.train_state.RunDir; the distributed trainer writes on rank 0 only) ------------------------
    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        self.run_dir.append_metrics(rec)

    def _truncate_metrics(self, step: int) -> None:
        self.history = self.run_dir.truncate_metrics(step)

    def _plot(self) -> None:
        self.run_dir.plot(self.history)

    def _latest_path(self) -> str | None:
        return latest_checkpoint(self.out_dir)

    def _find_checkpoint(self, resume: bool | str) -> str | None:
        return self.run_dir.find_checkpoint(resume)

    def fingerprint(self) -> dict:
        """What a checkpoint must agree with to be resumed (`qlora70.train_state.fingerprint`), with the GLOBAL
        micro-batch (micro_batch_size x world size): the data plan depends on that product only, so a checkpoint
        resumes under any world size with the same product."""
        return fingerprint(self.model, self.lora_config, self.params, self.cfg, self._checksum,
                           micro_batch_size=self.cfg.micro_batch_size * self.world_size)

    def save_checkpoint(self, boundary: dict | None = None) -> str:
        """Write checkpoints/step-NNNNNN atomically and point latest.json at it; older step dirs are removed."""
        b = boundary or self._snapshot()
        state = {"step": self.step, "epoch": b["epoch"], "micro_in_epoch": b["micro_in_epoch"],
                 "tokens_seen": self.tokens_seen, "best_val": self.best_val, "best_step": self.best_step,
                 "bad_evals": self.bad_evals, "stopped_early": self.stopped_early, "total_steps": self.total_steps,
                 "warmup_steps": self.warmup_steps, "loader": b["loader"], "fingerprint": self.fingerprint(),
                 "train_config": self.cfg.to_dict()}
        return self.run_dir.write_checkpoint(self.step, self._save_adapter, self.optimizer.state_dict(), b["rng"],
                                             state)

    def _save_best(self) -> None:
        self.run_dir.save_best(self._save_adapter, self.step, self.best_val)

    def load_checkpoint(self, path: str) -> None:
        """Restore adapter, optimizer, schedule position, data position and RNG from a checkpoint directory; raises
        ValueError when it belongs to another model, LoRA config or data-order setting."""
        state = self.run_dir.read_state(path)
        diffs = fingerprint_diffs(state["fingerprint"], self.fingerprint())
        if diffs:
            raise ValueError(f"cannot resume from {path}: it was written for another model / LoRA config / data "
                             f"setting ({'; '.join(diffs[:6])}). Use a fresh out_dir or the original settings")
        self._load_adapter(path)
        osd, rng = self.run_dir.read_optimizer_and_rng(path, state)
        self.optimizer.load_state_dict(osd)
        self.step, self.epoch, self.micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        self.tokens_seen, self.best_val, self.best_step = state["tokens_seen"], state["best_val"], state["best_step"]
        self.bad_evals, self.stopped_early = state["bad_evals"], state["stopped_early"]
        if state["total_steps"] != self.total_steps:
            log.warning("resume: total steps changed from %d to %d (schedule follows the new total)",
                        state["total_steps"], self.total_steps)
        self.train_loader.load_state_dict(state["loader"])
        set_rng_state(rng)
        self._truncate_metrics(self.step)
