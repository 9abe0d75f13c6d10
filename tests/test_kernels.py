"""Triton NF4 kernels (qlora70.kernels.nf4_kernels) against the torch reference (qlora70.nf4).

On a machine without CUDA the kernels run under the Triton CPU interpreter (fp32 / fp16 only: the interpreter gets bf16
arithmetic wrong); with CUDA the same tests run compiled on the GPU, plus the bf16 and >2^31-element tests.
TRITON_INTERPRET must be set before the kernels' @triton.jit decorators run, so it is set here before the import and
restored afterwards (so other test files keep their torch backend); the fixture below re-sets it during these tests.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
_prev = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from qlora70.kernels import nf4_kernels as K
finally:
    if _prev is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _prev

from qlora70 import ops  # noqa: E402
from qlora70.nf4 import NF4Weight, dequantize_nf4, quantize_nf4  # noqa: E402

if not CUDA and not K.INTERPRET:  # pragma: no cover - only if something imported the kernels before this file
    pytest.skip("qlora70.kernels was imported without TRITON_INTERPRET=1 on a CPU-only machine",
                allow_module_level=True)

DEV = "cpu" if K.INTERPRET else "cuda"
GPU = pytest.mark.skipif(K.INTERPRET, reason="needs CUDA (compiled Triton); bf16 is wrong in the interpreter")


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    if K.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets ops.get_backend pick Triton for CPU tensors


def make_q(shape, blocksize=64, dq=True, seed=0, scale=1.0) -> NF4Weight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    w[0, : min(3, shape[1])] = 0.0  # exact zeros and a partly-zero block
    return quantize_nf4(w, blocksize=blocksize, double_quant=dq).to(DEV)


def randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEV, dtype=dtype)


# ---- dequantize ---------------------------------------------------------------------------------------------------
# (shape, blocksize, double_quant): odd numel, K not a multiple of the block, partial last quant block,
# several nested (256-block) groups with a partial last one, blocksizes 32..256
DEQ_CASES = [
    ((5, 7), 64, True),
    ((33, 99), 64, True),
    ((129, 131), 64, True),   # 16899 elements: 265 blocks -> 2 nested groups, last block has 3 elements
    ((129, 131), 64, False),
    ((67, 192), 32, True),
    ((40, 300), 128, True),
    ((9, 257), 256, False),
]


@pytest.mark.parametrize("shape,bs,dq", DEQ_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_bit_exact(shape, bs, dq, dtype):
    q = make_q(shape, bs, dq)
    ref = dequantize_nf4(q, dtype)
    assert torch.equal(K.dequantize(q, dtype), ref)
    # many small programs (partial last program, rows crossing nested groups)
    assert torch.equal(K.dequantize(q, dtype, config={"elements": 256}), ref)


def test_dequantize_out_buffer_and_default_dtype():
    q = make_q((33, 99))
    buf = torch.full((33, 99), float("nan"), device=DEV)
    got = K.dequantize(q, torch.float32, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, dequantize_nf4(q, torch.float32))
    nc = torch.zeros(99, 33, device=DEV).t()  # non-contiguous (33, 99) view
    K.dequantize(q, torch.float32, out=nc)
    assert torch.equal(nc, dequantize_nf4(q, torch.float32))
    assert K.dequantize(q).dtype == q.dtype
    with pytest.raises(ValueError, match="out must be"):
        K.dequantize(q, torch.float32, out=torch.empty(33, 98, device=DEV))
    with pytest.raises(ValueError, match="out must be"):
        K.dequantize(q, torch.float16, out=torch.empty(33, 99, device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        K.dequantize(q, torch.int8)
    with pytest.raises(ValueError, match="unknown config"):
        K.dequantize(q, config={"rows": 4})
    with pytest.raises(ValueError, match="power of two"):
        K.dequantize(q, config={"elements": 100})


def test_ops_dequantize_routes_to_triton():
    q = make_q((33, 99))
    buf = torch.empty(33, 99, device=DEV)
    out = ops.dequantize(q, torch.float32, out=buf, backend="triton")
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, dequantize_nf4(q, torch.float32))


# ---- matmul -------------------------------------------------------------------------------------------------------
def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _ref_fwd(x, q, bias=None):
    """x @ W^T computed in fp32 from W rounded to x's dtype (what the kernels multiply)."""
    w = dequantize_nf4(q, x.dtype).float()
    y = x.float() @ w.t()
    return y if bias is None else y + bias.float()


