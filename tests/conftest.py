"""Shared test settings (no fixtures that hide what a test checks).

The whole session runs with one torch thread (the models are tiny; one thread is as fast and immune to
oversubscription when the 2 cores are shared; module-scoped reference runs and the runs compared with them must use the
same thread count to agree bit for bit) and, unless the environment says otherwise, the torch reference NF4 backend
(`make test` exports TRITON_INTERPRET=1, under which `auto` would route CPU tensors to the Triton interpreter;
tests/test_kernels.py asks for Triton explicitly), and fp32 as the CPU's `compute_dtype="auto"` choice, so that results
do not depend on whether this CPU has bf16 matmuls (tests/test_compute_dtype.py tests the choice itself).
"""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_reference_backend():
    n = torch.get_num_threads()
    had = "QLORA70_BACKEND" in os.environ
    os.environ.setdefault("QLORA70_BACKEND", "torch")
    had_dt = "QLORA70_CPU_COMPUTE_DTYPE" in os.environ
    os.environ.setdefault("QLORA70_CPU_COMPUTE_DTYPE", "fp32")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if not had:
        os.environ.pop("QLORA70_BACKEND", None)
    if not had_dt:
        os.environ.pop("QLORA70_CPU_COMPUTE_DTYPE", None)
