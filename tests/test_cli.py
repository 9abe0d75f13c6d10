"""The `qlora70` command on a tiny model: every command runs, bad arguments and missing files give one-line errors."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import normal_init, tiny_llama
from qlora70.cli import main

REPO = Path(__file__).resolve().parent.parent
MEDQA = REPO / "data" / "medqa" / "US_4options_test_200.jsonl"
MEADOW = REPO / "data" / "medical_meadow" / "wikidoc_patient_information_800.json"


def _sentences():
    rows = json.loads(MEADOW.read_text())[:300]
    for r in rows:
        yield f"Question: {r['instruction']} {r['input']}\nAnswer: {r['output']}"[:2000]
    for L in "ABCDE":
        yield f"Answer: {L}. yes no maybe"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama in HF format with a sentencepiece tokenizer.model beside it."""
    spm = pytest.importorskip("sentencepiece")
    from qlora70.checkpoint import save_hf

    d = tmp_path_factory.mktemp("tiny_hf")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_sentences(), model_writer=buf, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, character_coverage=0.999, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    m = tiny_llama(0, init=normal_init(0.05), eval=False, vocab_size=416, max_position_embeddings=512)
    save_hf(m, d, dtype=torch.float32, progress=False)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d


def run_cli(*args):
    return main([str(a) for a in args])