# (shape, blocksize, dq, forward config, backward config): aligned (K % blocksize == 0) tiles with one or several
# sub-blocks per tile, a tile narrower than the quant block, odd K (per-element path), 2-3 reduction splits
MM_CASES = [
    ((67, 192), 64, True, None, None),
    ((33, 99), 64, True, None, None),
    ((40, 256), 128, False, {"block_k": 64, "block_n": 32}, {"block_n": 32, "block_k": 64}),
    ((50, 320), 64, True, {"block_k": 64, "block_n": 16, "split": 3}, {"block_n": 16, "block_k": 32, "split": 3}),
    ((21, 77), 32, False, {"block_k": 32, "block_n": 16, "split": 2}, {"block_n": 16, "block_k": 16, "split": 2}),
]


@pytest.mark.parametrize("shape,bs,dq,cfg,_", MM_CASES)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_fused_forward(shape, bs, dq, cfg, _, M):
    q = make_q(shape, bs, dq, seed=M)
    x = randn(M, shape[1], seed=M + 10)
    bias = randn(shape[0], seed=M + 20) if M == 3 else None
    y = K.linear_forward(x, q, bias, fused=True, config=cfg)
    assert y.shape == (M, shape[0]) and y.dtype == x.dtype
    torch.testing.assert_close(y, _ref_fwd(x, q, bias), **_tol(x.dtype))


