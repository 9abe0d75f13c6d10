"""Medical QA evaluation: MedQA-USMLE, PubMedQA, USMLE self-assessment and generic multiple-choice JSONL.

Works with any `model(input_ids (B, T) long) -> logits (B, T, V)` (our `Llama`, or a transformers model wrapped in
`lambda ids: hf(ids).logits`) and any tokenizer with `encode(text, bos=False, eos=False) -> list[int]`, `decode(ids)`,
`bos_id`, `eos_id`, `pad_id`.

Scoring modes (`mode=`):
- "letter": log-likelihood of each answer label as the continuation of the prompt (" A", " B", ... or " yes"/" no"/
  " maybe"), lm-eval-harness style; single-token labels need one forward per question (requests sharing a context are
  served by one row), batched with right padding.
- "option" / "option_norm": log-likelihood of each full option text (" " + text); both the raw sum and the
  length-normalized score (sum / characters of the continuation, lm-eval's acc_norm) are computed and reported; the mode
  picks which one is the headline accuracy.
- "generate": greedy generation, then answer extraction (the reply must start with a label, medAlpaca style; a few
  "the answer is X" forms are also read). Pass `generate_fn(prompt) -> str` (e.g. `qlora70.generate` with a KV cache);
  without it a slow cache-free greedy loop over `model` is used.

Continuations are tokenized as lm-eval does: `ctx = enc(prompt)`, `cont = enc(prompt + target)[len(ctx):]`, the model
reads `(ctx + cont)[:-1]`. Long prompts lose few-shot examples first, then text from the left of the question (or of the
PubMedQA abstract); options and answers are never cut. Reports give accuracy with a Wilson 95% interval, macro-F1 for
PubMedQA, per-group accuracy (USMLE steps, MedQA meta_info), exclusions with reasons, per-item predictions (JSONL: ids,
labels, scores; no question text unless `save_text=True`), a markdown table and a JSON file.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import IGNORE_INDEX, pad_or_eos
from .data import collate, resolve_add_bos
from .io import atomic_write_json, atomic_write_text
from .metrics import predictions_from_records
from .metrics_lmeval import write_lm_eval
from .metrics_report import ItemMetrics, item_metrics
from .prompts import (DEFAULT_FORMAT, FORMATS, PromptFormat, _assemble, _Prompt, _sample_shots,  # noqa: F401
                      build_prompt, get_format, sample_items, split_continuation, split_continuations)
from .scoring import (Z95, _device_of, _logits_at, extract_answer, greedy_generate,  # noqa: F401
                      loglikelihoods, macro_f1, wilson_interval)
from .tasks import EvalItem, TaskData, load_task

MODES = ("letter", "option", "option_norm", "generate")

# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class EvalReport:
    """Result of one task evaluation. `predictions` (one dict per item) goes to a JSONL file, not into `to_dict()`."""

    task: str
    mode: str
    prompt_format: str
    prompt_template: str
    data_files: list[str]
    n_total: int
    n_excluded: int
    excluded: dict[str, int]
    excluded_ids: dict[str, list[str]]
    n_available: int
    n_scored: int
    n_correct: int
    accuracy: float
    ci95: tuple[float, float]
    split: str = ""  # what was scored, always stated (e.g. PubMedQA "test (test_ground_truth.json, 500 PMIDs)")
    accuracy_raw: float | None = None  # option modes: both scorings are kept
    accuracy_norm: float | None = None
    macro_f1: float | None = None
    confusion: dict[str, dict[str, int]] | None = None
    per_group: dict[str, dict[str, Any]] = field(default_factory=dict)
    k_shot: int = 0
    fewshot_files: list[str] = field(default_factory=list)
    seed: int = 0
    limit: int | None = None
    add_bos: bool = True
    max_length: int = 2048
    n_truncated: int = 0
    n_hard_truncated: int = 0
    n_fewer_shots: int = 0
    n_unparsed: int = 0
    elapsed_s: float = 0.0
    questions_per_s: float = 0.0
    name: str = ""
    shot_seed: int | None = None  # seed of the k-shot draws when it differs from `seed` (--shot-seeds)
    predictions: list[dict] = field(default_factory=list, repr=False)
    # calibration + selective answering from the per-item choice probabilities (log-likelihood modes; qlora70.metrics)
    metrics: ItemMetrics | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        d.pop("metrics")
        d["ci95"] = list(self.ci95)
        d["calibration_selective"] = self.metrics.to_dict() if self.metrics is not None else None
        return d

    def to_markdown(self) -> str:
        lo, hi = self.ci95
        title = self.name or self.task
        lines = [f"### {title}: {self.task} ({self.mode}, prompt `{self.prompt_format}`, {self.k_shot}-shot)", "",
                 f"Split scored: {self.split}.", "",
                 "| n scored | excluded | accuracy | 95% CI |" + (" macro-F1 |" if self.macro_f1 is not None else ""),
                 "|---|---|---|---|" + ("---|" if self.macro_f1 is not None else ""),
                 f"| {self.n_scored} | {self.n_excluded} | {self.accuracy:.3f} | [{lo:.3f}, {hi:.3f}] |"
                 + (f" {self.macro_f1:.3f} |" if self.macro_f1 is not None else "")]
        if self.accuracy_raw is not None:
            lines += ["", f"Option scoring: raw sum {self.accuracy_raw:.3f}, length-normalized {self.accuracy_norm:.3f}."]
        if self.per_group:
            lines += ["", "| group | n | accuracy | 95% CI |", "|---|---|---|---|"]
            for g, v in self.per_group.items():
                lines.append(f"| {g} | {v['n']} | {v['accuracy']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] |")
        if self.excluded:
            lines += ["", "Excluded: " + ", ".join(f"{r} {c}" for r, c in self.excluded.items())
                      + " (ids in the JSON report)."]
        notes = []
        if self.limit is not None:
            notes.append(f"seeded sample of {self.n_scored} of {self.n_available} (seed {self.seed})")
        if self.n_truncated:
            notes.append(f"{self.n_truncated} prompts cut from the left of the question/abstract")
        if self.n_fewer_shots:
            notes.append(f"{self.n_fewer_shots} prompts with fewer shots to fit {self.max_length} tokens")
        if self.mode == "generate":
            notes.append(f"{self.n_unparsed} replies without a readable answer (counted wrong)")
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines += ["", f"Prompt template: `{self.prompt_template}`"]
        if self.metrics is not None:
            lines += ["", self.metrics.to_markdown().rstrip()]
            lines += [f"![{k}]({os.path.basename(v)})" for k, v in self.metrics.plots.items()]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | os.PathLike, stem: str | None = None) -> dict[str, str]:
        """Write `<stem>.json`, `<stem>.md` and `<stem>_predictions.jsonl` atomically (log-likelihood modes also
        `<stem>_reliability.png`, `<stem>_coverage.png` and lm-eval's layout under `lm_eval/`); returns their paths."""
        out = Path(out_dir)
        stem = stem or f"eval_{self.name or self.task}"
        paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md",
                 "predictions": out / f"{stem}_predictions.jsonl"}
        if self.metrics is not None and self.n_scored:
            paths.update(self.metrics.save_plots(out, stem))
            paths.update({f"lm_eval_{k}": v for k, v in self._write_lm_eval(out / "lm_eval", stem).items()})
        d = self.to_dict()
        d["predictions_file"] = paths["predictions"].name
        atomic_write_json(paths["json"], d, default=_json_default)
        atomic_write_text(paths["markdown"], self.to_markdown())
        atomic_write_text(paths["predictions"], "".join(json.dumps(p, default=_json_default) + "\n"
                                                        for p in self.predictions))
        return {k: str(v) for k, v in paths.items()}

    def _write_lm_eval(self, out: Path, stem: str) -> dict[str, str]:
        """lm-evaluation-harness's results JSON + samples JSONL (acc_norm too in option modes)."""
        pred = predictions_from_records(self.predictions, stem)
        norm = (predictions_from_records(self.predictions, stem, score_key="scores_norm")
                if self.mode in ("option", "option_norm") else None)
        return write_lm_eval(out, self.task, pred, pred_norm=norm, date_id=stem, n_original=self.n_available,
                             k_shot=self.k_shot, limit=self.limit, seed=self.seed, fewshot_seed=self.shot_seed,
                             extra={"mode": self.mode, "prompt_format": self.prompt_format,
                                    "data_files": self.data_files})


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def reports_table(reports: Sequence[EvalReport], names: Sequence[str] | None = None) -> str:
    """One markdown table comparing reports (e.g. before/after fine-tuning)."""
    names = list(names) if names is not None else [r.name or r.task for r in reports]
    if len(names) != len(reports):
        raise ValueError(f"reports_table: {len(reports)} reports but {len(names)} names")
    lines = ["| run | task | mode | n | accuracy | 95% CI | macro-F1 |", "|---|---|---|---|---|---|---|"]
    for name, r in zip(names, reports):
        f1 = f"{r.macro_f1:.3f}" if r.macro_f1 is not None else "-"
        lines.append(f"| {name} | {r.task} | {r.mode} | {r.n_scored} | {r.accuracy:.3f} | "
                     f"[{r.ci95[0]:.3f}, {r.ci95[1]:.3f}] | {f1} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------

def evaluate_items(model: Callable, tokenizer: Any, data: TaskData, *, mode: str = "letter",
                   prompt_format: str | PromptFormat | None = None, limit: int | None = None, seed: int = 0,
                   k_shot: int = 0, fewshot: TaskData | None = None, batch_size: int = 8, max_length: int = 2048,
                   add_bos: bool | None = None, generate_fn: Callable[[str], str] | None = None,
                   max_new_tokens: int = 16, device: torch.device | str | None = None, progress: bool = True,
                   save_text: bool = False, name: str = "", shot_seed: int | None = None,
                   target_accuracy: float | None = None) -> EvalReport:
    """Score the items of an already loaded task; see `evaluate_task` for the arguments."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    if target_accuracy is not None and (mode == "generate" or not 0 < target_accuracy <= 1):
        raise ValueError(f"target_accuracy={target_accuracy} (--target-accuracy) needs a value in (0, 1] and a "
                         f"log-likelihood mode (letter, option, option_norm) for the confidences; got mode {mode!r}")
    if k_shot and (fewshot is None or not fewshot.items):
        raise ValueError(f"k_shot={k_shot} needs a few-shot pool: pass fewshot_data (a dev split of the same task)")
    fmt = get_format(prompt_format or DEFAULT_FORMAT.get(data.task, "lm-eval-mcq"))
    bos = resolve_add_bos(tokenizer, add_bos)
    pad_id = pad_or_eos(getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None))
    items = sample_items(data.items, limit, seed)
    t0 = time.perf_counter()
    prompts, requests, req_of = _build_requests(items, data.task, fmt, tokenizer, bos, mode, k_shot,
                                                fewshot.items if k_shot else [],
                                                seed if shot_seed is None else shot_seed, max_length, max_new_tokens,
                                                progress)
    if mode == "generate":
        gen = generate_fn or (lambda p: greedy_generate(model, tokenizer, p, max_new_tokens=max_new_tokens,
                                                        add_bos=bos, device=device))
        preds = _predict_generate(items, prompts, gen, data, save_text, progress)
    else:
        lls = loglikelihoods(model, requests, batch_size=batch_size, pad_id=pad_id, device=device,
                             progress=progress, desc=f"{data.task}: {mode}")
        preds = [_predict_scores(item, [lls[i] for i in idx], mode, fmt) for item, idx in zip(items, req_of)]
    for rec, pr in zip(preds, prompts):
        rec["truncated"] = pr.truncated
        if pr.hard_truncated:
            rec["hard_truncated"] = True  # even the options did not fit: tokens cut from the left
        if k_shot:
            rec["n_shots"] = pr.n_shots
        if save_text:
            rec["prompt"] = pr.text
    elapsed = time.perf_counter() - t0
    n, k = len(preds), sum(p["correct"] for p in preds)
    report = EvalReport(
        task=data.task, mode=mode, prompt_format=fmt.name, prompt_template=fmt.template, data_files=list(data.files),
        n_total=len(data.items) + len(data.excluded), n_excluded=len(data.excluded), excluded=data.exclusion_counts(),
        excluded_ids=data.excluded_ids(), n_available=len(data.items), n_scored=n, n_correct=k,
        accuracy=k / n if n else math.nan, ci95=wilson_interval(k, n), split=data.split_name(), k_shot=k_shot,
        fewshot_files=list(fewshot.files) if (fewshot is not None and k_shot) else [], seed=seed, limit=limit,
        add_bos=bos, max_length=max_length, n_truncated=sum(p.truncated for p in prompts),
        n_hard_truncated=sum(p.hard_truncated for p in prompts),
        n_fewer_shots=sum(p.n_shots < k_shot for p in prompts),
        n_unparsed=sum(not p.get("parsed", True) for p in preds), elapsed_s=round(elapsed, 3),
        questions_per_s=round(n / elapsed, 3) if elapsed > 0 else 0.0, name=name, shot_seed=shot_seed,
        predictions=preds)
    _summarize(report, preds, items, mode, data.label_words)
    if mode != "generate" and n:
        key = "scores_norm" if mode == "option_norm" else "scores"  # the scores the headline prediction used
        report.metrics = item_metrics(predictions_from_records(preds, name or data.task, score_key=key),
                                      name=name or data.task, target=target_accuracy, seed=seed)
    return report


def _build_requests(items: list[EvalItem], task: str, fmt: PromptFormat, tokenizer: Any, bos: bool, mode: str,
                    k_shot: int, pool: Sequence[EvalItem], seed: int, max_length: int, max_new_tokens: int,
                    progress: bool) -> tuple[list[_Prompt], list[tuple[list[int], list[int]]], list[list[int]]]:
    """(prompt per item, (context ids, continuation ids) requests, request indices per item: one per label in letter
    mode, one per option in option modes, none for generation). Prompts that do not fit are cut (`build_prompt`)."""
    prompts: list[_Prompt] = []
    requests: list[tuple[list[int], list[int]]] = []
    req_of: list[list[int]] = []
    it = items
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(items, desc=f"{task}: prompts", unit="q", leave=False)
    for item in it:
        shots = _sample_shots(pool, item, k_shot, seed) if k_shot else []
        if mode == "generate":
            conts: list[str] = []
        elif mode == "letter":
            conts = [fmt.target(lab) for lab in item.labels]
        else:
            conts = [fmt.option_target(txt) for txt in item.options.values()]
        pr = _Prompt(_assemble(item, fmt, shots), len(shots), False, False)
        ctx, cont_ids = split_continuations(tokenizer, pr.text, conts, bos)
        budget = max_length - (max_new_tokens if mode == "generate" else max(map(len, cont_ids)) - 1)
        if budget < 8:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt; raise it")
        if len(ctx) > budget:
            pr = build_prompt(item, fmt, shots, tokenizer, bos, budget)
            ctx, cont_ids = split_continuations(tokenizer, pr.text, conts, bos)
            if len(ctx) > budget:  # options alone too long: token-level cut from the left, keeping BOS
                keep = budget - (1 if bos else 0)
                ctx = ([ctx[0]] if bos else []) + ctx[len(ctx) - keep:]
        prompts.append(pr)
        req_of.append(list(range(len(requests), len(requests) + len(cont_ids))))
        requests += [(ctx, cont) for cont in cont_ids]
    return prompts, requests, req_of


def _predict_generate(items: list[EvalItem], prompts: list[_Prompt], gen: Callable[[str], str], data: TaskData,
                      save_text: bool, progress: bool) -> list[dict]:
    """One record per item from a generated reply (an unreadable reply counts wrong, `parsed` False)."""
    preds = []
    it = zip(items, prompts)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(list(it), desc=f"{data.task}: generate", unit="q", leave=False)
    for item, pr in it:
        reply = gen(pr.text)
        pred = extract_answer(reply, item.labels, None if data.label_words else item.options)
        rec = {"id": item.id, "group": item.group, "gold": item.answer, "pred": pred,
               "correct": pred == item.answer, "parsed": pred is not None}
        if save_text:
            rec["reply"] = reply
        preds.append(rec)
    return preds


def _predict_scores(item: EvalItem, scores: list[float], mode: str, fmt: PromptFormat) -> dict:
    """One record from the log-likelihood of each label (letter) or option (raw and length-normalized)."""
    rec = {"id": item.id, "group": item.group, "gold": item.answer}
    top = max(scores)  # explicit choice fields for qlora70.metrics (calibration, selective answering, lm-eval)
    z = sum(math.exp(s - top) for s in scores)
    rec.update(labels=list(item.labels), gold_index=item.gold, logliks=list(scores),
               probs=[math.exp(s - top) / z for s in scores])
    if mode == "letter":
        pred = item.labels[max(range(len(scores)), key=scores.__getitem__)]
        rec.update(pred=pred, correct=pred == item.answer, scores=dict(zip(item.labels, scores)))
        return rec
    lens = [len(fmt.option_target(t)) for t in item.options.values()]
    norm = [s / max(1, n) for s, n in zip(scores, lens)]
    p_raw = item.labels[max(range(len(scores)), key=scores.__getitem__)]
    p_norm = item.labels[max(range(len(norm)), key=norm.__getitem__)]
    pred = p_norm if mode == "option_norm" else p_raw
    rec.update(pred=pred, correct=pred == item.answer, pred_raw=p_raw, pred_norm=p_norm,
               scores=dict(zip(item.labels, scores)), scores_norm=dict(zip(item.labels, norm)))
    return rec


def _summarize(report: EvalReport, preds: list[dict], items: list[EvalItem], mode: str, label_words: bool) -> None:
    """Option-mode accuracies, PubMedQA macro-F1 + confusion, per-group accuracy with intervals (in place)."""
    n = len(preds)
    if mode in ("option", "option_norm") and n:
        report.accuracy_raw = sum(p["pred_raw"] == p["gold"] for p in preds) / n
        report.accuracy_norm = sum(p["pred_norm"] == p["gold"] for p in preds) / n
    if label_words and n:
        labels = items[0].labels
        report.macro_f1 = macro_f1([p["gold"] for p in preds], [p["pred"] for p in preds])
        conf = {g: {q: 0 for q in labels + ["unparsed"]} for g in labels}
        for p in preds:
            conf[p["gold"]][p["pred"] if p["pred"] is not None else "unparsed"] += 1
        if not report.n_unparsed:
            for row in conf.values():
                row.pop("unparsed")
        report.confusion = conf
    for g in sorted({p["group"] for p in preds if p["group"]}):
        sel = [p for p in preds if p["group"] == g]
        kg = sum(p["correct"] for p in sel)
        report.per_group[g] = {"n": len(sel), "correct": kg, "accuracy": kg / len(sel),
                               "ci95": list(wilson_interval(kg, len(sel)))}


def evaluate_task(model: Callable, tokenizer: Any, task: str, data: str | os.PathLike, *, mode: str = "letter",
                  limit: int | None = None, seed: int = 0, k_shot: int = 0,
                  fewshot_data: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                  batch_size: int = 8, max_length: int = 2048, prompt_format: str | None = None,
                  add_bos: bool | None = None, generate_fn: Callable[[str], str] | None = None,
                  max_new_tokens: int = 16, device: torch.device | str | None = None, progress: bool = True,
                  save_text: bool = False, name: str = "", shot_seed: int | None = None,
                  target_accuracy: float | None = None, **loader_kwargs: Any) -> EvalReport:
    """Load `task` ("medqa" | "pubmedqa" | "usmle" | "mcq") from `data`, score it, and (with `out_dir`) save the report.

    model: `model(input_ids (B, T) long) -> logits (B, T, V)`; tokenizer: qlora70 `Tokenizer` interface.
    mode: "letter" | "option" | "option_norm" | "generate" (see the module docstring).
    limit / seed: score a seeded random sample of `limit` items (never the first N).
    k_shot / fewshot_data: k examples per question drawn (seeded, per item) from a dev split of the same task.
    max_length: tokens the model may read (prompt + continuation - 1); prompts are cut as `build_prompt` says.
    prompt_format: a name in `FORMATS` (default: "lm-eval-mcq", or "lm-eval-pubmedqa" for PubMedQA).
    add_bos: prepend BOS (None: the tokenizer's preference, else True when it has a BOS id).
    generate_fn: `prompt -> reply` for mode "generate" (default: cache-free greedy over `model`).
    save_text: also write prompts / replies into the predictions JSONL (off by default: medical text stays out).
    shot_seed: seed of the k-shot draws (default `seed`); the scored items stay those of `seed` (`--shot-seeds`).
    target_accuracy: also choose the confidence threshold reaching this accuracy on a seeded half of the items and
        report it on the other half (`qlora70.metrics.target_accuracy`).
    Log-likelihood modes add calibration (ECE, 15 equal-width bins; Brier; NLL) and selective answering (AURC,
    accuracy at 50/80/100% coverage) to the report, and `save` writes their PNGs and lm-eval's files beside it.
    loader_kwargs: pubmedqa `ground_truth=`, `split=`; usmle `steps=`, `images=`, `exclude_images=`.
    Writes `eval_<name or task>.json`, `.md` and `_predictions.jsonl` under `out_dir`.
    """
    td = load_task(task, data, **loader_kwargs)
    fs = None
    if k_shot:
        if fewshot_data is None:
            raise ValueError(f"k_shot={k_shot} needs fewshot_data= (a dev split of {task}, e.g. "
                             f"data/medqa/US_4options_dev_300.jsonl or data/pubmedqa/pqal_fold0_dev_set.json)")
        fs = load_task(task, fewshot_data)
    report = evaluate_items(model, tokenizer, td, mode=mode, prompt_format=prompt_format, limit=limit, seed=seed,
                            k_shot=k_shot, fewshot=fs, batch_size=batch_size, max_length=max_length, add_bos=add_bos,
                            generate_fn=generate_fn, max_new_tokens=max_new_tokens, device=device, progress=progress,
                            save_text=save_text, name=name, shot_seed=shot_seed, target_accuracy=target_accuracy)
    if out_dir is not None:
        report.save(out_dir)
    return report


@torch.inference_mode()
def answer_loss(model: Callable, data: Any, *, batch_size: int = 8, pad_id: int = 0,
                device: torch.device | str | None = None, progress: bool = True) -> dict[str, float]:
    """Mean negative log-likelihood of the answer tokens (labels != -100) of a `qlora70.data.TokenizedData`, and its
    perplexity: the held-out answer perplexity of the training distribution."""
    device = torch.device(device) if device is not None else _device_of(model)
    order = sorted(range(len(data)), key=lambda i: -int(data.lengths[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc="answer loss", unit="batch", leave=False)
    total, count = 0.0, 0
    for b in it:
        batch = collate([data.example(i) for i in b], pad_id=pad_id)
        ids, labels = batch["input_ids"].to(device), batch["labels"]
        rows, pos = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)  # position t predicts token t + 1
        sel = _logits_at(model, ids, rows, pos)  # (N, V)
        tgt = labels[rows, pos + 1].to(sel.device)
        lp = torch.log_softmax(sel, dim=-1).gather(1, tgt[:, None])[:, 0]
        total -= float(lp.double().sum())
        count += len(tgt)
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if count else math.nan, "n_tokens": count,
            "n_examples": len(data)}