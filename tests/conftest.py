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


# ---- golden values: oracle results computed once, pinned in the test files ---------------------------------------
# The parity tests skip when an oracle (bitsandbytes, peft, transformers, tokenizers, regex) is missing; each has a
# `*_golden` companion that checks our output against the oracle's result pinned as a small constant, so the test
# still checks something without the `[test]` extras. The inputs are seeded CPU torch generators (stream stable across
# torch 2.x on CPU; goldens computed with torch 2.13.0+cpu): `check_inputs` fails, not skips, when they changed.
def sha256_tensor(t: torch.Tensor) -> str:
    """sha256 of the raw bytes of `t` (any dtype), so one hex string pins a whole packed / absmax tensor exactly."""
    import hashlib

    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def sha256_json(obj) -> str:
    """sha256 of the canonical JSON of `obj` (token-id lists, key lists, split results)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tensor_fingerprint(t: torch.Tensor) -> list[float]:
    """[float64 sum, float64 sum of |x|]: a tolerant checksum of an input tensor (robust to last-ulp libm changes)."""
    d = t.detach().double()
    return [round(d.sum().item(), 9), round(d.abs().sum().item(), 9)]


def state_fingerprint(sd: dict) -> list[float]:
    """`tensor_fingerprint` summed over the floating tensors of a state dict (the seeded model weights)."""
    s, a = 0.0, 0.0
    for v in sd.values():
        if v.is_floating_point():
            s, a = s + v.double().sum().item(), a + v.double().abs().sum().item()
    return [round(s, 9), round(a, 9)]


def check_inputs(got: list[float], want: list[float], what: str, rel: float = 1e-6) -> None:
    """Fail (never skip) when a golden test's seeded inputs are not the ones the golden values were computed from."""
    ok = all(abs(g - w) <= rel * max(1.0, abs(w)) for g, w in zip(got, want)) and len(got) == len(want)
    assert ok, (f"the seeded inputs of {what} changed ({got} != pinned {want}): torch's CPU RNG stream or the "
                "test's input construction changed, so the pinned golden values no longer apply; recompute them "
                "with the oracle (see the GOLDEN comment in the test file)")


PROBE_POINTS = 8


def logit_probe(t: torch.Tensor) -> dict:
    """A compact golden of a float tensor: `PROBE_POINTS` values at evenly spaced flat positions + the float64 sum."""
    flat = t.detach().double().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, PROBE_POINTS).round().long()
    return {"at": [round(flat[i].item(), 7) for i in idx], "sum": round(flat.sum().item(), 6)}


def check_probe(t: torch.Tensor, want: dict, atol: float = 1e-5, sum_atol: float | None = None) -> None:
    """Our tensor against an oracle's pinned `logit_probe` (values to `atol`, the sum to `sum_atol`)."""
    got = logit_probe(t)
    sum_atol = atol * t.numel() ** 0.5 * 4 if sum_atol is None else sum_atol
    err = max(abs(g - w) for g, w in zip(got["at"], want["at"]))
    assert err <= atol, f"values at the probe positions differ from the oracle's by {err:.3g} > {atol}: {got['at']}"
    assert abs(got["sum"] - want["sum"]) <= sum_atol, f"float64 sum {got['sum']} != oracle's {want['sum']}"


def hf_twin(model):
    """transformers' LlamaForCausalLM holding `model`'s weights (fp32, eval): the oracle twin of the LoRA/DoRA parity
    tests (skips without transformers)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.float().eval()
