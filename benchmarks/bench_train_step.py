#!/usr/bin/env python
"""One QLoRA training step: qlora70 vs transformers + peft + bitsandbytes, side by side in one run.

Same model shape and random base weights (one HF checkpoint written once, loaded by both), same token data (answer-only
labels: a random prompt prefix of 25-75% of each row is masked), same LoRA (r=64, alpha=16, dropout 0.1 on all 7
projections), NF4 + double quantization, gradient checkpointing, grad-norm clipping 0.3, AdamW lr 2e-4.

Each framework runs in its own subprocess (so peak RSS is its own): load, one warm-up step, then timed steps.
Rows: `ours` (qlora70, gradient checkpointing with full recomputation, as the peers), `ours-keep` (qlora70 with
`checkpoint_policy="keep_base_outputs"`, the Trainer's default on CPU: still checkpointed per layer, but the frozen
NF4 base outputs of the LoRA layers are kept from the forward, so the recomputation skips those matmuls; more memory,
less compute), `ours-auto` / `ours-auto-keep` (the same with the Trainer's `compute_dtype="auto"`: on a CPU whose bf16
matmuls measure faster, bf16 autocast over the fp32 model and fp32 LoRA masters; else identical to fp32), `peers`
(transformers + peft + bitsandbytes, HF gradient checkpointing, torch AdamW on CPU / bnb PagedAdamW32bit on GPU),
`peers-bf16` (CPU: the peers with the model and bnb compute dtype in bf16 under bf16 autocast).
On CPU the `ours*` rows apply `qlora70.native.keep_freed_memory()` as the Trainer does (no per-step page faults).
Reported: tokens/s (all B*T input tokens per step / best step time; the median is in the JSON), tokens per
CPU-second of the process (robust when other jobs share the cores; with --threads 1 it is the single-core rate),
the first step's loss (equal for all at B=0 init: the NF4 bytes agree), peak RSS of the training steps (VmHWM reset
after loading) and of the whole process (loading included); on GPU, torch.cuda.max_memory_allocated. On a shared
machine, compare with --threads 1: with 2 OpenMP threads every parallel op waits for a descheduled thread (~5 ms per
op under load).

Modes:
  (default)   CPU, SmolLM2-135M shape (30 layers, vocab 49152), 4 x 256 tokens per step
  --tiny      CPU, the tiny Llama of issue #18 (4 layers, hidden 512, 8 heads, MLP 1536, vocab 32000), 4 x 256 tokens
  --quick     CPU, SmolLM2-135M shape cut to 6 layers, 2 x 128 tokens
  --gpu       CUDA, Llama-2-7B shape, seq 1024, micro-batch 1, bf16 autocast
  --70b-fit   CUDA, qlora70 only: one Llama-2-70B-shaped QLoRA step (random NF4 weights made layer by layer on the GPU,
              seq 1024, micro-batch 1); records the peak allocated memory (must fit in 80 GB)

    python benchmarks/bench_train_step.py [--quick | --tiny | --gpu | --70b-fit] [--threads N] [--steps N]
        [--frameworks ours,ours-auto,peers,peers-bf16] [--out x.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

WORKERS = ["ours", "ours-keep", "ours-auto", "ours-auto-keep", "peers", "peers-bf16"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=64, alpha=16, dropout=0.1)
LR, CLIP = 2e-4, 0.3

MODES = {
    "cpu": dict(model="smollm2-135m", overrides={}, batch=4, seq=256, steps=3, device="cpu"),
    "quick": dict(model="smollm2-135m", overrides={"num_hidden_layers": 6}, batch=2, seq=128, steps=2, device="cpu"),
    "tiny": dict(model="llama2-7b", overrides=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
                 batch=4, seq=256, steps=5, device="cpu"),
    "gpu": dict(model="llama2-7b", overrides={}, batch=1, seq=1024, steps=5, device="cuda"),
    "70b": dict(model="llama2-70b", overrides={}, batch=1, seq=1024, steps=2, device="cuda"),
}


# ---- measurement helpers -----------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux: echo 5 > /proc/self/clear_refs) so the peak of the training steps alone can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) and HF-convention labels with a random 25-75% prompt prefix masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    for b in range(batch):
        p = int(torch.randint(seq // 4, 3 * seq // 4 + 1, (1,), generator=g))
        labels[b, :p] = -100
    return ids, labels


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- one framework per process -----------------------------------------------------------------------------------

def checkpoint_policies() -> list[str]:
    """The gradient-checkpointing policies this build's model supports ("full" always)."""
    import inspect

    from qlora70.model import set_gradient_checkpointing

    return ["full", "keep_base_outputs"] if "policy" in inspect.signature(set_gradient_checkpointing).parameters \
        else ["full"]


