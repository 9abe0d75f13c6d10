"""NF4 + double-quant quantize / dequantize throughput: qlora70 vs bitsandbytes (and torchao when installed).

    python benchmarks/bench_nf4.py                 # 4096x4096 + Llama-2-70B layer shapes, CPU (and CUDA if present)
    python benchmarks/bench_nf4.py --quick         # 4096x4096 only
    python benchmarks/bench_nf4.py --out benchmarks/out/nf4.json

GB/s counts the bytes a kernel must move: quantize reads 2 B/elem (bf16) and writes ~0.52 B/elem; dequantize reads
~0.52 B/elem and writes 2 B/elem (bf16). "vs best peer" is the ratio of the fastest peer's time to ours (>1: we win).
"dequantize" allocates its output (first-touch page faults included, as a user's call pays them); "dequant->buf" writes
into a preallocated buffer (the decode alone). Each figure is the median of --reps calls; every implementation is timed
in two interleaved rounds and the better round is kept.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

# The package must be installed (`make test` / `pip install -e .`): putting the repo root on sys.path would expose
# kernels/ as a top-level `kernels` module, which bitsandbytes tries to import as the PyPI `kernels` package.
from qlora70 import native, ops  # noqa: E402
from qlora70.io import atomic_write_json  # noqa: E402
from qlora70.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "70b q/o_proj 8192x8192": (8192, 8192), "70b k/v_proj 1024x8192": (1024, 8192),
          "70b gate/up 28672x8192": (28672, 8192), "70b down 8192x28672": (8192, 28672)}


def _timeit(fn, device, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up. The median, not the best: on the CPU a call that happens to
    get already-faulted memory from the allocator (freed by the previous op) runs several times faster than a normal
    one, and the best of N would report that luck."""
    fn()  # warm-up (allocations, kernel compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peers(device, skip=()):
    peers = {}
    try:
        import bitsandbytes.functional as F

        def bnb_q(w):
            return F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)

        def bnb_dq(state, out=None):
            return F.dequantize_4bit(*state, out=out)

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

        peers["torchao"] = (lambda w: to_nf4(w, 64, 256), lambda t, out=None: t.get_original_weight() if out is None
                            else out.copy_(t.get_original_weight()))
    except Exception:
        pass
    return peers


def run(shapes: dict, devices: list[torch.device], reps: int, skip=()) -> list[dict]:
    rows = []
    for device in devices:
        peers = _peers(device, skip)
        ours_dq = (lambda q, out=None: ops.dequantize(q, torch.bfloat16, out=out)) if device.type == "cuda" else \
            (lambda q, out=None: dequantize_nf4(q, torch.bfloat16, out=out))
        for name, shape in shapes.items():
            n = shape[0] * shape[1]
            w = (torch.randn(shape, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            q = quantize_nf4(w)
            qbytes = q.nbytes
            buf = torch.empty(shape, device=device, dtype=torch.bfloat16)
            impls = {"ours": (quantize_nf4, ours_dq, q)}
            for pname, (pq, pdq) in peers.items():
                try:
                    impls[pname] = (pq, pdq, pq(w))
                except Exception as e:  # a peer that cannot run this shape/device is reported, not fatal
                    print(f"[bench] {pname} failed on {name} ({device}): {e}")
            res: dict[str, list] = {k: [float("inf")] * 3 for k in impls}
            failed: set = set()
            for _round in range(2):  # interleaved rounds, best kept: machine noise hits every implementation alike
                for pname, (pq, pdq, st) in impls.items():
                    fns = (lambda: pq(w), lambda: pdq(st), lambda: pdq(st, out=buf))
                    for i, fn in enumerate(fns):
                        if (pname, i) in failed:
                            continue
                        try:
                            res[pname][i] = min(res[pname][i], _timeit(fn, device, reps))
                        except Exception as e:  # e.g. bitsandbytes' CPU backend has no `out=` variant
                            failed.add((pname, i))
                            print(f"[bench] {pname} op {i} failed on {name} ({device}): {str(e).splitlines()[0][:160]}")
            ops_ = (("quantize", 0, 2 * n + qbytes), ("dequantize", 1, qbytes + 2 * n),
                    ("dequant->buf", 2, qbytes + 2 * n))
            for op, i, moved in ops_:
                peer_times = [v[i] for k, v in res.items() if k != "ours" and (k, i) not in failed]
                best_peer = min(peer_times) if peer_times else None
                for impl, v in res.items():
                    if (impl, i) in failed:
                        continue
                    rows.append(dict(device=str(device), shape=name, op=op, impl=impl, seconds=v[i],
                                     gb_per_s=moved / v[i] / 1e9,
                                     vs_best_peer=(best_peer / v[i]) if (best_peer and impl == "ours") else None))
            del w, q
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the 4096x4096 shape")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shape", action="append", default=[], help="only shapes whose name contains this (repeatable), "
                    "e.g. --shape k/v")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", default="benchmarks/out/bench_nf4.json")
    ap.add_argument("--skip", action="append", default=[], help="skip a peer (e.g. --skip torchao: slow on CPU)")
    a = ap.parse_args(argv)
    shapes = {"4096x4096": SHAPES["4096x4096"]} if a.quick else SHAPES
    if a.shape:
        shapes = {k: v for k, v in SHAPES.items() if any(f in k for f in a.shape)}
        if not shapes:
            ap.error(f"--shape {a.shape} matches none of {list(SHAPES)}")
    if a.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(a.device)]
    print(f"CPU fast path: {native.native_status()} ({native.simd() or '-'}), torch threads {torch.get_num_threads()}")
    rows = run(shapes, devices, a.reps, tuple(a.skip))
    print(f"\n{'device':6} {'shape':26} {'op':10} {'impl':13} {'ms':>9} {'GB/s':>7} {'vs best peer':>12}")
    for r in rows:
        vs = f"{r['vs_best_peer']:.2f}x" if r["vs_best_peer"] else ""
        print(f"{r['device']:6} {r['shape']:26} {r['op']:10} {r['impl']:13} {r['seconds'] * 1e3:9.1f} "
              f"{r['gb_per_s']:7.2f} {vs:>12}")
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None, command=" ".join(sys.argv),
                cpu_native=native.native_status(), cpu_simd=native.simd())
    atomic_write_json(a.out, {"meta": meta, "rows": rows}, indent=1)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
