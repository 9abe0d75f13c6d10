"""qlora70.metrics: paired tests, calibration, selective answering, shot robustness and lm-eval output, against values
worked out by hand (written in the tests) and against the per-item files the current evaluation code writes."""
from __future__ import annotations

import json
import re
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora70 import metrics as M
from qlora70 import metrics_report as R
from qlora70.metrics_lmeval import acc_stderr, lm_eval_results, lm_eval_samples, write_lm_eval

DATA = Path(__file__).resolve().parent.parent / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(correct, scores=None, gold=None, prefix="q"):
    """Per-item dicts in the layout `qlora70.evaluate` writes (`scores` = {label: log-likelihood} in label order)."""
    out = []
    for i, c in enumerate(correct):
        r = {"id": f"{prefix}{i}", "group": "", "gold": "A" if gold is None else gold[i], "pred": "A",
             "correct": bool(c), "truncated": False}
        if scores is not None:
            r["scores"] = dict(zip("ABCDEFGH", map(float, scores[i])))
        out.append(r)
    return out


def pred_from(correct, prefix="q"):
    return M.predictions_from_records(records(correct, prefix=prefix), "test")


# ---- McNemar ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, c, want", [
    # by hand: P[X <= k], X ~ Bin(n, 1/2) = sum_{i<=k} C(n, i) / 2^n; p = min(1, 2 * that)
    (2, 8, 2 * (1 + 10 + 45) / 1024),          # n=10, k=2: 2 * 56/1024 = 0.109375
    (8, 2, 2 * (1 + 10 + 45) / 1024),          # symmetric
    (1, 9, 2 * (1 + 10) / 1024),               # 0.021484375
    (0, 6, 2 * 1 / 64),                        # 0.03125
    (0, 5, 2 * 1 / 32),                        # 0.0625: 5 flips one way is not enough at 0.05
    (5, 5, 1.0),                               # 2 * 638/1024 > 1 -> 1
    (0, 0, 1.0),                               # no discordant pairs
    (3, 4, 1.0),                               # 2 * (1+7+21+35)/128 = 1
    (4, 16, 2 * (1 + 20 + 190 + 1140 + 4845) / 2 ** 20),  # 0.011818...
])
def test_mcnemar_exact_hand_values(b, c, want):
    assert M.mcnemar_exact(b, c) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("b, c", [(400, 480), (4000, 4100), (20000, 20000), (1, 30000)])
def test_mcnemar_large_n_no_overflow_matches_log_space(b, c):
    p = M.mcnemar_exact(b, c)
    n, k = b + c, min(b, c)
    # independent log-space sum with lgamma
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    m = max(logs)
    ref = min(1.0, 2 * math.exp(m) * sum(math.exp(v - m) for v in logs))
    assert math.isfinite(p) and 0 <= p <= 1
    assert p == pytest.approx(ref, rel=1e-9, abs=1e-300)
    # exact rational check on the smaller case
    if n < 1000:
        tail = sum(Fraction(math.comb(n, i), 2 ** n) for i in range(k + 1))
        assert p == pytest.approx(float(min(1, 2 * tail)), rel=1e-15)


@pytest.mark.parametrize("n, k", [(30, 9), (2001, 950), (19999, 9800), (30000, 14700)])
def test_mcnemar_log_space_tail_equals_exact_tail(n, k):
    from qlora70.metrics import _half_tail_exact, _half_tail_log
    assert _half_tail_log(n, k) == pytest.approx(_half_tail_exact(n, k), rel=1e-9)


def test_mcnemar_huge_n_is_fast_and_sane():
    assert M.mcnemar_exact(500_000, 500_000) == 1.0
    p = M.mcnemar_exact(100_000, 102_000)  # z = 2000 / sqrt(202000) = 4.45: normal approximation ~8.6e-6
    assert 1e-6 < p < 1e-4


def test_mcnemar_rejects_bad_counts():
    with pytest.raises(ValueError, match="non-negative integers"):
        M.mcnemar_exact(-1, 3)


# ---- paired comparison and bootstrap ----------------------------------------------------------------------------

