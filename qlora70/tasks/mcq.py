"""Generic multiple-choice JSONL (bring MedMCQA, MMLU clinical topics, ... without code).

One JSON object per line (a `.json` file holding a list of such objects works too):
- `question` (str, required); optional `context` (str), `id`, `group` (or `subject`).
- `options`: a dict label -> text with labels A, B, C... in order, or a list of texts (labelled A, B, C...).
- `answer`: the letter ("C"), a 0-based index (2), or the exact text of one option; `answer_idx` (letter) is read too.
Ids default to `file:line`.
"""
from __future__ import annotations

import os

from .base import LETTERS, EvalItem, TaskData, check_file, collect_items, iter_jsonl, option_problem, read_json


def load_mcq(path: str | os.PathLike) -> TaskData:
    p = check_file(path, "multiple-choice data")
    if p.is_dir():
        raise ValueError(f"multiple-choice data: {p} is a directory; pass one .jsonl file")
    data = TaskData(task="mcq", files=[str(p)])
    if p.suffix == ".json":
        recs = read_json(p, "multiple-choice data")
        if not isinstance(recs, list):
            raise ValueError(f"multiple-choice data: {p} must be JSONL or a JSON list of objects")
        rows = ((i, r, None) for i, r in enumerate(recs))
    else:
        rows = iter_jsonl(p)
    return collect_items(data, rows, p.name, mcq_item)


def mcq_item(rec: dict, rid: str) -> tuple[EvalItem | None, str]:
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, "empty_question"
    options = rec.get("options")
    if isinstance(options, list):
        if len(options) > len(LETTERS):
            return None, "too_many_options"
        options = {LETTERS[j]: v for j, v in enumerate(options)}
    problem = option_problem(options)
    if problem:
        return None, problem
    options = {k: v.strip() for k, v in options.items()}
    ans = rec.get("answer_idx", rec.get("answer"))
    if ans is None or isinstance(ans, bool):
        return None, "no_answer_key"
    if isinstance(ans, int):
        if not 0 <= ans < len(options):
            return None, "answer_not_in_options"
        key = list(options)[ans]
    elif isinstance(ans, str):
        a = ans.strip()
        if a.upper() in options and len(a) == 1:
            key = a.upper()
        else:
            matches = [k for k, v in options.items() if v == a]
            if len(matches) != 1:
                return None, "answer_not_in_options"
            key = matches[0]
    else:
        return None, "no_answer_key"
    rid = str(rec["id"]) if isinstance(rec.get("id"), (str, int)) else rid
    group = rec.get("group", rec.get("subject", ""))
    context = rec.get("context", "")
    return EvalItem(id=rid, question=question.strip(), options=options, answer=key,
                    context=context.strip() if isinstance(context, str) else "",
                    group=group if isinstance(group, str) else ""), ""