def setup_ours(ckpt: str, device: str, dtype: torch.dtype, policy: str = "full"):
    from qlora70.checkpoint import load_model
    from qlora70.config import LoRAConfig
    from qlora70.lora import inject_lora
    from qlora70.model import set_gradient_checkpointing
    from qlora70.optim import PagedAdamW

    model = load_model(ckpt, quantize="nf4", dtype=dtype, device=device, progress=False)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], targets=tuple(TARGETS)))
    if policy == "full":
        set_gradient_checkpointing(model, True)
    else:
        set_gradient_checkpointing(model, True, policy=policy)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, PagedAdamW(params, lr=LR)


def _autocast(ids: torch.Tensor, dtype: torch.dtype | None):
    return torch.autocast(ids.device.type, dtype=dtype) if dtype else torch.autocast(ids.device.type, enabled=False)


def step_ours(model, params, opt, ids, labels, autocast_dtype):
    from qlora70.losses import chunked_cross_entropy

    ctx = _autocast(ids, autocast_dtype)
    with ctx:
        hidden = model(ids, return_hidden=True)  # (B, T, D)
        s, n = chunked_cross_entropy(hidden, model.lm_head.weight, labels)
    loss = s / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def setup_peers(ckpt: str, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        import bitsandbytes as bnb_lib
        opt = bnb_lib.optim.PagedAdamW32bit(params, lr=LR)  # the QLoRA default (paged_adamw_32bit)
    else:
        opt = torch.optim.AdamW(params, lr=LR)  # bnb's paged optimizers need CUDA
    return model, params, opt


def step_peers(model, params, opt, ids, labels, autocast_dtype):
    ctx = _autocast(ids, autocast_dtype)
    with ctx:
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = MODES[args.mode]
    device = mode["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    autocast_dtype = torch.bfloat16 if device == "cuda" else None
    extra = {}
    t0 = time.perf_counter()
    if args.worker.startswith("peers"):
        if args.worker == "peers-bf16":
            dtype = autocast_dtype = torch.bfloat16
        model, params, opt = setup_peers(args.ckpt, device, dtype)
        step = step_peers
    else:  # ours[-auto][-keep]: fp32 or compute_dtype="auto"; full recompute or keep the frozen base outputs
        policy = "keep_base_outputs" if args.worker.endswith("-keep") else "full"
        if device == "cpu":
            from qlora70 import native
            from qlora70.ops import resolve_compute_dtype
            extra["malloc_tuned"] = native.keep_freed_memory()  # as the Trainer does on CPU
            if "-auto" in args.worker:
                compute, extra["compute_dtype_reason"] = resolve_compute_dtype("cpu", "auto")
                autocast_dtype = None if compute == torch.float32 else compute
        model, params, opt = setup_ours(args.ckpt, device, dtype, policy)
        step = step_ours
    extra["autocast"] = str(autocast_dtype) if autocast_dtype else None
    load_s = time.perf_counter() - t0
    vocab = json.load(open(os.path.join(args.ckpt, "config.json")))["vocab_size"]
    ids, labels = make_batch(vocab, args.batch, args.seq)
    ids, labels = ids.to(device), labels.to(device)
    rss_after_load = _status_kb("VmRSS")
    losses = [step(model, params, opt, ids, labels, autocast_dtype)]  # warm-up (also allocates optimizer states)
    reset_ok = reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(args.steps):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        losses.append(step(model, params, opt, ids, labels, autocast_dtype))
        sync(device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    tokens = args.batch * args.seq
    med = sorted(times)[len(times) // 2]
    # best step = the least disturbed by other jobs on a shared machine (the usual estimate of the uncontended speed)
    out = {"framework": args.worker, "tokens_per_s": tokens / min(times), "tokens_per_s_median": tokens / med,
           "step_s_best": min(times), "step_s_median": med, "step_s": times,
           "cpu_s_per_step": cpu_times, "tokens_per_cpu_s": tokens / min(cpu_times),
           "losses": losses, "load_s": load_s, "trainable_params": sum(p.numel() for p in params),
           "rss_after_load_mb": rss_after_load / 1024,
           "peak_rss_train_mb": _status_kb("VmHWM") / 1024 if reset_ok else None,
           "peak_rss_total_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads(), **extra}
    if device == "cuda":
        out["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["max_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return out


# ---- the 70B fit check ---------------------------------------------------------------------------------------------

def fit_70b(args, name: str = "llama2-70b", device: str = "cuda") -> dict:
    """qlora70 only: a Llama-2-70B-shaped model with random NF4 weights built layer by layer on the GPU, LoRA r=64 on
    all 7 projections, paged AdamW, gradient checkpointing (full recompute), bf16 autocast; `steps` steps of
    1 x 1024 tokens. (`name`/`device` allow a small dry run on CPU.)"""
    from torch import nn

    from qlora70.config import LlamaConfig, LoRAConfig
    from qlora70.layers import Linear4bit
    from qlora70.lora import inject_lora
    from qlora70.model import Llama, decoder_linears, set_gradient_checkpointing
    from qlora70.nf4 import quantize_nf4
    from qlora70.optim import PagedAdamW
    from tqdm import tqdm

    cfg = LlamaConfig.from_name(name)
    dev, bf16 = torch.device(device), torch.bfloat16
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Llama(cfg)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * std).to(bf16)

    for _, parent, attr, mod in tqdm(list(decoder_linears(model)), desc="random NF4 70B", unit="linear"):
        w = rand(mod.out_features, mod.in_features)
        setattr(parent, attr, Linear4bit.from_weight(quantize_nf4(w)))
        del w
    m = model.model
    m.embed_tokens.weight = nn.Parameter(rand(cfg.vocab_size, cfg.hidden_size, std=1.0), requires_grad=False)
    model.lm_head.weight = nn.Parameter(rand(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
    for norm in [m.norm] + [n for layer in m.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        norm.weight = nn.Parameter(torch.ones(cfg.hidden_size, device=dev, dtype=bf16), requires_grad=False)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=64, alpha=16, dropout=0.1))
    set_gradient_checkpointing(model, True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=LR)
    build_s = time.perf_counter() - t0
    weights_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None
    ids, labels = make_batch(cfg.vocab_size, args.batch, args.seq)
    ids, labels = ids.to(dev), labels.to(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        sync(dev.type)
        t = time.perf_counter()
        losses.append(step_ours(model, params, opt, ids, labels, bf16))
        sync(dev.type)
        times.append(time.perf_counter() - t)
    out = {"framework": "ours", "model": f"{name} shape", "build_s": build_s, "weights_and_lora_gb": weights_gb,
           "step_s": times, "losses": losses, "tokens_per_s": args.batch * args.seq / min(times),
           "trainable_params": sum(p.numel() for p in params)}
    if cuda:
        out.update(max_allocated_gb=torch.cuda.max_memory_allocated() / 2**30,
                   max_reserved_gb=torch.cuda.max_memory_reserved() / 2**30,
                   fits_80gb=torch.cuda.max_memory_reserved() < 80e9, gpu=torch.cuda.get_device_name())
    return out


# ---- driver ----------------------------------------------------------------------------------------------------------

def write_checkpoint(mode: dict, path: str) -> dict:
    """Random base weights (seeded) for the mode's shape as an HF safetensors checkpoint both frameworks load."""
    from qlora70.checkpoint import save_hf
    from qlora70.config import LlamaConfig
    from qlora70.model import Llama

    cfg = LlamaConfig.from_name(mode["model"], **mode["overrides"])
    dev = mode["device"]
    torch.manual_seed(0)
    with torch.device(dev):
        model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    save_hf(model, path, dtype=torch.bfloat16 if dev == "cuda" else torch.float32, progress=False)
    del model
    return {"model": mode["model"], **mode["overrides"], "params": cfg.num_params()}


def machine() -> dict:
    """The CPU model and its SIMD / matrix flags (the figures depend on them), torch's CPU capability."""
    info = {"cpu": platform.processor() or platform.machine(), "flags": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            first = fh.read().split("\n\n")[0]
        kv = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in first.splitlines() if ":" in ln)}
        info["cpu"] = kv.get("model name", info["cpu"])
        info["flags"] = [f for f in kv.get("flags", kv.get("Features", "")).split()
                         if f.startswith(("avx", "amx", "fma", "sve", "bf16", "asimd"))]
    except OSError:
        pass
    info["logical_cpus"] = os.cpu_count()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def run_worker(framework: str, args, ckpt: str, script: str | None = None) -> dict:
    """One framework's run in a fresh process of `script` (default: this file), so peak memory is its own."""
    cmd = [sys.executable, os.path.abspath(script or __file__), "--worker", framework, "--ckpt", ckpt, "--mode", args.mode,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads or 0)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"framework": framework, "error": (p.stderr or p.stdout)[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| framework | tokens/s (best step) | step s (best / median) | tokens per CPU-s | first loss | "
            "peak RSS train MB | peak RSS total MB | GPU max alloc GB |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | error: {r['error'].splitlines()[-1][:80]} |||||")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {r['framework']} | {r['tokens_per_s']:.1f} | {min(r['step_s']):.2f} / "
                     f"{r.get('step_s_median', min(r['step_s'])):.2f} "
                     f"| {f(r.get('tokens_per_cpu_s'), '.1f')} | {r['losses'][0]:.4f} | "
                     f"{f(r.get('peak_rss_train_mb'), '.0f')} | "
                     f"{f(r.get('peak_rss_total_mb'), '.0f')} | {f(r.get('max_allocated_gb'), '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small CPU config (6 layers, 2 x 128 tokens)")
    g.add_argument("--tiny", action="store_true", help="CPU, the tiny Llama of issue #18 (4 x 512, 4 x 256 tokens)")
    g.add_argument("--gpu", action="store_true", help="Llama-2-7B shape on CUDA, seq 1024")
    g.add_argument("--70b-fit", dest="fit70b", action="store_true", help="one 70B-shaped QLoRA step on one GPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per framework (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="run each framework this many times, alternating")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: torch's default)")
    ap.add_argument("--frameworks", default=None, help="comma list of " + ", ".join(WORKERS) + " (default: all; "
                    "-keep = checkpointing that keeps the frozen base outputs, -auto = compute_dtype auto)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/train_step_<mode>.json)")
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.mode = ("quick" if args.quick else "tiny" if args.tiny else "gpu" if args.gpu else "70b" if args.fit70b
                 else "cpu")
    mode = MODES[args.mode]
    args.steps = args.steps or mode["steps"]
    args.batch = args.batch or mode["batch"]
    args.seq = args.seq or mode["seq"]
    if mode["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--{args.mode} needs a CUDA GPU")
    result = {"mode": args.mode, "batch": args.batch, "seq": args.seq, "lora": LORA, "targets": TARGETS,
              "steps": args.steps, "torch": torch.__version__,
              "cpu_threads": args.threads or torch.get_num_threads(), "load_avg_start": os.getloadavg(),
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.mode == "70b":
        rows = [fit_70b(args)]
        result["runs"] = rows
        print(json.dumps(rows[0], indent=1))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
            ckpt = os.path.join(tmp, "base")
            result["model"] = write_checkpoint(mode, ckpt)
            rows = []
            keep = "keep_base_outputs" in checkpoint_policies()
            frameworks = args.frameworks or ",".join(
                [w for w in WORKERS if (keep or not w.endswith("-keep")) and (mode["device"] == "cpu" or
                                                                              w in ("ours", "ours-keep", "peers"))])
            for _ in range(args.repeat):
                for fw in frameworks.split(","):
                    r = run_worker(fw, args, ckpt)
                    rows.append(r)
                    print(f"{fw}: " + (f"{r['tokens_per_s']:.1f} tokens/s" if "error" not in r else "ERROR"),
                          file=sys.stderr, flush=True)
        result["runs"] = rows
        result["load_avg_end"] = os.getloadavg()
        best = {}
        for r in rows:
            if "error" not in r and r["tokens_per_s"] > best.get(r["framework"], {}).get("tokens_per_s", 0):
                best[r["framework"]] = r
        peers = [best[k] for k in ("peers", "peers-bf16") if k in best]
        for ours in ("ours", "ours-keep", "ours-auto", "ours-auto-keep"):
            if ours not in best or not peers:
                continue
            # against the peers' best tokens/s (and that row's memory)
            o, p, sfx = best[ours], max(peers, key=lambda r: r["tokens_per_s"]), ours[4:].replace("-", "_")
            result["speedup" + sfx] = o["tokens_per_s"] / p["tokens_per_s"]
            if o.get("tokens_per_cpu_s") and p.get("tokens_per_cpu_s"):
                result["speedup_cpu_time" + sfx] = o["tokens_per_cpu_s"] / p["tokens_per_cpu_s"]
            if o.get("peak_rss_train_mb") and p.get("peak_rss_train_mb"):
                result["peak_rss_train_ratio" + sfx] = o["peak_rss_train_mb"] / p["peak_rss_train_mb"]
            result["peak_rss_total_ratio" + sfx] = o["peak_rss_total_mb"] / p["peak_rss_total_mb"]
            if "max_allocated_gb" in o:
                result["gpu_mem_ratio" + sfx] = o["max_allocated_gb"] / p["max_allocated_gb"]
        m = result["machine"]
        print(f"\nQLoRA train step, {args.mode}: {result['model']}, {args.batch} x {args.seq} tokens, LoRA r=64 on "
              f"{len(TARGETS)} projections, NF4+DQ, grad checkpointing\nmachine: {m['cpu']}, {m['logical_cpus']} "
              f"logical CPUs, flags {' '.join(m['flags'])}; torch {torch.__version__} "
              f"({m['torch_cpu_capability']}), threads {result['cpu_threads']}, "
              f"load avg {result['load_avg_start'][0]:.1f}\n")
        print(table(rows))
        for k, v in result.items():
            if k.startswith(("speedup", "peak_rss", "gpu_mem_ratio")):
                print(f"{k}: {v:.2f}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"train_step_{args.mode}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
