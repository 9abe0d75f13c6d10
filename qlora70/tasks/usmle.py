"""USMLE self-assessment (steps 1-3) as used by medAlpaca.

Files: `stepN.json` (list of {no, question, options {A..}}), `stepN_solutions.json` ({"no": letter}) and
`question_with_images.json` ({"stepN": [no, ...]}: questions that need an image, excluded as medAlpaca does).
Options run from 3 to 9 letters. Known damage, excluded with a reason: step 2 no. 115 (option E merged into D's text,
key E), no. 119 (empty options). Ids are `stepN:no`; `group` is `stepN`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .base import EvalItem, TaskData, check_file, option_problem, read_json

_STEP_FILE = re.compile(r"^step(\d+)\.json$")


def load_usmle(path: str | os.PathLike, steps: tuple[int, ...] | None = None,
               images: str | os.PathLike | None = None, exclude_images: bool = True) -> TaskData:
    """Load USMLE items from a directory holding `stepN.json` files (or one `stepN.json` file).

    `steps` restricts the steps (default: every `stepN.json` found). `images` is `question_with_images.json`
    (default: the one beside the step files; without it no image question can be excluded, which is an error when
    `exclude_images` is True so scores stay comparable to medAlpaca's).
    """
    p = check_file(path, "USMLE")
    root = p if p.is_dir() else p.parent
    if p.is_dir():
        found = sorted((int(m.group(1)), root / n) for n in os.listdir(root) if (m := _STEP_FILE.match(n)))
    else:
        m = _STEP_FILE.match(p.name)
        if not m:
            raise ValueError(f"USMLE: {p} is not named stepN.json; pass the directory or a stepN.json file")
        found = [(int(m.group(1)), p)]
    if steps is not None:
        found = [(s, f) for s, f in found if s in set(steps)]
        missing = set(steps) - {s for s, _ in found}
        if missing:
            raise FileNotFoundError(f"USMLE: no step{sorted(missing)[0]}.json in {root}")
    if not found:
        raise FileNotFoundError(f"USMLE: no stepN.json files in {root}")

    data = TaskData(task="usmle")
    image_nos: dict[str, set[int]] = {}
    if exclude_images:
        ip = Path(images) if images is not None else root / "question_with_images.json"
        check_file(ip, "USMLE image list (question_with_images.json; pass exclude_images=False to keep them)")
        raw = read_json(ip, "USMLE image list")
        if not isinstance(raw, dict):
            raise ValueError(f"USMLE image list: {ip} must be a JSON object step -> [no, ...]")
        image_nos = {str(k): {int(n) for n in v if str(n).strip().lstrip('-').isdigit()} for k, v in raw.items()
                     if isinstance(v, list)}
        data.files.append(str(ip))

    for step, fp in found:
        sol_path = check_file(fp.with_name(f"step{step}_solutions.json"), f"USMLE step {step} solutions")
        questions = read_json(fp, f"USMLE step {step}")
        solutions = read_json(sol_path, f"USMLE step {step} solutions")
        data.files += [str(fp), str(sol_path)]
        if not isinstance(questions, list):
            raise ValueError(f"USMLE: {fp} must be a JSON list of questions")
        if not isinstance(solutions, dict):
            raise ValueError(f"USMLE: {sol_path} must be a JSON object no -> letter")
        solutions = {str(k).strip(): v for k, v in solutions.items()}
        group = f"step{step}"
        for i, rec in enumerate(questions):
            no = rec.get("no") if isinstance(rec, dict) else None
            rid = f"{group}:{no}" if isinstance(no, (int, str)) else f"{group}:index{i}"
            if not isinstance(rec, dict):
                data.exclude(rid, "not_an_object")
                continue
            try:
                no_int = int(no)
            except (TypeError, ValueError):
                data.exclude(rid, "bad_question_number")
                continue
            if no_int in image_nos.get(group, ()):
                data.exclude(rid, "image_question")
                continue
            item, reason = usmle_item(rec, rid, solutions.get(str(no_int)), group)
            if item is None:
                data.exclude(rid, reason)
            else:
                data.items.append(item)
    return data


def usmle_item(rec: dict, rid: str, key: object, group: str) -> tuple[EvalItem | None, str]:
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, "empty_question"
    options = rec.get("options")
    problem = option_problem(options, min_options=3)
    if problem:
        return None, problem
    if not isinstance(key, str) or not key.strip():
        return None, "no_answer_key"
    key = key.strip().upper()
    if key not in options:
        return None, "answer_not_in_options"
    # Some scraped questions begin with stray punctuation (". \nA 30-year-old ...").
    q = question.strip().lstrip(".").strip()
    return EvalItem(id=rid, question=q, options={k: v.strip() for k, v in options.items()}, answer=key, group=group), ""
