"""Numbers a clinician can lean on, from per-item prediction files: paired before/after tests, calibration, selective
answering, few-shot robustness, and lm-evaluation-harness-format output.

Everything here is a pure function of per-item records (the `*_predictions.jsonl` lines `qlora70.evaluate` writes:
`id`, `gold`, `pred`, `correct`, and in the log-likelihood modes `scores` = {label: summed log-likelihood} in display
order) or of arrays; results are typed dataclasses with `to_dict()` / `to_markdown()`. Around it:
`qlora70.metrics_report` assembles one run's / a before-after pair's figures for reports and the CLI (and holds
the few-shot robustness summary),
`qlora70.metrics_plots` draws them (matplotlib imported inside its functions), `qlora70.metrics_lmeval` writes
lm-evaluation-harness's layout. Definitions:

- Paired comparison of runs A (before) and B (after) on the same items, matched by id. Flip table: both right,
  right->wrong (b), wrong->right (c), both wrong. McNemar's exact test: p = min(1, 2 * P[X <= min(b, c)]) with
  X ~ Binomial(b + c, 1/2), p = 1 when b + c = 0, summed exactly in integers up to 20,000 discordant pairs
  and in log space above (no overflow at any n). Paired bootstrap:
  the same resampled item indices for both runs, the accuracy difference B - A per resample, percentile interval.
- Choice probabilities: softmax over an item's per-choice log-likelihoods (`scores`, the raw sums lm-eval's `acc`
  uses). Confidence = the top probability; the prediction = its argmax. ECE with equal-width bins on [0, 1] (bin i is
  (i/B, (i+1)/B], B = 15 unless told): sum_bins n_bin/n * |accuracy_bin - mean confidence_bin|. Multi-class Brier:
  mean over items of sum_c (p_c - 1[c = gold])^2 (range 0..2). NLL: mean of -log p_gold (natural log).
- Selective answering: answer the items with the highest confidence first (ties in file order). Accuracy-coverage
  curve: accuracy of the top k items at coverage k/n. AURC = the area under the risk-coverage curve, the mean over
  k = 1..n of the risk (1 - accuracy) of the top k (Geifman et al. 2018's discrete form; lower is better); the area
  under the accuracy-coverage curve is 1 - AURC.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 10_000
ALPHA = 0.05
COVERAGES = (0.5, 0.8, 1.0)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _clean(o: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


# --------------------------------------------------------------------------------------------------------------------
# Per-item predictions: one reader for the files and for in-memory `EvalReport.predictions`
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class ItemPredictions:
    """Per-item results of one evaluation. `logliks` (n, C) holds per-choice log-likelihoods in label order, padded
    with -inf where an item has fewer choices (USMLE: 4..8); None when the source carries none (generate mode)."""

    source: str
    ids: list[str]
    correct: np.ndarray  # (n,) bool, as the evaluation scored it
    labels: list[list[str]] | None = None
    gold: np.ndarray | None = None  # (n,) int index into each item's labels
    logliks: np.ndarray | None = None  # (n, C) float64
    is_greedy: list[list[bool]] | None = None
    missing: str | None = None  # why logliks is None: "line L (id X) has no 'scores'"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self) else math.nan

    def need_scores(self, what: str) -> None:
        """Raise the clear error a metric that needs per-choice log-likelihoods gives when they are absent."""
        if self.logliks is None or self.gold is None:
            raise ValueError(f"{self.source}: {what} needs per-choice log-likelihoods (field 'scores' or 'logliks') "
                             f"and the gold label ('gold' or 'gold_index') on every item, but {self.missing}. "
                             f"Generation-mode files carry none: evaluate with --mode letter or option.")

    def log_probs(self) -> np.ndarray:
        """(n, C) log-softmax over each item's choices (padding stays -inf)."""
        self.need_scores("choice probabilities")
        return log_softmax(self.logliks)

    def probs(self) -> np.ndarray:
        """(n, C) softmax over each item's choice log-likelihoods (rows sum to 1, padding 0)."""
        return np.exp(self.log_probs())

    def subset(self, idx: np.ndarray) -> "ItemPredictions":
        idx = np.asarray(idx, dtype=np.int64)
        return ItemPredictions(
            self.source, [self.ids[i] for i in idx], self.correct[idx],
            None if self.labels is None else [self.labels[i] for i in idx],
            None if self.gold is None else self.gold[idx], None if self.logliks is None else self.logliks[idx],
            None if self.is_greedy is None else [self.is_greedy[i] for i in idx], self.missing)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (n, C) float64 with -inf entries allowed (each row needs one finite entry)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = x - m
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _field(rec: dict, key: str, where: str, kinds: tuple[type, ...]) -> Any:
    if key not in rec:
        raise ValueError(f"{where}: required field {key!r} is missing (have {sorted(rec)})")
    v = rec[key]
    if not isinstance(v, kinds) or (bool not in kinds and isinstance(v, bool)):
        raise ValueError(f"{where}: field {key!r} must be {'/'.join(k.__name__ for k in kinds)}, got {v!r}")
    return v