@pytest.mark.parametrize("shape,bs,dq,_,cfg", MM_CASES)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_fused_backward_input_matches_autograd(shape, bs, dq, _, cfg, M):
    q = make_q(shape, bs, dq, seed=M)
    x = randn(M, shape[1], seed=M + 30).requires_grad_(True)
    dy = randn(M, shape[0], seed=M + 40)
    (x @ dequantize_nf4(q, torch.float32).t()).backward(dy)  # autograd on the reference
    dx = K.linear_backward_input(dy, q, fused=True, config=cfg)
    assert dx.shape == (M, shape[1])
    torch.testing.assert_close(dx, x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M", [1, 17])
def test_fused_fp16(M):
    q = make_q((67, 192), 64, True, seed=3)
    x = randn(M, 192, dtype=torch.float16, seed=4)
    torch.testing.assert_close(K.linear_forward(x, q, fused=True).float(), _ref_fwd(x, q), **_tol(x.dtype))
    dy = randn(M, 67, dtype=torch.float16, seed=5)
    ref = dy.float() @ dequantize_nf4(q, torch.float16).float()
    torch.testing.assert_close(K.linear_backward_input(dy, q, fused=True).float(), ref, **_tol(dy.dtype))


def test_large_m_buffer_path_and_dispatch(monkeypatch):
    monkeypatch.setattr(K, "FUSED_MAX_M", 8)
    K.clear_workspace()
    big, small = make_q((67, 192), seed=7), make_q((33, 99), seed=8)
    x = randn(40, 192, seed=9)
    bias = randn(67, seed=10)
    y = K.linear_forward(x, big, bias)  # M = 40 > FUSED_MAX_M: workspace + torch matmul
    torch.testing.assert_close(y, _ref_fwd(x, big, bias), rtol=1e-5, atol=1e-5)
    assert (torch.device(DEV), torch.float32) in K._WORKSPACE
    x2 = randn(12, 99, seed=11)  # a smaller weight reuses the same buffer
    torch.testing.assert_close(K.linear_forward(x2, small), _ref_fwd(x2, small), rtol=1e-5, atol=1e-5)
    dy = randn(40, 67, seed=12)
    torch.testing.assert_close(K.linear_backward_input(dy, big), dy @ dequantize_nf4(big, torch.float32),
                               rtol=1e-5, atol=1e-5)
    # fused and buffer paths agree; M = 0 gives empty outputs
    torch.testing.assert_close(K.linear_forward(x2, small, fused=True), K.linear_forward(x2, small, fused=False),
                               rtol=1e-4, atol=1e-4)
    assert K.linear_forward(x[:0], big).shape == (0, 67)
    assert K.linear_backward_input(dy[:0], big).shape == (0, 192)


def test_buffer_path_never_hands_the_workspace_to_autograd():
    q1, q2 = make_q((33, 99), seed=13), make_q((33, 99), seed=14)
    x = randn(20, 99, seed=15).requires_grad_(True)
    y = K.linear_forward(x, q1, fused=False)  # autograd saves W for d/dx: it must not be the shared workspace
    K.linear_forward(randn(20, 99, seed=16), q2, fused=False)  # overwrites the workspace
    y.sum().backward()
    torch.testing.assert_close(x.grad, dequantize_nf4(q1, torch.float32).sum(0).expand(20, 99), rtol=1e-5, atol=1e-5)


def test_input_validation():
    q = make_q((33, 99))
    with pytest.raises(ValueError, match="columns"):
        K.linear_forward(randn(2, 98), q)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        K.linear_forward(torch.ones(2, 99, dtype=torch.int32, device=DEV), q)
    with pytest.raises(ValueError, match="2-D"):
        K.linear_backward_input(randn(33), q)
    with pytest.raises(ValueError, match="bias"):
        K.linear_forward(randn(2, 99), q, randn(32))
    with pytest.raises(ValueError, match="power of two"):
        K.linear_forward(randn(2, 99), q, fused=True, config={"block_n": 24})
    with pytest.raises(ValueError, match="unknown config"):
        K.linear_backward_input(randn(2, 33), q, fused=True, config={"bk": 16})
    with pytest.raises(ValueError, match="split"):
        K.linear_forward(randn(2, 99), q, fused=True, config={"split": 0})
    with pytest.raises(TypeError, match="NF4Weight"):
        K.dequantize(torch.zeros(3))


# ---- through the dispatch boundary ----------------------------------------------------------------------------------
@pytest.mark.parametrize("M_shape", [(1, 1), (2, 3), (3, 7)])
def test_ops_nf4_linear_triton_equals_torch(M_shape):
    q = make_q((67, 192), seed=17)
    x = randn(*M_shape, 192, seed=18)
    b = randn(67, seed=19)
    outs = {}
    for backend in ("torch", "triton"):
        xi, bi = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = ops.nf4_linear(xi, q, bi, backend=backend)
        y.backward(torch.ones_like(y) * 0.5 + randn(*y.shape, seed=20))
        outs[backend] = (y.detach(), xi.grad, bi.grad)
    for a, c in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_get_backend_triton_unavailable_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "triton_available", lambda: (False, "triton is not importable (test)"))
    with pytest.raises(RuntimeError, match="triton"):
        ops.get_backend(DEV, "triton")
    assert ops.get_backend(DEV, "auto") == "torch"  # auto falls back silently only when nothing was asked for
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.get_backend("cpu", "triton")
    monkeypatch.setenv("QLORA70_BACKEND", "triton")
    with pytest.raises(RuntimeError):
        ops.get_backend("cpu")


# ---- the pair lookup table cache (keyed by content) -----------------------------------------------------------------
def test_lut_cache_shared_by_equal_tables():
    from qlora70.nf4 import NF4_CODES
    K.clear_lut_cache()
    a, b = NF4_CODES.clone().to(DEV), NF4_CODES.clone().to(DEV)
    assert a.data_ptr() != b.data_ptr()
    la = K._pair_lut(a)
    assert K._pair_lut(b) is la and len(K._LUT_BY_CONTENT) == 1  # two tables, one content: one LUT
    byte = torch.arange(256, device=DEV)
    assert torch.equal(la, torch.stack([a[byte >> 4], a[byte & 15]], 1))


