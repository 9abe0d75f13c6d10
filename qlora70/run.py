"""One QLoRA experiment end to end: load -> quantize -> LoRA -> train -> evaluate (before/after) -> save -> report.

Used by `qlora70 train` and `examples/train_sm70.py`, configured by one validated `qlora70.config.RunConfig`
(`qlora70.recipe` builds it from a preset and the flags before anything is loaded). `run_experiment` is a sequence of
small stages: run directory, load, data (+ validation split), contamination check, trainer, evaluation before, train,
evaluation after, merge, report. The resolved configuration, the data accounting, the contamination check and every
evaluation go into `<out>/report.json` and `<out>/report.md`; the adapter is written in PEFT format at
`<out>/adapter_model.safetensors` + `<out>/adapter_config.json`.
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model, resolve_device, save_merged, tokenizer_for
from .config import RunConfig
from .data import TokenizedData, build_dataset, contamination_check_paths
from .distributed import DistributedTrainer, init_distributed
from .evaluate import evaluate_task
from .io import atomic_write_json, atomic_write_text
from .metrics_report import BeforeAfter, before_after
from .recipe import DATA_DIR
from .train_state import latest_checkpoint
from .trainer import Trainer

CHANCE = {"medqa": 0.25, "pubmedqa": 1 / 3}


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


def default_eval_specs(limit: int | None, tasks: tuple[str, ...] | None = None) -> list[EvalSpec]:
    """Held-out evaluation sets shipped in `data/` (disjoint from the shipped training subsets; see data/README.md),
    restricted to `tasks` when given (in the order given)."""
    specs = [EvalSpec("medqa", "medqa", str(DATA_DIR / "medqa" / "US_4options_test_200.jsonl"), limit),
             EvalSpec("pubmedqa", "pubmedqa", str(DATA_DIR / "pubmedqa"), limit),  # the 200 official-test items
             EvalSpec("usmle", "usmle", str(DATA_DIR / "usmle"), limit)]
    if tasks is None:  # the default set: what this checkout ships
        return [s for s in specs if os.path.exists(s.data)]
    by_name = {s.name: s for s in specs}
    missing = [by_name[t].data for t in tasks if not os.path.exists(by_name[t].data)]
    if missing:  # asked for by name: never dropped silently
        raise ValueError(f"--eval {','.join(tasks)}: the evaluation data {missing} is not in this checkout; "
                         "restore data/ or leave those tasks out of --eval")
    return [by_name[t] for t in tasks]


def evaluate_all(model, tok, specs: list[EvalSpec], seed: int, out_dir: Path | None, stem: str,
                 batch_size: int = 8, max_length: int = 1024) -> dict[str, Any]:
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


def honest_reading(before: dict, after: dict, chance: dict[str, float],
                   paired: BeforeAfter | None = None) -> list[str]:
    """Plain-language notes: whether each change is significant at 0.05 by the paired test (McNemar exact on the
    same items, `paired`: a `qlora70.metrics_report.BeforeAfter`), and near-chance accuracy, said out loud. Without
    `paired`, overlapping Wilson intervals are reported (a weaker, unpaired reading)."""
    notes = []
    verdicts = {t.task: t.paired.verdict for t in paired.tasks} if paired is not None else {}
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        overlap = not (a.ci95[0] > b.ci95[1] or b.ci95[0] > a.ci95[1])
        c = chance.get(name)
        msg = f"{name}: {b.accuracy:.1%} -> {a.accuracy:.1%} on {a.n_scored} items"
        if name in verdicts:
            msg += f"; paired test: {verdicts[name]}"
        elif overlap:
            msg += "; the 95% intervals overlap, so this run shows no significant change"
        if c is not None and a.ci95[0] <= c <= a.ci95[1]:
            msg += f"; chance level ({c:.0%}) lies inside the interval: the model is not better than guessing"
        notes.append(msg + ".")
    return notes


def paired_section(before: dict, after: dict, out: Path, target: float | None, seed: int) -> BeforeAfter:
    """The run report's paired before/after section (`qlora70.metrics_report.BeforeAfter`): McNemar exact, paired
    bootstrap, flip table, calibration and selective answering per task, with the PNGs written into `out`. The same
    object feeds report.json, report.md and the PNGs."""
    return before_after(before, after, plots_dir=out, target=target, seed=seed)


def run_dir_in_use(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a training run's checkpoint, i.e. when the Trainer would refuse a fresh run there."""
    return latest_checkpoint(out_dir) is not None