def _choice_fields(rec: dict, where: str, score_key: str) -> tuple[list[str], int, list[float], list[bool] | None]:
    """(labels, gold index, log-likelihoods, is_greedy) of one record; accepts today's `scores` = {label: ll} and the
    explicit `labels` / `gold_index` / `logliks` / `probs` / `is_greedy` lists the integration adds (those hold the
    raw scores, so another `score_key` such as "scores_norm" always reads that dict)."""
    if score_key == "scores" and ("logliks" in rec or "probs" in rec):
        labels = _field(rec, "labels", where, (list,))
        if "logliks" in rec:
            ll = [float(v) for v in _field(rec, "logliks", where, (list,))]
        else:
            p = np.asarray(_field(rec, "probs", where, (list,)), dtype=np.float64)
            if p.size and (np.any(p < 0) or abs(p.sum() - 1) > 1e-4):
                raise ValueError(f"{where}: field 'probs' must be probabilities summing to 1, got sum {p.sum():.6f}")
            with np.errstate(divide="ignore"):
                ll = np.log(p).tolist()
    else:
        sc = _field(rec, score_key, where, (dict,))
        labels, ll = list(sc), [float(v) for v in sc.values()]
    if len(ll) != len(labels) or not labels:
        raise ValueError(f"{where}: {len(ll)} choice scores for {len(labels)} labels")
    if not any(math.isfinite(v) for v in ll):
        raise ValueError(f"{where}: no finite choice log-likelihood in {ll}")
    if "gold_index" in rec:
        gi = int(_field(rec, "gold_index", where, (int,)))
    else:
        g = _field(rec, "gold", where, (str,))
        if g not in labels:
            raise ValueError(f"{where}: gold label {g!r} is not one of the scored labels {labels}")
        gi = labels.index(g)
    if not 0 <= gi < len(labels):
        raise ValueError(f"{where}: gold_index {gi} outside 0..{len(labels) - 1}")
    greedy = rec.get("is_greedy")
    return labels, gi, ll, (list(map(bool, greedy)) if isinstance(greedy, list) else None)


def predictions_from_records(records: Iterable[dict], source: str = "<records>", *,
                             score_key: str = "scores") -> ItemPredictions:
    """`ItemPredictions` from per-item dicts (`EvalReport.predictions` or parsed JSONL lines). `score_key` picks the
    per-choice scores: "scores" (raw log-likelihood sums, default) or "scores_norm" (per-character, option modes)."""
    ids, correct, labels, gold, lls, greedy = [], [], [], [], [], []
    missing: str | None = None
    seen: dict[str, int] = {}
    for n, rec in enumerate(records, 1):
        where = f"{source}: record {n}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where} is not a JSON object")
        rid = str(_field(rec, "id", where, (str, int)))
        where = f"{where} (id {rid})"
        if rid in seen:
            raise ValueError(f"{source}: id {rid!r} appears twice (records {seen[rid]} and {n}); ids must be unique")
        seen[rid] = n
        ids.append(rid)
        correct.append(bool(_field(rec, "correct", where, (bool,))))
        has = score_key in rec or (score_key == "scores" and ("logliks" in rec or "probs" in rec))
        if missing is None and has:
            lab, gi, ll, gr = _choice_fields(rec, where, score_key)
            labels.append(lab)
            gold.append(gi)
            lls.append(ll)
            greedy.append(gr)
        elif missing is None:
            missing = f"record {n} (id {rid}) has no {score_key!r}"
    if missing is not None or not ids:
        missing = missing or "it holds no records"
        return ItemPredictions(source, ids, np.asarray(correct, dtype=bool), missing=missing)
    width = max(map(len, lls))
    arr = np.full((len(lls), width), -np.inf)
    for i, ll in enumerate(lls):
        arr[i, :len(ll)] = ll
    return ItemPredictions(source, ids, np.asarray(correct, dtype=bool), labels, np.asarray(gold, dtype=np.int64),
                           arr, greedy if all(g is not None for g in greedy) else None)


