"""PNG figures for `qlora70.metrics`: the reliability diagram and the accuracy-coverage curve.

They draw the figures already computed in the `Calibration` / `Selective` / `TargetAccuracy` results (one source for
each number: the report's table and the PNG show the same values). matplotlib is imported inside the functions and
used through its object API with the Agg canvas (no pyplot state, no display needed); files go through
`qlora70.io.atomic_path`, so a crash never leaves a torn PNG.
"""
from __future__ import annotations

import os
from typing import Any

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
    """Reliability diagram: per confidence bin, the accuracy (bar) against the mean confidence (dot) and the diagonal
    of perfect calibration; bar labels give the items per bin. `cal`: a `qlora70.metrics.Calibration`."""
    fig, ax = _figure(5.2, 5.0)
    w = 1.0 / cal.n_bins
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    for b in cal.bins:
        centre = (b["lo"] + b["hi"]) / 2
        ax.bar(centre, b["accuracy"], width=w * 0.92, color="tab:blue", alpha=0.75, edgecolor="navy")
        ax.plot([centre, centre], [b["accuracy"], b["confidence"]], color="tab:red", lw=1.5)
        ax.text(centre, min(b["accuracy"], 0.97) + 0.015, str(b["n"]), ha="center", va="bottom", fontsize=7)
    ax.scatter([(b["lo"] + b["hi"]) / 2 for b in cal.bins], [b["confidence"] for b in cal.bins], color="tab:red",
               s=14, zorder=3, label="mean confidence in bin")
    ax.bar([], [], color="tab:blue", alpha=0.75, label="accuracy in bin (n above)")
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top choice probability)", ylabel="accuracy")
    ax.set_title(f"{title + ': ' if title else ''}reliability, {cal.n} items\nECE {cal.ece:.4f} ({cal.n_bins} "
                 f"equal-width bins), Brier {cal.brier:.4f}, NLL {cal.nll:.4f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_coverage(sel: Any, path: str | os.PathLike, *, title: str = "", target: Any = None) -> str:
    """Accuracy-coverage curve (answer the most confident items first), the accuracies at the reported coverages as
    points, and with `target` (a `TargetAccuracy`) its target line and held-out operating point."""
    fig, ax = _figure(5.6, 4.4)
    ax.plot([c * 100 for c in sel.coverage], sel.accuracy, color="tab:blue", lw=1.6,
            label=f"accuracy of the most confident (AURC {sel.aurc:.4f})")
    for name, acc in sel.accuracy_at.items():
        x = float(name.rstrip("%"))
        ax.scatter([x], [acc], color="tab:blue", s=22, zorder=3)
        ax.annotate(f"{acc:.3f}", (x, acc), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    if target is not None:
        ax.axhline(target.target, ls="--", color="tab:green", lw=1, label=f"target {target.target:.0%}")
        if target.report_answered:
            ax.scatter([target.report_coverage * 100], [target.report_accuracy], marker="D", color="tab:red", s=30,
                       zorder=4, label=f"held-out half at threshold {target.threshold:.3f}")
    ax.set(xlim=(0, 100), ylim=(0, 1.05), xlabel="coverage (% of items answered)", ylabel="accuracy")
    ax.set_title(f"{title + ': ' if title else ''}selective answering, {sel.n} items", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