def free_run_dir(base: str) -> str:
    """`base` if no run is in it, else the first of base-2, base-3, ... that is free (default out dirs only)."""
    if not run_dir_in_use(base):
        return base
    k = 2
    while run_dir_in_use(f"{base}-{k}"):
        k += 1
    return f"{base}-{k}"


def validation_split(data: TokenizedData, val_size: float, seed: int) -> tuple[Any, Any, str | None]:
    """(train, validation or None, note): `val_size` entries (>= 1) or that fraction of `data`. A fraction that rounds
    to 0 entries holds out 1 (none, with a note, when the data has fewer than 2 entries): a default never fails."""
    if not val_size:
        return data, None, None
    n = len(data)
    k = int(val_size) if val_size >= 1 else int(round(val_size * n))
    note = None
    if val_size < 1 and k == 0:
        k = 1 if n >= 2 else 0
        note = (f"validation fraction {val_size:g} of {n} entries rounds to 0; "
                + ("holding out 1 entry" if k else "no validation split (fewer than 2 entries)"))
    if not k:
        return data, None, note
    train, val = data.split(k, seed=seed)
    return train, val, note


def _stage_load(cfg: RunConfig, progress: bool) -> tuple[Any, Any, str, Any]:
    """(model, tokenizer, device, process info): NF4 + double quantization onto this process's device."""
    dev = resolve_device(cfg.device)
    info = init_distributed()  # rank 0 of 1 unless launched by torchrun / --nproc
    if info.world_size > 1:
        dev = str(info.device)  # cuda:LOCAL_RANK (NCCL) or cpu (gloo)
    compute = torch.float32 if dev == "cpu" else torch.bfloat16
    say(f"loading {cfg.model} -> NF4 + double quantization on {dev} (weights {str(compute).split('.')[-1]}; "
        f"compute dtype {cfg.train.compute_dtype!r})")
    model = load_model(cfg.model, quantize="nf4", double_quant=True, dtype=compute, device=dev, progress=progress)
    tok = tokenizer_for(cfg.model, cfg.tokenizer)
    say(f"model: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, vocab "
        f"{model.config.vocab_size}; tokenizer {tok.kind} ({tok.vocab_size} tokens)")
    return model, tok, dev, info


def _stage_data(cfg: RunConfig, train_paths: list[str], tok: Any, progress: bool) -> tuple[Any, Any, Any, str | None]:
    """(all data, train, validation or None, split note): cached token ids, answer-only labels."""
    say(f"data: {', '.join(train_paths)} (template {cfg.template!r}, seq_len {cfg.train.seq_len})")
    data = build_dataset(train_paths, tok, template=cfg.template, seq_len=cfg.train.seq_len, progress=progress)
    rep = data.report
    say(f"data: {len(data)} examples, {data.n_tokens} tokens ({data.n_answer_tokens} trained answer tokens); "
        f"dropped {rep.n_dropped} {rep.drop_counts()}; cache {'hit' if data.cache_hit else 'built'}")
    train_data, val_data, note = validation_split(data, cfg.val_size, cfg.train.seed)
    if note:
        say(f"note: {note}")
    say(f"split: {len(train_data)} train / {0 if val_data is None else len(val_data)} held-out validation examples")
    return data, train_data, val_data, note


