"""NF4 + double-quant quantize / dequantize throughput: qlora70 vs bitsandbytes (and torchao when installed).

    python benchmarks/bench_nf4.py                 # 4096x4096 + Llama-2-70B layer shapes, CPU (and CUDA if present)
    python benchmarks/bench_nf4.py --quick         # 4096x4096 only
    python benchmarks/bench_nf4.py --out benchmarks/out/nf4.json

GB/s counts the bytes a kernel must move: quantize reads 2 B/elem (bf16) and writes ~0.52 B/elem; dequantize reads
~0.52 B/elem and writes 2 B/elem (bf16). "vs best peer" is the ratio of the fastest peer's time to ours (>1: we win).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qlora70 import ops  # noqa: E402
from qlora70.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "70b q/o_proj 8192x8192": (8192, 8192), "70b k/v_proj 1024x8192": (1024, 8192),
          "70b gate/up 28672x8192": (28672, 8192), "70b down 8192x28672": (8192, 28672)}


def _timeit(fn, device, reps: int) -> float:
    fn()  # warm-up (allocations, kernel compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _peers(device, skip=()):
    peers = {}
    try:
        import bitsandbytes.functional as F

        def bnb_q(w):
            return F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)

        def bnb_dq(state):
            return F.dequantize_4bit(*state)

        peers["bitsandbytes"] = (bnb_q, bnb_dq)
    except Exception as e:  # pragma: no cover
        print(f"[bench] bitsandbytes unavailable: {e}")
    try:
        if "torchao" in skip:
            raise ImportError("skipped")
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4

        peers["torchao"] = (lambda w: to_nf4(w, 64, 256), lambda t: t.get_original_weight())
    except Exception:
        pass
    return peers


def run(shapes: dict, devices: list[torch.device], reps: int, skip=()) -> list[dict]:
    rows = []
    for device in devices:
        peers = _peers(device, skip)
        ours_dq = (lambda q: ops.dequantize(q, torch.bfloat16)) if device.type == "cuda" else \
            (lambda q: dequantize_nf4(q, torch.bfloat16))
        for name, shape in shapes.items():
            n = shape[0] * shape[1]
            w = (torch.randn(shape, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            q = quantize_nf4(w)
            qbytes = q.nbytes
            res = {"ours": (_timeit(lambda: quantize_nf4(w), device, reps), _timeit(lambda: ours_dq(q), device, reps))}
            for pname, (pq, pdq) in peers.items():
                try:
                    st = pq(w)
                    res[pname] = (_timeit(lambda: pq(w), device, reps), _timeit(lambda: pdq(st), device, reps))
                except Exception as e:  # a peer that cannot run this shape/device is reported, not fatal
                    print(f"[bench] {pname} failed on {name} ({device}): {e}")
            for op, i, moved in (("quantize", 0, 2 * n + qbytes), ("dequantize", 1, qbytes + 2 * n)):
                peer_times = [v[i] for k, v in res.items() if k != "ours"]
                best_peer = min(peer_times) if peer_times else None
                for impl, v in res.items():
                    rows.append(dict(device=str(device), shape=name, op=op, impl=impl, seconds=v[i],
                                     gb_per_s=moved / v[i] / 1e9,
                                     vs_best_peer=(best_peer / v[i]) if (best_peer and impl == "ours") else None))
            del w, q
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the 4096x4096 shape")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", default="benchmarks/out/bench_nf4.json")
    ap.add_argument("--skip", action="append", default=[], help="skip a peer (e.g. --skip torchao: slow on CPU)")
    a = ap.parse_args(argv)
    shapes = {"4096x4096": SHAPES["4096x4096"]} if a.quick else SHAPES
    if a.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(a.device)]
    rows = run(shapes, devices, a.reps, tuple(a.skip))
    print(f"\n{'device':6} {'shape':26} {'op':10} {'impl':13} {'ms':>9} {'GB/s':>7} {'vs best peer':>12}")
    for r in rows:
        vs = f"{r['vs_best_peer']:.2f}x" if r["vs_best_peer"] else ""
        print(f"{r['device']:6} {r['shape']:26} {r['op']:10} {r['impl']:13} {r['seconds'] * 1e3:9.1f} "
              f"{r['gb_per_s']:7.2f} {vs:>12}")
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None, command=" ".join(sys.argv))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    os.replace(tmp, a.out)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
