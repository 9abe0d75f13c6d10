"""MedQA-USMLE (US, 4 or 5 options) as distributed: JSONL with `question`, `options` {A..}, `answer_idx`, `answer`,
`meta_info` (step1 / step2&3). Ids are `file:line` (0-based line index)."""
from __future__ import annotations

import os

from .base import EvalItem, TaskData, check_file, collect_items, iter_jsonl, option_problem


def load_medqa(path: str | os.PathLike) -> TaskData:
    """Load a MedQA jsonl file; malformed lines are excluded with their `file:line` id and a reason."""
    p = check_file(path, "MedQA")
    if p.is_dir():
        raise ValueError(f"MedQA: {p} is a directory; pass one .jsonl file (e.g. US_4options_..._test.jsonl)")
    data = TaskData(task="medqa", files=[str(p)])
    return collect_items(data, iter_jsonl(p), p.name, medqa_item)


def medqa_item(rec: dict, rid: str) -> tuple[EvalItem | None, str]:
    """One MedQA record -> (item, "") or (None, reason). Also reads the generic `answer` letter when `answer_idx` is absent."""
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, "empty_question"
    options = rec.get("options")
    problem = option_problem(options)
    if problem:
        return None, problem
    key = rec.get("answer_idx")
    if key is None:
        return None, "no_answer_key"
    key = str(key).strip().upper()
    if key not in options:
        return None, "answer_not_in_options"
    answer_text = rec.get("answer")
    if isinstance(answer_text, str) and answer_text.strip() and answer_text.strip() != options[key].strip():
        return None, "answer_text_mismatch"
    group = rec.get("meta_info") if isinstance(rec.get("meta_info"), str) else ""
    rid = str(rec["id"]) if isinstance(rec.get("id"), (str, int)) else rid
    return EvalItem(id=rid, question=question.strip(), options={k: v.strip() for k, v in options.items()},
                    answer=key, group=group), ""