def _stage_contamination(train_paths: list[str], specs: list[EvalSpec]) -> dict | None:
    """13-gram overlap of the evaluation questions with the training data (before any training)."""
    if not specs:
        return None
    c = contamination_check_paths(train_paths, {s.name: (s.task, s.data) for s in specs}, progress=False)
    contam = c.to_dict()
    contam["markdown"] = c.to_markdown()
    say("contamination: " + "; ".join(f"{k}: {v['n_contaminated']} of {v['n_items']} eval questions found in "
                                      f"training data" for k, v in c.per_task.items()))
    return contam


def _stage_trainer(cfg: RunConfig, model: Any, tok: Any, info: Any, train_data: Any, val_data: Any,
                   specs: list[EvalSpec], out: Path, epoch_evals: list[dict]) -> Trainer:
    """The (distributed, when launched so) trainer; with `eval.each_epoch`, benchmarks at every epoch end."""
    def on_step(trainer, rec):  # evaluation at each epoch end (SM70 protocol)
        if cfg.eval.each_epoch and specs and trainer.micro_in_epoch == 0 and trainer.step > 0:
            res = evaluate_all(trainer.model, tok, specs, cfg.train.seed, out, f"epoch{trainer.epoch}")
            epoch_evals.append({"epoch": trainer.epoch, "step": trainer.step,
                                **{k: {"accuracy": v.accuracy, "ci95": list(v.ci95)} for k, v in res.items()}})

    trainer_cls = DistributedTrainer if info.world_size > 1 else Trainer
    trainer = trainer_cls(model, cfg.train, train_data, val_data, lora_config=cfg.lora, pad_id=tok.pad_id,
                          callbacks=[on_step], base_model_name_or_path=os.path.abspath(cfg.model))
    n_train = sum(p.numel() for _, p in trainer.params)
    lora = cfg.lora
    say(f"LoRA r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {', '.join(lora.targets)}: "
        f"{n_train / 1e6:.2f}M trainable params; {trainer.total_steps} optimizer steps of {cfg.train.batch_size} "
        "sequences")
    say(f"compute dtype: {'bf16 autocast' if trainer.autocast_dtype else 'fp32'} ({trainer.compute_dtype_reason})")
    return trainer


def _write_run_config(cfg: RunConfig, train_paths: list[str], specs: list[EvalSpec], dev: str, out: Path) -> None:
    resolved = {"run": cfg.flat(), "train_config": cfg.train.to_dict(), "lora": dict(cfg.lora.__dict__),
                "eval_config": asdict(cfg.eval), "template": cfg.template, "train_paths": train_paths,
                "eval": [s.__dict__ for s in specs],
                "device": dev, "torch": torch.__version__, "python": platform.python_version(),
                "started": datetime.now(timezone.utc).isoformat()}
    atomic_write_json(out / "run_config.json", resolved, default=str)


def _stage_train(trainer: Trainer, resume: bool, out: Path) -> tuple[dict, float]:
    t_train = time.perf_counter()
    summary = trainer.train(resume="auto" if resume else False)  # writes the final adapter into `out`
    train_s = time.perf_counter() - t_train
    rate = [r["tokens_per_s"] for r in trainer.history if "tokens_per_s" in r]
    say(f"at step {summary['step']} ({summary['tokens_seen']} tokens); this session {train_s:.0f}s"
        + (f", {rate[-1]:.0f} tokens/s" if rate else "") + f"; adapter -> {out / 'adapter_model.safetensors'}")
    return summary, train_s


def _val_loss(trainer: Trainer, val_data: Any, when: str) -> float | None:
    if val_data is None:
        return None
    v = trainer.evaluate()
    say(f"{when + ':':7} held-out answer loss {v:.4f} (perplexity {_ppl(v):.2f})")
    return v


