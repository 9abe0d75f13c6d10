"""The CPU fast path (qlora70/native.py + csrc/nf4_cpu.c) against the pure-torch reference in qlora70/nf4.py: same bytes,
same decoded bits, for every dtype, blocksize and awkward shape; the fp16/bf16 conversions against torch's casts."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora70 import native, nf4

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
needs_native = pytest.mark.skipif(not native.available(), reason=f"native path: {native.native_status()}")


def test_available_when_a_compiler_exists():
    if not HAVE_CC or os.environ.get("QLORA70_NATIVE") == "0":
        pytest.skip("no C compiler on this machine / disabled")
    assert native.native_status() == "available"


@needs_native
def test_fp16_to_fp32_all_bit_patterns():
    h = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    ours = native._conv("conv_f16_to_f32", h.view(torch.float16).view(torch.int16), torch.float32)
    ref = h.view(torch.float16).float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # -0.0 and subnormals included


def _hard_floats(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([
        bits.view(torch.float32),                                               # every exponent, NaN/inf included
        torch.randn(n, generator=g) * torch.logspace(-30, 30, n),
        # exact fp16 / bf16 ties: a representable value plus half an ulp
        torch.randn(n, generator=g).half().float() * (1 + 2.0 ** -11),
        torch.randn(n, generator=g).bfloat16().float() * (1 + 2.0 ** -8),
        torch.tensor([0.0, -0.0, 65504.0, 65520.0, 65519.99, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-45, float("inf"),
                      -float("inf"), float("nan"), 3.4e38, -3.4e38, 1.17e-38]),
    ])
    return x.contiguous()


@needs_native
@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16])
def test_fp32_to_half_rounding_matches_torch(target):
    x = _hard_floats(20000, seed=1)
    name = "conv_f32_to_f16" if target == torch.float16 else "conv_f32_to_bf16"
    ours = native._conv(name, x, torch.int16)
    ref = x.to(target)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours.view(target)), nan)
    assert torch.equal(ours[~nan], ref.view(torch.int16)[~nan])


SHAPES = [(1, 1), (1, 3), (3, 5), (37, 131), (64, 64), (7, 4097), (130, 96), (300, 257)]


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.05
    flat = w.view(-1)
    if flat.numel() >= 200:
        flat[64:128] = 0.0  # an all-zero block (blocksize 64)
        flat[150] = 0.3     # a lone outlier
    return w.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_same_bytes_as_torch_reference(dtype, shape, blocksize):
    w = _weight(shape, dtype, seed=hash((shape, blocksize)) % 1000)
    packed, absmax, bad = native.quantize(w.reshape(-1).contiguous(), blocksize, nf4._midpoints("nf4", "cpu"),
                                          nf4.NF4_ZERO_CODE)
    ref_packed, ref_absmax, ref_bad = nf4._quantize_torch(w.reshape(-1).float(), blocksize)
    assert bad == ref_bad == 0
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))


@needs_native
def test_quantize_counts_nan_and_inf():
    w = torch.randn(5, 77)
    w[1, 3], w[4, 70], w[0, 0] = float("nan"), float("inf"), -float("inf")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        _, _, bad = native.quantize(w.to(dt).reshape(-1).contiguous(), 64, nf4._midpoints("nf4", "cpu"), 7)
        assert bad == 3
    with pytest.raises(ValueError, match="3 NaN/inf"):
        nf4.quantize_nf4(w)


@needs_native
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (32, False), (128, True), (4096, True)])
def test_dequantize_same_bits_as_torch_reference(out_dtype, shape, blocksize, double_quant):
    w = _weight(shape, torch.float32, seed=7)
    q = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    ours = nf4.dequantize_nf4(q, out_dtype)
    ref = nf4._dequantize_torch(q, out_dtype)
    assert ours.shape == ref.shape == torch.Size(shape) and ours.dtype == out_dtype
    assert torch.equal(ours, ref) and torch.equal(torch.signbit(ours), torch.signbit(ref))


@needs_native
def test_dequantize_custom_code_table_and_tiny_scales():
    # a custom quant_map and absmax values whose products are fp16/bf16 subnormals or overflow fp16
    g = torch.Generator().manual_seed(3)
    q = nf4.quantize_nf4(torch.randn(9, 70, generator=g), double_quant=False)
    q.quant_map = torch.linspace(-1, 1, 16)
    q.absmax = torch.tensor([1e-7, 3e-5, 7e4, 1e-40, 0.0, 1.0, 2.5e-3, 1e5, 1e-38, 6e-8])[: q.n_blocks].contiguous()
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(nf4.dequantize_nf4(q, dt), nf4._dequantize_torch(q, dt)), dt


@needs_native
def test_threads_split_gives_the_same_result(monkeypatch):
    monkeypatch.setattr(native, "_MIN_ELEMENTS_PER_THREAD", 1000)  # split even this small weight over threads
    w = _weight((131, 1029), torch.bfloat16, seed=11)
    old = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            assert native._threads(w.numel()) == nt
            q = nf4.quantize_nf4(w)
            results.append((q, nf4.dequantize_nf4(q), nf4.dequantize_nf4(q, torch.float32)))
    finally:
        torch.set_num_threads(old)
    ref = nf4._dequantize_torch(results[0][0], torch.bfloat16)
    for q, d, d32 in results:
        assert torch.equal(q.packed, results[0][0].packed) and torch.equal(q.absmax, results[0][0].absmax)
        assert torch.equal(d, ref) and torch.equal(d32, results[0][2])


@needs_native
def test_rejects_bad_buffers():
    q = nf4.quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="packed must be uint8"):  # out has room for 258 values, q holds 256
        native.dequantize_into(q, torch.empty(258))
    with pytest.raises(ValueError, match="absmax codes"):
        bad = nf4.quantize_nf4(torch.randn(4, 64), double_quant=True)
        object.__setattr__(bad, "absmax", bad.absmax.float())
        native.dequantize_into(bad, torch.empty(256))
    with pytest.raises(ValueError, match="contiguous CPU"):
        native.dequantize_into(q, torch.empty(512)[::2])
    with pytest.raises(TypeError, match="output dtype"):
        native.dequantize_into(q, torch.empty(256, dtype=torch.int32))
    for bs in (8192, 48, 0):
        with pytest.raises(ValueError, match="blocksize must be a power of two"):
            native.quantize(torch.randn(256), bs, nf4._midpoints("nf4", "cpu"), 7)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


PROBE = """
    import warnings, torch
    warnings.simplefilter("always")
    from qlora70 import native, nf4
    w = torch.randn(37, 131, generator=torch.Generator().manual_seed(0))
    q = nf4.quantize_nf4(w)
    print(native.native_status())
    print(q.packed.sum().item(), nf4.dequantize_nf4(q).double().sum().item())
