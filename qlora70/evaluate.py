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

import inspect
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import MEDALPACA_PRIMER, SM70_TEMPLATE, Entry, encode_text, resolve_add_bos
from .io import atomic_write_json, atomic_write_text
from .tasks import EvalItem, TaskData, format_options, load_task

MODES = ("letter", "option", "option_norm", "generate")
Z95 = 1.959963984540054

# --------------------------------------------------------------------------------------------------------------------
# Prompt formats (named; the name and template text are recorded in every report)
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptFormat:
    """A named prompt layout. `render(item)` is the text before the answer; `target(label)` / `option_target(text)`
    are the continuations scored in letter / option mode."""

    name: str
    template: str
    render: Callable[[EvalItem], str] = field(repr=False, compare=False)
    target: Callable[[str], str] = field(repr=False, compare=False)
    option_target: Callable[[str], str] = field(repr=False, compare=False)


def _mcq_render(item: EvalItem) -> str:
    ctx = f"{item.context}\n" if item.context else ""
    return f"Question: {ctx}{item.question}\n{format_options(item.options)}\nAnswer:"


def _pubmedqa_render(item: EvalItem) -> str:
    return f"Abstract: {item.context}\nQuestion: {item.question}\nAnswer:"


def _sm70_render(item: EvalItem) -> str:
    # The training template itself (qlora70.data.SM70_TEMPLATE) on the entry `read_entries` makes from such a record:
    # context = abstract, instruction = question (+ the option block), so prompts match fine-tuning exactly.
    body = item.question if _is_yesno(item) else f"{item.question}\n{format_options(item.options)}"
    return SM70_TEMPLATE.render(Entry(instruction=body, input=item.context, output=""))[0]


def _medalpaca_render(item: EvalItem) -> str:
    if _is_yesno(item):
        instruction = "Answer the question based on the abstract with yes, no or maybe."
        body = f"{item.context}\n{item.question}" if item.context else item.question
    else:
        instruction = "Answer the multiple choice question correctly and truthfully."
        ctx = f"{item.context}\n" if item.context else ""
        body = f"{ctx}{item.question}\n{format_options(item.options, sep=': ')}"
    return f"{MEDALPACA_PRIMER}\n\n### Instruction:\n{instruction}\n\n### Input:\n{body}\n\n### Response:\n"


def _is_yesno(item: EvalItem) -> bool:
    return list(item.options) == list(item.options.values())


def _space(s: str) -> str:
    return " " + s


FORMATS: dict[str, PromptFormat] = {
    "lm-eval-mcq": PromptFormat(
        "lm-eval-mcq", "Question: {question}\\nA. {A}\\nB. {B}\\n...\\nAnswer:  -> \" {label}\"",
        _mcq_render, _space, _space),
    "lm-eval-pubmedqa": PromptFormat(
        "lm-eval-pubmedqa", "Abstract: {contexts joined by \\n}\\nQuestion: {question}\\nAnswer:  -> \" {yes|no|maybe}\"",
        _pubmedqa_render, _space, _space),
    "sm70": PromptFormat(
        "sm70", "Question: {context} {question}[\\nA. {A}\\n...]\\nAnswer:  -> \" {label}\" (the SM70 training template)",
        _sm70_render, _space, _space),
    "medalpaca": PromptFormat(
        "medalpaca", MEDALPACA_PRIMER + "\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{question}\\n"
        "A: {A}\\n...\\n\\n### Response:\\n  -> \"{label}\"", _medalpaca_render, str, str),
}
DEFAULT_FORMAT = {"medqa": "lm-eval-mcq", "usmle": "lm-eval-mcq", "mcq": "lm-eval-mcq", "pubmedqa": "lm-eval-pubmedqa"}
FEWSHOT_SEP = "\n\n"  # lm-eval's fewshot_delimiter


def get_format(name: str | PromptFormat) -> PromptFormat:
    if isinstance(name, PromptFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default). n == 0 gives (nan, nan)."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None) -> float:
    """Macro-averaged F1 over `labels` (default: the labels seen in gold or pred, as sklearn's f1_score does).
    A class never predicted has F1 0; unparsed predictions (None) count as wrong for their gold class."""
    if len(gold) != len(pred):
        raise ValueError(f"macro_f1: {len(gold)} gold labels but {len(pred)} predictions")
    if labels is None:
        labels = sorted({g for g in gold} | {p for p in pred if p is not None})
    if not labels:
        return math.nan
    f1s = []
    for c in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