def test_compare_flip_table_and_pvalue():
    # 20 items: 6 both right, 2 right->wrong, 8 wrong->right, 4 both wrong
    a = [1] * 6 + [1] * 2 + [0] * 8 + [0] * 4
    b = [1] * 6 + [0] * 2 + [1] * 8 + [0] * 4
    r = M.compare(pred_from(a), pred_from(b), n_resamples=2000, seed=1)
    assert (r.both_right, r.right_to_wrong, r.wrong_to_right, r.both_wrong) == (6, 2, 8, 4)
    assert r.accuracy_a == pytest.approx(8 / 20) and r.accuracy_b == pytest.approx(14 / 20)
    assert r.difference == pytest.approx(0.3)
    assert r.p_value == pytest.approx(0.109375)
    assert not r.significant and r.verdict.startswith("not significant at 0.05")
    d = r.to_dict()
    assert d["significant"] is False and d["ci95"][0] <= 0.3 <= d["ci95"][1]
    md = r.to_markdown()
    assert "| 2 (right->wrong) |" in md and "| 8 (wrong->right) |" in md and "Verdict" in md


def test_compare_significant_verdict():
    a = [0] * 12 + [1] * 8
    b = [1] * 12 + [1] * 8
    r = M.compare(pred_from(a), pred_from(b), n_resamples=1000)
    assert r.p_value == pytest.approx(2 / 4096) and r.significant
    assert r.verdict.startswith("significant at 0.05") and "better" in r.verdict


def test_compare_matches_by_id_not_position():
    a = pred_from([1, 0, 1, 0])
    recs = records([1, 0, 1, 0])[::-1]  # same items, other order
    b = M.predictions_from_records(recs, "b")
    r = M.compare(a, b, n_resamples=500)
    assert r.right_to_wrong == 0 and r.wrong_to_right == 0 and r.p_value == 1.0


def test_compare_mismatched_ids_is_an_error_unless_intersect():
    a = pred_from([1, 0, 1, 1])
    b = M.predictions_from_records(records([1, 1, 1], prefix="q")[:2] + records([0], prefix="z"), "b.jsonl")
    with pytest.raises(ValueError, match=r"2 ids only in test .*1 only in b.jsonl"):
        M.compare(a, b)
    r = M.compare(a, b, intersect=True, n_resamples=200)
    assert r.n == 2 and r.n_only_a == 2 and r.n_only_b == 1 and "shared ids" in r.to_markdown()


def test_bootstrap_interval_covers_the_true_difference():
    # population: P(A right) = 0.6, P(B right) = 0.7 per item, drawn jointly -> true difference 0.10
    rng = np.random.default_rng(7)
    hits = 0
    trials = 40
    for t in range(trials):
        u = rng.random(300)
        a, b = u < 0.6, (u < 0.6) | ((u >= 0.6) & (u < 0.7))  # correlated: B fixes 10% and breaks none
        flip = rng.random(300) < 0.1  # plus independent noise on both sides
        b = np.where(flip, rng.random(300) < 0.7, b)
        a = np.where(flip, rng.random(300) < 0.6, a)
        lo, hi = M.paired_bootstrap(a, b, n_resamples=2000, seed=t)
        assert lo <= float(b.mean() - a.mean()) <= hi
        hits += lo <= 0.1 <= hi
    assert hits >= 0.85 * trials  # nominal 95%; 40 trials


def test_bootstrap_is_seeded_and_identical_runs_give_zero():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=bool)
    b = np.array([1, 1, 1, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    assert M.paired_bootstrap(a, b, seed=3) == M.paired_bootstrap(a, b, seed=3)
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 201)) < 0.5  # a larger set: the interval ends are not on a coarse grid
    assert M.paired_bootstrap(x, y, seed=3) == M.paired_bootstrap(x, y, seed=3)
    assert M.paired_bootstrap(x, y, seed=3) != M.paired_bootstrap(x, y, seed=4)
    assert M.paired_bootstrap(a, a) == (0.0, 0.0)
    lo, hi = M.paired_bootstrap(a, b)
    assert -0.3 <= lo < 0.1 < hi <= 0.5  # observed difference +0.1 (2 fixed, 1 broken of 10)


