"""Our per-item predictions in lm-evaluation-harness's output layout, so the numbers drop into its tooling.

Matched against lm-evaluation-harness 0.4.13.dev0 (EleutherAI/lm-evaluation-harness @ 4e7e0d4, read with the search
tools, and DESIGN.md's record of a 0.4.13 run here):
- results JSON: `lm_eval/evaluator_utils.py` `EvalAcc._to_eval_results` (keys `results`, `group_subtasks`, `configs`,
  `versions`, `n-shot`, `higher_is_better`, `n-samples` = {"original", "effective"}) and `_collect_results` (per task
  `name`, `alias`, `sample_len`, then `"<metric>,<filter>"` and `"<metric>_stderr,<filter>"` with filter "none");
  `simple_evaluate`'s `config` block (`lm_eval/evaluator.py`); `task_hashes` from
  `loggers/evaluation_tracker.py save_results_aggregated` (sha256 of the concatenated doc/prompt/target hashes).
- `acc_stderr` = `api/metrics.py mean_stderr` = sample std (n - 1) / sqrt(n) = sqrt(p (1 - p) / (n - 1)).
- samples JSONL: `evaluator.py` (`doc_id`, `doc`, `target`, `arguments`, `resps`, `filtered_resps`, `filter`,
  `metrics`, `doc_hash`, `prompt_hash`, `target_hash`, then the per-sample metrics such as `acc`), sanitised as
  `save_results_samples` does: `arguments` becomes {"gen_args_i": {"arg_0": context, "arg_1": continuation}}, every
  value inside `resps` / `filtered_resps` is a string, `target` is a string. A multiple-choice request's response is
  (log-likelihood, is_greedy): `resps` = per choice [[ll, is_greedy]], `filtered_resps` = per choice [ll, is_greedy].
- `acc` = 1 when argmax of the choice log-likelihoods is the gold index (`api/task.py process_results`,
  multiple_choice); `acc_norm` uses the per-character scores. lm-eval's task names: `medqa_4options` (target = the gold
  index, version "Yaml"), `pubmedqa` (target = the gold word, version 1.0).
Deliberate differences (medical text stays out of our files): `doc` carries our item id, the labels and the gold label,
not the question; `arguments` carries the continuations with an empty context; `doc_hash` hashes that doc, and
`prompt_hash` is the hash the caller passes (of the prompt text) or "". `doc_id` is the item's position in our file.
`is_greedy` is written "None" when the per-item file does not record it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .io import atomic_write_json, atomic_write_text
from .metrics import ItemPredictions, _clean

LM_EVAL_TASKS = {"medqa": ("medqa_4options", "Yaml", "index"), "pubmedqa": ("pubmedqa", 1.0, "label")}


def hash_string(s: str) -> str:
    """lm-eval's `utils.hash_string`: sha256 hex of the UTF-8 string."""
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def acc_stderr(values: np.ndarray) -> float | str:
    """lm-eval's `mean_stderr` of 0/1 values: sample std (ddof=1) / sqrt(n); "N/A" for a single item, as it writes."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return "N/A"
    return float(math.sqrt(float(np.sum((v - v.mean()) ** 2)) / (v.size - 1)) / math.sqrt(v.size))


def _task_info(task: str, task_name: str | None) -> tuple[str, Any, str]:
    name, version, target_as = LM_EVAL_TASKS.get(task, (f"qlora70_{task}", "Yaml", "index"))
    return task_name or name, version, target_as


def _argmax_hits(pred: ItemPredictions) -> np.ndarray:
    pred.need_scores("lm-eval output")
    return (np.argmax(pred.logliks, axis=1) == pred.gold).astype(np.float64)


def lm_eval_samples(task: str, pred: ItemPredictions, *, pred_norm: ItemPredictions | None = None,
                    task_name: str | None = None, continuations: Sequence[Sequence[str]] | None = None,
                    prompt_hashes: Sequence[str] | None = None) -> list[dict]:
    """One lm-eval sample record per item (see the module docstring). `pred_norm`: the same items read with
    score_key="scores_norm" (option modes) adds `acc_norm`. `continuations[i]`: item i's scored continuations
    (default " " + label, lm-eval's `target_delimiter` + choice)."""
    hits = _argmax_hits(pred)
    hits_norm = _argmax_hits(pred_norm) if pred_norm is not None else None
    if pred_norm is not None and pred_norm.ids != pred.ids:
        raise ValueError(f"lm-eval samples: {pred_norm.source} (normalized scores) lists other ids than {pred.source}")
    _, _, target_as = _task_info(task, task_name)
    out = []
    for i, rid in enumerate(pred.ids):
        labels = pred.labels[i]
        lls = [float(x) for x in pred.logliks[i, :len(labels)]]
        greedy = pred.is_greedy[i] if pred.is_greedy is not None else [None] * len(labels)
        gold = int(pred.gold[i])
        target = labels[gold] if target_as == "label" else gold
        doc = {"qlora70_id": rid, "choices": list(labels), "gold": labels[gold]}
        conts = list(continuations[i]) if continuations is not None else [" " + lab for lab in labels]
        metrics = {"acc": float(hits[i])}
        if hits_norm is not None:
            metrics["acc_norm"] = float(hits_norm[i])
        out.append({
            "doc_id": i, "doc": doc, "target": str(target),
            "arguments": {f"gen_args_{j}": {"arg_0": "", "arg_1": c} for j, c in enumerate(conts)},
            "resps": [[[str(ll), str(g)]] for ll, g in zip(lls, greedy)],
            "filtered_resps": [[str(ll), str(g)] for ll, g in zip(lls, greedy)],
            "filter": "none", "metrics": list(metrics),
            "doc_hash": hash_string(json.dumps(doc, indent=2, ensure_ascii=False)),
            "prompt_hash": prompt_hashes[i] if prompt_hashes is not None else "",
            "target_hash": hash_string(str(target)), **metrics})
    return out


def lm_eval_results(task: str, pred: ItemPredictions, *, pred_norm: ItemPredictions | None = None,
                    task_name: str | None = None, n_original: int | None = None, k_shot: int = 0,
                    model: str = "", model_args: str = "", batch_size: int | None = None, device: str | None = None,
                    limit: int | None = None, seed: int = 0, fewshot_seed: int | None = None,
                    samples: list[dict] | None = None, extra: dict | None = None) -> dict:
    """The results JSON lm-eval's `simple_evaluate` + `save_results_aggregated` write, for one task.
    `n_original`: items available before `limit` (default: those scored); `extra`: our own settings, stored under
    `configs.<task>.metadata.qlora70`."""
    name, version, _ = _task_info(task, task_name)
    hits = _argmax_hits(pred)
    n = len(pred)
    res: dict[str, Any] = {"name": name, "alias": name, "sample_len": n, "acc,none": float(hits.mean()),
                           "acc_stderr,none": acc_stderr(hits)}
    hib = {"acc": True}
    metric_list = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    if pred_norm is not None:
        hn = _argmax_hits(pred_norm)
        res.update({"acc_norm,none": float(hn.mean()), "acc_norm_stderr,none": acc_stderr(hn)})
        hib["acc_norm"] = True
        metric_list.append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
    labels = pred.labels[0] if pred.labels and all(lab == pred.labels[0] for lab in pred.labels) else None
    cfg = {"task": name, "output_type": "multiple_choice", "doc_to_choice": labels, "target_delimiter": " ",
           "fewshot_delimiter": "\n\n", "num_fewshot": k_shot, "metric_list": metric_list,
           "metadata": {"version": version, "qlora70": _clean(extra or {})}}
    if samples is None:
        samples = lm_eval_samples(task, pred, pred_norm=pred_norm, task_name=task_name)
    return _clean({
        "results": {name: res}, "group_subtasks": {name: []}, "configs": {name: cfg}, "versions": {name: version},
        "n-shot": {name: k_shot}, "higher_is_better": {name: hib},
        "n-samples": {name: {"original": n if n_original is None else int(n_original), "effective": n}},
        "config": {"model": model, "model_args": model_args, "batch_size": batch_size, "device": device,
                   "use_cache": None, "limit": limit, "bootstrap_iters": 100000, "gen_kwargs": None,
                   "random_seed": seed, "numpy_seed": seed, "torch_seed": seed,
                   "fewshot_seed": seed if fewshot_seed is None else fewshot_seed},
        "task_hashes": {name: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                                  for s in samples))},
        "model_name": model, "date": time.time(), "written_by": "qlora70 (lm-evaluation-harness 0.4.13 layout)"})


def write_lm_eval(out_dir: str | os.PathLike, task: str, pred: ItemPredictions, *, date_id: str | None = None,
                  task_name: str | None = None, **kwargs: Any) -> dict[str, str]:
    """Write `results_<date_id>.json` and `samples_<task>_<date_id>.jsonl` (lm-eval's file names) under `out_dir`,
    atomically; returns their paths. `date_id` defaults to lm-eval's `datetime.now().isoformat()` with ':' -> '-'."""
    date_id = date_id or datetime.now().isoformat().replace(":", "-")
    name, _, _ = _task_info(task, task_name)
    samples = lm_eval_samples(task, pred, pred_norm=kwargs.get("pred_norm"), task_name=task_name,
                              continuations=kwargs.pop("continuations", None),
                              prompt_hashes=kwargs.pop("prompt_hashes", None))
    results = lm_eval_results(task, pred, task_name=task_name, samples=samples, **kwargs)
    out = Path(out_dir)
    paths = {"results": out / f"results_{date_id}.json", "samples": out / f"samples_{name}_{date_id}.jsonl"}
    atomic_write_json(paths["results"], results)
    atomic_write_text(paths["samples"], "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return {k: str(v) for k, v in paths.items()}
