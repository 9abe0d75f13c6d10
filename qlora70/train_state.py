"""A training run's directory and state, apart from the loop: checkpoints, fingerprint, RNG state, metrics, plot.

Layout of `out_dir` (`RunDir`):
    metrics.jsonl            one JSON object per logged step / validation
    loss_curve.png           training and validation loss
    checkpoints/latest.json  -> the newest complete checkpoint directory
    checkpoints/step-NNNNNN/ adapter (PEFT format), optimizer.safetensors, rng.safetensors, trainer_state.json
    best_adapter/            the adapter with the lowest validation loss (PEFT format) + best.json
    adapter_model.safetensors + adapter_config.json: the final adapter (PEFT format; `out_dir` loads as an adapter)
Every file is written to a temporary name and renamed; a checkpoint directory is renamed into place only when
complete and `latest.json` is switched after it, so a kill -9 at any moment leaves the previous checkpoint usable.
`qlora70.trainer.Trainer` owns one `RunDir`; the multi-process trainer calls it on rank 0 only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .config import LoRAConfig, TrainConfig
from .io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from .safetensors_io import atomic_save_safetensors

# TrainConfig fields that change the data order or the meaning of a step: a resume must keep them
RESUME_FIXED = ("seed", "batch_size", "micro_batch_size", "seq_len", "val_fraction", "val_size", "group_by_length",
                "packing", "optim_bits")


# ---- RNG state ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (+ every CUDA device), Python and NumPy global generator states."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    """The fresh-run seeding of torch, Python and NumPy (in that order)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_to_files(st: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states as (tensors for safetensors, JSON-able dict)."""
    tensors = {"torch": st["torch"].clone()}
    for i, s in enumerate(st.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.clone()
    py = st["python"]
    npst = st["numpy"]
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, js


def rng_from_files(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> dict[str, Any]:
    py = js["python"]
    npj = js["numpy"]
    st = {"torch": tensors["torch"], "python": (py[0], tuple(py[1]), py[2]),
          "numpy": (npj[0], np.asarray(npj[1], dtype=np.uint32), npj[2], npj[3], npj[4])}
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda:
        st["cuda"] = cuda
    return st


# ---- fingerprint -------------------------------------------------------------------------------------------------
def base_checksum(model: nn.Module, n_tensors: int = 4, n_samples: int = 4096) -> str:
    """A cheap hash of the frozen base weights: evenly spaced samples of the first and last few tensors (catches
    resuming onto another checkpoint of the same shape, e.g. base vs. chat weights)."""
    frozen = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if not t.requires_grad and ".lora_" not in n and t.numel() > 0]
    h = hashlib.sha256()
    for name, t in frozen[:n_tensors] + frozen[-n_tensors:]:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // n_samples)][:n_samples]
        h.update(name.encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module, lora_config: LoRAConfig, params: list[tuple[str, torch.Tensor]],
                cfg: TrainConfig, checksum: str, micro_batch_size: int | None = None) -> dict:
    """What a checkpoint must agree with to be resumed: model shape, base checksum, LoRA config, trainable tensors,
    data order. `micro_batch_size` overrides the config's (the multi-process trainer records the global one)."""
    c = getattr(model, "config", None)
    model_cfg = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("name", "torch_dtype")} \
        if dataclasses.is_dataclass(c) else None
    lc = lora_config
    train = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items() if k in RESUME_FIXED}
    if micro_batch_size is not None:
        train["micro_batch_size"] = micro_batch_size
    return {"model_config": model_cfg, "base": {"checksum": checksum},
            "lora": {"r": lc.r, "alpha": float(lc.alpha), "dropout": float(lc.dropout),
                     "targets": sorted(lc.targets), "use_rslora": lc.use_rslora,
                     **({"use_dora": True} if lc.use_dora else {})},  # absent for plain LoRA: older runs resume
            "trainable": [[n, list(p.shape)] for n, p in params], "train": train}