def test_lut_cache_never_serves_a_stale_table_at_the_same_address():
    import numpy as np

    from qlora70.nf4 import NF4_CODES
    K.clear_lut_cache()
    arr = NF4_CODES.numpy().copy()
    first = torch.from_numpy(arr)  # version 0 at address X
    l1 = K._pair_lut(first.to(DEV)) if DEV != "cpu" else K._pair_lut(first)
    arr[:] = np.linspace(-2.0, 2.0, 16, dtype=np.float32)  # the memory at X changes behind torch's back
    second = torch.from_numpy(arr)  # a new table: same address, same version (0), other content
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    l2 = K._pair_lut(second.to(DEV)) if DEV != "cpu" else K._pair_lut(second)
    lin = torch.from_numpy(np.linspace(-2.0, 2.0, 16, dtype=np.float32))
    assert l2 is not l1 and torch.equal(l2[0x1F].cpu(), torch.stack([lin[1], lin[15]]))
    assert torch.equal(l1[0x1F].cpu(), torch.stack([NF4_CODES[1], NF4_CODES[15]]))  # the first LUT is unchanged
    # an in-place torch op on a cached table bumps its version: the LUT follows the new content
    t = NF4_CODES.clone().to(DEV)
    before = K._pair_lut(t)
    t.mul_(0.5)
    after = K._pair_lut(t)
    assert after is not before and torch.equal(after, before * 0.5)
    # ... and a kernel launched with the changed table decodes with it
    q = make_q((4, 64), 64, False)
    q2 = NF4Weight(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=64,
                   quant_map=q.quant_map.clone())
    ref = K.dequantize(q2, torch.float32)
    q2.quant_map.mul_(2.0)
    assert torch.equal(K.dequantize(q2, torch.float32), 2 * ref)
    assert torch.equal(K.dequantize(q2, torch.float32), dequantize_nf4(q2, torch.float32))


# ---- CUDA only ------------------------------------------------------------------------------------------------------
@GPU
@pytest.mark.parametrize("shape,bs,dq", DEQ_CASES)
def test_dequantize_bf16_bit_exact_cuda(shape, bs, dq):
    q = make_q(shape, bs, dq)
    assert torch.equal(K.dequantize(q, torch.bfloat16), dequantize_nf4(q, torch.bfloat16))


@GPU
@pytest.mark.parametrize("M", [1, 3, 16, 17, 300])
def test_matmul_bf16_cuda(M):
    q = make_q((1000, 1024), 64, True, seed=21, scale=0.02)
    x = randn(M, 1024, dtype=torch.bfloat16, seed=22)
    torch.testing.assert_close(K.linear_forward(x, q).float(), _ref_fwd(x, q), rtol=2e-2, atol=2e-2)
    dy = randn(M, 1000, dtype=torch.bfloat16, seed=23)
    ref = dy.float() @ dequantize_nf4(q, torch.bfloat16).float()
    torch.testing.assert_close(K.linear_backward_input(dy, q).float(), ref, rtol=2e-2, atol=5e-2)


