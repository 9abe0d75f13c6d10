#!/usr/bin/env python
"""Paired before/after report of an existing run directory, from its per-item files alone (no model).

    python examples/paired_report.py runs/demo                 # reads runs/demo/eval/<task>_{before,after}_predictions.jsonl
    python examples/paired_report.py runs/demo --target-accuracy 0.8 --out runs/demo/paired

For every task evaluated both before and after fine-tuning it writes, under --out (default: the run directory):
paired.md and paired.json (flip table, McNemar exact test, paired bootstrap 95% interval, verdict at 0.05;
calibration: ECE with 15 equal-width bins, Brier, NLL; selective answering: AURC, accuracy at 50/80/100% coverage,
and with --target-accuracy the held-out threshold), plus <task>_reliability_{before,after}.png and <task>_coverage.png.
`qlora70.run` writes the same section into report.md / report.json of new runs; this script (like
`qlora70 eval --compare RUN_DIR`) rebuilds it for a finished run from its per-item files alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora70.io import atomic_write_json, atomic_write_text
from qlora70.metrics_report import before_after


def find_pairs(eval_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """{task: predictions file} for the before and the after runs in `eval_dir`."""
    before = {p.name[: -len("_before_predictions.jsonl")]: p for p in sorted(eval_dir.glob("*_before_predictions.jsonl"))}
    after = {p.name[: -len("_after_predictions.jsonl")]: p for p in sorted(eval_dir.glob("*_after_predictions.jsonl"))}
    return before, after


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory holding eval/<task>_before_predictions.jsonl and _after_")
    ap.add_argument("--out", help="where to write paired.md / paired.json / PNGs (default: the run directory)")
    ap.add_argument("--target-accuracy", type=float, help="confidence threshold reaching this accuracy (held out)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap and half-split seed")
    ap.add_argument("--resamples", type=int, default=10_000, help="paired bootstrap resamples")
    a = ap.parse_args(argv)
    run = Path(a.run)
    before, after = find_pairs(run / "eval")
    if not set(before) & set(after):
        print(f"error: no task has both {run / 'eval'}/<task>_before_predictions.jsonl and _after_; was the run "
              f"evaluated before and after fine-tuning?", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else run
    sec = before_after(before, after, plots_dir=out, target=a.target_accuracy, seed=a.seed,
                       n_resamples=a.resamples)
    md = "## Paired before / after (the same items scored twice)\n\n" + sec.to_markdown(link_dir=out)
    atomic_write_json(out / "paired.json", sec.to_dict())
    atomic_write_text(out / "paired.md", md)
    print(md)
    print(f"wrote {out / 'paired.md'}, {out / 'paired.json'} and the PNGs beside them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
