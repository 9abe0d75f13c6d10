"""PNG figures for `qlora70.metrics`: the reliability diagram and the accuracy-coverage curve.

They draw the figures already computed in the `Calibration` / `Selective` / `TargetAccuracy` results (one source for
each number: the report's table and the PNG show the same values). matplotlib is imported inside the functions and
used through its object API with the Agg canvas (no pyplot state, no display needed); files go through
`qlora70.io.atomic_path`, so a crash never leaves a torn PNG.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from .io import atomic_path


def _figure(w: float, h: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, path: str | os.PathLike) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return os.fspath(path)


def plot_reliability(cal: Any, path: str | os.PathLike, *, title: str = "") -> str:
    """Reliability diagram: per confidence bin, the accuracy (bar) against the mean confidence (red dot and gap line)
    and the diagonal of perfect calibration; below, the items per bin. `cal`: a `qlora70.metrics.Calibration`."""
    fig, _ = _figure(5.2, 5.6)
    fig.clear()
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    w = 1.0 / cal.n_bins
    centres = [(b["lo"] + b["hi"]) / 2 for b in cal.bins]
    top.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    top.bar(centres, [b["accuracy"] for b in cal.bins], width=w * 0.92, color="tab:blue", alpha=0.75,
            edgecolor="navy", label="accuracy in bin")
    for x, b in zip(centres, cal.bins):
        top.plot([x, x], [b["accuracy"], b["confidence"]], color="tab:red", lw=1.5)
    top.scatter(centres, [b["confidence"] for b in cal.bins], color="tab:red", s=14, zorder=3,
                label="mean confidence (gap in red)")
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy")
    top.set_title(f"{title + ': ' if title else ''}reliability, {cal.n} items\nECE {cal.ece:.4f} ({cal.n_bins} "
                  f"equal-width bins), Brier {cal.brier:.4f}, NLL {cal.nll:.4f}", fontsize=9)
    top.grid(alpha=0.3)
    counts = [b["n"] for b in cal.bins]
    bottom.bar(centres, counts, width=w * 0.92, color="0.55")
    for x, k in zip(centres, counts):
        bottom.text(x, k, str(k), ha="center", va="bottom", fontsize=7)
    bottom.set(ylim=(0, max(counts + [1]) * 1.3), xlabel="confidence (top choice probability)", ylabel="items")
    bottom.grid(alpha=0.3)
    fig.legend(*top.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def plot_coverage(curves: Mapping[str, Any], path: str | os.PathLike, *, title: str = "", target: Any = None) -> str:
    """Accuracy-coverage curves (answer the most confident items first), one per run in `curves` ({name: Selective},
    e.g. before and after), the accuracies at the reported coverages as points, and with `target` (a
    `TargetAccuracy`, of the last run) its target line and held-out operating point."""
    fig, ax = _figure(5.6, 4.4)
    n = 0
    styles = (("tab:gray", "--", 1.4), ("tab:blue", "-", 1.6), ("tab:orange", "-", 1.6), ("tab:purple", "-", 1.6))
    for z, ((name, sel), (color, ls, lw)) in enumerate(zip(curves.items(), styles)):
        n = max(n, sel.n)
        ax.plot([c * 100 for c in sel.coverage], sel.accuracy, color=color, ls=ls, lw=lw, zorder=2 + len(curves) - z,
                label=f"{name}: AURC {sel.aurc:.4f}")
        for cov, acc in sel.accuracy_at.items():
            x = sel.coverage_at.get(cov, float(cov.rstrip("%")) / 100) * 100  # the coverage really used: ceil(c n)/n
            ax.scatter([x], [acc], color=color, s=22, zorder=3)
            ax.annotate(f"{acc:.3f}", (x, acc), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                        color=color)
    if target is not None:
        ax.axhline(target.target, ls="--", color="tab:green", lw=1, label=f"target accuracy {target.target:.0%}")
        if target.report_answered:
            ax.scatter([target.report_coverage * 100], [target.report_accuracy], marker="D", color="tab:red", s=30,
                       zorder=4, label=f"held-out half at confidence >= {target.threshold:.3f}")
    ax.set(xlim=(0, 100), ylim=(0, 1.05), xlabel="coverage (% of items answered, most confident first)",
           ylabel="accuracy of the answered items")
    ax.set_title(f"{title + ': ' if title else ''}selective answering, {n} items", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
