"""One QLoRA experiment end to end: load -> quantize -> LoRA -> train -> evaluate (before/after) -> save -> report.

Used by `qlora70 train` and `examples/train_sm70.py`. The resolved configuration, the data accounting, the
contamination check and every evaluation go into `<out>/report.json` and `<out>/report.md`; the adapter is written in
PEFT format at `<out>/adapter_model.safetensors` + `<out>/adapter_config.json`.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_json, atomic_write_text
from .recipe import DATA_DIR, resolve_train_config


def say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 talks
        print(f"[qlora70] {msg}", flush=True)


@dataclass
class EvalSpec:
    """One evaluation: a task name, its native file, a seeded sample size and loader options."""

    name: str
    task: str
    data: str
    limit: int | None = None
    mode: str = "letter"
    kwargs: dict = field(default_factory=dict)


def default_eval_specs(limit: int | None) -> list[EvalSpec]:
    """Held-out evaluation sets shipped in `data/` (disjoint from the shipped training subsets; see data/README.md)."""
    specs = [EvalSpec("medqa", "medqa", str(DATA_DIR / "medqa" / "US_4options_test_200.jsonl"), limit),
             EvalSpec("pubmedqa", "pubmedqa", str(DATA_DIR / "pubmedqa"), limit),  # the 200 official-test items
             EvalSpec("usmle", "usmle", str(DATA_DIR / "usmle"), limit)]
    return [s for s in specs if os.path.exists(s.data)]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def evaluate_all(model, tok, specs: list[EvalSpec], seed: int, out_dir: Path | None, stem: str,
                 batch_size: int = 8, max_length: int = 1024) -> dict[str, Any]:
    from .evaluate import evaluate_task
    results = {}
    was_training = model.training
    model.eval()
    for s in specs:
        t0 = time.perf_counter()
        rep = evaluate_task(model, tok, s.task, s.data, mode=s.mode, limit=s.limit, seed=seed,
                            out_dir=None, batch_size=batch_size, max_length=max_length, name=f"{s.name}_{stem}",
                            **s.kwargs)
        if out_dir is not None:
            rep.save(out_dir / "eval", stem=f"{s.name}_{stem}")
        results[s.name] = rep
        lo, hi = rep.ci95
        say(f"{stem:6} {s.name:9} acc {rep.accuracy:.3f} [95% CI {lo:.3f}-{hi:.3f}] n={rep.n_scored}"
            + (f" macro-F1 {rep.macro_f1:.3f}" if rep.macro_f1 is not None else "")
            + f" ({time.perf_counter() - t0:.0f}s)")
    model.train(was_training)
    return results


def _ppl(loss: float | None) -> float | None:
    return None if loss is None or not math.isfinite(loss) else math.exp(loss)


def before_after_table(before: dict, after: dict, val_before: float | None, val_after: float | None) -> str:
    rows = ["| metric | before | after | change |", "|---|---|---|---|"]
    if val_before is not None and val_after is not None:
        rows.append(f"| held-out answer loss (own distribution) | {val_before:.3f} | {val_after:.3f} | "
                    f"{val_after - val_before:+.3f} |")
        rows.append(f"| held-out answer perplexity | {_ppl(val_before):.2f} | {_ppl(val_after):.2f} | "
                    f"{_ppl(val_after) / _ppl(val_before) - 1:+.1%} |")
    for name in before:
        b, a = before[name], after.get(name)
        if a is None:
            continue
        rows.append(f"| {name} accuracy (n={b.n_scored}) | {b.accuracy:.3f} [{b.ci95[0]:.3f}, {b.ci95[1]:.3f}] | "
                    f"{a.accuracy:.3f} [{a.ci95[0]:.3f}, {a.ci95[1]:.3f}] | {a.accuracy - b.accuracy:+.3f} |")
        if b.macro_f1 is not None:
            rows.append(f"| {name} macro-F1 | {b.macro_f1:.3f} | {a.macro_f1:.3f} | {a.macro_f1 - b.macro_f1:+.3f} |")
    return "\n".join(rows)


def honest_reading(before: dict, after: dict, chance: dict[str, float]) -> list[str]:
    """Plain-language notes: overlapping confidence intervals and near-chance accuracy are said out loud."""
    notes = []
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        overlap = not (a.ci95[0] > b.ci95[1] or b.ci95[0] > a.ci95[1])
        c = chance.get(name)
        msg = f"{name}: {b.accuracy:.1%} -> {a.accuracy:.1%} on {a.n_scored} items"
        if overlap:
            msg += "; the 95% intervals overlap, so this run shows no significant change"
        if c is not None and a.ci95[0] <= c <= a.ci95[1]:
            msg += f"; chance level ({c:.0%}) lies inside the interval: the model is not better than guessing"
        notes.append(msg + ".")
    return notes


def run_dir_in_use(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a training run's checkpoint, i.e. when the Trainer would refuse a fresh run there."""
    from .trainer import latest_checkpoint
    return latest_checkpoint(out_dir) is not None