"""


def test_disabled_and_missing_compiler_fall_back_to_the_same_numbers(tmp_path):
    runs = {
        "default": _run(PROBE, {}),
        "disabled": _run(PROBE, {"QLORA70_NATIVE": "0"}),
        "no compiler": _run(PROBE, {"CC": "/bin/false", "PATH": str(tmp_path), "QLORA70_CACHE_DIR": str(tmp_path)}),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
    status = {k: r.stdout.splitlines()[0] for k, r in runs.items()}
    numbers = {k: r.stdout.splitlines()[1] for k, r in runs.items()}
    assert status["disabled"].startswith("disabled")
    assert "compiler" in status["no compiler"] or "failed" in status["no compiler"]
    assert len(set(numbers.values())) == 1, numbers


def test_broken_compiler_warns_and_falls_back(tmp_path):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\necho 'error: simulated failure' >&2\nexit 1\n")
    cc.chmod(0o755)
    r = _run(PROBE, {"CC": str(cc), "QLORA70_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("build failed") and "simulated failure" in r.stdout
    assert "slower torch path" in r.stderr
    assert not any((tmp_path / "cache").iterdir())  # no half-written library left behind


@pytest.mark.parametrize("native_on", [True, False])
def test_dequantize_into_caller_buffer(native_on, monkeypatch):
    if not native_on:
        monkeypatch.setattr(native, "available", lambda: False)
    q = nf4.quantize_nf4(_weight((33, 70), torch.float32, seed=5))
    buf = torch.full((33, 70), float("nan"), dtype=torch.bfloat16)
    got = nf4.dequantize_nf4(q, torch.bfloat16, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, nf4._dequantize_torch(q, torch.bfloat16))
    for bad in (torch.empty(33, 71, dtype=torch.bfloat16), torch.empty(33, 70), torch.empty(70, 33).t()):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            nf4.dequantize_nf4(q, torch.bfloat16, out=bad.to(torch.bfloat16) if bad.dtype != torch.float32 else bad)


def test_linear4bit_reuses_its_nf4_view_until_tensors_change():
    from torch import nn
    from qlora70.layers import Linear4bit
    lin = Linear4bit.from_linear(nn.Linear(70, 33))
    q = lin.quant
    assert lin.quant is q  # built and validated once
    lin.weight.data = lin.weight.data.clone()
    assert lin.quant is not q and lin.quant.packed.data_ptr() == lin.weight.data_ptr()
    other = Linear4bit.from_linear(nn.Linear(70, 33))
    before = lin.quant
    lin.load_state_dict(other.state_dict())
    assert lin.quant is not before and torch.equal(lin.dequantize(), other.dequantize())
    x = torch.randn(4, 70)
    assert torch.allclose(lin(x), x @ other.dequantize(torch.float32).t() + other.bias, atol=1e-5)


SCALAR_PROBE = """
    import torch
    from qlora70 import native, nf4
    assert native.native_status() == "available", native.native_status()
    print(native.simd())
    g = torch.Generator().manual_seed(1)
    for shape in [(3, 5), (37, 131), (7, 4097), (131, 1029)]:
        for bs, dq in [(64, True), (32, False), (4096, True)]:
            w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
            q = nf4.quantize_nf4(w, blocksize=bs, double_quant=dq)
            ref_packed, ref_absmax, _ = nf4._quantize_torch(w.reshape(-1), bs)
            assert torch.equal(q.packed, ref_packed), (shape, bs)
            for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                assert torch.equal(nf4.dequantize_nf4(q, dt), nf4._dequantize_torch(q, dt)), (shape, bs, dt)
    print("ok")