def test_bootstrap_resamples_items_jointly():
    # B = A on every item: any joint resample gives difference 0; an independent one would not
    a = np.random.default_rng(0).random(500) < 0.5
    assert M.paired_bootstrap(a, a.copy(), n_resamples=3000) == (0.0, 0.0)


# ---- calibration ------------------------------------------------------------------------------------------------

HAND_P = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.18, 0.62, 0.2]])
HAND_GOLD = np.array([0, 1, 0, 2])


def test_calibration_hand_values():
    # confidences 0.7 (right), 0.5 (wrong), 0.9 (right), 0.62 (wrong): four different 1/15 bins
    # ECE = (|1-0.7| + |0-0.5| + |1-0.9| + |0-0.62|) / 4 = 1.52 / 4 = 0.38
    # Brier: 0.09+0.04+0.01=0.14; 0.25+0.49+0.04=0.78; 0.01+0.0025+0.0025=0.015; 0.0324+0.3844+0.64=1.0568
    #        mean 1.9918 / 4 = 0.49795
    # NLL: -(ln 0.7 + ln 0.3 + ln 0.9 + ln 0.2) / 4 = 0.818862...
    shift = np.array([[3.0], [-50.0], [0.0], [7.5]])  # softmax ignores a per-item constant
    recs = records([1, 0, 1, 0], scores=np.log(HAND_P) + shift, gold=["A", "B", "A", "C"])
    p = M.predictions_from_records(recs, "hand")
    np.testing.assert_allclose(p.probs(), HAND_P, atol=1e-12)
    cal = M.calibration(p.log_probs(), p.gold)
    assert cal.n_bins == 15 and len(cal.bins) == 4
    assert cal.ece == pytest.approx(0.38, abs=1e-12)
    assert cal.brier == pytest.approx(0.49795, abs=1e-12)
    assert cal.nll == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.9) + math.log(0.2)) / 4, abs=1e-12)
    assert cal.accuracy == 0.5 and cal.mean_confidence == pytest.approx((0.7 + 0.5 + 0.9 + 0.62) / 4)
    assert "15 equal-width bins" in cal.to_markdown() and "15 equal-width" in cal.to_dict()["binning"]


def test_ece_pools_items_within_a_bin():
    # 0.70 (right) and 0.72 (wrong) share the bin (0.667, 0.733]: |0.5 - 0.71| = 0.21, not (0.3 + 0.72) / 2
    lp = np.log(np.array([[0.70, 0.30], [0.72, 0.28]]))
    cal = M.calibration(lp, np.array([0, 1]))
    assert len(cal.bins) == 1 and cal.bins[0]["n"] == 2
    assert cal.ece == pytest.approx(0.21, abs=1e-12)
    assert M.calibration(lp, np.array([0, 1]), n_bins=100).ece == pytest.approx(0.51, abs=1e-12)


def test_padded_choices_usmle_style():
    recs = records([1, 1], gold=["A", "E"])
    recs[0]["scores"] = {"A": -0.1, "B": -3.0, "C": -4.0, "D": -5.0}
    recs[1]["scores"] = {"A": -3.0, "B": -3.0, "C": -3.0, "D": -3.0, "E": -0.2, "F": -3.0}
    p = M.predictions_from_records(recs, "u")
    assert p.logliks.shape == (2, 6) and np.isneginf(p.logliks[0, 4:]).all()
    np.testing.assert_allclose(p.probs().sum(axis=1), 1.0)
    assert p.probs()[0, 4:].tolist() == [0.0, 0.0] and list(p.gold) == [0, 4]
    assert math.isfinite(M.calibration(p.log_probs(), p.gold).brier)


# ---- selective answering ----------------------------------------------------------------------------------------