def free_run_dir(base: str) -> str:
    """`base` if no run is in it, else the first of base-2, base-3, ... that is free (default out dirs only)."""
    if not run_dir_in_use(base):
        return base
    k = 2
    while run_dir_in_use(f"{base}-{k}"):
        k += 1
    return f"{base}-{k}"


def run_experiment(cfg: dict[str, Any], train_paths: list[str], out_dir: str, *, eval_specs: list[EvalSpec],
                   eval_before: bool = True, resume: bool = False, save_merged: bool = True,
                   device: str = "auto", tokenizer_path: str | None = None, progress: bool = True,
                   eval_each_epoch: bool = False, contamination: bool = True) -> dict[str, Any]:
    from .checkpoint import load_model
    from .distributed import DistributedTrainer, init_distributed
    from .config import LoRAConfig, TrainConfig
    from .data import build_dataset, contamination_check_paths
    from .lora import save_merged as _save_merged
    from .tokenizer import load_tokenizer
    from .trainer import Trainer

    t_start = time.perf_counter()
    out = Path(out_dir)
    if not resume and run_dir_in_use(out):  # fail in seconds, not after loading and the first evaluation
        raise ValueError(f"{out} already holds a training run ({out / 'checkpoints'}); continue it with --resume, "
                         f"or pass another --out (nothing there is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    info = init_distributed()  # rank 0 of 1 unless launched by torchrun / --nproc
    if info.world_size > 1:
        if eval_specs or eval_before or save_merged:
            raise ValueError("multi-process training (--nproc > 1) trains and saves the adapter; evaluate or merge it "
                             "afterwards in one process (qlora70 eval / qlora70 merge)")
        dev = str(info.device)  # cuda:LOCAL_RANK (NCCL) or cpu (gloo)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {dev!r} requested but no CUDA device is available")
    model_path = cfg["model"]
    if not model_path:
        raise ValueError("no model: pass --model PATH (an HF Llama directory, a bitsandbytes 4-bit directory or a "
                         ".gguf file)")
    compute = torch.float32 if dev == "cpu" else torch.bfloat16
    say(f"loading {model_path} -> NF4 + double quantization on {dev} (compute {str(compute).split('.')[-1]})")
    model = load_model(model_path, quantize="nf4", double_quant=True, dtype=compute, device=dev, progress=progress)
    tok_src = tokenizer_path or (model_path if model_path.endswith(".gguf") else model_path)
    tok = load_tokenizer(tok_src)
    say(f"model: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, vocab "
        f"{model.config.vocab_size}; tokenizer {tok.kind} ({tok.vocab_size} tokens)")

    say(f"data: {', '.join(train_paths)} (template {cfg['template']!r}, seq_len {cfg['seq_len']})")
    data = build_dataset(train_paths, tok, template=cfg["template"], seq_len=cfg["seq_len"], progress=progress)
    rep = data.report
    say(f"data: {len(data)} examples, {data.n_tokens} tokens ({data.n_answer_tokens} trained answer tokens); "
        f"dropped {rep.n_dropped} {rep.drop_counts()}; cache {'hit' if data.cache_hit else 'built'}")
    val_size = cfg.get("val_size") or 0
    train_data, val_data = data.split(int(val_size) if val_size >= 1 else float(val_size), seed=cfg["seed"]) \
        if val_size else (data, None)
    say(f"split: {len(train_data)} train / {0 if val_data is None else len(val_data)} held-out validation examples")

    contam = None
    if contamination and eval_specs:
        c = contamination_check_paths(train_paths, {s.name: (s.task, s.data) for s in eval_specs}, progress=False)
        contam = c.to_dict()
        contam["markdown"] = c.to_markdown()
        say("contamination: " + "; ".join(f"{k}: {v['n_contaminated']} of {v['n_items']} eval questions found in "
                                          f"training data" for k, v in c.per_task.items()))

    lora = LoRAConfig(r=int(cfg["lora_r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg["lora_dropout"]))
    epochs = cfg.get("epochs") or 1
    tc = TrainConfig(lr=float(cfg["lr"]), epochs=max(1, int(math.ceil(epochs))), max_steps=cfg.get("max_steps"),
                     batch_size=int(cfg["batch_size"]), micro_batch_size=int(cfg["micro_batch_size"]),
                     seq_len=int(cfg["seq_len"]), warmup_ratio=float(cfg["warmup_ratio"]),
                     lr_schedule=cfg["lr_schedule"], max_grad_norm=cfg["max_grad_norm"], seed=int(cfg["seed"]),
                     save_every=int(cfg["save_every"]), eval_every=int(cfg["eval_every"]),
                     early_stopping_patience=cfg.get("early_stopping"),
                     gradient_checkpointing=bool(cfg["gradient_checkpointing"]), offload=bool(cfg.get("offload")),
                     optim_bits=int(cfg["optim_bits"]), paged=bool(cfg["paged"]), out_dir=str(out),
                     compute_dtype=str(cfg.get("compute_dtype") or "auto"), progress=progress)
    before: dict = {}
    epoch_evals: list[dict] = []

    def on_step(trainer, rec):  # evaluation at each epoch end (SM70 protocol)
        if eval_each_epoch and trainer.micro_in_epoch == 0 and trainer.step > 0:
            res = evaluate_all(trainer.model, tok, eval_specs, cfg["seed"], out, f"epoch{trainer.epoch}")
            epoch_evals.append({"epoch": trainer.epoch, "step": trainer.step,
                                **{k: {"accuracy": v.accuracy, "ci95": list(v.ci95)} for k, v in res.items()}})

    trainer_cls = DistributedTrainer if info.world_size > 1 else Trainer
    trainer = trainer_cls(model, tc, train_data, val_data, lora_config=lora, pad_id=tok.pad_id, callbacks=[on_step],
                          base_model_name_or_path=os.path.abspath(model_path))
    n_train = sum(p.numel() for _, p in trainer.params)
    say(f"LoRA r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {', '.join(lora.targets)}: "
        f"{n_train / 1e6:.2f}M trainable params; {trainer.total_steps} optimizer steps of {tc.batch_size} sequences")
    resolved = {"run": cfg, "train_config": tc.__dict__ if not hasattr(tc, "to_dict") else tc.to_dict(),
                "lora": lora.__dict__, "template": cfg["template"], "train_paths": train_paths,
                "eval": [s.__dict__ for s in eval_specs], "device": dev, "torch": torch.__version__,
                "python": platform.python_version(), "started": datetime.now(timezone.utc).isoformat()}
    if info.rank == 0:
        atomic_write_json(out / "run_config.json", resolved, default=str)

    val_before = None
    if eval_before and not resume:
        if val_data is not None:
            val_before = trainer.evaluate()
            say(f"before: held-out answer loss {val_before:.4f} (perplexity {_ppl(val_before):.2f})")
        before = evaluate_all(model, tok, eval_specs, cfg["seed"], out, "before")

    t_train = time.perf_counter()
    summary = trainer.train(resume="auto" if resume else False)  # writes the final adapter into `out`
    train_s = time.perf_counter() - t_train
    rate = [r["tokens_per_s"] for r in trainer.history if "tokens_per_s" in r]
    say(f"at step {summary['step']} ({summary['tokens_seen']} tokens); this session {train_s:.0f}s"
        + (f", {rate[-1]:.0f} tokens/s" if rate else "") + f"; adapter -> {out / 'adapter_model.safetensors'}")

    val_after = trainer.evaluate() if val_data is not None else None
    if val_after is not None:
        say(f"after:  held-out answer loss {val_after:.4f} (perplexity {_ppl(val_after):.2f})")
    after = evaluate_all(model, tok, eval_specs, cfg["seed"], out, "after") if eval_specs else {}
    if info.rank != 0:  # rank 0 writes the report
        return {"summary": summary, "val_loss_after": val_after}

    merged_path = None
    if save_merged:
        merged_path = _save_merged(model, out / "merged", dtype=torch.bfloat16)
        say(f"merged bf16 checkpoint -> {merged_path}")

    chance = {"medqa": 0.25, "pubmedqa": 1 / 3}
    table = before_after_table(before, after, val_before, val_after) if before else ""
    notes = honest_reading(before, after, chance) if before else []
    report = {"model": model_path, "device": dev, "elapsed_s": time.perf_counter() - t_start, "train_s": train_s,
              "summary": summary, "data": {"n_examples": len(data), "n_train": len(train_data),
                                           "n_val": 0 if val_data is None else len(val_data),
                                           "n_tokens": int(data.n_tokens), "report": rep.to_dict()},
              "contamination": contam, "val_loss_before": val_before, "val_loss_after": val_after,
              "before": {k: v.to_dict() for k, v in before.items()},
              "after": {k: v.to_dict() for k, v in after.items()}, "epoch_evals": epoch_evals, "notes": notes,
              "adapter": str(out / "adapter_model.safetensors"), "merged": merged_path,
              "metrics": str(out / "metrics.jsonl"), "loss_curve": str(out / "loss_curve.png")}
    atomic_write_json(out / "report.json", report, default=str)
    md = ["# qlora70 run report", "", f"- model: `{model_path}` on {dev}; {summary['step']} steps, "
          f"{summary['tokens_seen']} tokens in {train_s:.0f}s",
          f"- LoRA r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets {', '.join(lora.targets)}",
          f"- data: {len(train_data)} train / {0 if val_data is None else len(val_data)} validation examples, "
          f"template `{cfg['template']}`", ""]
    if table:
        md += ["## Before / after", "", table, ""]
    if notes:
        md += ["## Reading it honestly", ""] + [f"- {n}" for n in notes] + [""]
    if contam:
        md += ["## Contamination check", "", contam["markdown"], ""]
    md += ["## Files", "", "- adapter: `adapter_model.safetensors`, `adapter_config.json` (PEFT format)",
           "- metrics: `metrics.jsonl`, loss curve: `loss_curve.png`", "- per-task reports: `eval/`"]
    if merged_path:
        md.append(f"- merged checkpoint: `{os.path.relpath(merged_path, out)}`")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    if table:
        print("\n" + table + "\n")
        for n in notes:
            print("  - " + n)
    say(f"report -> {out / 'report.md'} (total {time.perf_counter() - t_start:.0f}s)")
    return report


def train_from_args(a: argparse.Namespace) -> dict:
    cfg = resolve_train_config(a)
    if not a.data:
        raise ValueError("no training data: pass --data PATH (repeatable; a JSON/JSONL file or a directory)")
    if not a.out:
        raise ValueError("no run directory: pass --out DIR")
    specs = default_eval_specs(cfg.get("eval_limit")) if cfg.get("eval_each_epoch") else []
    return run_experiment(cfg, list(a.data), a.out, eval_specs=specs, eval_before=False, resume=a.resume,
                          save_merged=False, device=a.device, tokenizer_path=a.tokenizer,
                          eval_each_epoch=bool(cfg.get("eval_each_epoch")))