# --------------------------------------------------------------------------------------------------------------------
# Tokenization and log-likelihood scoring
# --------------------------------------------------------------------------------------------------------------------

def _encode(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    ids = encode_text(tokenizer, text)
    return [int(tokenizer.bos_id)] + ids if add_bos else ids


def split_continuation(tokenizer: Any, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; ctx = enc(context),
    cont = enc(context + continuation)[len(ctx):]. Returns (ctx_ids, cont_ids)."""
    ctx, conts = split_continuations(tokenizer, context, [continuation], add_bos)
    return ctx, conts[0]


def split_continuations(tokenizer: Any, context: str, continuations: Sequence[str],
                        add_bos: bool) -> tuple[list[int], list[list[int]]]:
    """`split_continuation` for several continuations of one context, encoding the context once."""
    n_sp = len(context) - len(context.rstrip(" "))
    head = context[len(context) - n_sp:] if n_sp else ""
    context = context[:len(context) - n_sp]
    ctx = _encode(tokenizer, context, add_bos)
    out = []
    for c in continuations:
        whole = _encode(tokenizer, context + head + c, add_bos)
        cont = whole[len(ctx):]
        if not cont:
            raise ValueError(f"continuation {c!r} produced no tokens after the context; check the tokenizer")
        out.append(cont)
    return ctx, out


def _device_of(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _logits(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        raise ValueError(f"model must map input_ids {tuple(ids.shape)} to logits (B, T, V); got "
                         f"{getattr(out, 'shape', type(out))}")
    return out


def _lm_head_of(model: Any) -> torch.nn.Module | None:
    """The LM head when `model` can return final hidden states (qlora70's `Llama(..., return_hidden=True)`), so only
    the scored positions go through the (large-vocabulary) head; None for a plain logits callable."""
    head = getattr(model, "lm_head", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None
    try:
        return head if "return_hidden" in inspect.signature(model.forward).parameters else None
    except (TypeError, ValueError):
        return None


def _logits_at(model: Callable, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) float32 at (rows[i], pos[i]) of `model(ids)`, computing the head only there when possible."""
    head = _lm_head_of(model)
    if head is not None:
        h = model(ids, return_hidden=True)  # (B, T, D)
        if not isinstance(h, torch.Tensor) or h.shape[:2] != ids.shape:
            raise ValueError(f"model(..., return_hidden=True) must give (B, T, D), got {getattr(h, 'shape', type(h))}")
        return head(h[rows.to(h.device), pos.to(h.device)]).float()
    logits = _logits(model, ids)  # (B, T, V)
    return logits[rows.to(logits.device), pos.to(logits.device)].float()


@torch.inference_mode()
def loglikelihoods(model: Callable, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
                   pad_id: int = 0, device: torch.device | str | None = None, progress: bool = True,
                   desc: str = "scoring") -> list[float]:
    """Sum of log p(cont | ctx) for each (ctx_ids, cont_ids) request.

    The model reads `(ctx + cont)[:-1]`; requests whose input is a prefix of another request's input with the same
    context share that row (so all single-token continuations of one prompt cost one forward). Rows are sorted by
    length, batched with right padding (safe for a causal model) and scored at the continuation positions only.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _device_of(model)
    rows: list[list[int]] = []
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    where: list[int] = []
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("empty context: every request needs at least one context token (e.g. BOS)")
        inp = list(ctx) + list(cont[:-1])
        cands = by_ctx.setdefault(tuple(ctx), [])
        hit = next((r for r in cands if len(rows[r]) >= len(inp) and rows[r][:len(inp)] == inp), None)
        if hit is None:
            # an existing row that is a prefix of this longer input can be replaced by it
            grow = next((r for r in cands if len(rows[r]) < len(inp) and inp[:len(rows[r])] == rows[r]), None)
            if grow is not None:
                rows[grow] = inp
                hit = grow
            else:
                rows.append(inp)
                hit = len(rows) - 1
                cands.append(hit)
        where.append(hit)
    # requests per row
    per_row: dict[int, list[int]] = {}
    for qi, r in enumerate(where):
        per_row.setdefault(r, []).append(qi)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    out = [0.0] * len(requests)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc=desc, unit="batch", leave=False)
    for batch in it:
        T = max(len(rows[r]) for r in batch)
        ids = torch.full((len(batch), T), int(pad_id), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, :len(rows[r])] = torch.tensor(rows[r], dtype=torch.long)
        bi, pos, tok, qidx = [], [], [], []
        for b, r in enumerate(batch):
            for qi in per_row[r]:
                ctx, cont = requests[qi]
                for j, t in enumerate(cont):
                    bi.append(b)
                    pos.append(len(ctx) - 1 + j)
                    tok.append(int(t))
                    qidx.append(qi)
        sel = _logits_at(model, ids.to(device), torch.tensor(bi), torch.tensor(pos))  # (N, V)
        lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tok, device=sel.device)[:, None])[:, 0]
        for qi, v in zip(qidx, lp.double().cpu().tolist()):
            out[qi] += v
    return out


@torch.inference_mode()
def greedy_generate(model: Callable, tokenizer: Any, prompt: str, *, max_new_tokens: int = 16, add_bos: bool = True,
                    device: torch.device | str | None = None, stop_at_newline: bool = True) -> str:
    """Cache-free greedy decoding over any logits callable (slow: one full forward per new token). Stops at EOS or,
    with `stop_at_newline`, at the first newline after some text."""
    device = torch.device(device) if device is not None else _device_of(model)
    ids = _encode(tokenizer, prompt, add_bos)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = _logits(model, torch.tensor([ids + new], dtype=torch.long, device=device))
        nxt = int(logits[0, -1].argmax())
        if nxt == getattr(tokenizer, "eos_id", None):
            break
        new.append(nxt)
        text = tokenizer.decode(new)
        if stop_at_newline and "\n" in text.lstrip():
            break
    return tokenizer.decode(new)


_ANSWER_IS = re.compile(r"(?i:answer|option)\s*(?i:is)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def extract_answer(text: str, labels: Sequence[str], options: dict[str, str] | None = None) -> str | None:
    """The label a generated reply gives, or None.

    Letter labels: the reply starts with the letter ("C", "C.", "(C)", "C: text"), else "answer is C" / "Answer: C",
    else the reply starts with one option's text. Word labels (yes/no/maybe): the first word, else the first label word
    anywhere."""
    t = text.strip()
    if not t:
        return None
    if all(len(lab) == 1 for lab in labels):
        m = re.match(r"^\(?([A-Z])(?:$|[\s).:,\]-])", t)
        if m and m.group(1) in labels:
            return m.group(1)
        m = _ANSWER_IS.search(t)
        if m and m.group(1) in labels:
            return m.group(1)
        if options:
            low = t.lower()
            hits = [k for k, v in options.items() if v and low.startswith(v.lower())]
            if len(hits) == 1:
                return hits[0]
        return None
    words = re.findall(r"[a-z]+", t.lower())
    if words and words[0] in labels:
        return words[0]
    return next((w for w in words if w in labels), None)


# --------------------------------------------------------------------------------------------------------------------
# Prompt assembly with truncation
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class _Prompt:
    text: str
    n_shots: int
    truncated: bool  # question/context text cut from the left
    hard_truncated: bool  # even the options had to be cut (token-level, from the left)


def _assemble(item: EvalItem, fmt: PromptFormat, shots: Sequence[EvalItem]) -> str:
    parts = [fmt.render(s) + fmt.target(s.answer) for s in shots]
    return FEWSHOT_SEP.join(parts + [fmt.render(item)])


def build_prompt(item: EvalItem, fmt: PromptFormat, shots: Sequence[EvalItem], tokenizer: Any, add_bos: bool,
                 budget: int) -> _Prompt:
    """Fit the prompt in `budget` tokens: drop few-shot examples (last first), then cut the context (PubMedQA
    abstract) and then the question from the left at a word boundary. Options and the answer cue are kept; if even
    they do not fit, `hard_truncated` is set and the caller cuts tokens from the left (after BOS)."""
    shots = list(shots)
    text = _assemble(item, fmt, shots)
    n = len(_encode(tokenizer, text, add_bos))
    while n > budget and shots:
        shots.pop()
        text = _assemble(item, fmt, shots)
        n = len(_encode(tokenizer, text, add_bos))
    if n <= budget:
        return _Prompt(text, len(shots), False, False)
    cur = item
    for fname in ("context", "question"):
        for _ in range(64):
            body = getattr(cur, fname)
            if not body:
                break
            n_body = max(1, len(encode_text(tokenizer, body)))
            cut = int((n - budget) * len(body) / n_body * 1.05) + 1
            rest = body[cut:]
            sp = rest.find(" ")
            rest = rest[sp + 1:] if 0 <= sp < 40 else rest
            cur = replace(cur, **{fname: rest})
            text = _assemble(cur, fmt, [])
            n = len(_encode(tokenizer, text, add_bos))
            if n <= budget:
                return _Prompt(text, 0, True, False)
    return _Prompt(text, 0, True, True)


def _sample_shots(pool: Sequence[EvalItem], item: EvalItem, k: int, seed: int) -> list[EvalItem]:
    cands = [p for p in pool if p.id != item.id and p.question != item.question]
    if k > len(cands):
        raise ValueError(f"k_shot={k} but the few-shot pool has only {len(cands)} usable items")
    return random.Random(f"{seed}:{item.id}").sample(cands, k)


def sample_items(items: Sequence[EvalItem], limit: int | None, seed: int) -> list[EvalItem]:
    """A seeded random subset of `limit` items, kept in file order (never the first N)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]


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
    predictions: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        d["ci95"] = list(self.ci95)
        return d

    def to_markdown(self) -> str:
        lo, hi = self.ci95
        title = self.name or self.task
        lines = [f"### {title}: {self.task} ({self.mode}, prompt `{self.prompt_format}`, {self.k_shot}-shot)", "",
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
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | os.PathLike, stem: str | None = None) -> dict[str, str]:
        """Write `<stem>.json`, `<stem>.md` and `<stem>_predictions.jsonl` atomically; returns their paths."""
        out = Path(out_dir)
        stem = stem or f"eval_{self.name or self.task}"
        paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md",
                 "predictions": out / f"{stem}_predictions.jsonl"}
        d = self.to_dict()
        d["predictions_file"] = paths["predictions"].name
        atomic_write_json(paths["json"], d, default=_json_default)
        atomic_write_text(paths["markdown"], self.to_markdown())
        atomic_write_text(paths["predictions"], "".join(json.dumps(p, default=_json_default) + "\n"
                                                        for p in self.predictions))
        return {k: str(v) for k, v in paths.items()}


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
                   save_text: bool = False, name: str = "") -> EvalReport:
    """Score the items of an already loaded task; see `evaluate_task` for the arguments."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    if k_shot and (fewshot is None or not fewshot.items):
        raise ValueError(f"k_shot={k_shot} needs a few-shot pool: pass fewshot_data (a dev split of the same task)")
    fmt = get_format(prompt_format or DEFAULT_FORMAT.get(data.task, "lm-eval-mcq"))
    bos = resolve_add_bos(tokenizer, add_bos)
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = pad_id if pad_id is not None else (getattr(tokenizer, "eos_id", None) or 0)
    items = sample_items(data.items, limit, seed)
    t0 = time.perf_counter()

    prompts: list[_Prompt] = []
    requests: list[tuple[list[int], list[int]]] = []
    req_of: list[list[int]] = []  # per item: request indices (letter mode) or per option
    it = items
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(items, desc=f"{data.task}: prompts", unit="q", leave=False)
    for item in it:
        shots = _sample_shots(fewshot.items, item, k_shot, seed) if k_shot else []
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
        idx = []
        for cont in cont_ids:
            idx.append(len(requests))
            requests.append((ctx, cont))
        req_of.append(idx)

    preds: list[dict] = []
    n_unparsed = 0
    if mode == "generate":
        dev = device
        gen = generate_fn or (lambda p: greedy_generate(model, tokenizer, p, max_new_tokens=max_new_tokens,
                                                        add_bos=bos, device=dev))
        it = zip(items, prompts)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(list(it), desc=f"{data.task}: generate", unit="q", leave=False)
        for item, pr in it:
            reply = gen(pr.text)
            pred = extract_answer(reply, item.labels, None if data.label_words else item.options)
            n_unparsed += pred is None
            rec = {"id": item.id, "group": item.group, "gold": item.answer, "pred": pred,
                   "correct": pred == item.answer, "parsed": pred is not None}
            if save_text:
                rec["reply"] = reply
            preds.append(rec)
    else:
        lls = loglikelihoods(model, requests, batch_size=batch_size, pad_id=pad_id, device=device,
                             progress=progress, desc=f"{data.task}: {mode}")
        for item, idx, pr in zip(items, req_of, prompts):
            scores = [lls[i] for i in idx]
            rec = {"id": item.id, "group": item.group, "gold": item.answer}
            if mode == "letter":
                pred = item.labels[max(range(len(scores)), key=scores.__getitem__)]
                rec.update(pred=pred, correct=pred == item.answer, scores=dict(zip(item.labels, scores)))
            else:
                lens = [len(fmt.option_target(t)) for t in item.options.values()]
                norm = [s / max(1, n) for s, n in zip(scores, lens)]
                p_raw = item.labels[max(range(len(scores)), key=scores.__getitem__)]
                p_norm = item.labels[max(range(len(norm)), key=norm.__getitem__)]
                pred = p_norm if mode == "option_norm" else p_raw
                rec.update(pred=pred, correct=pred == item.answer, pred_raw=p_raw, pred_norm=p_norm,
                           scores=dict(zip(item.labels, scores)), scores_norm=dict(zip(item.labels, norm)))
            preds.append(rec)
    for rec, pr in zip(preds, prompts):
        rec["truncated"] = pr.truncated
        if pr.hard_truncated:
            rec["hard_truncated"] = True  # even the options did not fit: tokens cut from the left
        if k_shot:
            rec["n_shots"] = pr.n_shots
        if save_text:
            rec["prompt"] = pr.text

    elapsed = time.perf_counter() - t0
    n = len(preds)
    k = sum(p["correct"] for p in preds)
    report = EvalReport(
        task=data.task, mode=mode, prompt_format=fmt.name, prompt_template=fmt.template, data_files=list(data.files),
        n_total=len(data.items) + len(data.excluded), n_excluded=len(data.excluded), excluded=data.exclusion_counts(),
        excluded_ids=data.excluded_ids(), n_available=len(data.items), n_scored=n, n_correct=k,
        accuracy=k / n if n else math.nan, ci95=wilson_interval(k, n), k_shot=k_shot,
        fewshot_files=list(fewshot.files) if (fewshot is not None and k_shot) else [], seed=seed, limit=limit,
        add_bos=bos, max_length=max_length, n_truncated=sum(p.truncated for p in prompts),
        n_hard_truncated=sum(p.hard_truncated for p in prompts),
        n_fewer_shots=sum(p.n_shots < k_shot for p in prompts), n_unparsed=n_unparsed, elapsed_s=round(elapsed, 3),
        questions_per_s=round(n / elapsed, 3) if elapsed > 0 else 0.0, name=name, predictions=preds)
    if mode in ("option", "option_norm") and n:
        report.accuracy_raw = sum(p["pred_raw"] == p["gold"] for p in preds) / n
        report.accuracy_norm = sum(p["pred_norm"] == p["gold"] for p in preds) / n
    if data.label_words and n:
        labels = items[0].labels
        report.macro_f1 = macro_f1([p["gold"] for p in preds], [p["pred"] for p in preds])
        conf = {g: {q: 0 for q in labels + ["unparsed"]} for g in labels}
        for p in preds:
            conf[p["gold"]][p["pred"] if p["pred"] is not None else "unparsed"] += 1
        if not n_unparsed:
            for row in conf.values():
                row.pop("unparsed")
        report.confusion = conf
    groups = sorted({p["group"] for p in preds if p["group"]})
    for g in groups:
        sel = [p for p in preds if p["group"] == g]
        kg = sum(p["correct"] for p in sel)
        report.per_group[g] = {"n": len(sel), "correct": kg, "accuracy": kg / len(sel),
                               "ci95": list(wilson_interval(kg, len(sel)))}
    return report


def evaluate_task(model: Callable, tokenizer: Any, task: str, data: str | os.PathLike, *, mode: str = "letter",
                  limit: int | None = None, seed: int = 0, k_shot: int = 0,
                  fewshot_data: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                  batch_size: int = 8, max_length: int = 2048, prompt_format: str | None = None,
                  add_bos: bool | None = None, generate_fn: Callable[[str], str] | None = None,
                  max_new_tokens: int = 16, device: torch.device | str | None = None, progress: bool = True,
                  save_text: bool = False, name: str = "", **loader_kwargs: Any) -> EvalReport:
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
                            save_text=save_text, name=name)
    if out_dir is not None:
        report.save(out_dir)
    return report


@torch.inference_mode()
def answer_loss(model: Callable, data: Any, *, batch_size: int = 8, pad_id: int = 0,
                device: torch.device | str | None = None, progress: bool = True) -> dict[str, float]:
    """Mean negative log-likelihood of the answer tokens (labels != -100) of a `qlora70.data.TokenizedData`, and its
    perplexity: the held-out answer perplexity of the training distribution."""
    from .data import IGNORE_INDEX, collate

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
