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


# ---- the one tiny-model builder (import it: `from conftest import tiny_llama`) ------------------------------------
def tiny_config(name: str = "tiny", **overrides):
    """`LlamaConfig.from_name("tiny")` (2 layers, hidden 64, 4 heads / 2 KV heads, vocab 512) with overrides."""
    from qlora70.config import LlamaConfig

    cfg = LlamaConfig.from_name("tiny", **overrides)
    cfg.name = name
    return cfg


def normal_init(std: float, norm_std: float | None = None):
    """An `init` for `tiny_llama`: every weight ~ N(0, std); with `norm_std`, the norm weights ~ N(1, norm_std)."""
    def init(name: str, p: torch.Tensor) -> None:
        if norm_std is not None and "norm" in name:
            p.normal_(1.0, norm_std)
        else:
            p.normal_(0.0, std)
    return init


def uniform_norms(name: str, p: torch.Tensor) -> None:
    """An `init` for `tiny_llama`: default nn init, norm weights ~ U(0.5, 1.5) so that they matter."""
    if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)


def tiny_llama(seed: int = 0, *, quantize: bool = False, init=None, eval: bool = True, config=None, **overrides):
    """A seeded random tiny `qlora70.model.Llama` (`tiny_config(**overrides)`, or `config`): `init(name, param)`
    re-initializes each parameter in order (None: torch's defaults), `quantize` turns the decoder linears into NF4
    `Linear4bit` (`quantize_model_`), `eval` puts it in eval mode."""
    from qlora70.model import Llama, quantize_model_

    torch.manual_seed(seed)
    m = Llama(config if config is not None else tiny_config(**overrides))
    if init is not None:
        with torch.no_grad():
            for n, p in m.named_parameters():
                init(n, p)
    if quantize:
        quantize_model_(m)
    return m.eval() if eval else m