def read_predictions(path: str | os.PathLike, *, score_key: str = "scores") -> ItemPredictions:
    """Read a `*_predictions.jsonl` file (one JSON object per line). Errors name the file, the line and the field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"predictions file {p} does not exist (evaluate with --out DIR to write one)")
    recs = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {i} is not valid JSON ({e.msg})") from None
    return predictions_from_records(recs, str(p), score_key=score_key)


# --------------------------------------------------------------------------------------------------------------------
# Paired before/after
# --------------------------------------------------------------------------------------------------------------------

EXACT_MAX_PAIRS = 20_000  # above this many discordant pairs the tail is summed in log space (O(k) instead of O(k n))


def _half_tail_exact(n: int, k: int) -> float:
    """P[X <= k], X ~ Binomial(n, 1/2): exact integer sum of C(n, i), one correctly rounded division at the end
    (int / int never overflows; it underflows to 0.0)."""
    term, tail = 1, 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        tail += term
    return tail / (1 << n)


def _half_tail_log(n: int, k: int) -> float:
    """P[X <= k] for large n: log C(n, i) by cumulative sums of log((n - i) / (i + 1)), then log-sum-exp
    (float64; relative error ~1e-10 at n = 10^5)."""
    i = np.arange(k, dtype=np.float64)
    logc = np.concatenate([[0.0], np.cumsum(np.log(n - i) - np.log(i + 1))])
    m = logc.max()
    return float(math.exp(m + math.log(np.exp(logc - m).sum()) - n * math.log(2.0)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b right->wrong and c wrong->right pairs: min(1, 2 P[X <= min(b, c)]),
    X ~ Binomial(b + c, 1/2); 1 when b + c = 0. Exact integer arithmetic up to `EXACT_MAX_PAIRS` discordant pairs,
    log space above (no overflow at any n)."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"mcnemar_exact: b and c must be non-negative integers, got b={b}, c={c}")
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0:
        return 1.0
    tail = _half_tail_exact(n, k) if n <= EXACT_MAX_PAIRS else _half_tail_log(n, k)
    return min(1.0, 2 * tail)


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of accuracy(B) - accuracy(A) over `n_resamples` resamples of the items with replacement,
    the same indices for both runs (numpy default_rng(seed); quantiles by linear interpolation)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")
    d = b.astype(np.float64) - a.astype(np.float64)  # per item: +1 fixed, -1 broken, 0 unchanged
    rng = np.random.default_rng(seed)
    n = d.size
    chunk = max(1, min(n_resamples, 4_000_000 // n))  # bounded memory: chunk x n indices at a time
    diffs = np.empty(n_resamples)
    for s in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - s)
        diffs[s:s + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class PairedComparison:
    """Run B against run A on the same items (A = before, B = after)."""

    name_a: str
    name_b: str
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_b - accuracy_a
    both_right: int
    right_to_wrong: int  # right in A, wrong in B (b)
    wrong_to_right: int  # wrong in A, right in B (c)
    both_wrong: int
    p_value: float  # McNemar exact, two-sided
    ci95: tuple[float, float]  # paired bootstrap percentile interval of the difference
    n_resamples: int
    seed: int
    alpha: float = ALPHA
    n_only_a: int = 0  # items dropped by intersect=True
    n_only_b: int = 0

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    @property
    def verdict(self) -> str:
        """Plain words: significant at alpha or not, by McNemar's exact test; flags a bootstrap interval that
        disagrees (excludes 0 while p >= alpha, or includes 0 while p < alpha) as borderline."""
        d = f"{self.difference * 100:+.1f} points"
        lo, hi = self.ci95
        excludes0 = lo > 0 or hi < 0
        ci = f"95% interval [{lo * 100:+.1f}, {hi * 100:+.1f}]"
        flips = f"{self.wrong_to_right} fixed vs {self.right_to_wrong} broken"
        if self.significant:
            way = "better" if self.difference > 0 else "worse"
            return (f"significant at {self.alpha:g}: {self.name_b} is {way} than {self.name_a} ({d}, McNemar exact "
                    f"p = {self.p_value:.3g}, {flips}, {ci})"
                    + ("" if excludes0 else "; the bootstrap interval includes 0, so the evidence is borderline"))
        return (f"not significant at {self.alpha:g}: {d} (McNemar exact p = {self.p_value:.3g}, {flips}, {ci})"
                + ("; the bootstrap interval excludes 0, so the evidence is borderline" if excludes0 else
                   "; no change is shown"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ci95=list(self.ci95), significant=self.significant, verdict=self.verdict,
                 test="McNemar exact (two-sided binomial on discordant pairs)",
                 interval=f"paired bootstrap {self.n_resamples} resamples, seed {self.seed}, percentile 95%")
        return _clean(d)

    def to_markdown(self) -> str:
        lo, hi = self.ci95
        lines = [f"| paired ({self.n} items) | {self.name_b} right | {self.name_b} wrong |", "|---|---|---|",
                 f"| **{self.name_a} right** | {self.both_right} | {self.right_to_wrong} (right->wrong) |",
                 f"| **{self.name_a} wrong** | {self.wrong_to_right} (wrong->right) | {self.both_wrong} |", "",
                 f"Accuracy {self.accuracy_a:.3f} -> {self.accuracy_b:.3f}, difference {self.difference:+.3f} "
                 f"(paired bootstrap 95% interval [{lo:+.3f}, {hi:+.3f}], {self.n_resamples} resamples, seed "
                 f"{self.seed}); McNemar exact p = {self.p_value:.4g}.", "", f"**Verdict:** {self.verdict}."]
        if self.n_only_a or self.n_only_b:
            lines += ["", f"Compared on the {self.n} shared ids ({self.n_only_a} only in {self.name_a}, "
                          f"{self.n_only_b} only in {self.name_b})."]
        return "\n".join(lines) + "\n"


def align(a: ItemPredictions, b: ItemPredictions, *, intersect: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays pairing the items of `a` and `b` by id (in `a`'s order). Different id sets are an error unless
    `intersect=True` (then only shared ids are used; the counts left out are in the comparison)."""
    pos_b = {rid: i for i, rid in enumerate(b.ids)}
    only_a = [rid for rid in a.ids if rid not in pos_b]
    only_b = sorted(set(b.ids) - set(a.ids))
    if (only_a or only_b) and not intersect:
        raise ValueError(
            f"the two runs scored different items: {len(only_a)} ids only in {a.source} (e.g. {only_a[:3]}), "
            f"{len(only_b)} only in {b.source} (e.g. {only_b[:3]}). Evaluate both with the same --data/--limit/"
            f"--seed, or pass intersect=True (CLI: --intersect) to compare the shared ids only.")
    ia = np.asarray([i for i, rid in enumerate(a.ids) if rid in pos_b], dtype=np.int64)
    ib = np.asarray([pos_b[a.ids[i]] for i in ia], dtype=np.int64)
    if ia.size == 0:
        raise ValueError(f"{a.source} and {b.source} share no item ids; nothing to compare")
    return ia, ib


