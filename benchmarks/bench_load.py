"""Peak host memory of streaming NF4 loading, on a synthetic Llama-2-7B-shaped sharded bf16 checkpoint.

1. Writes random bf16 weights in HF layout (model-0000i-of-0000n.safetensors + index), one tensor in memory at a time.
2. In a fresh subprocess, `load_model(dir, quantize="nf4", dtype=bfloat16)` and reads the process's peak RSS
   (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), the RSS right after `import torch, qlora70` (baseline) and the
   bytes of the loaded model.
3. Target: peak RSS < 1.3 x (quantized model size + largest checkpoint tensor).

    python benchmarks/bench_load.py --layers 4          # quick: ~1.6 GB on disk
    python benchmarks/bench_load.py                     # full 7B shape: ~13.5 GB on disk
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from qlora70.checkpoint import parse_size, write_safetensors  # noqa: E402
from qlora70.config import LlamaConfig  # noqa: E402
from qlora70.io import atomic_write_json  # noqa: E402

GB = 1e9

CHILD = r"""
import json, os, resource, sys, time
import torch
import qlora70
from qlora70.checkpoint import load_model, SafetensorsFile
torch.set_num_threads(int(sys.argv[2]))
def rss():  # current RSS in bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
t0 = time.time()
m = load_model(sys.argv[1], quantize="nf4", dtype=torch.bfloat16, progress=False)
dt = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
seen, size = set(), 0
for t in list(m.parameters()) + list(m.buffers()):
    if t.data_ptr() not in seen:
        seen.add(t.data_ptr())
        size += t.numel() * t.element_size()
d = sys.argv[1]
largest = max(max(s.entries[k][3] - s.entries[k][2] for k in s.keys())
              for s in (SafetensorsFile(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")))
nf4 = sum(mod.quant.nbytes for mod in m.modules() if type(mod).__name__ == "Linear4bit")
print(json.dumps(dict(load_s=dt, peak_rss=peak, baseline_rss=base, after_rss=rss(), model_bytes=size,
                      nf4_linear_bytes=nf4, largest_tensor=largest)))
"""


def synth_specs(cfg: LlamaConfig, seed: int = 0):
    """HF key order; each tensor is generated only when the writer asks for it."""
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    shapes = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                   (p + "mlp.down_proj.weight", (h, f)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]

    def make(k, shape):
        def produce():
            if len(shape) == 1:
                return torch.ones(shape, dtype=torch.bfloat16)
            g = torch.Generator().manual_seed(seed + k)
            return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        return produce
    return [(n, s, torch.bfloat16, make(k, s)) for k, (n, s) in enumerate(shapes)]


def write_checkpoint(d: str, cfg: LlamaConfig, shard_size: int) -> tuple[int, float]:
    from tqdm import tqdm
    specs = synth_specs(cfg)
    total = sum(torch.Size(s).numel() * 2 for _, s, _, _ in specs)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(d)) or ".").free
    if free < total + 2 * 2 ** 30:
        raise SystemExit(f"bench_load: the checkpoint needs {total / GB:.1f} GB but only {free / GB:.1f} GB are free "
                         f"under {os.path.dirname(os.path.abspath(d))}; use --layers N to shrink it or --dir elsewhere")
    os.makedirs(d, exist_ok=True)
    shards, cur, size = [], [], 0
    for sp in specs:
        nb = torch.Size(sp[1]).numel() * 2
        if cur and size + nb > shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(sp)
        size += nb
    shards.append(cur)
    n = len(shards)
    t0 = time.time()
    wmap = {}
    bar = tqdm(total=len(specs), desc="write synthetic checkpoint", unit="tensor")
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"

        def counted(sp):
            return (*sp[:3], lambda: (bar.update(1), sp[3]())[1])
        write_safetensors(os.path.join(d, name), [counted(sp) for sp in shard])
        wmap.update({sp[0]: name for sp in shard})
    bar.close()
    atomic_write_json(os.path.join(d, "model.safetensors.index.json"),
                      {"metadata": {"total_size": total}, "weight_map": wmap})
    hf = cfg.to_hf()
    hf["torch_dtype"] = "bfloat16"
    atomic_write_json(os.path.join(d, "config.json"), hf)
    return total, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the full Llama-2-7B shape)")
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                   "bench_load.json"))
    a = ap.parse_args()
    cfg = LlamaConfig.from_name("llama2-7b", num_hidden_layers=a.layers)
    tmp = a.dir is None
    d = a.dir or tempfile.mkdtemp(prefix="qlora70-bench-load-", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        if os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
            disk, wt = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), 0.0
            print(f"reusing the checkpoint in {d}")
        else:
            disk, wt = write_checkpoint(d, cfg, parse_size(a.shard_size))
        out = subprocess.run([sys.executable, "-c", CHILD, d, str(a.threads)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")})
        if out.returncode:
            raise SystemExit(f"bench_load: the loading subprocess failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if tmp and not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    budget = r["model_bytes"] + r["largest_tensor"]
    r.update(layers=a.layers, params=cfg.num_params(), checkpoint_bytes=disk, write_s=wt, threads=a.threads,
             target_bytes=1.3 * budget, ratio=r["peak_rss"] / budget,
             ratio_minus_baseline=(r["peak_rss"] - r["baseline_rss"]) / budget, ok=r["peak_rss"] < 1.3 * budget)
    n_lin = cfg.num_params(False) - cfg.hidden_size * (2 * a.layers + 1)  # decoder linear weights
    rows = [("layers", f"{a.layers}"), ("parameters", f"{cfg.num_params() / 1e9:.2f} B"),
            ("bf16 checkpoint on disk", f"{disk / GB:.2f} GB"), ("write time", f"{wt:.1f} s"),
            ("load + quantize time", f"{r['load_s']:.1f} s ({a.threads} threads)"),
            ("loaded model (NF4 linears + bf16 rest)", f"{r['model_bytes'] / GB:.3f} GB"),
            ("  of which NF4 linears", f"{r['nf4_linear_bytes'] / GB:.3f} GB ({8 * r['nf4_linear_bytes'] / n_lin:.3f} "
                                       "bits/param)"),
            ("largest checkpoint tensor", f"{r['largest_tensor'] / GB:.3f} GB"),
            ("RSS after `import torch, qlora70`", f"{r['baseline_rss'] / GB:.3f} GB"),
            ("peak RSS (ru_maxrss)", f"{r['peak_rss'] / GB:.3f} GB"),
            ("RSS after loading", f"{r['after_rss'] / GB:.3f} GB"),
            ("peak / (model + largest tensor)", f"{r['ratio']:.3f}  (target < 1.3: {'PASS' if r['ok'] else 'FAIL'})"),
            ("same, import baseline subtracted", f"{r['ratio_minus_baseline']:.3f}")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    atomic_write_json(a.json, r)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