"""


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_portable_scalar_build_is_bit_identical_too(tmp_path):
    """Machines without AVX-512 run the scalar loops: build them here (baseline target) and check them as well."""
    r = _run(SCALAR_PROBE, {"QLORA70_NATIVE_PORTABLE": "1", "QLORA70_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["scalar", "ok"], r.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_removes_first_touch_faults():
    """In a fresh process, a loop that frees and reallocates a 64 MiB buffer (as a training step does): without the
    tuning every allocation is a fresh mapping (~16k page faults to fill it); with it the heap settles within a few
    iterations and the buffer comes back with its pages in place. QLORA70_MALLOC_TUNE=0 opts out."""
    code = textwrap.dedent("""
        import resource, torch
        from qlora70 import native
        ok = native.keep_freed_memory()
        out = []
        for _ in range(10):
            t = torch.empty(16 << 20, dtype=torch.float32)   # 64 MiB
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t.fill_(1.0)
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            del t
        print(ok, *out)
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for tune in ("1", "0"):
        env["QLORA70_MALLOC_TUNE"] = tune
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        ok, *faults = out.stdout.split()
        faults = [int(f) for f in faults]
        if tune == "0":
            assert ok == "False" and min(faults[1:]) > 4000, faults
        elif ok != "True":
            pytest.skip("not glibc")
        else:
            assert max(faults[-3:]) < 200, faults