@GPU
def test_int64_offsets_beyond_2_31_elements_cuda():
    """A [65540, 32768] weight has 2^31 + 131072 elements: flat element and byte offsets pass int32."""
    N, Kd, bs = 65540, 32768, 64
    n = N * Kd
    assert n > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
    codes = torch.randint(0, 256, (n // bs,), dtype=torch.uint8, device="cuda", generator=g)
    nested = torch.rand(-(-n // bs // 256), device="cuda", generator=g) * 0.1
    q = NF4Weight(packed=packed, absmax=codes, shape=(N, Kd), dtype=torch.bfloat16, blocksize=bs,
                  nested_absmax=nested, offset=0.05)
    r0 = N - 8  # the last 8 rows start at a nested-group boundary (Kd / bs = 512 blocks per row)
    tail = NF4Weight(packed=packed[r0 * Kd // 2:], absmax=codes[r0 * Kd // bs:], shape=(N - r0, Kd),
                     dtype=torch.bfloat16, blocksize=bs, nested_absmax=nested[r0 * Kd // bs // 256:], offset=0.05)
    w_tail = dequantize_nf4(tail, torch.bfloat16)
    w = K.dequantize(q, torch.bfloat16)
    assert torch.equal(w[r0:], w_tail)
    del w
    x = randn(1, Kd, dtype=torch.bfloat16, seed=24)
    y = K.linear_forward(x, q, fused=True)
    torch.testing.assert_close(y[:, r0:].float(), x.float() @ w_tail.float().t(), rtol=2e-2, atol=5e-2)
    dy = torch.zeros(1, N, dtype=torch.bfloat16, device="cuda")
    dy[0, r0:] = 1.0
    dx = K.linear_backward_input(dy, q, fused=True)
    torch.testing.assert_close(dx.float(), w_tail.float().sum(0, keepdim=True), rtol=2e-2, atol=5e-2)


@GPU
@pytest.mark.parametrize("T", [6, 40])  # 12 tokens: the fused kernels (M <= FUSED_MAX_M); 80: dequant + cuBLAS
def test_model_step_auto_backend_on_cuda(monkeypatch, T):
    """Model level on CUDA: a tiny NF4 Llama with LoRA, bf16 autocast, forward + backward with backend "auto" (which
    must resolve to the compiled Triton kernels) equals the torch reference backend."""
    from qlora70.config import LlamaConfig, LoRAConfig
    from qlora70.layers import Linear4bit
    from qlora70.lora import inject_lora
    from qlora70.model import Llama, quantize_model_

    monkeypatch.delenv("QLORA70_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops.get_backend("cuda") == "triton"
    ids = torch.randint(3, 512, (2, T), generator=torch.Generator().manual_seed(5)).cuda()
    res = {}
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        model = quantize_model_(Llama(LlamaConfig.from_name("tiny"))).cuda()
        inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0))
        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        grads = [p.grad.float() for p in model.parameters() if p.requires_grad]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        res[backend] = (loss.detach(), grads)
    torch.testing.assert_close(res["auto"][0], res["torch"][0], rtol=1e-2, atol=1e-2)
    for a, b in zip(res["auto"][1], res["torch"][1]):
        assert ((a - b).norm() / b.norm().clamp(min=1e-12)) < 3e-2


# ---- the benchmark script -------------------------------------------------------------------------------------------
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_kernels.py")


def test_benchmark_runs_on_tiny_shapes(tmp_path):
    """The benchmark end to end (Triton rows interpreted on CPU), on 70B shapes / 64 and M in {1, 17}."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = str(tmp_path / "bench")
    args = ["--quick", "--no-tune", "--shape-div", "64", "--m", "1,17", "--cpu-seconds", "0", "--no-bnb", "--out", out]
    assert bench.main(args) == 0
    with open(out + ".json") as f:
        rep = json.load(f)
    methods = {r["method"] for r in rep["rows"]}
    assert {"triton", "triton fused", "triton dequant+cuBLAS", "dense torch.matmul", "reference (torch)"} <= methods
    assert rep["checks"] and all(c["ok"] for c in rep["checks"]), rep["checks"]
    assert rep["crossover"]["tested_M"] == [1, 17]
    assert os.path.getsize(out + ".png") > 10_000


def test_benchmark_compile_check_for_sm90(tmp_path):
    """Every default kernel variant compiles for sm_90 without a GPU (catches GPU-only compile errors on CPU CI)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, BENCH, "--compile-check", "--quick", "--out", str(tmp_path / "b")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(tmp_path / "b_compile.json") as f:
        res = json.load(f)
    assert len(res) >= 3 and all(x["ok"] for x in res)
    assert all((x.get("spill_bytes") or 0) == 0 for x in res), res
