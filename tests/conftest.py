"""Shared test settings (no fixtures that hide what a test checks).

The whole session runs with one torch thread (the models are tiny; one thread is as fast and immune to
oversubscription when the 2 cores are shared; module-scoped reference runs and the runs compared with them must use the
same thread count to agree bit for bit) and, unless the environment says otherwise, the torch reference NF4 backend
(`make test` exports TRITON_INTERPRET=1, under which `auto` would route CPU tensors to the Triton interpreter;
tests/test_kernels.py asks for Triton explicitly).
"""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_reference_backend():
    n = torch.get_num_threads()
    had = "QLORA70_BACKEND" in os.environ
    os.environ.setdefault("QLORA70_BACKEND", "torch")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if not had:
        os.environ.pop("QLORA70_BACKEND", None)