def test_coverage_curve_hand_values_and_aurc():
    conf = np.array([0.6, 0.9, 0.3, 0.8])
    hit = np.array([1, 1, 1, 0], dtype=bool)
    # sorted by confidence: 0.9 R, 0.8 W, 0.6 R, 0.3 R -> accuracy of top k: 1, 1/2, 2/3, 3/4
    s = M.selective(conf, hit)
    np.testing.assert_allclose(s.accuracy, [1, 0.5, 2 / 3, 0.75])
    np.testing.assert_allclose(s.coverage, [0.25, 0.5, 0.75, 1.0])
    assert s.threshold == [0.9, 0.8, 0.6, 0.3]
    assert s.aurc == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)  # 13/48
    assert s.area_accuracy_coverage == pytest.approx(1 - 13 / 48)
    assert s.accuracy_at == {"50%": 0.5, "80%": 0.75, "100%": 0.75}  # 80% of 4 -> top ceil(3.2) = 4
    assert s.coverage_at == {"50%": 0.5, "80%": 1.0, "100%": 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_curve_monotone_on_sorted_confidences(seed):
    rng = np.random.default_rng(seed)
    conf = rng.random(257)
    hit = np.sort(conf)[::-1] > 0.4  # correctness perfectly ranked by confidence
    conf_sorted = np.sort(conf)[::-1]
    s = M.selective(conf_sorted, hit)
    assert np.all(np.diff(s.coverage) > 0) and np.all(np.diff(s.threshold) <= 0)
    assert np.all(np.diff(s.accuracy) <= 1e-15)  # answering less-confident items never raises accuracy here
    # same curve when the input comes shuffled
    perm = rng.permutation(257)
    np.testing.assert_allclose(M.selective(conf_sorted[perm], hit[perm]).accuracy, s.accuracy)
    assert s.accuracy_at["100%"] == pytest.approx(hit.mean())


def test_choose_threshold_hand_and_ties():
    conf = np.array([0.95, 0.9, 0.8, 0.8, 0.7, 0.5])
    hit = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    # top-k accuracies at tie ends: k=1 1.0, k=2 1.0, k=4 (both 0.8) 0.75, k=5 0.8, k=6 4/6
    assert M.choose_threshold(conf, hit, 0.8) == 0.7
    assert M.choose_threshold(conf, hit, 0.9) == 0.9  # k=3 (0.8 alone, acc 1.0) is not allowed: it splits a tie
    assert M.choose_threshold(conf, hit, 0.6) == 0.5
    assert M.choose_threshold(np.array([0.9, 0.8]), np.array([0, 0], dtype=bool), 0.5) is None


def test_target_threshold_is_chosen_on_one_half_only():
    rng = np.random.default_rng(5)
    conf = rng.random(200)
    hit = rng.random(200) < conf  # higher confidence, more often right
    t = M.target_accuracy(conf, hit, 0.8, seed=11)
    perm = np.random.default_rng(11).permutation(200)
    sel, rep = perm[:100], perm[100:]
    assert t.n_select == 100 and t.n_report == 100
    assert t.threshold == M.choose_threshold(conf[sel], hit[sel], 0.8)
    # relabelling the report half changes the reported figures, never the threshold
    hit2 = hit.copy()
    hit2[rep] = ~hit2[rep]
    t2 = M.target_accuracy(conf, hit2, 0.8, seed=11)
    assert t2.threshold == t.threshold and t2.report_coverage == t.report_coverage
    assert t2.report_accuracy != t.report_accuracy
    # relabelling the selection half does move it (the test can fail)
    hit3 = hit.copy()
    hit3[sel] = conf[sel] > 0.5
    assert M.target_accuracy(conf, hit3, 0.8, seed=11).threshold != t.threshold
    ans = conf[rep] >= t.threshold
    assert t.report_answered == ans.sum() and t.report_accuracy == pytest.approx(hit[rep][ans].mean())
    assert "held-out" in t.to_markdown() and t.to_dict()["threshold"] == t.threshold


def test_target_unreachable():
    t = M.target_accuracy(np.linspace(0.3, 0.9, 10), np.zeros(10, dtype=bool), 0.9, seed=0)
    assert t.threshold is None and t.report_answered == 0 and not t.reached
    assert "no confidence threshold" in t.to_markdown() and t.to_dict()["report_accuracy"] is None


# ---- few-shot robustness ----------------------------------------------------------------------------------------

def test_shot_robustness():
    r = R.shot_robustness([0.50, 0.60, 0.70, 0.40], seeds=[0, 1, 2, 3], k_shot=3)
    # mean 0.55; sample std sqrt(((-.05)^2 + .05^2 + .15^2 + (-.15)^2) / 3) = sqrt(0.05/3) = 0.129099...
    assert r.mean == pytest.approx(0.55) and r.std == pytest.approx(math.sqrt(0.05 / 3))
    assert (r.min, r.max, r.seeds) == (0.4, 0.7, [0, 1, 2, 3])
    assert "| 3 | 0, 1, 2, 3 | 0.550 |" in r.to_markdown()
    assert math.isnan(R.shot_robustness([0.5], [0], 1).std) and R.shot_robustness([0.5], [0], 1).to_dict()["std"] is None
    with pytest.raises(ValueError, match="seeds must differ"):
        R.shot_robustness([0.5, 0.6], [1, 1], 3)


# ---- readers: errors name the file and the field ------------------------------------------------------------------

def test_reader_errors_name_file_and_field(tmp_path):
    f = tmp_path / "x_predictions.jsonl"
    f.write_text(json.dumps({"id": "a", "gold": "A", "pred": "A"}) + "\n")
    with pytest.raises(ValueError, match=r"x_predictions.jsonl: record 1 \(id a\): required field 'correct'"):
        M.read_predictions(f)
    f.write_text('{"id": "a", "correct": true}\nnot json\n')
    with pytest.raises(ValueError, match=r"x_predictions.jsonl: line 2 is not valid JSON"):
        M.read_predictions(f)
    f.write_text("".join(json.dumps(r) + "\n" for r in records([1, 0]) + records([1])))
    with pytest.raises(ValueError, match="id 'q0' appears twice"):
        M.read_predictions(f)
    # a generate-mode file: fine for the paired test, a clear error for calibration
    f.write_text("".join(json.dumps(r) + "\n" for r in records([1, 0, 1])))
    p = M.read_predictions(f)
    assert p.accuracy == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"x_predictions.jsonl: calibration .* needs per-choice log-likelihoods.*"
                                         r"record 1 \(id q0\) has no 'scores'"):
        R.item_metrics(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.read_predictions(tmp_path / "nope.jsonl")
    bad = records([1], scores=[[-1.0, -2.0]], gold=["C"])
    with pytest.raises(ValueError, match=r"gold label 'C' is not one of the scored labels \['A', 'B'\]"):
        M.predictions_from_records(bad, "f")


def test_reader_accepts_explicit_probability_fields():
    base = {"id": "a", "gold": "B", "pred": "B", "correct": True}
    p1 = M.predictions_from_records([{**base, "labels": ["A", "B"], "logliks": [-2.0, -0.5], "gold_index": 1}], "f")
    p2 = M.predictions_from_records([{**base, "labels": ["A", "B"], "probs": p1.probs()[0].tolist()}], "f")
    p3 = M.predictions_from_records([{**base, "scores": {"A": -2.0, "B": -0.5}}], "f")
    for p in (p2, p3):
        np.testing.assert_allclose(p.probs(), p1.probs(), atol=1e-12)
        assert p.gold.tolist() == [1]
    # score_key="scores_norm" reads that dict even when the raw `logliks` are there too
    both = {**base, "labels": ["A", "B"], "logliks": [-2.0, -0.5], "scores_norm": {"A": -0.1, "B": -0.4}}
    pn = M.predictions_from_records([both], "f", score_key="scores_norm")
    assert pn.logliks.tolist() == [[-0.1, -0.4]] and pn.gold.tolist() == [1]
    assert M.predictions_from_records([both], "f").logliks.tolist() == [[-2.0, -0.5]]
    with pytest.raises(ValueError, match="summing to 1"):
        M.predictions_from_records([{**base, "labels": ["A", "B"], "probs": [0.5, 0.6]}], "f")


# ---- the files the current evaluation writes ----------------------------------------------------------------------

class ByteTokenizer:
    """Bytes + 3 as ids (0 pad, 1 BOS, 2 EOS): enough of qlora70's tokenizer interface for evaluate."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 259

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [1] * bos + [b + 3 for b in text.encode("utf-8")] + [2] * eos

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def bigram_model(seed: int):
    w = torch.randn(259, 259, generator=torch.Generator().manual_seed(seed)) * 3
    return lambda ids: w[ids]  # (B, T) -> (B, T, V): next-token logits from the last token


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    E = pytest.importorskip("qlora70.evaluate")
    out = tmp_path_factory.mktemp("eval")
    tok = ByteTokenizer()
    paths = {}
    for name, seed in (("before", 0), ("after", 1)):
        rep = E.evaluate_task(bigram_model(seed), tok, "medqa", DATA / "medqa/US_4options_test_200.jsonl",
                              limit=40, seed=0, progress=False, name=name, max_length=4096)
        paths[name] = Path(rep.save(out, stem=f"medqa_{name}")["predictions"])
        paths[name + "_report"] = rep
    return paths


def test_reads_the_predictions_file_evaluate_writes(evaluated):
    p = M.read_predictions(evaluated["before"])
    rep = evaluated["before_report"]
    assert len(p) == rep.n_scored == 40 and p.accuracy == pytest.approx(rep.accuracy)
    assert p.logliks.shape == (40, 4) and all(lab == ["A", "B", "C", "D"] for lab in p.labels)
    # the argmax of the softmax is the prediction evaluate made; the gold index is the gold label's position
    for i, r in enumerate(rep.predictions):
        assert "ABCD"[int(np.argmax(p.probs()[i]))] == r["pred"] and "ABCD"[p.gold[i]] == r["gold"]
    m = R.item_metrics(p, target=0.3, seed=0)
    assert m.calibration.accuracy == pytest.approx(rep.accuracy)
    assert m.selective.accuracy_at["100%"] == pytest.approx(rep.accuracy)


def test_compare_files_evaluate_writes(evaluated):
    r = M.compare_files(evaluated["before"], evaluated["after"], n_resamples=1000)
    a, b = evaluated["before_report"], evaluated["after_report"]
    assert (r.name_a, r.name_b) == ("medqa_before", "medqa_after") and r.n == 40
    assert r.difference == pytest.approx(b.accuracy - a.accuracy)
    assert r.both_right + r.right_to_wrong == a.n_correct and r.both_right + r.wrong_to_right == b.n_correct


# ---- PNGs ---------------------------------------------------------------------------------------------------------

def test_pngs_written_atomically_and_non_empty(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    n = 300
    ll = rng.normal(size=(n, 4)) * 2
    gold = np.where(rng.random(n) < 0.6, ll.argmax(1), rng.integers(0, 4, n))
    recs = records([0] * n, scores=ll, gold=["ABCD"[g] for g in gold])
    m = R.item_metrics(M.predictions_from_records(recs, "medqa_after"), target=0.7, seed=0)
    paths = m.save_plots(tmp_path / "plots", "medqa_after")
    for key in ("reliability", "coverage"):
        data = Path(paths[key]).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert sorted(os.listdir(tmp_path / "plots")) == ["medqa_after_coverage.png", "medqa_after_reliability.png"]
    # a failing writer leaves no file and no temporary behind
    from qlora70.metrics_plots import plot_reliability
    with pytest.raises(Exception):
        plot_reliability(object(), tmp_path / "plots" / "broken.png")
    assert sorted(os.listdir(tmp_path / "plots")) == ["medqa_after_coverage.png", "medqa_after_reliability.png"]


# ---- lm-eval layout -----------------------------------------------------------------------------------------------

def test_acc_stderr_is_lm_evals_mean_stderr():
    v = np.array([1, 0, 1, 1, 0], dtype=float)  # p = 0.6: sqrt(0.6 * 0.4 / 4) = 0.244948...
    assert acc_stderr(v) == pytest.approx(math.sqrt(0.6 * 0.4 / 4))
    assert acc_stderr(np.array([1.0])) == "N/A"


def test_lm_eval_results_and_samples_layout(tmp_path):
    ll = np.array([[-1.0, -2.0, -3.0, -0.5], [-0.1, -2.0, -3.0, -4.0], [-3.0, -0.2, -1.0, -2.0]])
    recs = records([0, 1, 1], scores=ll, gold=["D", "A", "B"])
    p = M.predictions_from_records(recs, "f")
    samples = lm_eval_samples("medqa", p)
    res = lm_eval_results("medqa", p, n_original=200, k_shot=0, model="m", samples=samples)
    t = res["results"]["medqa_4options"]
    assert t["acc,none"] == pytest.approx(1.0) and t["acc_stderr,none"] == pytest.approx(0.0)
    assert t["sample_len"] == 3 and t["name"] == t["alias"] == "medqa_4options"
    assert res["n-samples"] == {"medqa_4options": {"original": 200, "effective": 3}}
    assert res["versions"] == {"medqa_4options": "Yaml"} and res["n-shot"] == {"medqa_4options": 0}
    assert res["higher_is_better"] == {"medqa_4options": {"acc": True}}
    assert res["configs"]["medqa_4options"]["doc_to_choice"] == ["A", "B", "C", "D"]
    assert {"model", "model_args", "batch_size", "device", "limit", "bootstrap_iters", "random_seed",
            "fewshot_seed"} <= set(res["config"])
    s = samples[0]
    assert set(s) == {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                      "doc_hash", "prompt_hash", "target_hash", "acc"}
    assert s["doc_id"] == 0 and s["target"] == "3" and s["filter"] == "none" and s["metrics"] == ["acc"]
    assert s["resps"] == [[["-1.0", "None"]], [["-2.0", "None"]], [["-3.0", "None"]], [["-0.5", "None"]]]
    assert s["filtered_resps"] == [["-1.0", "None"], ["-2.0", "None"], ["-3.0", "None"], ["-0.5", "None"]]
    assert s["arguments"]["gen_args_3"] == {"arg_0": "", "arg_1": " D"}
    for s in samples:  # lm-eval's acc from what the file says
        lls = [float(r[0][0]) for r in s["resps"]]
        assert s["acc"] == float(int(np.argmax(lls)) == int(s["target"]))
    import hashlib
    assert s["target_hash"] == hashlib.sha256(b"1").hexdigest()
    # PubMedQA: lm-eval's target is the gold word
    pq = M.predictions_from_records([{"id": "1", "gold": "no", "pred": "no", "correct": True,
                                      "scores": {"yes": -2.0, "no": -0.3, "maybe": -4.0}}], "p")
    assert lm_eval_samples("pubmedqa", pq)[0]["target"] == "no"
    paths = write_lm_eval(tmp_path, "pubmedqa", pq, date_id="2026-12-01T12-00-00")
    assert Path(paths["results"]).name == "results_2026-12-01T12-00-00.json"
    assert Path(paths["samples"]).name == "samples_pubmedqa_2026-12-01T12-00-00.jsonl"
    saved = json.loads(Path(paths["results"]).read_text())
    assert saved["results"]["pubmedqa"]["acc_stderr,none"] == "N/A" and saved["versions"]["pubmedqa"] == 1.0
    assert json.loads(Path(paths["samples"]).read_text())["acc"] == 1.0


def test_lm_eval_acc_norm_from_option_scores():
    recs = records([1, 0], scores=[[-1.0, -2.0], [-1.0, -2.0]], gold=["A", "B"])
    recs[0]["scores_norm"] = {"A": -0.5, "B": -0.1}
    recs[1]["scores_norm"] = {"A": -0.5, "B": -0.1}
    p = M.predictions_from_records(recs, "f")
    pn = M.predictions_from_records(recs, "f", score_key="scores_norm")
    res = lm_eval_results("medqa", p, pred_norm=pn)["results"]["medqa_4options"]
    assert res["acc,none"] == 0.5 and res["acc_norm,none"] == 0.5
    s = lm_eval_samples("medqa", p, pred_norm=pn)
    assert [x["acc_norm"] for x in s] == [0.0, 1.0] and s[0]["metrics"] == ["acc", "acc_norm"]


# ---- report assembly ----------------------------------------------------------------------------------------------

def test_before_after_section_one_source_for_each_figure(evaluated, tmp_path):
    pytest.importorskip("matplotlib")
    sec = R.before_after({"medqa": evaluated["before_report"], "usmle": records([1])},
                         {"medqa": evaluated["after_report"]}, plots_dir=tmp_path, target=0.3, n_resamples=1000)
    assert sec.skipped == ["usmle"] and [t.task for t in sec.tasks] == ["medqa"]
    d, md = sec.to_dict(), sec.to_markdown(link_dir=tmp_path)
    t = d["tasks"]["medqa"]
    direct = M.compare(R.as_predictions(evaluated["before"]), R.as_predictions(evaluated["after"]), n_resamples=1000)
    assert t["paired"]["p_value"] == direct.p_value and t["paired"]["ci95"] == list(direct.ci95)
    assert f"| {direct.p_value:.3g} |" in md and f"[{direct.ci95[0]:+.3f}, {direct.ci95[1]:+.3f}]" in md
    for run in ("before", "after"):
        assert f"| {t[run]['calibration']['ece']:.4f} |" in md and f"| {t[run]['selective']['aurc']:.4f} |" in md
    assert set(t["plots"]) == {"reliability_before", "reliability_after", "coverage"}
    for p in t["plots"].values():
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
    assert "](medqa_coverage.png)" in md and "not compared (evaluated only once): usmle" in md
    json.dumps(d)  # report.json-ready


def test_before_after_without_scores_still_pairs(tmp_path):
    sec = R.before_after({"usmle": records([1, 0, 1, 0])}, {"usmle": records([1, 1, 1, 0])}, plots_dir=tmp_path,
                         n_resamples=200)
    t = sec.tasks[0]
    assert t.paired.wrong_to_right == 1 and t.before is None and "needs per-choice log-likelihoods" in t.note
    assert os.listdir(tmp_path) == [] and "calibration skipped" in sec.to_markdown()


def test_shot_seeds():
    assert R.shot_seeds(5, 3) == [5, 6, 7]
    with pytest.raises(ValueError, match="--shot-seeds"):
        R.shot_seeds(0, 0)


@pytest.mark.parametrize("p, ci, want", [
    (0.0527, (0.005, 0.205), r"not significant at 0.05: \+10.5 points .*excludes 0, so the evidence is borderline"),
    (0.30, (-0.05, 0.25), "not significant at 0.05: .*; no change is shown"),
    (0.01, (0.02, 0.2), r"significant at 0.05: after is better than before \(\+10.5 points.*\)$"),
    (0.04, (-0.01, 0.2), "significant at 0.05: .*includes 0, so the evidence is borderline"),
])
def test_verdict_words(p, ci, want):
    r = M.PairedComparison("before", "after", 200, 0.385, 0.49, 0.105, 50, 43, 64, 43, p, ci, 10000, 0)
    assert re.match(want, r.verdict) and r.significant == (p < 0.05)


def test_paired_report_example_on_a_run_directory(evaluated, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import runpy
    ex = runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples" / "paired_report.py"))
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    for k in ("before", "after"):
        (run / "eval" / f"medqa_{k}_predictions.jsonl").write_bytes(evaluated[k].read_bytes())
    assert ex["main"]([str(run), "--resamples", "500", "--target-accuracy", "0.3"]) == 0
    saved = json.loads((run / "paired.json").read_text())
    assert saved["tasks"]["medqa"]["paired"]["n"] == 40 and "McNemar exact" in (run / "paired.md").read_text()
    assert (run / "medqa_coverage.png").read_bytes()[:8] == PNG_MAGIC
    assert ex["main"]([str(tmp_path / "empty")]) == 1 and "no task has both" in capsys.readouterr().err
