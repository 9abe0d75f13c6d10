"""Draw the small data subsets shipped in `data/` from the full files (run once by a maintainer, not at run time).

    python data/make_subsets.py /path/to/full/data   # the folder laid out as data/README.md describes

Every subset is a seeded random sample (never the first N: PubMedQA's `test_set.json` is sorted by label), written in the
file's native format (JSONL lines copied byte for byte; JSON re-serialized with the same keys). Re-running with the same
source files reproduces the same subsets exactly.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

SEED = 20240601
HERE = Path(__file__).resolve().parent


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
    os.replace(tmp, path)


def _sample_sorted(rng: random.Random, n_total: int, k: int) -> list[int]:
    return sorted(rng.sample(range(n_total), k))


def main(src: Path) -> None:
    rng = random.Random(SEED)

    # Medical Meadow: wikidoc patient information, 800 of 5942 entries.
    out = HERE / "medical_meadow"
    out.mkdir(exist_ok=True)
    meadow = json.loads((src / "medical_meadow/medical_meadow_small.json").read_text(encoding="utf-8"))
    _write_json(out / "wikidoc_patient_information_800.json", [meadow[i] for i in _sample_sorted(rng, len(meadow), 800)])
    for name in ("LICENSE", "medAlpaca_DATA_DESCRIPTION.md"):
        shutil.copyfile(src / "medical_meadow" / name, out / name)

    # MedQA-USMLE: 4-option dev 300 (k-shot pool, demo training), 4-option test 200 (held-out eval),
    # 5-option test 100 (the first 100 of the same test sample: the 4- and 5-option test files are line-aligned).
    out = HERE / "medqa"
    out.mkdir(exist_ok=True)
    dev = (src / "medqa/US_4options_phrases_no_exclude_dev.jsonl").read_text(encoding="utf-8").splitlines()
    _write_lines(out / "US_4options_dev_300.jsonl", [dev[i] for i in _sample_sorted(rng, len(dev), 300)])
    test4 = (src / "medqa/US_4options_phrases_no_exclude_test.jsonl").read_text(encoding="utf-8").splitlines()
    test5 = (src / "medqa/US_test_5options.jsonl").read_text(encoding="utf-8").splitlines()
    if len(test4) != len(test5):
        raise ValueError("the 4- and 5-option MedQA test files are expected to be line-aligned")
    order = rng.sample(range(len(test4)), 200)
    _write_lines(out / "US_4options_test_200.jsonl", [test4[i] for i in sorted(order)])
    _write_lines(out / "US_5options_test_100.jsonl", [test5[i] for i in sorted(order[:100])])
    shutil.copyfile(src / "medqa/MedQA_LICENSE_jind11", out / "MedQA_LICENSE_jind11")

    # PubMedQA (PQA-L): 200 of the 500 official test items, stratified by label (proportional, seeded), plus the
    # whole fold-0 dev file (50 items, the k-shot pool); ori_pqal.json holds exactly those 250 records.
    out = HERE / "pubmedqa"
    out.mkdir(exist_ok=True)
    ori = json.loads((src / "pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    truth = json.loads((src / "pubmedqa/test_ground_truth.json").read_text(encoding="utf-8"))
    fold_dev = json.loads((src / "pubmedqa/pqal_fold0_dev_set.json").read_text(encoding="utf-8"))
    by_label: dict[str, list[str]] = {}
    for pmid in sorted(truth):
        by_label.setdefault(truth[pmid], []).append(pmid)
    quota = {lab: round(200 * len(ids) / len(truth)) for lab, ids in sorted(by_label.items())}
    quota[max(quota, key=quota.get)] += 200 - sum(quota.values())
    test_ids = sorted(p for lab in sorted(by_label) for p in rng.sample(by_label[lab], quota[lab]))
    keep = set(test_ids) | set(fold_dev)
    _write_json(out / "ori_pqal.json", {k: v for k, v in ori.items() if k in keep})
    _write_json(out / "test_ground_truth.json", {k: truth[k] for k in test_ids})
    _write_json(out / "pqal_fold0_dev_set.json", fold_dev)
    shutil.copyfile(src / "pubmedqa/LICENSE", out / "LICENSE")

    # USMLE self-assessment: all files, unchanged (malformed items included on purpose).
    out = HERE / "usmle"
    out.mkdir(exist_ok=True)
    for name in sorted(os.listdir(src / "usmle")):
        shutil.copyfile(src / "usmle" / name, out / name)
    print("subsets written under", HERE)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python data/make_subsets.py /path/to/full/data")
    main(Path(sys.argv[1]))