def compare(a: ItemPredictions, b: ItemPredictions, *, name_a: str = "before", name_b: str = "after",
            intersect: bool = False, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
            alpha: float = ALPHA) -> PairedComparison:
    """Paired comparison of two runs on the same items: flip table, McNemar exact, paired bootstrap interval."""
    ia, ib = align(a, b, intersect=intersect)
    ca, cb = a.correct[ia], b.correct[ib]
    rw, wr = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    return PairedComparison(
        name_a=name_a, name_b=name_b, n=int(ia.size), accuracy_a=float(ca.mean()), accuracy_b=float(cb.mean()),
        difference=float(cb.mean() - ca.mean()), both_right=int(np.sum(ca & cb)), right_to_wrong=rw,
        wrong_to_right=wr, both_wrong=int(np.sum(~ca & ~cb)), p_value=mcnemar_exact(rw, wr),
        ci95=paired_bootstrap(ca, cb, n_resamples=n_resamples, seed=seed), n_resamples=n_resamples, seed=seed,
        alpha=alpha, n_only_a=len(a) - int(ia.size), n_only_b=len(b) - int(ib.size))


def compare_files(path_a: str | os.PathLike, path_b: str | os.PathLike, **kwargs: Any) -> PairedComparison:
    """`compare` on two predictions files (`qlora70 eval --compare A B`); names default to the file stems."""
    kwargs.setdefault("name_a", Path(path_a).name.removesuffix("_predictions.jsonl"))
    kwargs.setdefault("name_b", Path(path_b).name.removesuffix("_predictions.jsonl"))
    if kwargs["name_a"] == kwargs["name_b"]:
        kwargs["name_a"], kwargs["name_b"] = "A", "B"
    return compare(read_predictions(path_a), read_predictions(path_b), **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """Calibration of the choice probabilities; `bins` lists every non-empty bin (lo, hi, n, confidence, accuracy)."""

    n: int
    n_bins: int
    accuracy: float  # of the argmax choice
    mean_confidence: float
    ece: float
    brier: float
    nll: float
    bins: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["binning"] = f"{self.n_bins} equal-width confidence bins on [0, 1], right-closed"
        return _clean(d)

    def to_markdown(self) -> str:
        return (f"| n | accuracy | mean confidence | ECE ({self.n_bins} equal-width bins) | Brier (multi-class) | "
                f"NLL of gold |\n|---|---|---|---|---|---|\n| {self.n} | {self.accuracy:.3f} | "
                f"{self.mean_confidence:.3f} | {self.ece:.4f} | {self.brier:.4f} | {self.nll:.4f} |\n")


def calibration(log_probs: np.ndarray, gold: np.ndarray, *, n_bins: int = ECE_BINS) -> Calibration:
    """ECE, Brier and NLL from (n, C) log-probabilities (rows normalised; -inf padding allowed) and gold indices."""
    lp = np.asarray(log_probs, dtype=np.float64)
    g = np.asarray(gold, dtype=np.int64)
    if lp.ndim != 2 or g.shape != (lp.shape[0],) or lp.shape[0] == 0:
        raise ValueError(f"calibration: need log_probs (n, C) and gold (n,), n >= 1; got {lp.shape}, {g.shape}")
    if n_bins < 1:
        raise ValueError(f"calibration: n_bins must be >= 1, got {n_bins}")
    p = np.exp(lp)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    hit = (pred == g).astype(np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(g)), g] = 1.0
    brier = float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    nll = float(np.mean(-lp[np.arange(len(g)), g]))
    which = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # bin i = (i/B, (i+1)/B]
    bins, ece = [], 0.0
    for i in range(n_bins):
        sel = which == i
        k = int(sel.sum())
        if k:
            bc, ba = float(conf[sel].mean()), float(hit[sel].mean())
            ece += k / len(g) * abs(ba - bc)
            bins.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "n": k, "confidence": bc, "accuracy": ba})
    return Calibration(n=len(g), n_bins=n_bins, accuracy=float(hit.mean()), mean_confidence=float(conf.mean()),
                       ece=float(ece), brier=brier, nll=nll, bins=bins)