def fingerprint_diffs(saved: dict, mine: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when a resume is allowed)."""
    diffs = []
    for section in ("model_config", "base", "lora", "train"):
        a, b = saved.get(section) or {}, mine.get(section) or {}
        diffs += [f"{section}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k)]
    if not diffs and saved["trainable"] != mine["trainable"]:
        diffs.append("the trainable LoRA tensors (names/shapes) differ")
    return diffs


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint directory of the run in `out_dir` (named by checkpoints/latest.json), or None."""
    root = os.path.join(os.fspath(out_dir), "checkpoints")
    p = os.path.join(root, "latest.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as fh:
            name = json.load(fh)["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{p} is not a checkpoint pointer ({type(e).__name__}: {e}); restore it or remove the "
                         "run directory") from None
    path = os.path.join(root, name)
    return path if os.path.isdir(path) else None


# ---- the run directory -------------------------------------------------------------------------------------------
class RunDir:
    """The files of one training run in `out_dir` (see the module docstring)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.ckpt_root = os.path.join(out_dir, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out_dir, "metrics.jsonl")

    def find_checkpoint(self, resume: bool | str) -> str | None:
        """The checkpoint to resume from: resume "auto" (latest or None), True (latest, required), False (None;
        refuses a directory that holds a checkpoint), or a checkpoint directory path."""
        if isinstance(resume, str) and resume != "auto":
            if not os.path.isdir(resume):
                raise FileNotFoundError(f"resume: checkpoint directory {resume} does not exist")
            return resume
        latest = latest_checkpoint(self.out_dir)
        if resume is True and latest is None:
            raise FileNotFoundError(f"resume=True but {self.ckpt_root} holds no checkpoint (latest.json)")
        if resume is False:
            if latest is not None:
                raise ValueError(f"{self.out_dir} already holds a checkpoint ({latest}); resume from it "
                                 "(resume='auto') or choose another out_dir")
            return None
        return latest

    # metrics.jsonl and the loss curve
    def append_metrics(self, rec: dict) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def read_metrics(self, up_to_step: int) -> list[dict]:
        """The records up to `up_to_step` (a torn last line after kill -9 is skipped); [] for step 0."""
        out: list[dict] = []
        if up_to_step and os.path.isfile(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("step", 0) <= up_to_step:
                        out.append(rec)
        return out

    def truncate_metrics(self, step: int) -> list[dict]:
        """Keep only the records up to `step` (a resume drops what the interrupted run logged after it)."""
        history = self.read_metrics(step)
        if os.path.isfile(self.metrics_path):
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        return history

    def plot(self, history: list[dict]) -> None:
        """loss_curve.png: training loss per step and validation loss, one plot."""
        train = [(r["step"], r["loss"]) for r in history if "loss" in r and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
        if not train and not val:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(os.path.join(self.out_dir, "loss_curve.png")) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)

    # checkpoints
    def write_checkpoint(self, step: int, save_adapter: Callable[[str], None], optimizer_state: dict,
                         rng: dict[str, Any], state: dict) -> str:
        """Write checkpoints/step-NNNNNN atomically (adapter via `save_adapter(dir)`, optimizer tensors, RNG, the
        JSON `state`), point latest.json at it and remove older step dirs. Returns its path."""
        name = f"step-{step:06d}"
        with atomic_dir(os.path.join(self.ckpt_root, name)) as tmp:
            save_adapter(tmp)
            tensors, meta = {}, {}
            for i, st in optimizer_state["state"].items():
                meta[str(i)] = {"step": st["step"]}
                for k, v in st.items():
                    if torch.is_tensor(v):
                        tensors[f"state.{i}.{k}"] = v
            atomic_save_safetensors(tensors, os.path.join(tmp, "optimizer.safetensors"))
            rng_t, rng_j = rng_to_files(rng)
            atomic_save_safetensors(rng_t, os.path.join(tmp, "rng.safetensors"))
            state = dict(state, rng=rng_j, optimizer={"param_groups": optimizer_state["param_groups"], "state": meta,
                                                      "optim_bits": optimizer_state["optim_bits"]})
            atomic_write_json(os.path.join(tmp, "trainer_state.json"), state, sort_keys=True)
        atomic_write_json(os.path.join(self.ckpt_root, "latest.json"), {"dir": name, "step": step}, sort_keys=True)
        for d in os.listdir(self.ckpt_root):
            if d != name and (d.startswith("step-") or d.startswith(".tmp-")):
                shutil.rmtree(os.path.join(self.ckpt_root, d), ignore_errors=True)
        return os.path.join(self.ckpt_root, name)

    @staticmethod
    def read_state(path: str) -> dict:
        spath = os.path.join(path, "trainer_state.json")
        if not os.path.isfile(spath):
            raise FileNotFoundError(f"{spath} not found: {path} is not a complete trainer checkpoint")
        with open(spath, encoding="utf-8") as fh:
            return json.load(fh)

    @staticmethod
    def read_optimizer_and_rng(path: str, state: dict) -> tuple[dict, dict[str, Any]]:
        """(optimizer state dict in `PagedAdamW.state_dict()` layout, RNG state) of a checkpoint directory."""
        from safetensors.torch import load_file

        opt_t = load_file(os.path.join(path, "optimizer.safetensors"))
        o = state["optimizer"]
        osd = {"param_groups": o["param_groups"], "optim_bits": o["optim_bits"], "state": {}}
        for i, m in o["state"].items():
            osd["state"][int(i)] = {"step": m["step"], **{k[len(f"state.{i}."):]: v for k, v in opt_t.items()
                                                       if k.startswith(f"state.{i}.")}}
        return osd, rng_from_files(load_file(os.path.join(path, "rng.safetensors")), state["rng"])

    def save_best(self, save_adapter: Callable[[str], None], step: int, val_loss: float | None) -> None:
        with atomic_dir(os.path.join(self.out_dir, "best_adapter")) as tmp:
            save_adapter(tmp)
            atomic_write_json(os.path.join(tmp, "best.json"), {"step": step, "val_loss": val_loss}, sort_keys=True)
