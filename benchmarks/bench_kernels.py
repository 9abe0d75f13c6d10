#!/usr/bin/env python
"""NF4 kernel microbenchmarks on Llama-2-70B shapes: dequantize, y = x W^T, dx = dy W.

One command on a GPU (H100/H200, < 3 minutes with --quick):
    python benchmarks/bench_kernels.py --quick
writes benchmarks/results/bench_kernels.json and .png, prints a table, the measured fused / buffer crossover M (the
value for FUSED_MAX_M in kernels/nf4_kernels.py), a small launch-config sweep and the issue's targets (pass / miss).

Compared, per shape and M:
  dequant   Triton (one kernel) | torch reference (qlora70.nf4) | bitsandbytes dequantize_4bit | a device-to-device
            copy moving the same number of bytes (the bandwidth ceiling); GB/s = (bytes read + bytes written) / time
  forward   fused dequant-matmul | dequant-to-workspace + cuBLAS | dense bf16 torch.matmul | reference | bnb.matmul_4bit
  backward  dx = dy @ W: fused | workspace + cuBLAS | dense bf16 | reference
GPU timings are triton.testing.do_bench means: the L2 cache is flushed (a 256 MB memset) before every call, so weights
never come from L2, and the launchers' host overhead (tens of us) overlaps that memset: the numbers are device time.
Eager decoding of 560 linears per token is host-bound at M = 1 unless it runs under CUDA graphs.

Without CUDA:
    python benchmarks/bench_kernels.py --cpu-small      # reference vs dense vs bitsandbytes (CPU) on 1/8-size shapes
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --cpu-small   # + the Triton kernels, interpreted (slow)
    python benchmarks/bench_kernels.py --compile-check  # compile every kernel variant for sm_90 with the bundled ptxas
                                                        # (no GPU needed): registers, spills, shared memory
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from qlora70.nf4 import dequantize_nf4, quantize_nf4

# Llama-2-70B linear weights [out, in] and how many of each one decoder layer has
SHAPES_70B = {
    "q/o_proj": ((8192, 8192), 2),
    "k/v_proj": ((1024, 8192), 2),
    "gate/up_proj": ((28672, 8192), 2),
    "down_proj": ((8192, 28672), 1),
}
M_LIST = [1, 16, 64, 256, 1024, 4096]
M_EXTRA = [2, 4, 8, 32, 128]  # finer crossover search (full mode)
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- helpers --------------------------------------------------------------------------------------------------------
def _bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401  (benchmark-only comparison; the library never imports it)
        import bitsandbytes.functional as bnbF
        return bnb, bnbF
    except Exception:
        return None, None


def _kernels():
    """qlora70.kernels.nf4_kernels if Triton can run here (CUDA, or TRITON_INTERPRET=1), else None."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    try:
        from qlora70.kernels import nf4_kernels
        return nf4_kernels
    except Exception as e:  # pragma: no cover - depends on the install
        print(f"[bench] Triton kernels unavailable: {e}")
        return None


