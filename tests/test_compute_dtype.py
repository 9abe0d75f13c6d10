"""compute_dtype="auto" on the CPU: bf16 only with bf16 matmul instructions and a measured speed-up, the verdict
cached per CPU / torch version, the environment override, and the Trainer using the choice."""
from __future__ import annotations

import json

import pytest
import torch

from qlora70 import native, ops


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache dir, no process-level memo, no override from the environment (conftest pins fp32)."""
    monkeypatch.setenv("QLORA70_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QLORA70_CPU_COMPUTE_DTYPE", raising=False)
    native._cached_compute_dtype.cache_clear()
    yield tmp_path
    native._cached_compute_dtype.cache_clear()


def _fake_probe(monkeypatch, fp32_s: float, bf16_s: float) -> list[int]:
    calls = []

    def probe():
        calls.append(1)
        return {"fp32_s": fp32_s, "bf16_s": bf16_s, "flop": 1e9, "fp32_gflops": 1 / fp32_s, "bf16_gflops": 1 / bf16_s}

    monkeypatch.setattr(native, "_probe_matmul", probe)
    return calls


def test_no_bf16_instructions_means_fp32_without_probing(fresh, monkeypatch):
    monkeypatch.setattr(native, "cpu_bf16_flags", lambda: [])
    calls = _fake_probe(monkeypatch, 1.0, 0.01)  # would say bf16 if it were asked
    dtype, why = native.cpu_compute_dtype()
    assert dtype == torch.float32 and "no bf16" in why and calls == []


@pytest.mark.parametrize("fp32_s, bf16_s, want", [(1.0, 0.25, torch.bfloat16), (1.0, 0.8, torch.float32),
                                                  (1.0, 1.3, torch.float32)])
def test_probe_decides_and_is_cached(fresh, monkeypatch, fp32_s, bf16_s, want):
    monkeypatch.setattr(native, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    calls = _fake_probe(monkeypatch, fp32_s, bf16_s)
    dtype, why = native.cpu_compute_dtype()
    assert dtype == want and "avx512_bf16" in why and calls == [1]
    files = list(fresh.glob("compute_dtype_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["dtype"] == ("bf16" if want == torch.bfloat16
                                                                             else "fp32")
    native._cached_compute_dtype.cache_clear()  # a new process: reads the file, probes nothing
    assert native.cpu_compute_dtype()[0] == want and "cached" in native.cpu_compute_dtype()[1] and calls == [1]


def test_corrupt_cache_is_measured_again(fresh, monkeypatch):
    monkeypatch.setattr(native, "cpu_bf16_flags", lambda: ["amx_bf16"])
    calls = _fake_probe(monkeypatch, 1.0, 0.1)
    native.cpu_compute_dtype()
    path = next(fresh.glob("compute_dtype_*.json"))
    path.write_text("{not json")
    native._cached_compute_dtype.cache_clear()
    assert native.cpu_compute_dtype()[0] == torch.bfloat16 and calls == [1, 1]


@pytest.mark.parametrize("env, want", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("BF16", torch.bfloat16)])
def test_env_override(fresh, monkeypatch, env, want):
    calls = _fake_probe(monkeypatch, 1.0, 1.0)
    monkeypatch.setenv("QLORA70_CPU_COMPUTE_DTYPE", env)
    dtype, why = native.cpu_compute_dtype()
    assert dtype == want and "QLORA70_CPU_COMPUTE_DTYPE" in why and calls == []


def test_bad_env_value_is_an_error(fresh, monkeypatch):
    monkeypatch.setenv("QLORA70_CPU_COMPUTE_DTYPE", "fp16")
    with pytest.raises(ValueError, match="QLORA70_CPU_COMPUTE_DTYPE"):
        native.cpu_compute_dtype()


def test_real_probe_is_sane(fresh):
    r = native._probe_matmul()
    assert r["fp32_s"] > 0 and r["bf16_s"] > 0 and r["flop"] == sum(2 * m * k * n for m, k, n in native._PROBE_SHAPES)
    flags = native.cpu_bf16_flags()
    assert all(f in ("amx_bf16", "avx512_bf16", "bf16") for f in flags)


def test_resolve_compute_dtype(fresh, monkeypatch):
    monkeypatch.setattr(native, "cpu_bf16_flags", lambda: [])
    assert ops.resolve_compute_dtype("cpu", "auto")[0] == torch.float32
    assert ops.resolve_compute_dtype("cpu", "bf16")[0] == torch.bfloat16
    assert ops.resolve_compute_dtype("cpu", "fp32")[0] == torch.float32
    assert ops.resolve_compute_dtype("cuda", "auto") == (torch.bfloat16, "auto on CUDA: bf16")
    assert ops.resolve_compute_dtype("cuda", "fp32")[0] == torch.float32
    assert ops.resolve_compute_dtype("meta", "auto")[0] == torch.float32
    with pytest.raises(ValueError, match="compute_dtype"):
        ops.resolve_compute_dtype("cpu", "half")


@pytest.mark.parametrize("env, want", [("bf16", torch.bfloat16), ("fp32", None)])
def test_trainer_uses_the_choice(fresh, monkeypatch, tmp_path, env, want):
    from qlora70.config import LlamaConfig, LoRAConfig, TrainConfig
    from qlora70.model import Llama, quantize_model_
    from qlora70.trainer import Trainer

    monkeypatch.setenv("QLORA70_CPU_COMPUTE_DTYPE", env)
    torch.manual_seed(0)
    model = quantize_model_(Llama(LlamaConfig.from_name("tiny")))
    data = [{"input_ids": torch.randint(3, 100, (2, 8)), "labels": torch.randint(3, 100, (2, 8))}]

    class Loader(list):
        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    t = Trainer(model, TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2, out_dir=str(tmp_path / "run"),
                                   progress=False), Loader(data), lora_config=LoRAConfig(r=2, alpha=4))
    assert t.autocast_dtype == want and env in t.compute_dtype_reason
    # the LoRA masters stay fp32 whatever the compute dtype
    assert all(p.dtype == torch.float32 for _, p in t.params)
