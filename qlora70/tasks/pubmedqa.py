"""PubMedQA (PQA-L) as distributed.

- `ori_pqal.json` (or any file in its layout, e.g. `test_set.json`, `pqal_fold0_dev_set.json`): a dict
  PMID -> {QUESTION, CONTEXTS [list of str], LABELS, MESHES, YEAR, final_decision, LONG_ANSWER}.
- optional ground truth (`test_ground_truth.json`): a dict PMID -> "yes"/"no"/"maybe". The items are its PMIDs and the
  labels are its values (the official 500-item test set).
- optional split file (`test_set.json`, `pqal_fold0_train_set.json`, ...): only its PMIDs are used (a dict keyed by
  PMID or a list of PMIDs); labels come from the split's own records when they carry `final_decision`.
  `split="all"` scores every labelled record of `ori_pqal.json` (training, dev and test mixed) on purpose.
A directory without `test_ground_truth.json` (and no `split`) is an error: the scope of a benchmark never widens
silently. `TaskData.split` says what was loaded; every report states it.
Ids are the PMIDs. Labels are the words yes/no/maybe (`TaskData.label_words` is True).
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import EvalItem, TaskData, check_file, read_json

PUBMEDQA_LABELS = ("yes", "no", "maybe")


def load_pubmedqa(path: str | os.PathLike, ground_truth: str | os.PathLike | None = None,
                  split: str | os.PathLike | None = None) -> TaskData:
    """Load PubMedQA items. `path` is a file in the ori_pqal layout or a directory holding `ori_pqal.json`
    (with `test_ground_truth.json` beside it used as the ground truth when `ground_truth` is not given)."""
    p = check_file(path, "PubMedQA")
    score_all = split is not None and os.fspath(split) == "all"
    if score_all:
        split = None
    if p.is_dir():
        if ground_truth is None and split is None and not score_all:
            if not (p / "test_ground_truth.json").exists():
                raise ValueError(f"PubMedQA: {p} has no test_ground_truth.json, so its test split is unknown; add "
                                 "that file (the official test labels), pass a split file (--split FILE), or score "
                                 "all labelled items of ori_pqal.json (training, dev and test mixed) on purpose with "
                                 "--split all")
            ground_truth = p / "test_ground_truth.json"
        p = check_file(p / "ori_pqal.json", "PubMedQA")
    records = read_json(p, "PubMedQA")
    if not isinstance(records, dict):
        raise ValueError(f"PubMedQA: {p} must be a JSON object PMID -> record (the ori_pqal.json layout), "
                         f"got {type(records).__name__}")
    data = TaskData(task="pubmedqa", files=[str(p)], label_words=True)

    labels: dict[str, object] = {}
    if ground_truth is not None:
        gp = check_file(ground_truth, "PubMedQA ground truth")
        gt = read_json(gp, "PubMedQA ground truth")
        if not isinstance(gt, dict):
            raise ValueError(f"PubMedQA ground truth: {gp} must be a JSON object PMID -> label")
        data.files.append(str(gp))
        labels = {str(k): v for k, v in gt.items()}
        keys = list(labels)
    else:
        keys = [str(k) for k in records]
    if split is not None:
        sp = check_file(split, "PubMedQA split")
        sd = read_json(sp, "PubMedQA split")
        if isinstance(sd, dict):
            split_keys = [str(k) for k in sd]
            for k, v in sd.items():
                if isinstance(v, dict) and "final_decision" in v and str(k) not in labels:
                    labels[str(k)] = v["final_decision"]
        elif isinstance(sd, list):
            split_keys = [str(k) for k in sd]
        else:
            raise ValueError(f"PubMedQA split: {sp} must be a JSON object keyed by PMID or a list of PMIDs")
        data.files.append(str(sp))
        keys = [k for k in split_keys if ground_truth is None or k in set(keys)]
    if ground_truth is not None:
        data.split = f"test ({Path(data.files[1]).name}, {len(keys)} PMIDs)"
        if split is not None:
            data.split += f" within split {Path(data.files[-1]).name}"
    elif split is not None:
        data.split = f"split {Path(data.files[-1]).name} ({len(keys)} PMIDs)"
    else:
        data.split = (f"all labelled items of {p.name} ({len(keys)} records: training, dev and test mixed)" if score_all
                      else f"{p.name} as given ({len(keys)} records)")

    for pmid in keys:
        rec = records.get(pmid)
        if rec is None:
            data.exclude(pmid, "missing_record")
            continue
        item, reason = pubmedqa_item(pmid, rec, labels.get(pmid))
        if item is None:
            data.exclude(pmid, reason)
        else:
            data.items.append(item)
    return data


def pubmedqa_item(pmid: str, rec: object, label: object = None) -> tuple[EvalItem | None, str]:
    """One record -> (item, "") or (None, reason). `label` overrides the record's `final_decision`."""
    if not isinstance(rec, dict):
        return None, "not_an_object"
    question = rec.get("QUESTION")
    if not isinstance(question, str) or not question.strip():
        return None, "empty_question"
    contexts = rec.get("CONTEXTS")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        return None, "bad_contexts"
    if label is None:
        label = rec.get("final_decision")
    if label is None:
        return None, "no_answer_key"
    label = str(label).strip().lower()
    if label not in PUBMEDQA_LABELS:
        return None, "bad_label"
    return EvalItem(id=str(pmid), question=question.strip(), options={w: w for w in PUBMEDQA_LABELS}, answer=label,
                    context="\n".join(c.strip() for c in contexts)), ""


def long_answer(path: str | os.PathLike) -> dict[str, str]:
    """PMID -> LONG_ANSWER for records that have one (used to build training entries with explanations)."""
    recs = read_json(Path(path), "PubMedQA")
    if not isinstance(recs, dict):
        return {}
    return {str(k): v["LONG_ANSWER"].strip() for k, v in recs.items()
            if isinstance(v, dict) and isinstance(v.get("LONG_ANSWER"), str) and v["LONG_ANSWER"].strip()}