class Timer:
    def __init__(self, device: str, quick: bool, cpu_seconds: float | None = None):
        self.device, self.quick = device, quick
        self.cpu_seconds = (0.3 if quick else 1.0) if cpu_seconds is None else cpu_seconds

    def __call__(self, fn) -> float:
        """Mean milliseconds per call."""
        if self.device == "cuda":
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=10 if self.quick else 25, rep=40 if self.quick else 100))
        fn()  # warm-up (JIT, allocator)
        times, t_end = [], time.perf_counter() + self.cpu_seconds
        n_min = 1 if self.cpu_seconds == 0 else 2 if self.quick else 3
        while len(times) < n_min or (time.perf_counter() < t_end and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def env_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    bnb, _ = _bnb()
    info["bitsandbytes"] = getattr(bnb, "__version__", None)
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    return info


# ---- benchmark body -------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.cpu_small
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.K = _kernels() if (self.cuda or os.environ.get("TRITON_INTERPRET") == "1") else None
        self.bnb, self.bnbF = (None, None) if args.no_bnb else _bnb()
        self.time = Timer(self.device, args.quick, args.cpu_seconds)
        self.rows: list[dict] = []
        self.checks: list[dict] = []

    def record(self, kind, name, shape, M, method, ms, **extra):
        row = dict(kind=kind, name=name, shape=list(shape), M=M, method=method, ms=ms, **extra)
        self.rows.append(row)
        return row

    def shapes(self) -> dict:
        div = self.args.shape_div or (1 if self.cuda else 8)  # CPU: 1/8 of each dimension by default
        return {k: ((n // div, k_ // div), c) for k, ((n, k_), c) in SHAPES_70B.items()}

    def m_list(self) -> list[int]:
        if self.args.m:
            return self.args.m
        if not self.cuda:
            return [1, 16, 64]
        return M_LIST if self.args.quick else sorted(set(M_LIST + M_EXTRA))

    def triton_ok(self, numel: int) -> bool:
        """Triton rows: always on CUDA; in the interpreter only on small weights (it runs ~1 us per element-op)."""
        return self.K is not None and (self.cuda or numel <= 1 << 18)

    # -- dequantize --
    def dequant(self, name, shape, w, q, bq):
        numel = w.numel()
        read_b, write_b = q.nbytes, numel * w.element_size()
        moved = read_b + write_b
        gbps = lambda ms: moved / ms / 1e6  # noqa: E731
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        res = {}
        src = torch.empty(moved // 2, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time(lambda: dst.copy_(src))
        res["copy"] = self.record("dequant", name, shape, None, "copy (same bytes)", ms,
                                  gbps=2 * src.numel() / ms / 1e6)
        del src, dst
        if self.triton_ok(numel):
            got = self.K.dequantize(q, self.dtype, out=out)
            self.checks.append(dict(check="dequant bit-exact vs reference", name=name,
                                    ok=bool(torch.equal(got, dequantize_nf4(q, self.dtype)))))
            ms = self.time(lambda: self.K.dequantize(q, self.dtype, out=out))
            res["triton"] = self.record("dequant", name, shape, None, "triton", ms, gbps=gbps(ms))
        ms = self.time(lambda: dequantize_nf4(q, self.dtype))
        res["reference"] = self.record("dequant", name, shape, None, "reference (torch)", ms, gbps=gbps(ms))
        if bq is not None:
            p, qs = bq
            ms = self.time(lambda: self.bnbF.dequantize_4bit(p, qs))
            res["bnb"] = self.record("dequant", name, shape, None, "bitsandbytes", ms, gbps=gbps(ms))
        return res

    # -- forward / backward --
    def matmuls(self, name, shape, w, q, bq, Ms):
        N, Kd = shape
        wd = dequantize_nf4(q, self.dtype)  # the dense weight cuBLAS multiplies (same values)
        fused_cap = max(Ms) if not self.cuda else (256 if self.args.quick else 1024)
        for M in Ms:
            flops = 2.0 * M * N * Kd
            tf = lambda ms: flops / ms / 1e9  # noqa: E731
            x = torch.randn(M, Kd, device=self.device, dtype=self.dtype)
            dy = torch.randn(M, N, device=self.device, dtype=self.dtype)
            r = self.record("forward", name, shape, M, "dense torch.matmul", self.time(lambda: x @ wd.t()))
            r["tflops"] = tf(r["ms"])
            r = self.record("forward", name, shape, M, "reference (torch)",
                            self.time(lambda: x @ dequantize_nf4(q, self.dtype).t()))
            r["tflops"] = tf(r["ms"])
            if bq is not None:
                p, qs = bq
                r = self.record("forward", name, shape, M, "bitsandbytes",
                                self.time(lambda: self.bnb.matmul_4bit(x, p.t(), quant_state=qs)))
                r["tflops"] = tf(r["ms"])
            r = self.record("backward", name, shape, M, "dense torch.matmul", self.time(lambda: dy @ wd))
            r["tflops"] = tf(r["ms"])
            r = self.record("backward", name, shape, M, "reference (torch)",
                            self.time(lambda: dy @ dequantize_nf4(q, self.dtype)))
            r["tflops"] = tf(r["ms"])
            if not self.triton_ok(w.numel()):
                continue
            with torch.no_grad():
                ref = (x.float() @ wd.float().t())
                for fused in ([True, False] if M <= fused_cap else [False]):
                    label = "triton fused" if fused else "triton dequant+cuBLAS"
                    y = self.K.linear_forward(x, q, fused=fused)
                    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
                    self.checks.append(dict(check=f"forward {label} rel. max error", name=name, M=M, value=err,
                                            ok=err < (2e-2 if self.dtype != torch.float32 else 1e-4)))
                    r = self.record("forward", name, shape, M, label,
                                    self.time(lambda: self.K.linear_forward(x, q, fused=fused)))
                    r["tflops"] = tf(r["ms"])
                    r = self.record("backward", name, shape, M, label,
                                    self.time(lambda: self.K.linear_backward_input(dy, q, fused=fused)))
                    r["tflops"] = tf(r["ms"])
            del x, dy
        del wd

    def run(self):
        torch.manual_seed(0)
        for name, (shape, _) in self.shapes().items():
            w = torch.randn(shape, device=self.device, dtype=self.dtype) * 0.02
            q = quantize_nf4(w, blocksize=64, double_quant=True)
            bq = None
            if self.bnb is not None:
                try:
                    bq = self.bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                except Exception as e:
                    print(f"[bench] bitsandbytes quantize_4bit failed on {self.device}: {e}")
            print(f"[bench] {name} {shape[0]}x{shape[1]}: dequant", flush=True)
            self.dequant(name, shape, w, q, bq)
            print(f"[bench] {name}: matmuls, M in {self.m_list()}", flush=True)
            self.matmuls(name, shape, w, q, bq, self.m_list())
            del w, q, bq
            if self.cuda:
                torch.cuda.empty_cache()
        if self.K is not None:
            self.K.clear_workspace()

    # -- analysis --
    def _ms(self, kind, name, M, method):
        for r in self.rows:
            if r["kind"] == kind and r["name"] == name and r["M"] == M and r["method"] == method:
                return r["ms"]
        return None

    def crossover(self) -> dict:
        """Per shape: the smallest M where dequant+cuBLAS beats the fused kernel. Recommended FUSED_MAX_M: the largest
        tested M such that, for it and every smaller tested M, the fused kernel is faster summed over one decoder
        layer's linears (weighted by how many of each shape a layer has), forward + backward."""
        per_shape, ms_list = {}, self.m_list()
        for kind in ("forward", "backward"):
            for name in self.shapes():
                cross = None
                for M in ms_list:
                    f, b = self._ms(kind, name, M, "triton fused"), self._ms(kind, name, M, "triton dequant+cuBLAS")
                    if f is not None and b is not None and b < f:
                        cross = M
                        break
                per_shape[f"{kind} {name}"] = cross
        rec = 0
        for M in ms_list:
            tot_f = tot_b = 0.0
            ok = True
            for name, (_, count) in self.shapes().items():
                for kind in ("forward", "backward"):
                    f, b = self._ms(kind, name, M, "triton fused"), self._ms(kind, name, M, "triton dequant+cuBLAS")
                    if f is None or b is None:
                        ok = False
                        break
                    tot_f, tot_b = tot_f + count * f, tot_b + count * b
            if not ok or tot_f > tot_b:
                break
            rec = M
        return {"first_M_where_buffer_wins": per_shape, "recommended_FUSED_MAX_M": rec, "tested_M": ms_list}

    def targets(self) -> list[dict]:
        """The issue's H100 targets, evaluated on this run."""
        out = []
        for name in self.shapes():
            t, c, b = (self._ms("dequant", name, None, m) for m in ("triton", "copy (same bytes)", "bitsandbytes"))
            if t and c:
                out.append(dict(target="dequant >= 85% of copy bandwidth", name=name, value=round(c / t, 3),
                                ok=c / t >= 0.85))
            if t and b:
                out.append(dict(target="dequant faster than bitsandbytes", name=name, value=round(b / t, 3),
                                ok=t < b))
            for M in (1, 16):
                f, d = self._ms("forward", name, M, "triton fused"), self._ms("forward", name, M, "dense torch.matmul")
                if f and d:
                    out.append(dict(target="fused M<=16 >= 2.5x faster than bf16 cuBLAS", name=name, M=M,
                                    value=round(d / f, 3), ok=d / f >= 2.5))
            for M in (1024, 4096):
                bpath, d = (self._ms("forward", name, M, m) for m in ("triton dequant+cuBLAS", "dense torch.matmul"))
                if bpath and d and t:
                    out.append(dict(target="large-M path within 5% of cuBLAS + dequant", name=name, M=M,
                                    value=round(bpath / (d + t), 3), ok=bpath <= 1.05 * (d + t)))
        return out

    # -- config sweep --
    def tune(self) -> dict:
        """Time alternative launch configs on the largest shapes; the winners are what to put in DEQUANT_CONFIG /
        FWD_CONFIG / BWD_CONFIG."""
        if not (self.cuda and self.K is not None):
            return {}
        K, quick, dev = self.K, self.args.quick, self.device
        (N, Kd), _ = self.shapes()["gate/up_proj"]
        w = torch.randn(N, Kd, device=dev, dtype=self.dtype) * 0.02
        q = quantize_nf4(w, 64, True)
        del w
        out = torch.empty(N, Kd, device=dev, dtype=self.dtype)
        res = {"dequant": [], "forward": [], "backward": []}
        deq = [(2048, 4), (4096, 4), (4096, 8), (8192, 8)] + ([] if quick else [(16384, 8), (8192, 4), (2048, 2)])
        for el, nw in deq:
            cfg = {"elements": el, "num_warps": nw}
            ms = self.time(lambda: K.dequantize(q, self.dtype, out=out, config=cfg))
            res["dequant"].append(dict(config=cfg, ms=ms, gbps=(q.nbytes + out.numel() * 2) / ms / 1e6))
        del out
        fwd = [dict(block_n=32, block_k=128, num_warps=4, num_stages=2), dict(block_n=64, block_k=64, num_warps=4,
               num_stages=2), dict(block_n=64, block_k=128, num_warps=8, num_stages=2),
               dict(block_n=32, block_k=128, num_warps=4, num_stages=3), dict(block_n=128, block_k=64, num_warps=8,
               num_stages=2), dict(block_n=32, block_k=64, num_warps=4, num_stages=1)]
        bwd = [dict(block_n=64, block_k=64, num_warps=4, num_stages=2), dict(block_n=128, block_k=32, num_warps=4,
               num_stages=2), dict(block_n=128, block_k=64, num_warps=8, num_stages=2),
               dict(block_n=64, block_k=64, num_warps=4, num_stages=3)]
        for M in ((1, 16) if quick else (1, 4, 16, 64)):
            x = torch.randn(M, Kd, device=dev, dtype=self.dtype)
            dy = torch.randn(M, N, device=dev, dtype=self.dtype)
            for cfg in fwd:
                try:
                    ms = self.time(lambda: K.linear_forward(x, q, fused=True, config=cfg))
                except Exception as e:  # a config that does not compile/launch is reported, not fatal
                    ms = None
                    print(f"[tune] forward {cfg}: {type(e).__name__}: {e}")
                res["forward"].append(dict(M=M, config=cfg, ms=ms))
            for cfg in bwd:
                try:
                    ms = self.time(lambda: K.linear_backward_input(dy, q, fused=True, config=cfg))
                except Exception as e:
                    ms = None
                    print(f"[tune] backward {cfg}: {type(e).__name__}: {e}")
                res["backward"].append(dict(M=M, config=cfg, ms=ms))
        best = {}
        for kind, rows in res.items():
            ok = [r for r in rows if r["ms"] is not None]
            if ok:
                by_cfg: dict[str, float] = {}
                for r in ok:  # sum over the M values: one config for all of them
                    by_cfg[json.dumps(r["config"], sort_keys=True)] = by_cfg.get(json.dumps(r["config"],
                                                                                           sort_keys=True), 0) + r["ms"]
                best[kind] = json.loads(min(by_cfg, key=by_cfg.get))
        res["best"] = best
        return res

    # -- report --
    def table(self) -> str:
        lines = []
        deq = [r for r in self.rows if r["kind"] == "dequant"]
        if deq:
            lines.append(f"{'dequantize':<14} {'shape':>12} {'method':<22} {'ms':>9} {'GB/s':>8}")
            for r in deq:
                lines.append(f"{r['name']:<14} {r['shape'][0]:>5}x{r['shape'][1]:<6} {r['method']:<22} "
                             f"{r['ms']:>9.4f} {r['gbps']:>8.1f}")
        for kind in ("forward", "backward"):
            rows = [r for r in self.rows if r["kind"] == kind]
            if not rows:
                continue
            lines.append("")
            lines.append(f"{kind:<14} {'shape':>12} {'M':>5} {'method':<22} {'ms':>9} {'TFLOP/s':>8} {'x dense':>8}")
            for r in rows:
                d = self._ms(kind, r["name"], r["M"], "dense torch.matmul")
                lines.append(f"{r['name']:<14} {r['shape'][0]:>5}x{r['shape'][1]:<6} {r['M']:>5} {r['method']:<22} "
                             f"{r['ms']:>9.4f} {r.get('tflops', 0):>8.2f} {d / r['ms']:>8.2f}")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(self.shapes())
        all_methods = sorted({r["method"] for r in self.rows})
        color = {m: f"C{i % 10}" for i, m in enumerate(all_methods)}
        fig, grid = plt.subplots(2, 3, figsize=(17, 9))
        axes = list(grid.flat)
        ax = axes[0]
        methods = sorted({r["method"] for r in self.rows if r["kind"] == "dequant"})
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            vals = [next((r["gbps"] for r in self.rows if r["kind"] == "dequant" and r["name"] == n
                          and r["method"] == m), 0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=m, color=color[m])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20)
        ax.set_ylabel("GB/s (read + written)")
        ax.set_title("NF4 dequantize")
        ax.legend(fontsize=7)
        panels = [("forward", n) for n in names] + [("backward", names[2])]
        for ax, (kind, n) in zip(axes[1:], panels):
            for m in sorted({r["method"] for r in self.rows if r["kind"] == kind}):
                pts = sorted((r["M"], r["tflops"]) for r in self.rows if r["kind"] == kind and r["name"] == n
                             and r["method"] == m)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m, color=color[m])
            shape = next(r["shape"] for r in self.rows if r["name"] == n)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{'y = x W^T' if kind == 'forward' else 'dx = dy W'}, {n} {shape[0]}x{shape[1]}")
            ax.legend(fontsize=7)
        fig.suptitle(f"qlora70 NF4 kernels on {self.device} ({'bf16' if self.cuda else 'fp32'})")
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".png")
        os.close(fd)
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)


# ---- compile check (no GPU needed) ----------------------------------------------------------------------------------
def compile_check(arch: int = 90, quick: bool = False) -> list[dict]:
    """Compile every kernel variant the launchers can produce for sm_<arch> (Triton's bundled ptxas; no GPU), with
    16-byte pointer / length divisibility as a CUDA launch specializes them. Reports registers, spills, shared bytes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--compile-check needs TRITON_INTERPRET unset (it compiles, it does not interpret)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qlora70.kernels import nf4_kernels as K
    target = GPUTarget("cuda", arch, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    wargs = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "lut_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
             "nested_map_ptr": "*fp32"}
    results = []

    def comp(fn, sig, const, aligned_ints, **opts):
        full = {**sig, **{k: "constexpr" for k in const}}
        names = list(full)
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in names
                 if full[k].startswith("*") or k in aligned_ints}
        row = dict(kernel=fn.__name__, constexprs={k: v for k, v in const.items()}, options=opts)
        t0 = time.time()
        try:
            c = triton.compile(ASTSource(fn=fn, signature=full, constexprs=const, attrs=attrs), target=target,
                               options=opts)
            row.update(shared=c.metadata.shared, compile_s=round(time.time() - t0, 2), ok=True)
            if os.path.exists(ptxas):
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(c.asm["ptx"])
                r = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}", "-v", f.name,
                                    "-o", os.devnull], capture_output=True, text=True)
                os.unlink(f.name)
                regs = re.search(r"Used (\d+) registers", r.stderr)
                spill = re.search(r"(\d+) bytes spill stores", r.stderr)
                row.update(registers=int(regs.group(1)) if regs else None, spill_bytes=int(spill.group(1)) if spill
                           else None)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        results.append(row)
        print(f"[compile] {row['kernel']:<16} {json.dumps(row['constexprs'], sort_keys=True)[:150]} {opts} -> "
              + (f"regs={row.get('registers')} spill={row.get('spill_bytes')} smem={row.get('shared')} "
                 f"({row.get('compile_s')}s)" if row["ok"] else row["error"]), flush=True)

    dq_sig = {**wargs, "out_ptr": "*bf16", "offset": "fp32", "n_elements": "i32", "n_bytes": "i32", "n_blocks": "i32"}
    for out_t in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        for bs, dq in ((64, True),) if quick else ((64, True), (64, False), (256, True)):
            cfg = K.DEQUANT_CONFIG
            comp(K._dequant_kernel, {**dq_sig, "out_ptr": f"*{out_t}"},
                 dict(BLOCKSIZE=bs, ROWS=max(1, cfg["elements"] // bs), DQ=dq, NESTED_BS=256),
                 ("n_elements", "n_bytes", "n_blocks"), num_warps=cfg["num_warps"], enable_fp_fusion=False)
    for act in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        prec = "ieee" if act == "fp32" else "tf32"
        fsig = {"x_ptr": f"*{act}", **wargs, "offset": "fp32", "bias_ptr": f"*{act}", "out_ptr": f"*{act}",
                "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32", "stride_os": "i32",
                "stride_om": "i32", "k_per_split": "i32"}
        bsig = {"dy_ptr": f"*{act}", **wargs, "offset": "fp32", "out_ptr": f"*{act}", "M": "i32", "N": "i32",
                "K": "i32", "stride_dm": "i32", "stride_dn": "i32", "stride_os": "i32", "stride_om": "i32",
                "n_per_split": "i32"}
        ints = ("N", "K", "stride_xm", "stride_dm", "stride_os", "stride_om", "k_per_split", "n_per_split")
        for bm in (16, 64) if act == "bf16" and not quick else (16,):
            for aligned in (True, False):
                fc = K._fused_plan(bm, 8192, 8192, torch.device("cpu"), aligned, {"block_m": bm, "split": 1},
                                   K.FWD_CONFIG, "block_k", "compile_check")
                comp(K._fwd_kernel, fsig, dict(BLOCK_M=bm, BLOCK_N=fc["block_n"], BLOCK_K=fc["block_k"], BLOCKSIZE=64,
                                               SUB=min(64, fc["block_k"]), DQ=True, NESTED_BS=256, ALIGNED=aligned,
                                               HAS_BIAS=True, DOT_PREC=prec),
                     ints, num_warps=fc["num_warps"], num_stages=fc["num_stages"])
                bc = K._fused_plan(bm, 8192, 8192, torch.device("cpu"), aligned, {"block_m": bm, "split": 1},
                                   K.BWD_CONFIG_FP32 if prec == "ieee" else K.BWD_CONFIG, "block_n", "compile_check")
                comp(K._bwd_kernel, bsig, dict(BLOCK_M=bm, BLOCK_N=bc["block_n"], BLOCK_K=bc["block_k"], BLOCKSIZE=64,
                                               SUB=min(64, bc["block_k"]), DQ=True, NESTED_BS=256, ALIGNED=aligned,
                                               DOT_PREC=prec),
                     ints, num_warps=bc["num_warps"], num_stages=bc["num_stages"])
    return results


# ---- main -----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer M values, shorter timing, small config sweep")
    ap.add_argument("--cpu-small", action="store_true", help="CPU mode on 1/8-size shapes (default without CUDA)")
    ap.add_argument("--no-tune", action="store_true", help="skip the launch-config sweep")
    ap.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes comparison")
    ap.add_argument("--cpu-seconds", type=float, default=None,
                    help="CPU timing budget per measurement (default 0.3 with --quick, else 1.0; at least 2 runs)")
    ap.add_argument("--shape-div", type=int, default=None, help="divide every 70B dimension by this (CPU default 8)")
    ap.add_argument("--m", type=lambda v: [int(t) for t in v.split(",")], default=None,
                    help="comma-separated M values (default: 1,16,64,256,1024,4096 on GPU; 1,16,64 on CPU)")
    ap.add_argument("--compile-check", action="store_true", help="only compile the kernels for sm_90 and report")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_kernels"),
                    help="output path prefix (.json and .png are added)")
    args = ap.parse_args(argv)
    if args.compile_check:
        res = compile_check(quick=args.quick)
        atomic_write(args.out + "_compile.json", json.dumps(res, indent=1).encode())
        bad = [r for r in res if not r["ok"] or (r.get("spill_bytes") or 0) > 0]
        print(f"[compile] {len(res) - len(bad)}/{len(res)} variants compile without spills; wrote "
              f"{args.out}_compile.json")
        return 1 if any(not r["ok"] for r in res) else 0
    if not torch.cuda.is_available():
        args.cpu_small = True
    t0 = time.time()
    b = Bench(args)
    print(f"[bench] device={b.device} dtype={b.dtype} triton={'yes' if b.K else 'no'} "
          f"bitsandbytes={'yes' if b.bnb else 'no'} quick={args.quick}", flush=True)
    b.run()
    tune = {} if args.no_tune else b.tune()
    cross = b.crossover() if b.K is not None else {}
    report = dict(env=env_info(b.device), quick=args.quick, rows=b.rows, checks=b.checks, crossover=cross,
                  targets=b.targets() if b.cuda else [], tune=tune, seconds=round(time.time() - t0, 1))
    print()
    print(b.table())
    if b.checks:
        bad = [c for c in b.checks if not c["ok"]]
        print(f"\ncorrectness checks: {len(b.checks) - len(bad)}/{len(b.checks)} ok" +
              "".join(f"\n  FAILED {c}" for c in bad))
    if cross:
        print(f"\ncrossover (first M where dequant+cuBLAS beats fused): {cross['first_M_where_buffer_wins']}")
        print(f"recommended FUSED_MAX_M = {cross['recommended_FUSED_MAX_M']} (tested M: {cross['tested_M']})")
    if tune.get("best"):
        print(f"\nbest launch configs: {json.dumps(tune['best'])}")
    for t in report["targets"]:
        print(f"target {'OK  ' if t['ok'] else 'MISS'} {t['target']:<46} {t['name']:<13} M={t.get('M', '-')!s:<5} "
              f"value={t['value']}")
    atomic_write(args.out + ".json", json.dumps(report, indent=1, default=str).encode())
    try:
        b.plot(args.out + ".png")
        print(f"\nwrote {args.out}.json and {args.out}.png ({report['seconds']} s)")
    except Exception as e:  # the numbers matter more than the figure
        print(f"\nwrote {args.out}.json; plot failed: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
