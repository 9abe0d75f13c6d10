"""benchmarks/gpu_check.sh and prepare_gpu_wheels.py, checked on the CPU: the plan fits its budget, the embedded Python
helpers compile and summarize each step's figures, and the slimmed bitsandbytes wheel stays a consistent wheel.
(`bash benchmarks/gpu_check.sh --dry-run` also installs the wheels and imports everything: ~45 s, run by hand.)"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def helper(tmp_path, name: str) -> str:
    """Extract the heredoc helper `name`.py from the script into tmp_path."""
    text = open(SCRIPT).read()
    m = re.search(rf"cat >\"\$HELP/{name}\.py\" <<'PYEOF'\n(.*?)\nPYEOF\n", text, re.S)
    assert m, f"helper {name}.py not found in gpu_check.sh"
    path = tmp_path / f"{name}.py"
    path.write_text(m.group(1) + "\n")
    return str(path)


def test_script_parses_and_limits_fit_one_command():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = open(SCRIPT).read()
    steps = re.search(r'^STEPS="([^"]+)"', text, re.M).group(1).split()
    limits = {s.split(":")[0]: int(s.split(":")[1]) for s in steps}
    assert list(limits)[:3] == ["preflight", "kernel_tests", "fit_70b"]  # most valuable first
    assert sum(limits.values()) <= 540
    for name, limit in limits.items():  # the header documents the same limits
        assert re.search(rf"^#   {name}\s+{limit}\s", text, re.M), name
    run_call = re.search(r"timeout_s=(\d+)", text)
    assert run_call and sum(limits.values()) < int(run_call.group(1)) <= 600
    assert "torch.distributed.run" in text and not re.search(r"^[^#]*\btorchrun ", text, re.M)


@pytest.mark.parametrize("name", ["imports", "fit70b", "summary"])
def test_helpers_compile(tmp_path, name):
    import py_compile
    py_compile.compile(helper(tmp_path, name), doraise=True)


def _summary(tmp_path, step: str, log: str, rc: int = 0, files: dict | None = None) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "gpu_check.log").write_text(log)
    for k, v in (files or {}).items():
        (out / k).write_text(json.dumps(v))
    subprocess.run([sys.executable, helper(tmp_path, "summary"), step, str(out), str(rc), "7"], check=True,
                   capture_output=True)
    return (out / "summary.txt").read_text()


def test_summary_of_each_step(tmp_path):
    s = _summary(tmp_path, "kernel_tests", "=== kernel_tests (limit 90s): x\nFAILED tests/a.py::t - boom\n"
                 "3 failed, 70 passed, 2 skipped in 41.2s\n", rc=1)
    assert "pytest: 3 failed, 70 passed, 2 skipped" in s and "FAILED tests/a.py::t" in s
    bench = {"checks": [{"check": "c", "ok": True}, {"check": "d", "ok": False}],
             "rows": [{"kind": "dequant", "name": "q/o_proj", "method": "triton", "ms": 0.05, "gbps": 3900.0}],
             "crossover": {"recommended_FUSED_MAX_M": 16, "first_M_where_buffer_wins": {"forward q/o_proj": 64}},
             "targets": [{"target": "t", "name": "q/o_proj", "value": 0.9, "ok": True}]}
    s = _summary(tmp_path, "bench_kernels", "=== bench_kernels (limit 110s)\n", files={"bench_kernels.json": bench})
    assert "correctness checks ok: 1/2" in s and "recommended FUSED_MAX_M = 16" in s and "3900 GB/s" in s
    # the 7B step killed before its JSON: the per-framework lines it printed survive
    s = _summary(tmp_path, "train_step_7b", "=== train_step_7b (limit 120s)\nours: 5000.0 tokens/s\n", rc=124)
    assert "(TIMEOUT)" in s and "ours: 5000.0 tokens/s" in s
    fit = {"tokens_per_s": 300.0, "step_s": [4.0, 3.5], "losses": [10.4, 10.4], "max_allocated_gb": 45.0,
           "max_reserved_gb": 47.0, "cuda_context_gb": 0.6, "measured_peak_reserved_plus_context_gb": 47.6,
           "planned_total_gb": 53.3, "planned_over_measured": 1.12, "planned_placement": "device",
           "fits_80gb": True, "planned_fits_80gib": True, "planned_total_80gib_gb": 53.3}
    s = _summary(tmp_path, "fit_70b", "=== fit_70b (limit 140s)\nqlora70.optim: PagedAdamW placement on cuda:0: "
                 "device (states 6.17 GiB)\n", files={"fit_70b.json": fit})
    assert "measured peak reserved + context 47.60 GiB" in s and "planner: 53.30 GiB" in s
    assert "PagedAdamW placement on cuda:0: device" in s
    s = _summary(tmp_path, "fsdp_nccl", '=== fsdp_nccl (limit 40s)\nnoise\n{"backend": "nccl", "ok": true}\n')
    assert '"backend": "nccl"' in s and (tmp_path / "out" / "fsdp_check.json").exists()


def test_import_checks_strict_and_dry(tmp_path):
    h = helper(tmp_path, "imports")
    args = ["a=json,cuda", "b=json,no_such_module_xyz"]
    dry = subprocess.run([sys.executable, h, *args], capture_output=True, text=True, check=True).stdout
    strict = subprocess.run([sys.executable, h, "--strict", *args], capture_output=True, text=True,
                            check=True).stdout
    import torch
    if not torch.cuda.is_available():
        assert "a ok (unchecked here: cuda)" in dry and "a missing: cuda" in strict
    assert "b missing: no_such_module_xyz (ModuleNotFoundError" in dry


def test_slim_bitsandbytes_wheel_keeps_a_consistent_record(tmp_path):
    spec = importlib.util.spec_from_file_location("prep", os.path.join(ROOT, "benchmarks", "prepare_gpu_wheels.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    whl = tmp_path / "bitsandbytes-0.0-py3-none-manylinux_2_24_x86_64.whl"
    files = {"bitsandbytes/__init__.py": b"x = 1\n", "bitsandbytes/libbitsandbytes_cuda130.so": b"\0" * 1000,
             "bitsandbytes/libbitsandbytes_cuda118.so": b"\1" * 5000, "bitsandbytes/libbitsandbytes_cpu.so": b"c"}
    record = "".join(f"{n},{prep._record_hash(d)},{len(d)}\n" for n, d in files.items())
    record += "bitsandbytes-0.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("bitsandbytes-0.0.dist-info/RECORD", record)
    before, after = prep.slim_bitsandbytes(str(whl))
    assert after < before
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        rec = z.read("bitsandbytes-0.0.dist-info/RECORD").decode()
        assert "bitsandbytes/libbitsandbytes_cuda118.so" not in names and "cuda118" not in rec
        for line in rec.splitlines():
            name, digest, size = line.split(",")
            assert name in names
            if digest:
                assert digest == prep._record_hash(z.read(name)) and int(size) == len(z.read(name))