def run_experiment(cfg: RunConfig, train_paths: list[str], out_dir: str, *, eval_specs: list[EvalSpec],
                   eval_before: bool = True, resume: bool = False, save_merged: bool = True,
                   progress: bool = True, contamination: bool = True) -> dict[str, Any]:
    """Run one experiment (see the module docstring); returns the report dict (rank 0) or a summary (other ranks)."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    if not resume and run_dir_in_use(out):  # fail in seconds, not after loading and the first evaluation
        raise ValueError(f"{out} already holds a training run ({out / 'checkpoints'}); continue it with --resume, "
                         f"or pass another --out (nothing there is overwritten)")
    if not cfg.model:
        raise ValueError("no model: pass --model PATH (an HF Llama directory, a bitsandbytes 4-bit directory or a "
                         ".gguf file)")
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (eval_specs or eval_before or save_merged):
        raise ValueError("multi-process training (--nproc > 1) trains and saves the adapter; evaluate or merge it "
                         "afterwards in one process (qlora70 eval / qlora70 merge)")
    model, tok, dev, info = _stage_load(cfg, progress)
    data, train_data, val_data, split_note = _stage_data(cfg, train_paths, tok, progress)
    contam = _stage_contamination(train_paths, eval_specs) if contamination else None
    if cfg.lora.init_lora_weights == "loftq":
        _loftq_start(model, cfg.lora, cfg.model, out, cfg.train.seed, info.rank == 0, progress)
    epoch_evals: list[dict] = []
    trainer = _stage_trainer(cfg, model, tok, info, train_data, val_data, eval_specs, out, epoch_evals)
    if info.rank == 0:
        _write_run_config(cfg, train_paths, eval_specs, dev, out)
    before, val_before = {}, None
    if eval_before and not resume:
        val_before = _val_loss(trainer, val_data, "before")
        before = evaluate_all(model, tok, eval_specs, cfg.train.seed, out, "before")
    summary, train_s = _stage_train(trainer, resume, out)
    val_after = _val_loss(trainer, val_data, "after")
    after = evaluate_all(model, tok, eval_specs, cfg.train.seed, out, "after") if eval_specs else {}
    if info.rank != 0:  # rank 0 writes the report
        return {"summary": summary, "val_loss_after": val_after}
    paired = paired_section(before, after, out, cfg.eval.target_accuracy, cfg.train.seed) if before and after else None
    merged_path = None
    if save_merged:
        merged_path = save_merged_checkpoint(model, out)
    report = {"model": cfg.model, "device": dev,
              "compute_dtype": {"dtype": "bf16" if trainer.autocast_dtype else "fp32",
                                "reason": trainer.compute_dtype_reason},
              "elapsed_s": time.perf_counter() - t_start, "train_s": train_s,
              "summary": summary, "data": {"n_examples": len(data), "n_train": len(train_data),
                                           "n_val": 0 if val_data is None else len(val_data),
                                           "n_tokens": int(data.n_tokens), "report": data.report.to_dict()},
              "contamination": contam, "val_loss_before": val_before, "val_loss_after": val_after,
              "before": {k: v.to_dict() for k, v in before.items()},
              "after": {k: v.to_dict() for k, v in after.items()}, "epoch_evals": epoch_evals,
              "notes": honest_reading(before, after, CHANCE, paired) if before else [],
              "adapter": str(out / "adapter_model.safetensors"), "merged": merged_path,
              "metrics": str(out / "metrics.jsonl"), "loss_curve": str(out / "loss_curve.png"),
              "paired": paired.to_dict() if paired is not None else None}
    if split_note:
        report["data"]["split_note"] = split_note
    write_report(report, cfg, before, after, out, t_start, paired)
    return report


def _loftq_start(model, lora, model_path: str, out: Path, seed: int, main: bool, progress: bool) -> None:
    """Inject LoRA (seeded as the Trainer does) and LoftQ-initialise it, streaming the full-precision weights from
    `model_path`; rank 0 saves the LoftQ NF4 base to `out/base_loftq` (the adapter only fits that base)."""
    from .checkpoint import save_quantized, weight_reader
    from .loftq import apply_loftq
    from .lora import LoRALinear, inject_lora
    from .model import decoder_linears

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_lora(model, lora)
    t0 = time.perf_counter()
    rep = apply_loftq(model, weight_reader(model_path), iters=lora.loftq_iters)
    n = len(rep)
    say(f"LoftQ ({lora.loftq_iters} iteration(s), {time.perf_counter() - t0:.0f} s): mean relative error of "
        f"{n} weights {sum(r['nf4_error'] for r in rep) / n:.4f} (plain NF4) -> "
        f"{sum(r['loftq_error'] for r in rep) / n:.4f}")
    if main:  # the NF4 bases alone (LoRA wrappers swapped out while writing)
        wrapped = [(parent, attr, m) for _, parent, attr, m in decoder_linears(model) if isinstance(m, LoRALinear)]
        try:
            for parent, attr, m in wrapped:
                setattr(parent, attr, m.base_layer)
            path = save_quantized(model, str(out / "base_loftq"), progress=progress)
        finally:
            for parent, attr, m in wrapped:
                setattr(parent, attr, m)
        say(f"LoftQ base saved to {path}: evaluate / merge the adapter on it (--model {path})")


def save_merged_checkpoint(model: Any, out: Path) -> str:
    path = save_merged(model, out / "merged", dtype=torch.bfloat16)
    say(f"merged bf16 checkpoint -> {path}")
    return path


def write_report(report: dict, cfg: RunConfig, before: dict, after: dict, out: Path, t_start: float,
                 paired: BeforeAfter | None = None) -> None:
    """report.json, report.md (with the paired section when before and after were both evaluated), and the
    before/after table on stdout."""
    atomic_write_json(out / "report.json", report, default=str)
    table = before_after_table(before, after, report["val_loss_before"], report["val_loss_after"]) if before else ""
    summary, lora, d = report["summary"], cfg.lora, report["data"]
    md = ["# qlora70 run report", "", f"- model: `{cfg.model}` on {report['device']}; {summary['step']} steps, "
          f"{summary['tokens_seen']} tokens in {report['train_s']:.0f}s",
          f"- compute dtype: {report['compute_dtype']['dtype']} ({report['compute_dtype']['reason']})",
          f"- LoRA r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets {', '.join(lora.targets)}",
          f"- data: {d['n_train']} train / {d['n_val']} validation examples, template `{cfg.template}`"]
    if d.get("split_note"):
        md.append(f"- note: {d['split_note']}")
    md.append("")
    if table:
        md += ["## Before / after", "", table, ""]
    if paired is not None and paired.tasks:
        md += ["## Paired before / after (the same items scored twice)", "", paired.to_markdown(link_dir=out), ""]
    if report["notes"]:
        md += ["## Reading it honestly", ""] + [f"- {n}" for n in report["notes"]] + [""]
    if report["contamination"]:
        md += ["## Contamination check", "", report["contamination"]["markdown"], ""]
    md += ["## Files", "", "- adapter: `adapter_model.safetensors`, `adapter_config.json` (PEFT format)",
           "- metrics: `metrics.jsonl`, loss curve: `loss_curve.png`", "- per-task reports: `eval/`"]
    if report["merged"]:
        md.append(f"- merged checkpoint: `{os.path.relpath(report['merged'], out)}`")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    if table:
        print("\n" + table + "\n")
        for n in report["notes"]:
            print("  - " + n)
    if paired is not None and paired.tasks:
        print("\nPaired before / after (the same items scored twice):\n\n" + paired.to_markdown(link_dir=out))
    say(f"report -> {out / 'report.md'} (total {time.perf_counter() - t_start:.0f}s)")


def train_from_args(cfg: RunConfig, train_paths: list[str], resume: bool) -> dict:
    """`qlora70 train`: the preset's benchmarks (or `--eval`) at each epoch end / after training; no before-training
    evaluation and no merged checkpoint (the example script does both)."""
    if cfg.eval.tasks is not None:
        specs = default_eval_specs(cfg.eval.limit, cfg.eval.tasks)
    else:
        specs = default_eval_specs(cfg.eval.limit) if cfg.eval.each_epoch else []
    return run_experiment(cfg, list(train_paths), cfg.train.out_dir, eval_specs=specs, eval_before=False,
                          resume=resume, save_merged=False)