# --------------------------------------------------------------------------------------------------------------------
# Selective answering
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Selective:
    """Accuracy-coverage curve (answer the most confident first) and the summary figures taken from it."""

    n: int
    aurc: float  # area under the risk-coverage curve: mean over k of (1 - accuracy of the top k); lower is better
    accuracy_at: dict[str, float]  # "50%" -> accuracy of the most confident ceil(50% of n) items
    coverage_at: dict[str, float] = field(default_factory=dict)  # "50%" -> the coverage really used, ceil(c n) / n
    coverage: list[float] = field(default_factory=list, repr=False)  # k / n, k = 1..n
    accuracy: list[float] = field(default_factory=list, repr=False)  # accuracy of the top k
    threshold: list[float] = field(default_factory=list, repr=False)  # confidence of the k-th item

    @property
    def area_accuracy_coverage(self) -> float:
        return 1.0 - self.aurc

    def to_dict(self, curve: bool = True) -> dict:
        d = asdict(self)
        if not curve:
            for k in ("coverage", "accuracy", "threshold"):
                d.pop(k)
        d["area_accuracy_coverage"] = self.area_accuracy_coverage
        d["definition"] = "AURC = mean over k=1..n of the risk (1 - accuracy) of the k most confident items"
        return _clean(d)

    def to_markdown(self) -> str:
        cols = list(self.accuracy_at)
        return ("| AURC (risk-coverage, lower is better) | " + " | ".join(f"accuracy at {c} coverage" for c in cols)
                + " |\n|---|" + "---|" * len(cols) + f"\n| {self.aurc:.4f} | "
                + " | ".join(_fmt(self.accuracy_at[c]) for c in cols) + " |\n")


