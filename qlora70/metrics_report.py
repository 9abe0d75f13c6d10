"""Assemble `qlora70.metrics` figures for a report: one run's calibration and selective answering (`item_metrics`),
a before/after pair of runs over several tasks (`before_after`), few-shot robustness over shot seeds
(`shot_robustness`: mean, sample std, min, max of the accuracies of N independent shot draws).

Inputs are duck-typed so `evaluate` / `run` / `cli` wire them in a few lines without this module importing them: a run
is an `ItemPredictions`, a predictions-file path, an `EvalReport` (anything with `.predictions`, a list of per-item
dicts) or such a list itself. Every figure is computed once here; `to_dict()` (report.json), `to_markdown()`
(report.md) and the PNGs (`qlora70.metrics_plots`) all read the same objects.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .metrics import (ALPHA, BOOTSTRAP_RESAMPLES, COVERAGES, ECE_BINS, Calibration, ItemPredictions,
                      PairedComparison, Selective, TargetAccuracy, _clean, _fmt, calibration, compare,
                      predictions_from_records, read_predictions, selective, target_accuracy)


def as_predictions(run: Any, source: str = "<run>") -> ItemPredictions:
    """An `ItemPredictions` from a path, an `EvalReport`-like object (`.predictions`), a list of dicts, or itself."""
    if isinstance(run, ItemPredictions):
        return run
    if isinstance(run, (str, os.PathLike)):
        return read_predictions(run)
    recs = getattr(run, "predictions", run)
    if not isinstance(recs, (list, tuple)):
        raise TypeError(f"{source}: expected a predictions file, an EvalReport or a list of per-item dicts, got "
                        f"{type(run).__name__}")
    # an EvalReport's calibration uses the scores its headline prediction used (as evaluate.evaluate_items does)
    key = "scores_norm" if getattr(run, "mode", None) == "option_norm" else "scores"
    return predictions_from_records(recs, source, score_key=key)


@dataclass
class ItemMetrics:
    """Calibration + selective answering (+ the held-out target-accuracy threshold) of one evaluation."""

    name: str
    calibration: Calibration
    selective: Selective
    target: TargetAccuracy | None = None
    plots: dict[str, str] = field(default_factory=dict)

    def to_dict(self, curve: bool = False) -> dict:
        return {"name": self.name, "calibration": self.calibration.to_dict(),
                "selective": self.selective.to_dict(curve=curve),
                "target_accuracy": None if self.target is None else self.target.to_dict(), "plots": dict(self.plots)}

    def to_markdown(self) -> str:
        out = [f"#### {self.name}: calibration and selective answering", "", self.calibration.to_markdown(),
               self.selective.to_markdown()]
        if self.target is not None:
            out.append(self.target.to_markdown())
        return "\n".join(out)

    def save_plots(self, out_dir: str | os.PathLike, stem: str | None = None) -> dict[str, str]:
        """`<stem>_reliability.png` and `<stem>_coverage.png` under `out_dir` (atomic writes); records and returns
        the paths."""
        from .metrics_plots import plot_coverage, plot_reliability
        stem = stem or self.name
        out = Path(out_dir)
        self.plots = {
            "reliability": plot_reliability(self.calibration, out / f"{stem}_reliability.png", title=self.name),
            "coverage": plot_coverage({self.name: self.selective}, out / f"{stem}_coverage.png", title=self.name,
                                      target=self.target)}
        return dict(self.plots)


def item_metrics(pred: ItemPredictions, *, name: str | None = None, n_bins: int = ECE_BINS,
                 target: float | None = None, seed: int = 0,
                 coverages: Sequence[float] = COVERAGES) -> ItemMetrics:
    """Calibration, selective answering and (with `target`) the held-out threshold, from one set of predictions."""
    pred.need_scores("calibration / selective answering")
    lp = pred.log_probs()
    conf = np.exp(lp.max(axis=1))
    hit = lp.argmax(axis=1) == pred.gold
    return ItemMetrics(name=name or Path(pred.source).name.removesuffix("_predictions.jsonl"),
                       calibration=calibration(lp, pred.gold, n_bins=n_bins),
                       selective=selective(conf, hit, coverages=coverages),
                       target=None if target is None else target_accuracy(conf, hit, target, seed=seed))


# --------------------------------------------------------------------------------------------------------------------
# Before / after over tasks (the run report's section)
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class TaskPair:
    """One task's paired comparison and both runs' probability figures (None with `note` when a run has no scores)."""

    task: str
    paired: PairedComparison
    before: ItemMetrics | None = None
    after: ItemMetrics | None = None
    note: str = ""
    plots: dict[str, str] = field(default_factory=dict)


@dataclass
class BeforeAfter:
    """The run report's paired before/after section over all tasks evaluated both times."""

    tasks: list[TaskPair]
    names: tuple[str, str] = ("before", "after")
    skipped: list[str] = field(default_factory=list)  # tasks evaluated only once

    def to_dict(self) -> dict:
        out = {}
        for t in self.tasks:
            out[t.task] = {"paired": t.paired.to_dict(), "plots": dict(t.plots), "note": t.note,
                           self.names[0]: t.before.to_dict() if t.before else None,
                           self.names[1]: t.after.to_dict() if t.after else None}
        return {"tasks": out, "skipped": list(self.skipped)}

    def to_markdown(self, link_dir: str | os.PathLike | None = None) -> str:
        """Tables + verdicts + PNG links (relative to `link_dir`, the directory of the markdown file)."""
        a, b = self.names
        lines = [f"| task | n | {a} | {b} | change | paired bootstrap 95% | right->wrong | wrong->right | McNemar "
                 f"exact p | significant at 0.05 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t in self.tasks:
            p = t.paired
            lines.append(f"| {t.task} | {p.n} | {p.accuracy_a:.3f} | {p.accuracy_b:.3f} | {p.difference:+.3f} | "
                         f"[{p.ci95[0]:+.3f}, {p.ci95[1]:+.3f}] | {p.right_to_wrong} | {p.wrong_to_right} | "
                         f"{p.p_value:.3g} | {'yes' if p.significant else 'no'} |")
        lines += [""] + [f"- **{t.task}**: {t.paired.verdict}." for t in self.tasks]
        lines += ["", f"Bootstrap: {self.tasks[0].paired.n_resamples if self.tasks else 0} paired resamples of the "
                      f"items (seed {self.tasks[0].paired.seed if self.tasks else 0}); McNemar: two-sided exact "
                      f"binomial on the discordant pairs."]
        lines += ["", _calibration_table(self), ""]
        for t in self.tasks:
            if t.note:
                lines.append(f"- {t.task}: {t.note}")
            for key, path in t.plots.items():
                rel = os.path.relpath(path, link_dir) if link_dir is not None else path
                lines.append(f"- {t.task} {key.replace('_', ' ')}: ![{t.task} {key}]({rel})")
        if self.skipped:
            lines.append(f"- not compared (evaluated only once): {', '.join(self.skipped)}")
        return "\n".join(lines).rstrip() + "\n"


def _calibration_table(sec: BeforeAfter) -> str:
    rows = ["| task | run | ECE (15 equal-width bins) | Brier | NLL of gold | AURC | acc @50% | acc @80% | acc @100% "
            "| target: threshold, held-out coverage / accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in sec.tasks:
        for run, m in ((sec.names[0], t.before), (sec.names[1], t.after)):
            if m is None:
                continue
            c, s, tg = m.calibration, m.selective, m.target
            tgt = "-" if tg is None else ("not reachable" if tg.threshold is None else
                                         f"{tg.target:.0%}: >= {tg.threshold:.3f}, {tg.report_coverage:.1%} / "
                                         f"{_fmt(tg.report_accuracy)}")
            rows.append(f"| {t.task} | {run} | {c.ece:.4f} | {c.brier:.4f} | {c.nll:.4f} | {s.aurc:.4f} | "
                        + " | ".join(_fmt(s.accuracy_at.get(k)) for k in ("50%", "80%", "100%")) + f" | {tgt} |")
    return "\n".join(rows) if len(rows) > 2 else "No per-choice probabilities (generation mode): calibration skipped."


def _pair_task(task: str, pb: ItemPredictions, pa: ItemPredictions, names: tuple[str, str], plots_dir: Any,
               target: float | None, seed: int, n_resamples: int, alpha: float) -> TaskPair:
    paired = compare(pb, pa, name_a=names[0], name_b=names[1], n_resamples=n_resamples, seed=seed, alpha=alpha)
    tp = TaskPair(task, paired)
    lacking = [p for p in (pb, pa) if p.logliks is None or p.gold is None]
    if lacking:  # generation mode: no per-choice scores (any other error surfaces)
        try:
            lacking[0].need_scores("calibration / selective answering")
        except ValueError as e:  # its message says what is missing and what to do
            tp.note = f"calibration and selective answering skipped: {e}"
    else:
        tp.before = item_metrics(pb, name=f"{task} {names[0]}", target=target, seed=seed)
        tp.after = item_metrics(pa, name=f"{task} {names[1]}", target=target, seed=seed)
    if plots_dir is not None and tp.after is not None:
        from .metrics_plots import plot_coverage, plot_reliability
        out = Path(plots_dir)
        for run, m in ((names[0], tp.before), (names[1], tp.after)):
            tp.plots[f"reliability_{run}"] = plot_reliability(m.calibration, out / f"{task}_reliability_{run}.png",
                                                              title=m.name)
        tp.plots["coverage"] = plot_coverage({names[0]: tp.before.selective, names[1]: tp.after.selective},
                                             out / f"{task}_coverage.png", title=task, target=tp.after.target)
    return tp


def before_after(before: Mapping[str, Any], after: Mapping[str, Any], *, plots_dir: str | os.PathLike | None = None,
                 target: float | None = None, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 alpha: float = ALPHA, names: tuple[str, str] = ("before", "after")) -> BeforeAfter:
    """Paired comparison + calibration + selective answering for every task in both `before` and `after`
    ({task: EvalReport | path | records}); with `plots_dir`, `<task>_reliability_<run>.png` and `<task>_coverage.png`
    (both runs on one axis) are written there."""
    tasks, skipped = [], sorted(set(before) ^ set(after))
    for task in [t for t in before if t in after]:
        pb = as_predictions(before[task], f"{task} {names[0]}")
        pa = as_predictions(after[task], f"{task} {names[1]}")
        tasks.append(_pair_task(task, pb, pa, names, plots_dir, target, seed, n_resamples, alpha))
    return BeforeAfter(tasks, names, skipped)


# --------------------------------------------------------------------------------------------------------------------
# Few-shot robustness
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class ShotRobustness:
    """Accuracy over N independent draws of the k shots (one seed per draw); std is the sample std (ddof=1)."""

    k_shot: int
    seeds: list[int]
    accuracies: list[float]
    mean: float
    std: float  # nan for a single seed
    min: float
    max: float

    def to_dict(self) -> dict:
        return _clean(asdict(self))

    def to_markdown(self) -> str:
        return (f"| k-shot | shot seeds | mean accuracy | std (sample) | min | max |\n|---|---|---|---|---|---|\n"
                f"| {self.k_shot} | {', '.join(map(str, self.seeds))} | {self.mean:.3f} | {_fmt(self.std)} | "
                f"{self.min:.3f} | {self.max:.3f} |\n")


def shot_robustness(accuracies: Sequence[float], seeds: Sequence[int], k_shot: int) -> ShotRobustness:
    """Summarise the accuracies of N shot draws (`accuracies[i]` came from `seeds[i]`)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.ndim != 1 or acc.size == 0 or len(seeds) != acc.size:
        raise ValueError(f"shot_robustness: need one accuracy per seed, got {acc.size} accuracies, {len(seeds)} seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"shot_robustness: seeds must differ (independent draws), got {list(seeds)}")
    return ShotRobustness(k_shot=int(k_shot), seeds=[int(s) for s in seeds], accuracies=acc.tolist(),
                          mean=float(acc.mean()), std=float(acc.std(ddof=1)) if acc.size > 1 else math.nan,
                          min=float(acc.min()), max=float(acc.max()))


def shot_seeds(seed: int, n: int) -> list[int]:
    """The N shot seeds `--k-shot K --shot-seeds N` evaluates: seed, seed + 1, ..., seed + N - 1."""
    if n < 1:
        raise ValueError(f"--shot-seeds must be >= 1, got {n}")
    return [int(seed) + i for i in range(n)]