def test_help_for_every_command(capsys):
    for cmd in ["train", "eval", "quantize", "merge", "generate", "export-gguf", "plan"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"qlora70 {cmd}" in out


def test_quantize_generate_eval(tiny_model, tmp_path, capsys):
    q = tmp_path / "nf4"
    assert run_cli("quantize", "--model", tiny_model, "--out", q, "--device", "cpu") == 0
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert run_cli("generate", "--model", tiny_model, "--prompt", "Question: what is gout?", "--max-new-tokens", 5,
                   "--device", "cpu") == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    assert run_cli("eval", "--model", tiny_model, "--task", "medqa", "--data", MEDQA, "--limit", 4, "--out", out,
                   "--device", "cpu") == 0
    rep = json.loads((out / "eval_medqa.json").read_text())
    assert rep["n_scored"] == 4 and rep["limit"] == 4 and 0 <= rep["accuracy"] <= 1
    assert "medqa" in capsys.readouterr().out


def test_train_merge_export(tiny_model, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--model", tiny_model, "--data", MEADOW, "--out", run, "--preset", "demo",
                   "--max-steps", 2, "--seq-len", 96, "--batch-size", 4, "--micro-batch-size", 2, "--val-size", 8,
                   "--save-every", 1, "--device", "cpu") == 0
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    assert not (run / "adapter").exists()  # the final adapter is written once, at the run's root
    ac = json.loads((run / "adapter_config.json").read_text())
    assert ac["peft_type"] == "LORA" and ac["r"] == 64 and ac["lora_alpha"] == 16
    rc = json.loads((run / "run_config.json").read_text())
    assert rc["run"]["seq_len"] == 96 and rc["run"]["max_steps"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len([json.loads(x) for x in lines if '"loss"' in x]) >= 2
    # resume from the latest checkpoint: already at max_steps, so it finishes immediately with the same adapter
    assert run_cli("train", "--model", tiny_model, "--data", MEADOW, "--out", run, "--preset", "demo",
                   "--max-steps", 2, "--seq-len", 96, "--batch-size", 4, "--micro-batch-size", 2, "--val-size", 8,
                   "--device", "cpu", "--resume") == 0
    merged = tmp_path / "merged"
    assert run_cli("merge", "--model", tiny_model, "--adapter", run, "--out", merged) == 0
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    g = tmp_path / "m.gguf"
    assert run_cli("export-gguf", "--model", tiny_model, "--adapter", run, "--out", g, "--qtype", "Q8_0") == 0
    assert g.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("args,needle", [
    (["eval", "--model", "/nonexistent/model", "--task", "medqa", "--data", str(MEDQA)], "/nonexistent/model"),
    (["generate", "--model", "/no/such.gguf", "--prompt", "hi"], "/no/such.gguf"),
    (["train", "--model", "/no/model", "--data", "/no/data.json", "--out", "/tmp/x"], "/no/data.json"),
    (["merge", "--model", "/no/model", "--adapter", "/no/adapter", "--out", "/tmp/x"], "/no/model"),
    (["plan", "--model", "llama2-700b"], "llama2-700b"),
])
def test_bad_input_is_one_line(args, needle, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_export_gguf_bad_tokenizer_or_training_data_fails_before_loading(tiny_model, tmp_path, capsys):
    """An explicit --tokenizer is never dropped for a file without a vocabulary; flags fail before the model loads."""
    out = str(tmp_path / "m.gguf")
    model = str(tiny_model)
    assert main(["export-gguf", "--model", model, "--tokenizer", "/no/tokenizer.model", "--out", out]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/no/tokenizer.model" in err and not os.path.exists(out)
    assert main(["export-gguf", "--model", model, "--training-data", "/no/train.jsonl", "--out", out]) == 1
    assert "/no/train.jsonl" in capsys.readouterr().err and not os.path.exists(out)


def test_bad_model_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["generate", "--model", str(bad), "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.gguf" in err


def test_console_script_and_usage_errors():
    r = subprocess.run([sys.executable, "-m", "qlora70.cli", "eval", "--task", "nope"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "qlora70.cli", "plan", "--model", "llama2-7b"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and "total (peak)" in r.stdout


def test_train_nproc2_equals_one_process(tiny_model, tmp_path):
    """`qlora70 train --nproc 2` (FSDP2, gloo, CPU) gives the adapter of one process with the same global batch."""
    from safetensors.torch import load_file
    common = ["train", "--model", tiny_model, "--data", MEADOW, "--preset", "demo", "--max-steps", 3,
              "--seq-len", 64, "--batch-size", 8, "--lora-dropout", 0, "--lora-r", 8, "--val-size", 0,
              "--save-every", 0, "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*common, "--micro-batch-size", 4, "--out", one) == 0
    assert run_cli(*common, "--micro-batch-size", 2, "--nproc", 2, "--out", two) == 0
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_rerun_into_a_used_out_dir_fails_fast_and_default_dirs_step_aside(tmp_path):
    from qlora70.config import RunConfig
    from qlora70.run import free_run_dir, run_experiment
    def fake_run(d):  # the layout Trainer.save_checkpoint leaves
        (d / "checkpoints" / "step-000030").mkdir(parents=True)
        (d / "checkpoints" / "latest.json").write_text('{"dir": "step-000030"}')

    used = tmp_path / "runs" / "demo"
    fake_run(used)
    with pytest.raises(ValueError, match=r"already holds a training run .* --resume"):
        run_experiment(RunConfig(), [], str(used), eval_specs=[])  # raised before any model or data is touched
    assert free_run_dir(str(used)) == f"{used}-2"
    (tmp_path / "runs" / "demo-2" / "checkpoints").mkdir(parents=True)
    assert free_run_dir(str(used)) == f"{used}-2"  # an empty checkpoints dir is not a run
    fake_run(tmp_path / "runs" / "demo-2")
    assert free_run_dir(str(used)) == f"{used}-3"
    assert free_run_dir(str(tmp_path / "fresh")) == str(tmp_path / "fresh")


# ---- issue 19: what a new user tripped on ------------------------------------------------------------------------
PUBMEDQA = REPO / "data" / "pubmedqa"


def _small_pubmedqa(d: Path, n: int = 4, ground_truth: bool = False) -> Path:
    recs = json.loads((PUBMEDQA / "ori_pqal.json").read_text())
    keep = dict(list(recs.items())[:n])
    d.mkdir(parents=True, exist_ok=True)
    (d / "ori_pqal.json").write_text(json.dumps(keep))
    if ground_truth:
        (d / "test_ground_truth.json").write_text(json.dumps({k: v["final_decision"] for k, v in keep.items()}))
    return d


def test_pubmedqa_without_ground_truth_fails_and_names_the_way_out(tiny_model, tmp_path, capsys):
    d = _small_pubmedqa(tmp_path / "pq")
    assert main(["eval", "--model", str(tiny_model), "--task", "pubmedqa", "--data", str(d), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test_ground_truth.json" in err and "--split all" in err
    out = tmp_path / "rep"
    assert main(["eval", "--model", str(tiny_model), "--task", "pubmedqa", "--data", str(d), "--split", "all",
                 "--out", str(out), "--device", "cpu"]) == 0
    rep = json.loads((out / "eval_pubmedqa.json").read_text())
    assert rep["n_scored"] == 4 and rep["split"].startswith("all labelled items of ori_pqal.json (4 records")
    assert "Split scored: all labelled items" in capsys.readouterr().out
    _small_pubmedqa(d, ground_truth=True)
    assert main(["eval", "--model", str(tiny_model), "--task", "pubmedqa", "--data", str(d), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert json.loads((out / "eval_pubmedqa.json").read_text())["split"] == "test (test_ground_truth.json, 4 PMIDs)"
    assert main(["eval", "--model", str(tiny_model), "--task", "medqa", "--data", str(MEDQA), "--split", "all"]) == 1
    assert "--split applies to --task pubmedqa only" in capsys.readouterr().err


def test_default_validation_split_on_a_small_file(tiny_model, tmp_path, capsys):
    small = tmp_path / "small.json"
    small.write_text(json.dumps(json.loads(MEADOW.read_text())[:24]))
    run = tmp_path / "run"  # the sm70 preset: a 1% validation split, 24 entries -> rounds to 0 -> 1 entry held out
    assert main(["train", "--model", str(tiny_model), "--data", str(small), "--out", str(run), "--max-steps", "1",
                 "--seq-len", "64", "--batch-size", "2", "--micro-batch-size", "2", "--eval", "none",
                 "--device", "cpu"]) == 0
    assert "validation fraction 0.01 of 24 entries rounds to 0; holding out 1 entry" in capsys.readouterr().out
    rep = json.loads((run / "report.json").read_text())
    assert rep["data"]["n_val"] == 1 and rep["data"]["n_train"] == 23 and rep["after"] == {}
    assert json.loads((run / "run_config.json").read_text())["run"]["eval"] == []


def test_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for args in (["train", "--model", "m", "--data", str(MEADOW), "--out", str(f)],
                 ["eval", "--model", "m", "--task", "medqa", "--data", str(MEDQA), "--out", str(f)]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--out {f} is an existing file; --out must be a directory" in err
        assert "Errno" not in err


def test_train_eval_tasks(tiny_model, tmp_path, capsys):
    assert main(["train", "--model", "m", "--data", str(MEADOW), "--out", str(tmp_path / "x"),
                 "--eval", "medqa,nope"]) == 1
    assert "--eval 'medqa,nope': choose a comma list of medqa, pubmedqa, usmle, or none" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model), "--data", str(MEADOW), "--out", str(run), "--preset", "demo",
                 "--max-steps", "1", "--seq-len", "64", "--batch-size", "2", "--micro-batch-size", "2",
                 "--val-size", "0", "--eval", "medqa", "--eval-limit", "2", "--device", "cpu"]) == 0
    rep = json.loads((run / "report.json").read_text())
    assert list(rep["after"]) == ["medqa"] and rep["after"]["medqa"]["n_scored"] == 2
    assert list(rep["contamination"]["per_task"]) == ["medqa"]


def test_bad_hyperparameter_fails_before_anything_heavy_loads():
    """A bad --lr (or any value) is rejected while building the RunConfig: before torch, the model or the data."""
    code = ("import sys, time; t = time.perf_counter(); from qlora70.cli import main; "
            "rc = main(['train', '--model', '/no/model', '--data', '/no/data', '--out', '/tmp/q70-x', '--lr', '-1']); "
            "print(rc, 'torch' in sys.modules, f'{time.perf_counter() - t:.2f}')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    rc, torch_loaded, _ = r.stdout.split()
    assert rc == "1" and torch_loaded == "False", r.stdout + r.stderr
    assert "TrainConfig.lr must be > 0, got -1.0" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- issue 15: paired comparison, selective answering, shot robustness, the run report's paired section ------------
MEDQA_DEV = REPO / "data" / "medqa" / "US_4options_dev_300.jsonl"


def test_eval_compare_and_target_accuracy(tiny_model, tmp_path, capsys):
    from qlora70.metrics import compare_files, read_predictions, target_accuracy
    from qlora70.metrics_report import item_metrics
    common = ["eval", "--model", str(tiny_model), "--task", "medqa", "--data", str(MEDQA), "--limit", "12",
              "--device", "cpu", "--seed", "3"]
    qa, fp = tmp_path / "nf4", tmp_path / "fp32"
    assert main(common + ["--out", str(qa), "--target-accuracy", "0.5"]) == 0
    assert main(common + ["--out", str(fp), "--no-quantize"]) == 0
    capsys.readouterr()
    # --target-accuracy: chosen on one seeded half, reported on the other; the JSON holds exactly metrics.*'s figures
    rep = json.loads((qa / "eval_medqa.json").read_text())
    pred = read_predictions(qa / "eval_medqa_predictions.jsonl")
    conf, hit = pred.probs().max(axis=1), pred.probs().argmax(axis=1) == pred.gold
    want = target_accuracy(conf, hit, 0.5, seed=3).to_dict()
    got = rep["calibration_selective"]["target_accuracy"]
    assert got == pytest.approx(want, nan_ok=True) and got["n_select"] + got["n_report"] == 12
    assert rep["calibration_selective"]["calibration"] == item_metrics(pred).calibration.to_dict()  # one source
    for f in ("eval_medqa_reliability.png", "eval_medqa_coverage.png"):
        assert (qa / f).read_bytes()[:4] == b"\x89PNG"
    lm = json.loads((qa / "lm_eval" / "results_eval_medqa.json").read_text())
    assert lm["results"]["medqa_4options"]["acc,none"] == pytest.approx(rep["accuracy"])
    # --compare A B: the paired table printed and saved, the numbers those of metrics.compare_files
    a, b = qa / "eval_medqa_predictions.jsonl", fp / "eval_medqa_predictions.jsonl"
    out = tmp_path / "cmp"
    assert main(["eval", "--compare", str(a), str(b), "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    res = compare_files(a, b, seed=3)  # both files are eval_medqa_predictions.jsonl: named A and B
    saved = json.loads((out / "compare.json").read_text())["tasks"]["compare"]
    assert saved["paired"]["p_value"] == pytest.approx(res.p_value) and saved["paired"]["ci95"] == pytest.approx(
        list(res.ci95))
    assert saved["paired"]["right_to_wrong"] == res.right_to_wrong and saved["paired"]["n_resamples"] == 10_000
    assert (res.name_a, res.name_b) == ("A", "B") and "McNemar exact p" in printed and res.verdict in printed
    assert f"{res.p_value:.3g}" in printed and (out / "compare_coverage.png").is_file()
    # different item sets: a one-line error naming the counts, unless --intersect
    small = tmp_path / "small"
    assert main(common[:7] + ["--limit", "5", "--device", "cpu", "--seed", "3", "--out", str(small)]) == 0
    capsys.readouterr()
    c = small / "eval_medqa_predictions.jsonl"
    assert main(["eval", "--compare", str(a), str(c)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--intersect" in err and "different items" in err
    shared = set(read_predictions(a).ids) & set(read_predictions(c).ids)
    assert len(shared) == 5  # the seeded 5-item sample lies inside the 12-item one
    assert main(["eval", "--compare", str(a), str(c), "--intersect"]) == 0
    assert "| compare | 5 |" in capsys.readouterr().out


def test_eval_shot_seeds_keep_the_items(tiny_model, tmp_path, capsys):
    out = tmp_path / "shots"
    assert main(["eval", "--model", str(tiny_model), "--task", "medqa", "--data", str(MEDQA), "--limit", "4",
                 "--k-shot", "1", "--fewshot-data", str(MEDQA_DEV), "--shot-seeds", "3", "--out", str(out),
                 "--max-length", "512", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rob = json.loads((out / "eval_medqa_shot_robustness.json").read_text())
    assert rob["seeds"] == [0, 1, 2] and rob["k_shot"] == 1
    accs, ids = [], []
    for s in rob["seeds"]:
        rep = json.loads((out / f"eval_medqa_shots{s}.json").read_text())
        assert rep["shot_seed"] == s and rep["seed"] == 0 and rep["k_shot"] == 1
        accs.append(rep["accuracy"])
        ids.append([json.loads(x)["id"] for x in (out / f"eval_medqa_shots{s}_predictions.jsonl").read_text().splitlines()])
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 4  # the shots move, the --limit sample does not
    assert rob["accuracies"] == accs and rob["mean"] == pytest.approx(sum(accs) / 3)
    assert rob["min"] == min(accs) and rob["max"] == max(accs)
    assert rob["std"] == pytest.approx(float(torch.tensor(accs, dtype=torch.float64).std()))  # sample std (ddof=1)
    assert "| 1 | 0, 1, 2 |" in printed
    assert main(["eval", "--model", str(tiny_model), "--task", "medqa", "--data", str(MEDQA), "--shot-seeds",
                 "2"]) == 1
    assert "--shot-seeds N needs N >= 1 and --k-shot K" in capsys.readouterr().err


def test_run_report_paired_section_equals_the_per_item_files(tiny_model, tmp_path):
    """report.json's paired section is metrics.* on the per-item files; report.md shows the same figures."""
    from qlora70.cli import build_parser
    from qlora70.metrics import calibration, compare, read_predictions
    from qlora70.recipe import run_config_from_args
    from qlora70.run import EvalSpec, run_experiment
    run = tmp_path / "run"
    a = build_parser().parse_args(["train", "--model", str(tiny_model), "--data", str(MEADOW), "--out", str(run),
                                   "--preset", "demo", "--max-steps", "2", "--seq-len", "64", "--batch-size", "2",
                                   "--micro-batch-size", "2", "--val-size", "0", "--save-every", "0", "--lr", "3e-3",
                                   "--device", "cpu"])
    cfg = run_config_from_args(a, str(run), progress=False)
    assert cfg.eval.target_accuracy == 0.8  # the demo preset turns the held-out threshold on
    rep = run_experiment(cfg, [str(MEADOW)], str(run), eval_specs=[EvalSpec("medqa", "medqa", str(MEDQA), 10)],
                         save_merged=False, progress=False, contamination=False)
    saved = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    sec = saved["paired"]["tasks"]["medqa"]
    assert rep["paired"] == saved["paired"]
    pb = read_predictions(run / "eval" / "medqa_before_predictions.jsonl")
    pa = read_predictions(run / "eval" / "medqa_after_predictions.jsonl")
    want = compare(pb, pa, seed=cfg.train.seed)
    got = sec["paired"]
    assert (got["n"], got["right_to_wrong"], got["wrong_to_right"]) == (10, want.right_to_wrong, want.wrong_to_right)
    assert got["p_value"] == pytest.approx(want.p_value) and got["ci95"] == pytest.approx(list(want.ci95))
    assert got["accuracy_a"] == pytest.approx(saved["before"]["medqa"]["accuracy"])
    assert got["accuracy_b"] == pytest.approx(saved["after"]["medqa"]["accuracy"])
    for run_name, p in (("before", pb), ("after", pa)):
        cal = calibration(p.log_probs(), p.gold)
        assert sec[run_name]["calibration"]["ece"] == pytest.approx(cal.ece)
        assert sec[run_name]["calibration"]["n_bins"] == 15
        # report.md shows report.json's numbers
        c, s = sec[run_name]["calibration"], sec[run_name]["selective"]
        assert f"| medqa | {run_name} | {c['ece']:.4f} | {c['brier']:.4f} | {c['nll']:.4f} | {s['aurc']:.4f} |" in md
        assert sec[run_name]["target_accuracy"]["target"] == 0.8
    assert "## Paired before / after" in md and f"{got['p_value']:.3g} |" in md
    assert f"[{got['ci95'][0]:+.3f}, {got['ci95'][1]:+.3f}]" in md and got["verdict"] in md
    sig = "yes" if got["p_value"] < 0.05 else "no"
    assert f"| {sig} |" in md and got["verdict"].startswith("significant" if sig == "yes" else "not significant")
    assert any(got["verdict"] in n for n in saved["notes"])  # the paired verdict replaces "the intervals overlap"
    assert not any("intervals overlap" in n for n in saved["notes"])
    for f in ("medqa_reliability_before.png", "medqa_reliability_after.png", "medqa_coverage.png"):
        assert (run / f).read_bytes()[:4] == b"\x89PNG" and f"]({f})" in md
    # `qlora70 eval --compare RUN_DIR`: the same paired figures from the run's per-item files alone
    cmp = tmp_path / "cmp"
    assert main(["eval", "--compare", str(run), "--out", str(cmp), "--seed", str(cfg.train.seed)]) == 0
    assert json.loads((cmp / "compare.json").read_text())["tasks"]["medqa"]["paired"] == got
