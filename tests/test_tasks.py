"""Evaluation task loaders on the shipped real subsets (data/) and on deliberately damaged files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from qlora70.tasks import PUBMEDQA_LABELS, load_mcq, load_medqa, load_pubmedqa, load_task, load_usmle

DATA = Path(__file__).resolve().parent.parent / "data"


def _raw_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------- MedQA

@pytest.mark.parametrize("name, n, n_opts", [("US_4options_test_200.jsonl", 200, 4), ("US_4options_dev_300.jsonl", 300, 4),
                                             ("US_5options_test_100.jsonl", 100, 5)])
def test_medqa_real_files(name, n, n_opts):
    path = DATA / "medqa" / name
    td = load_medqa(path)
    assert len(td) == n and td.excluded == []
    raw = _raw_jsonl(path)
    assert len({it.id for it in td.items}) == n
    for it, rec in zip(td.items, raw):
        assert list(it.options) == list("ABCDE"[:n_opts])
        assert it.options[it.answer] == rec["answer"].strip()
        assert it.answer == rec["answer_idx"]
        assert it.group in ("step1", "step2&3")
        assert it.question == rec["question"].strip()


def test_medqa_5options_are_the_same_questions_as_a_4option_subset():
    q4 = {it.question for it in load_medqa(DATA / "medqa/US_4options_test_200.jsonl").items}
    q5 = {it.question for it in load_medqa(DATA / "medqa/US_5options_test_100.jsonl").items}
    assert q5 <= q4


def test_medqa_malformed_lines_are_excluded_with_ids(tmp_path):
    good = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B", "answer": "b"}
    lines = [json.dumps(good), "{not json", json.dumps([1, 2]), "",
             json.dumps({**good, "answer_idx": None}), json.dumps({k: v for k, v in good.items() if k != "answer_idx"}),
             json.dumps({**good, "answer_idx": "E"}), json.dumps({**good, "options": {}}),
             json.dumps({**good, "answer": "c"}), json.dumps({**good, "question": "  "}),
             json.dumps({**good, "options": {"A": "a", "B": ""}}), json.dumps({**good, "answer_idx": "b"})]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    td = load_medqa(p)
    assert [it.id for it in td.items] == ["m.jsonl:0", "m.jsonl:11"]  # lower-case key normalized
    assert {(e.id, e.reason) for e in td.excluded} == {
        ("m.jsonl:1", "invalid_json"), ("m.jsonl:2", "not_an_object"), ("m.jsonl:4", "no_answer_key"),
        ("m.jsonl:5", "no_answer_key"), ("m.jsonl:6", "answer_not_in_options"), ("m.jsonl:7", "no_options"),
        ("m.jsonl:8", "answer_text_mismatch"), ("m.jsonl:9", "empty_question"), ("m.jsonl:10", "empty_option_text")}


def test_medqa_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_medqa(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="directory"):
        load_medqa(tmp_path)


# ------------------------------------------------------------------------------------------------------- PubMedQA

def test_pubmedqa_directory_uses_ground_truth_and_is_stratified():
    td = load_pubmedqa(DATA / "pubmedqa")
    truth = json.loads((DATA / "pubmedqa/test_ground_truth.json").read_text())
    ori = json.loads((DATA / "pubmedqa/ori_pqal.json").read_text())
    assert len(td) == 200 and td.excluded == [] and td.label_words
    assert [it.id for it in td.items] == list(truth)
    assert all(it.answer == truth[it.id] for it in td.items)
    # a stratified seeded sample: all three labels in the official 276/169/55 proportions
    assert Counter(it.answer for it in td.items) == {"yes": 110, "no": 68, "maybe": 22}
    it = td.items[0]
    assert list(it.options) == list(PUBMEDQA_LABELS)
    assert it.context == "\n".join(c.strip() for c in ori[it.id]["CONTEXTS"])
    assert it.question == ori[it.id]["QUESTION"].strip()


def test_pubmedqa_fold_file_semantics():
    fold = json.loads((DATA / "pubmedqa/pqal_fold0_dev_set.json").read_text())
    td = load_pubmedqa(DATA / "pubmedqa/ori_pqal.json", split=DATA / "pubmedqa/pqal_fold0_dev_set.json")
    assert [it.id for it in td.items] == list(fold)
    assert all(it.answer == fold[it.id]["final_decision"] for it in td.items)
    # the fold file is itself in the ori_pqal layout and loads directly
    td2 = load_pubmedqa(DATA / "pubmedqa/pqal_fold0_dev_set.json")
    assert [(i.id, i.answer, i.context) for i in td2.items] == [(i.id, i.answer, i.context) for i in td.items]
    # the whole shipped ori_pqal.json: 200 test + 50 dev records
    assert len(load_pubmedqa(DATA / "pubmedqa/ori_pqal.json")) == 250


def test_pubmedqa_damage(tmp_path):
    ori = {"1": {"QUESTION": "q1?", "CONTEXTS": ["a", "b"], "final_decision": "yes"},
           "2": {"QUESTION": "", "CONTEXTS": ["a"], "final_decision": "no"},
           "3": {"QUESTION": "q3?", "CONTEXTS": "not a list", "final_decision": "no"},
           "4": {"QUESTION": "q4?", "CONTEXTS": ["x"], "final_decision": "perhaps"},
           "5": {"QUESTION": "q5?", "CONTEXTS": ["x"]},
           "6": "junk"}
    (tmp_path / "ori.json").write_text(json.dumps(ori))
    td = load_pubmedqa(tmp_path / "ori.json")
    assert [it.id for it in td.items] == ["1"] and td.items[0].context == "a\nb"
    assert {(e.id, e.reason) for e in td.excluded} == {("2", "empty_question"), ("3", "bad_contexts"),
                                                       ("4", "bad_label"), ("5", "no_answer_key"), ("6", "not_an_object")}
    (tmp_path / "gt.json").write_text(json.dumps({"1": "No", "5": "maybe", "99": "yes"}))
    td = load_pubmedqa(tmp_path / "ori.json", ground_truth=tmp_path / "gt.json")
    assert [(it.id, it.answer) for it in td.items] == [("1", "no"), ("5", "maybe")]
    assert [(e.id, e.reason) for e in td.excluded] == [("99", "missing_record")]
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json"):
        load_pubmedqa(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="PMID"):
        load_pubmedqa(tmp_path / "list.json")


# ---------------------------------------------------------------------------------------------------------- USMLE

def test_usmle_real_files_with_malformed_items():
    td = load_usmle(DATA / "usmle")
    images = json.loads((DATA / "usmle/question_with_images.json").read_text())
    counts = Counter(it.group for it in td.items)
    reasons = td.excluded_ids()
    assert sorted(reasons["image_question"]) == sorted(f"{s}:{n}" for s, ns in images.items() for n in ns)
    # the known damage in step 2: no. 115 has option E merged into D's text (key E), no. 119 has no options
    assert "step2:115" in reasons["merged_option_text"]
    assert reasons["no_options"] == ["step2:119"]
    # more of the same kind of damage found by the same check (E/F merged into the previous option)
    assert sorted(reasons["merged_option_text"]) == ["step2:104", "step2:115", "step2:118", "step2:91"]
    assert counts == {"step1": 119 - 27, "step2": 120 - 10 - 5, "step3": 137 - 13}
    n_opts = Counter(len(it.options) for it in td.items)
    assert min(n_opts) >= 3 and max(n_opts) == 8
    sols = {s: json.loads((DATA / f"usmle/{s}_solutions.json").read_text()) for s in ("step1", "step2", "step3")}
    for it in td.items:
        step, no = it.id.split(":")
        assert it.group == step and it.answer == sols[step][no] and it.answer in it.options


def test_usmle_single_step_and_image_list_options(tmp_path):
    td = load_usmle(DATA / "usmle/step2.json")
    assert {it.group for it in td.items} == {"step2"} and len(td) == 105
    td = load_usmle(DATA / "usmle", steps=(1,), exclude_images=False)
    # without the image list, image questions with empty option texts are still caught
    assert sorted(td.excluded_ids()["empty_option_text"]) == ["step1:62", "step1:80", "step1:85"]
    with pytest.raises(FileNotFoundError, match="step4"):
        load_usmle(DATA / "usmle", steps=(4,))
    (tmp_path / "step1.json").write_text((DATA / "usmle/step1.json").read_text())
    (tmp_path / "step1_solutions.json").write_text(json.dumps({"1": "B"}))
    with pytest.raises(FileNotFoundError, match="question_with_images"):
        load_usmle(tmp_path)
    td = load_usmle(tmp_path, exclude_images=False)
    assert [it.id for it in td.items] == ["step1:1"]
    assert td.exclusion_counts()["no_answer_key"] == 119 - 1 - 3


# ---------------------------------------------------------------------------------------------- generic MCQ JSONL

def test_generic_mcq(tmp_path):
    rows = [{"question": "dict+letter", "options": {"A": "x", "B": "y"}, "answer": "B"},
            {"question": "list+index", "options": ["x", "y", "z"], "answer": 2, "id": "q2", "subject": "anatomy"},
            {"question": "list+text", "options": ["alpha", "beta"], "answer": "alpha", "context": "ctx"},
            {"question": "answer_idx", "options": {"A": "x", "B": "y"}, "answer_idx": "a"},
            {"question": "bad index", "options": ["x", "y"], "answer": 5},
            {"question": "unknown text", "options": ["x", "y"], "answer": "w"},
            {"question": "no answer", "options": ["x", "y"]},
            {"question": "one option", "options": ["x"], "answer": 0},
            {"question": "gap", "options": {"A": "x", "C": "y"}, "answer": "A"}]
    p = tmp_path / "bench.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    td = load_mcq(p)
    got = [(it.id, it.answer, list(it.options), it.group, it.context) for it in td.items]
    assert got == [("bench.jsonl:0", "B", ["A", "B"], "", ""), ("q2", "C", ["A", "B", "C"], "anatomy", ""),
                   ("bench.jsonl:2", "A", ["A", "B"], "", "ctx"), ("bench.jsonl:3", "A", ["A", "B"], "", "")]
    assert td.exclusion_counts() == {"answer_not_in_options": 2, "no_answer_key": 1, "too_few_options": 1,
                                     "non_consecutive_option_labels": 1}
    pj = tmp_path / "bench.json"
    pj.write_text(json.dumps(rows[:2]))
    assert len(load_mcq(pj)) == 2
    # MedQA files are valid generic MCQ files too
    assert len(load_mcq(DATA / "medqa/US_4options_test_200.jsonl")) == 200


def test_load_task_dispatch():
    assert load_task("usmle", DATA / "usmle", steps=(3,)).task == "usmle"
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmlu", DATA)
