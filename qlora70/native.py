"""CPU fast path for NF4 quantize / dequantize: a small C file (csrc/nf4_cpu.c) compiled at first use and called
through ctypes, bit-identical to the pure-torch reference in `qlora70.nf4`.

Why: on the CPU the torch formulation needs several full passes (byte -> index -> table gather -> scale -> cast), each
through memory; one fused C loop reads the packed bytes once and writes the output once. It is what makes loading a
70B checkpoint (quantizing ~69e9 weights on the host) and CPU training runs fast enough to use.

The shared library is built with the system C compiler (`$CC`, else `cc`/`gcc`/`clang`) into a per-user cache
(`$QLORA70_CACHE_DIR`, else `$XDG_CACHE_HOME/qlora70`, else `~/.cache/qlora70`), keyed by the source, the flags and
the CPU, and written atomically (temp file, then rename); `QLORA70_NATIVE_PORTABLE=1` builds for the compiler's
baseline target instead of `-march=native` (the scalar loops). Without a compiler, or with `QLORA70_NATIVE=0`, every
function here reports "unavailable" and callers use the torch path (same numbers, slower); `native_status()` says why.
Work is split over up to `torch.get_num_threads()` pthreads inside the C call (ctypes releases the GIL meanwhile).

`cpu_compute_dtype()` decides whether CPU training should compute in bf16 (autocast) or fp32: bf16 only where the CPU
has bf16 matmul instructions (AMX-BF16, AVX512-BF16, Arm BF16) and a short measurement (~10-30 ms, model-like matmul
shapes, bf16 including the cast of the fp32 activations) shows bf16 clearly faster; the verdict is cached in the same
cache directory as the build, keyed by the CPU model/flags and the torch version. `QLORA70_CPU_COMPUTE_DTYPE=bf16|fp32`
overrides it.

`keep_freed_memory()` (called by the Trainer on the CPU) stops glibc from returning freed blocks to the kernel (no
mmap for large blocks, no heap trimming): a training step frees and reallocates the same activation-sized buffers every
step, and each fresh mapping costs a page fault per 4 KiB on first touch (~40-50k faults per step for a 4-layer
512-wide model at 4x256 tokens; ~0 after). `QLORA70_MALLOC_TUNE=0` leaves malloc alone.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from .io import atomic_path, atomic_write_json

_SRC = Path(__file__).with_name("csrc") / "nf4_cpu.c"
_ABI = 9
_OUT_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # as in nf4_cpu.c
_IN_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MIN_ELEMENTS_PER_THREAD = 1 << 20  # below this a second thread costs more than it saves
_lock = threading.Lock()
_status: str = "not built yet"


def _cache_dir() -> Path:
    if os.environ.get("QLORA70_CACHE_DIR"):
        return Path(os.environ["QLORA70_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qlora70"


def _compiler() -> str | None:
    for c in [os.environ.get("CC"), "cc", "gcc", "clang"]:
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cpu_id() -> str:
    """Something that changes when -march=native would produce different code (CPU model + feature flags)."""
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    ident += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return ident


def _build(cc: str) -> Path:
    src = _SRC.read_bytes()
    portable = ["-O3", "-ffp-contract=off"]  # the compiler's baseline target: the scalar loops
    native = ["-march=native", "-fopenmp-simd"]  # `omp simd` reductions (no OpenMP runtime is linked)
    if platform.machine().lower() in ("x86_64", "amd64"):  # 512-bit vectors where the CPU has them (the dropout
        native.append("-mprefer-vector-width=512")           # hash loop: 1.5x); no effect on AVX2-only CPUs
    attempts = [portable] if os.environ.get("QLORA70_NATIVE_PORTABLE") == "1" else [portable[:1] + native
                                                                                     + portable[1:], portable]
    key = hashlib.sha256(src + cc.encode() + _cpu_id().encode() + repr(attempts).encode()).hexdigest()[:16]
    out = _cache_dir() / f"nf4_cpu_{key}{'.dll' if sys.platform == 'win32' else '.so'}"
    if out.exists():
        return out
    errors = []
    for flags in attempts:
        cmd = [cc, *flags, "-fPIC", "-shared", "-fno-fast-math", "-std=c99", "-pthread", "-o", "<tmp>", str(_SRC),
               "-lm"]
        try:
            with atomic_path(out) as tmp:  # concurrent builders each rename a complete library into place
                cmd[cmd.index("-o") + 1] = tmp
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    raise RuntimeError(r.stderr.strip()[-500:] or f"exit status {r.returncode}")
            return out
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            errors.append(f"{' '.join(cmd)}: {e}")
    raise RuntimeError("; ".join(errors))


class _Scales(ctypes.Structure):
    """scales_t in nf4_cpu.c: fp32 absmax, or double-quantized codes + nested map, scales and offset."""
    _fields_ = [("absmax", ctypes.c_void_p), ("qabsmax", ctypes.c_void_p), ("nmap", ctypes.c_void_p),
                ("nabs", ctypes.c_void_p), ("offset", ctypes.c_float), ("nbs_log2", ctypes.c_int64)]


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("QLORA70_NATIVE", "1") == "0":
        _status = "disabled by QLORA70_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _status = "no C compiler found (set CC, or install gcc/clang)"
        return None
    with _lock:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            if lib.nf4_abi_version() != _ABI:
                raise RuntimeError(f"ABI {lib.nf4_abi_version()} != {_ABI}")
        except (OSError, RuntimeError) as e:
            _status = f"build failed: {e}"
            warnings.warn(f"qlora70: the CPU NF4 fast path is unavailable ({_status}); using the slower torch path",
                          RuntimeWarning, stacklevel=3)
            return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.nf4_dequantize.argtypes = [p, ctypes.POINTER(_Scales), p, p, i64, i64, i64, i64]
    lib.nf4_dequantize.restype = None
    lib.nf4_absmax.argtypes = [p, p, i64, i64, i64, i64]
    lib.nf4_absmax.restype = i64
    lib.nf4_quantize.argtypes = [p, p, p, p, i64, i64, i64, i64, i64]
    lib.nf4_quantize.restype = None
    for name in ("conv_f32_to_f16", "conv_f32_to_bf16", "conv_f16_to_f32"):
        getattr(lib, name).argtypes = [p, p, i64]
        getattr(lib, name).restype = None
    lib.seeded_dropout.argtypes = [p, p, i64, i64, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, i64]
    lib.seeded_dropout.restype = None
    lib.lora_sum.argtypes = [p, p, p, i64, i64, ctypes.c_float, i64]
    lib.lora_sum.restype = None
    lib.lora_sum_backward.argtypes = [p, p, p, i64, i64, ctypes.c_float, i64]
    lib.lora_sum_backward.restype = None
    lib.ce_rows.argtypes = [p, p, p, i64, i64, i64, i64, i64]
    lib.ce_rows.restype = i64
    lib.rmsnorm_forward.argtypes = [p, p, p, p, i64, i64, ctypes.c_float, i64]
    lib.rmsnorm_backward.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.swiglu_forward.argtypes = [p, p, p, i64, i64, i64]
    lib.swiglu_backward.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.rope.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64]
    for name in ("rmsnorm_forward", "rmsnorm_backward", "swiglu_forward", "swiglu_backward", "rope"):
        getattr(lib, name).restype = None
    lib.nf4_advise_hugepages.argtypes = [p, i64]
    lib.nf4_advise_hugepages.restype = ctypes.c_int
    _status = "available"
    return lib


def native_status() -> str:
    """'available', or why the CPU fast path is not used."""
    _lib()
    return _status


def available() -> bool:
    return _lib() is not None


def simd() -> str:
    """Which dequantize loop the library was built with: 'avx512' or 'scalar' ('' when unavailable)."""
    lib = _lib()
    return "" if lib is None else ("avx512" if lib.nf4_simd() == 512 else "scalar")


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the CPU NF4 fast path is unavailable: {_status}")
    return lib


def _threads(n: int) -> int:
    """Threads for n elements of work: torch's thread count, at most one per `_MIN_ELEMENTS_PER_THREAD`."""
    return max(1, min(torch.get_num_threads(), n // _MIN_ELEMENTS_PER_THREAD))


# Only outputs of at least glibc's largest mmap threshold (32 MiB) are advised: those are always fresh mappings whose
# first touch faults every page; a smaller block may be recycled from the heap with its pages already in place, and
# advising it only costs a system call.
_HUGEPAGE_MIN_BYTES = 32 << 20


def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(n, dtype) on the CPU, advised to use transparent huge pages when large (see nf4_cpu.c)."""
    out = torch.empty(n, dtype=dtype)
    lib = _lib()
    if lib is not None and out.numel() * out.element_size() >= _HUGEPAGE_MIN_BYTES:
        lib.nf4_advise_hugepages(out.data_ptr(), out.numel() * out.element_size())
    return out


def _check_blocksize(bs: int) -> None:
    # the C loops assume an even blocksize (whole bytes per block) and keep one block's codes on the stack (<= 4096)
    if not isinstance(bs, int) or bs < 2 or bs > 4096 or bs & (bs - 1):
        raise ValueError(f"native NF4: blocksize must be a power of two in [2, 4096], got {bs!r}")


def _cpu_contig(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"native NF4: {name} must be a contiguous CPU tensor, got {t.device} "
                         f"contiguous={t.is_contiguous()}")


def _same(name: str, dtypes: tuple, *ts: torch.Tensor) -> None:
    """Contiguous CPU tensors of one shape and one dtype from `dtypes` (the C loops index them flat)."""
    for t in ts:
        if t.dtype not in dtypes or t.dtype != ts[0].dtype or t.shape != ts[0].shape:
            raise ValueError(f"native {name}: tensors must share a shape and a dtype in {dtypes}, got "
                             f"{[(str(u.dtype), tuple(u.shape)) for u in ts]}")
        _cpu_contig(t, name)


def _f32(t: torch.Tensor, name: str, numel: int) -> torch.Tensor:
    """A small side tensor (code tables, scales) as contiguous fp32 on the CPU, its size checked."""
    if t.device.type != "cpu" or not t.is_floating_point() or t.numel() != numel:
        raise ValueError(f"native dequantize: {name} must be a float CPU tensor of {numel} values, got {t.dtype} "
                         f"[{t.numel()}] on {t.device}")
    return t.reshape(-1).float().contiguous()


def dequantize_into(q, out: torch.Tensor) -> torch.Tensor:
    """Decode NF4Weight `q` into `out` [n] (contiguous CPU; f32/f64/bf16/f16): out[i] = code[nibble] * absmax[block]
    (fp32 product, one rounding to out.dtype), the double-quantized absmax decoded in the same loop."""
    lib = _require()
    if out.dtype not in _OUT_KIND:
        raise TypeError(f"native dequantize: unsupported output dtype {out.dtype}")
    _cpu_contig(out, "out")
    n, bs = out.numel(), q.blocksize
    _check_blocksize(bs)
    n_blocks = -(-n // bs)
    packed = q.packed.reshape(-1).contiguous()
    _cpu_contig(packed, "packed")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"native dequantize: packed must be uint8 [{(n + 1) // 2}], got {packed.dtype} "
                         f"[{packed.numel()}]")
    code = _f32(q.quant_map, "quant_map", 16)
    keep = [packed, code]  # referenced until the C call returns
    if q.nested_absmax is None:
        am = _f32(q.absmax, "absmax", n_blocks)
        sc = _Scales(absmax=am.data_ptr())
        keep.append(am)
    else:
        qa, nmap = q.absmax.reshape(-1).contiguous(), _f32(q.nested_quant_map, "nested_quant_map", 256)
        nabs = _f32(q.nested_absmax, "nested_absmax", -(-n_blocks // q.nested_blocksize))
        if qa.dtype != torch.uint8 or qa.numel() != n_blocks:
            raise ValueError(f"native dequantize: absmax codes must be uint8 [{n_blocks}], got {qa.dtype} "
                             f"[{qa.numel()}]")
        _cpu_contig(qa, "absmax")
        nbs = int(q.nested_blocksize)
        if nbs <= 0 or nbs & (nbs - 1):
            raise ValueError(f"native dequantize: nested_blocksize must be a power of two, got {nbs}")
        sc = _Scales(qabsmax=qa.data_ptr(), nmap=nmap.data_ptr(), nabs=nabs.data_ptr(), offset=float(q.offset),
                     nbs_log2=nbs.bit_length() - 1)
        keep += [qa, nmap, nabs]
    lib.nf4_dequantize(packed.data_ptr(), ctypes.byref(sc), code.data_ptr(), out.data_ptr(), n, bs,
                       _OUT_KIND[out.dtype], _threads(n))
    del keep
    return out


def quantize(flat: torch.Tensor, blocksize: int, midpoints: torch.Tensor, pad_code: int,
             clamp_tail: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """flat float [n] (f32/bf16/f16, contiguous CPU) -> (packed uint8 [(n + 1) // 2], absmax fp32 [n_blocks],
    number of NaN/inf values). Same bytes as `qlora70.nf4` (absmax of a partial last block clamped to >= 1e-38 when
    `clamp_tail`, as bitsandbytes stores it). When the count is non-zero the codes are meaningless: raise."""
    lib = _require()
    if flat.dtype not in _IN_KIND:
        raise TypeError(f"native quantize: unsupported input dtype {flat.dtype}")
    _cpu_contig(flat, "input")
    _check_blocksize(blocksize)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    kind, threads = _IN_KIND[flat.dtype], _threads(4 * n)  # ~4x the work per element of a dequantize
    absmax = torch.empty(n_blocks, dtype=torch.float32)
    bad = lib.nf4_absmax(flat.data_ptr(), absmax.data_ptr(), n, blocksize, kind, threads)
    if n % blocksize:
        absmax[-1:] = absmax[-1:].clamp(min=1e-38) if clamp_tail else absmax[-1:]
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    if bad:
        return packed, absmax, int(bad)
    inv = (1.0 / absmax.clamp(min=1e-38)).contiguous()
    mid = midpoints.to(device="cpu", dtype=torch.float32).contiguous()
    lib.nf4_quantize(flat.data_ptr(), inv.data_ptr(), mid.data_ptr(), packed.data_ptr(), n, blocksize, pad_code, kind,
                     threads)
    return packed, absmax, 0


def seeded_dropout(x: torch.Tensor, seed: int, threshold: int, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x * (keep ? scale : 0) in `out_dtype`, one pass; keep(i) = hash(seed, i) >= threshold (nf4_cpu.c, the
    reference is `qlora70.ops.dropout_keep_reference`). x: contiguous CPU f32/bf16/f16; seed: uint64; threshold:
    uint32 (round(p * 2^32)); the product x * scale is formed in fp32 and rounded once to out_dtype."""
    lib = _require()
    if x.dtype not in _IN_KIND or out_dtype not in _IN_KIND:
        raise TypeError(f"native dropout: dtypes must be float32/bfloat16/float16, got {x.dtype} -> {out_dtype}")
    _cpu_contig(x, "input")
    if not (0 <= seed < 2 ** 64 and 0 <= threshold < 2 ** 32):
        raise ValueError(f"native dropout: seed must be a uint64 and threshold a uint32, got {seed}, {threshold}")
    y = torch.empty(x.shape, dtype=out_dtype)
    n = x.numel()
    lib.seeded_dropout(x.data_ptr(), y.data_ptr(), n, _IN_KIND[x.dtype], _IN_KIND[out_dtype], seed, threshold,
                       scale, _threads(n))
    return y


def lora_sum(y: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 y + scale * d (y, d contiguous CPU tensors of one shape and one dtype f32/bf16/f16), one pass; the
    product and the sum each rounded to fp32, as `y.float() + d.float() * scale`."""
    lib = _require()
    _same("lora_sum", tuple(_IN_KIND), y, d)
    out = torch.empty(y.shape, dtype=torch.float32)
    lib.lora_sum(y.data_ptr(), d.data_ptr(), out.data_ptr(), y.numel(), _IN_KIND[y.dtype], scale, _threads(y.numel()))
    return out


def lora_sum_backward(g: torch.Tensor, dtype: torch.dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, g * scale) rounded to `dtype`, from a contiguous fp32 CPU gradient g, one pass."""
    lib = _require()
    if g.dtype != torch.float32 or dtype not in _IN_KIND:
        raise ValueError(f"native lora_sum_backward: g must be float32 and dtype float32/bfloat16/float16, got "
                         f"{g.dtype} -> {dtype}")
    _cpu_contig(g, "g")
    gy, gd = torch.empty(g.shape, dtype=dtype), torch.empty(g.shape, dtype=dtype)
    lib.lora_sum_backward(g.data_ptr(), gy.data_ptr(), gd.data_ptr(), g.numel(), _IN_KIND[dtype], scale,
                          _threads(g.numel()))
    return gy, gd


def cross_entropy_rows_(logits: torch.Tensor, y: torch.Tensor, grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (fp32 [n]) of logits (n, V) (contiguous CPU f32/bf16/f16) against y (int64 [n]); with
    `grad` the logits are overwritten in place by softmax - onehot(y) (nf4_cpu.c: one row at a time in cache)."""
    lib = _require()
    if logits.dtype not in _IN_KIND or logits.dim() != 2:
        raise ValueError(f"native cross_entropy: logits must be 2-D float32/bfloat16/float16, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    _cpu_contig(logits, "logits")
    y = y.to(torch.int64).contiguous()
    if y.shape != logits.shape[:1]:
        raise ValueError(f"native cross_entropy: y must be [{logits.shape[0]}], got {tuple(y.shape)}")
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32)
    bad = lib.ce_rows(logits.data_ptr(), y.data_ptr(), loss.data_ptr(), n, v, _IN_KIND[logits.dtype], int(grad),
                      _threads(n * v))
    if bad:
        raise MemoryError(f"native cross_entropy: could not allocate a row buffer of {v} floats")
    return loss


def rmsnorm_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for fp32 x (..., D) and weight w [D]: y = w * (x * rstd), rstd [rows] = 1 / sqrt(mean(x^2) + eps)."""
    lib = _require()
    _same("rmsnorm", (torch.float32,), x)
    _same("rmsnorm", (torch.float32,), w)
    d = x.shape[-1]
    if w.shape != (d,):
        raise ValueError(f"native rmsnorm: weight must be [{d}], got {tuple(w.shape)}")
    rows = x.numel() // d
    y, rstd = torch.empty_like(x), torch.empty(rows, dtype=torch.float32)
    lib.rmsnorm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, d, eps, _threads(x.numel()))
    return y, rstd


def rmsnorm_backward(x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dL/dx of `rmsnorm_forward` for the output gradient g (fp32, x's shape)."""
    lib = _require()
    _same("rmsnorm backward", (torch.float32,), x, g)
    dx = torch.empty_like(x)
    d = x.shape[-1]
    lib.rmsnorm_backward(x.data_ptr(), w.data_ptr(), rstd.data_ptr(), g.data_ptr(), dx.data_ptr(), x.numel() // d, d,
                         _threads(x.numel()))
    return dx


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b of one shape and dtype (fp32 or bf16), one pass."""
    lib = _require()
    _same("swiglu", (torch.float32, torch.bfloat16), a, b)
    y = torch.empty_like(a)
    lib.swiglu_forward(a.data_ptr(), b.data_ptr(), y.data_ptr(), a.numel(), _IN_KIND[a.dtype], _threads(a.numel()))
    return y


def swiglu_backward(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/da, dL/db) of silu(a) * b for the output gradient dy (same shape and dtype), one pass."""
    lib = _require()
    _same("swiglu backward", (torch.float32, torch.bfloat16), a, b, dy)
    da, db = torch.empty_like(a), torch.empty_like(a)
    lib.swiglu_backward(a.data_ptr(), b.data_ptr(), dy.data_ptr(), da.data_ptr(), db.data_ptr(), a.numel(),
                        _IN_KIND[a.dtype], _threads(a.numel()))
    return da, db


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype,
         backward: bool = False) -> torch.Tensor:
    """Rotary embedding fused with the head transpose: x (B, T, H, hd) fp32 -> (B, H, T, hd) in out_dtype; with
    `backward`, x is the gradient (B, H, T, hd) (any of f32/bf16/f16) and the result dx (B, T, H, hd) fp32.
    cos, sin: (B, T, hd) fp32 contiguous (rotate-half layout)."""
    lib = _require()
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"native rope: x must be 4-D with an even head dim, got {tuple(x.shape)}")
    b, t, h, hd = (x.shape[0], x.shape[2], x.shape[1], x.shape[3]) if backward else tuple(x.shape)
    kind = x.dtype if backward else out_dtype
    if kind not in _IN_KIND or (not backward and x.dtype != torch.float32):
        raise ValueError(f"native rope: unsupported dtypes {x.dtype} -> {out_dtype}")
    for name, c in (("x", x), ("cos", cos), ("sin", sin)):
        _cpu_contig(c, name)
    if cos.shape != (b, t, hd) or sin.shape != cos.shape or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"native rope: cos/sin must be fp32 ({b}, {t}, {hd}), got {cos.dtype} {tuple(cos.shape)}")
    y = torch.empty((b, t, h, hd) if backward else (b, h, t, hd), dtype=torch.float32 if backward else out_dtype)
    lib.rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), b, t, h, hd, _IN_KIND[kind], int(backward),
             _threads(x.numel()))
    return y


def _conv(name: str, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Test hook: the C conversion helpers applied elementwise (results as raw bits in out_dtype)."""
    lib = _require()
    x = x.contiguous()
    y = torch.empty(x.numel(), dtype=out_dtype)
    getattr(lib, name)(x.data_ptr(), y.data_ptr(), x.numel())
    return y


# ---- CPU compute dtype: bf16 where the CPU makes bf16 matmuls faster ------------------------------------------------
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 /proc/cpuinfo flags; Arm reports "bf16" under "Features"
_BF16_MIN_SPEEDUP = 1.5  # bf16 (cast included) must beat fp32 by this much: autocast adds casts the probe omits
_PROBE_VERSION = 2  # bump when the probe changes: cached verdicts of older probes are measured again
# (M, K, N) of y = x @ W^T like a small model's step: tokens x hidden -> 3*hidden, and the down projection
_PROBE_SHAPES = ((256, 512, 1536), (256, 1536, 512))


def cpu_bf16_flags() -> list[str]:
    """The bf16 matmul features this CPU reports (['amx_bf16', 'avx512_bf16'], ['bf16'] on Arm, or [])."""
    found: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    words = set(line.split(":", 1)[-1].split())
                    found = [w for w in _BF16_FLAGS if w in words] + (["bf16"] if "bf16" in words else [])
                    break
    except OSError:
        pass
    return found


def _probe_matmul() -> dict[str, float]:
    """Best-of-5 seconds for the probe shapes in fp32 (x @ W^T) and in bf16 (x.to(bf16) @ W_bf16^T, as autocast
    runs it), at torch's current thread count; plus the GFLOP/s of each. The two dtypes are timed in alternation,
    round by round, so a burst of load from other processes hits both sides alike (a cached verdict outlives it)."""
    g = torch.Generator().manual_seed(0)
    res = {"fp32_s": 0.0, "bf16_s": 0.0, "flop": 0.0}
    for m, k, n in _PROBE_SHAPES:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        wb = w.to(torch.bfloat16)
        fns = {"fp32_s": lambda: x @ w.t(), "bf16_s": lambda: x.to(torch.bfloat16) @ wb.t()}
        best = {name: float("inf") for name in fns}
        for fn in fns.values():
            fn()  # warm-up: the library picks and JITs its kernel
        for _ in range(5):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        for name in fns:
            res[name] += best[name]
        res["flop"] += 2.0 * m * k * n
    res["fp32_gflops"] = res["flop"] / res["fp32_s"] / 1e9
    res["bf16_gflops"] = res["flop"] / res["bf16_s"] / 1e9
    return res


def _decide_compute_dtype() -> dict:
    """The uncached verdict: {'dtype': 'bf16'|'fp32', 'reason': ..., measurement fields}."""
    flags = cpu_bf16_flags()
    if not flags:
        return {"dtype": "fp32", "reason": "CPU reports no bf16 matmul instructions (no AMX-BF16 / AVX512-BF16 / "
                                           "Arm BF16): fp32"}
    r = _probe_matmul()
    speedup = r["fp32_s"] / r["bf16_s"]
    dtype = "bf16" if speedup >= _BF16_MIN_SPEEDUP else "fp32"
    why = (f"{'+'.join(flags)}: bf16 matmul {r['bf16_gflops']:.0f} GFLOP/s vs fp32 {r['fp32_gflops']:.0f} GFLOP/s "
           f"({speedup:.2f}x, threshold {_BF16_MIN_SPEEDUP}x, {torch.get_num_threads()} threads): {dtype}")
    return {"dtype": dtype, "reason": why, "flags": flags, "speedup": speedup, **r}


@functools.lru_cache(maxsize=None)
def _cached_compute_dtype() -> tuple[str, str]:
    # the verdict depends on the thread count it was measured at (the reason names it), so that is in the key too
    key = hashlib.sha256((_cpu_id() + torch.__version__ + str(_PROBE_VERSION) + f"t{torch.get_num_threads()}")
                         .encode()).hexdigest()[:16]
    path = _cache_dir() / f"compute_dtype_{key}.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("dtype") in ("bf16", "fp32") and isinstance(rec.get("reason"), str):
            return rec["dtype"], rec["reason"] + f" (cached in {path})"
    except (OSError, ValueError):
        pass
    rec = _decide_compute_dtype()
    rec.update(torch=torch.__version__, cpu=platform.processor() or platform.machine())
    try:
        atomic_write_json(path, rec)
    except OSError:  # a read-only cache costs one probe per process, nothing else
        pass
    return rec["dtype"], rec["reason"]


def cpu_compute_dtype() -> tuple[torch.dtype, str]:
    """(torch.bfloat16 or torch.float32, why) for `compute_dtype="auto"` on this CPU. bf16 only where the CPU has
    bf16 matmul instructions and the one-time probe measured them >= 1.5x faster than fp32 (cast included); else
    fp32. `QLORA70_CPU_COMPUTE_DTYPE=bf16|fp32` overrides (`auto` or unset: decide)."""
    env = os.environ.get("QLORA70_CPU_COMPUTE_DTYPE", "auto").strip().lower()
    if env in ("bf16", "bfloat16"):
        return torch.bfloat16, "QLORA70_CPU_COMPUTE_DTYPE=bf16"
    if env in ("fp32", "float32"):
        return torch.float32, "QLORA70_CPU_COMPUTE_DTYPE=fp32"
    if env not in ("", "auto"):
        raise ValueError(f"QLORA70_CPU_COMPUTE_DTYPE must be bf16, fp32 or auto, got {env!r}")
    dtype, why = _cached_compute_dtype()
    return (torch.bfloat16 if dtype == "bf16" else torch.float32), why


# ---- malloc: keep freed memory in the process ----------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from the heap (M_MMAP_MAX=0) and never trim it below 2 GiB of free space
    (M_TRIM_THRESHOLD), so buffers freed by one training step are reused by the next without page faults; the
    process's RSS then stays at its peak instead of dropping between steps. True when applied (Linux glibc; once per
    process); False elsewhere, or with QLORA70_MALLOC_TUNE=0."""
    if os.environ.get("QLORA70_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
