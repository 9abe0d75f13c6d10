"""Evaluation prompts: named prompt formats (lm-eval's MCQ / PubMedQA, SM70, medAlpaca; the name and template
text go into every report), lm-eval's context/continuation token split, prompt assembly with few-shot examples and
truncation from the left (options and answers are never cut), and seeded item / shot sampling.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from .data import MEDALPACA_PRIMER, SM70_TEMPLATE, Entry, encode_text
from .tasks import EvalItem, format_options

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