def _ranked(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf, hit = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if conf.shape != hit.shape or conf.ndim != 1 or conf.size == 0:
        raise ValueError(f"selective answering: need equal-length non-empty 1-D confidence and correctness, got "
                         f"{conf.shape} and {hit.shape}")
    order = np.argsort(-conf, kind="stable")  # most confident first, ties in input order
    return conf[order], hit[order]


def selective(confidence: np.ndarray, correct: np.ndarray, *,
              coverages: Sequence[float] = COVERAGES) -> Selective:
    """The accuracy-coverage curve, its AURC and the accuracy at each coverage (top ceil(c * n) items)."""
    conf, hit = _ranked(confidence, correct)
    n = conf.size
    k = np.arange(1, n + 1)
    acc = np.cumsum(hit) / k
    at, cov = {}, {}
    for c in coverages:
        if not 0 < c <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {c}")
        m = max(1, math.ceil(c * n - 1e-9))
        at[f"{c:.0%}"], cov[f"{c:.0%}"] = float(acc[m - 1]), m / n
    return Selective(n=n, aurc=float(np.mean(1.0 - acc)), accuracy_at=at, coverage_at=cov,
                     coverage=(k / n).tolist(), accuracy=acc.tolist(), threshold=conf.tolist())


@dataclass
class TargetAccuracy:
    """The confidence threshold reaching `target` accuracy, chosen on one seeded half and reported on the other."""

    target: float
    seed: int
    threshold: float | None  # answer when confidence >= threshold; None: no threshold reaches the target
    n_select: int
    select_coverage: float
    select_accuracy: float
    n_report: int
    report_answered: int
    report_coverage: float
    report_accuracy: float  # nan when the report half answers nothing

    @property
    def reached(self) -> bool:
        return self.threshold is not None and self.report_answered > 0 and self.report_accuracy >= self.target

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reached_on_report_half"] = self.reached
        return _clean(d)

    def to_markdown(self) -> str:
        if self.threshold is None:
            return (f"Target accuracy {self.target:.0%}: no confidence threshold reaches it on the selection half "
                    f"({self.n_select} items, seed {self.seed}); answering nothing is the only way.\n")
        return (f"Target accuracy {self.target:.0%}: answer when confidence >= {self.threshold:.4f} (chosen on a "
                f"seeded half, {self.n_select} items, seed {self.seed}: coverage {self.select_coverage:.1%}, "
                f"accuracy {self.select_accuracy:.3f}). On the other {self.n_report} items it answers "
                f"{self.report_answered} (coverage {self.report_coverage:.1%}) with accuracy "
                f"{_fmt(self.report_accuracy)} - the held-out figure"
                + ("" if self.reached else ", below the target") + ".\n")


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest confidence t such that the items with confidence >= t are at least `target` accurate (the largest
    coverage reaching the target); None when no t does. Ties are kept together: a threshold takes all items at it."""
    conf, hit = _ranked(confidence, correct)
    acc = np.cumsum(hit) / np.arange(1, conf.size + 1)
    last_of_tie = np.append(conf[1:] != conf[:-1], True)  # candidate cut points: after the last item of each value
    ok = np.flatnonzero(last_of_tie & (acc >= target - 1e-12))
    return None if ok.size == 0 else float(conf[ok[-1]])


def target_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float, *, seed: int = 0) -> TargetAccuracy:
    """Split the items in two by a seeded permutation (numpy default_rng(seed)); choose the threshold on the first
    half (`choose_threshold`) and report coverage and accuracy at that threshold on the second."""
    conf, hit = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if not 0 < target <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target}")
    if conf.shape != hit.shape or conf.ndim != 1 or conf.size < 2:
        raise ValueError(f"target accuracy: need >= 2 items with a confidence each, got {conf.shape}, {hit.shape}")
    perm = np.random.default_rng(seed).permutation(conf.size)
    sel, rep = perm[: conf.size // 2], perm[conf.size // 2:]
    t = choose_threshold(conf[sel], hit[sel], target)
    ans_s = conf[sel] >= t if t is not None else np.zeros(sel.size, dtype=bool)
    ans_r = conf[rep] >= t if t is not None else np.zeros(rep.size, dtype=bool)
    return TargetAccuracy(
        target=target, seed=seed, threshold=t, n_select=int(sel.size), select_coverage=float(ans_s.mean()),
        select_accuracy=float(hit[sel][ans_s].mean()) if ans_s.any() else math.nan, n_report=int(rep.size),
        report_answered=int(ans_r.sum()), report_coverage=float(ans_r.mean()),
        report_accuracy=float(hit[rep][ans_r].mean()) if ans_r.any() else math.nan)


__all__ = ["ItemPredictions", "read_predictions", "predictions_from_records", "log_softmax", "mcnemar_exact",
           "paired_bootstrap", "PairedComparison", "align", "compare", "compare_files", "Calibration", "calibration",
           "Selective", "selective", "TargetAccuracy", "choose_threshold", "target_accuracy"]
