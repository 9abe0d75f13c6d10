"""FSDP2 QLoRA on 2 CPU processes (gloo, 127.0.0.1): the loss curve and the final adapter equal a single-process run
with the same global batch; checkpoint/resume under 2 processes (and on 1); the NF4 base crosses the wire as 4-bit
uint8 data."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import tiny_llama
from qlora70.config import LlamaConfig, LoRAConfig, TrainConfig
from qlora70.data import TokenizedData
from qlora70.model import Llama
from qlora70.trainer import Trainer

LORA = LoRAConfig(r=8, alpha=16, dropout=0.0)
WORLD = 2
MICRO = 2  # per rank; the single-process reference uses MICRO * WORLD


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model() -> Llama:
    return tiny_llama(0, quantize=True, eval=False)


def build_data(n: int = 40, seed: int = 0, V: int = 512) -> TokenizedData:
    rng = np.random.default_rng(seed)
    lens = rng.integers(6, 20, n)
    toks = rng.integers(3, V, int(lens.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return TokenizedData(toks, offsets, (lens // 2).astype(np.int32), [f"rand:{i}" for i in range(n)])


def config(out_dir: str, micro: int, **kw) -> TrainConfig:
    base = dict(lr=1e-3, batch_size=8, micro_batch_size=micro, max_steps=6, save_every=0, warmup_ratio=0.2,
                lr_schedule="cosine", max_grad_norm=0.3, out_dir=out_dir, progress=False, seed=3, val_size=5,
                eval_every=3, gradient_checkpointing=False)
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank: int, port: int, out_dir: str, interrupt_at: int | None, record: str | None, overrides: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from qlora70.distributed import DistributedTrainer, build_sharded, init_distributed

    info = init_distributed(backend="gloo")
    try:
        staggered = overrides.pop("staggered", False)
        model = build_sharded(build_model, LORA, seed=3) if staggered else build_model()
        gathers: list[tuple[torch.dtype, int]] = []
        if record:  # log every FSDP all-gather (dtype, bytes) during the first forward
            orig = {n: getattr(dist, n) for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)}

            def wrap(fn):
                def rec(output, input, *a, **k):
                    gathers.append((str(output.dtype), output.numel() * output.element_size()))
                    return fn(output, input, *a, **k)
                return rec
            for n, fn in orig.items():
                setattr(dist, n, wrap(fn))
        cbs = []
        if interrupt_at:
            def stop(tr, rec):
                if rec["step"] == interrupt_at:
                    raise KeyboardInterrupt
            cbs.append(stop)
        t = DistributedTrainer(model, config(out_dir, MICRO, **overrides), build_data(), lora_config=LORA,
                               callbacks=cbs)
        if record:
            t.model.train()
            with torch.no_grad():
                t.model(torch.randint(3, 512, (1, 8)), return_hidden=True)
            for n, fn in orig.items():
                setattr(dist, n, fn)
        try:
            out = t.train()
        except KeyboardInterrupt:
            out = {"interrupted": True, "step": t.step}
        if info.is_main:
            res = {"out": out, "history": t.history, "gathers": gathers,
                   "local_shapes": {n: list(p.to_local().shape) for n, p in t.model.named_parameters()
                                    if n.endswith("q_proj.base_layer.weight")},
                   "layer0": _layer_sizes(t.model.model.layers[0])}
            with open(os.path.join(out_dir, f"result-{interrupt_at}.json"), "w") as fh:
                json.dump(res, fh, default=str)
    finally:
        dist.destroy_process_group()


def _layer_sizes(layer: torch.nn.Module) -> dict:
    """Global (unsharded) sizes of one decoder layer's parameters."""
    packed = [p for n, p in layer.named_parameters() if n.endswith("base_layer.weight")]
    return {"param_bytes": sum(p.numel() * p.element_size() for p in layer.parameters()),
            "n_params": len(list(layer.parameters())), "packed_dtypes": [str(p.dtype) for p in packed],
            "packed_bytes": sum(p.numel() for p in packed),
            "base_params": sum(m.in_features * m.out_features for n, m in layer.named_modules()
                               if n.endswith("base_layer"))}


def run2(out_dir: str, interrupt_at: int | None = None, record: bool = False, **overrides) -> dict:
    mp.spawn(_worker, args=(_free_port(), out_dir, interrupt_at, "1" if record else None, overrides), nprocs=WORLD,
             join=True)
    with open(os.path.join(out_dir, f"result-{interrupt_at}.json")) as fh:
        return json.load(fh)


def losses(history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in history if key in r]




@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The single-process reference: micro-batch MICRO * WORLD, same global batch of 8."""
    out = str(tmp_path_factory.mktemp("single"))
    t = Trainer(build_model(), config(out, MICRO * WORLD), build_data(), lora_config=LORA)
    t.train()
    return {"history": t.history, "adapter": load_file(os.path.join(out, "adapter_model.safetensors"))}


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_two_processes_equal_one(tmp_path, single):
    res = run2(str(tmp_path), record=True)
    got, want = losses(res["history"]), losses(single["history"])
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-5, rtol=0)
    np.testing.assert_allclose([v for _, v in losses(res["history"], "val_loss")],
                               [v for _, v in losses(single["history"], "val_loss")], atol=1e-5, rtol=0)
    np.testing.assert_allclose([r["grad_norm"] for r in res["history"] if "loss" in r],
                               [r["grad_norm"] for r in single["history"] if "loss" in r], rtol=1e-4)
    assert [r["trained_tokens"] for r in res["history"] if "loss" in r] == \
        [r["trained_tokens"] for r in single["history"] if "loss" in r]
    _assert_same_adapter(load_file(os.path.join(tmp_path, "adapter_model.safetensors")), single["adapter"])
    # the packed 4-bit weight is sharded: q_proj (64 x 64 -> 2048 packed bytes) holds 1024 rows per rank
    assert all(s == [1024, 1] for s in res["local_shapes"].values()), res["local_shapes"]
    # each decoder layer is ONE all-gather of uint8 bytes holding exactly its parameters at their stored size: the NF4
    # base as packed 4-bit bytes (+ absmax codes / code maps), never a dequantized float copy
    layer_gathers = [g for g in res["gathers"] if g[0] == "torch.uint8"]
    assert len(layer_gathers) == LlamaConfig.from_name("tiny").num_hidden_layers, res["gathers"]
    sizes = res["layer0"]
    assert sizes["packed_dtypes"] == ["torch.uint8"] * 7
    for _, nb in layer_gathers:
        assert sizes["param_bytes"] <= nb <= sizes["param_bytes"] + 64 * sizes["n_params"], (nb, sizes)
    assert sizes["packed_bytes"] * 2 == sizes["base_params"]  # 0.5 byte per base weight crosses the wire
    assert nb < sizes["base_params"] * 4  # a dequantized fp32 base alone would be larger than the whole gather


def test_checkpoint_resume_two_processes(tmp_path, single):
    # with gradient checkpointing (the default): FSDP re-gathers each layer for the recomputation
    # and the model built rank by rank (build_sharded: one full copy in host memory at a time)
    first = run2(str(tmp_path), interrupt_at=3, gradient_checkpointing=True, staggered=True)
    assert first["out"] == {"interrupted": True, "step": 3}
    ck = json.load(open(os.path.join(tmp_path, "checkpoints", "latest.json")))
    assert ck["step"] == 3
    ckdir = os.path.join(tmp_path, "checkpoints", ck["dir"])
    opt = load_file(os.path.join(ckdir, "optimizer.safetensors"))  # full (gathered) states, single-process layout
    assert opt and all(v.dtype == torch.float32 for v in opt.values())
    one = tmp_path / "one_process"
    shutil.copytree(tmp_path, one, ignore=shutil.ignore_patterns("result-*"))
    res = run2(str(tmp_path), gradient_checkpointing=True, staggered=True)  # resume="auto" from step 3
    assert res["out"]["step"] == 6
    np.testing.assert_allclose([v for _, v in losses(res["history"])], [v for _, v in losses(single["history"])],
                               atol=1e-5, rtol=0)
    _assert_same_adapter(load_file(os.path.join(tmp_path, "adapter_model.safetensors")), single["adapter"])
    # the checkpoint layout is world-size independent: 2 ranks x micro 2 resume as 1 process x micro 4
    t = Trainer(build_model(), config(str(one), MICRO * WORLD), build_data(), lora_config=LORA)
    assert t.train()["step"] == 6
    np.testing.assert_allclose([v for _, v in losses(t.history)], [v for _, v in losses(single["history"])],
                               atol=1e-5, rtol=0)
    _assert_same_adapter(load_file(os.path.join(one, "adapter_model.safetensors")), single["adapter"])


PROBE = """
import json, os, sys
import torch, torch.distributed as dist
from qlora70.distributed import init_distributed
info = init_distributed()
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
if info.is_main:
    json.dump({"world": info.world_size, "sum": float(t), "addr": os.environ["MASTER_ADDR"], "argv": sys.argv[1:]},
              open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_launch_reexecs_under_torchrun(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    out = tmp_path / "probe.json"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    code = ("import sys; from qlora70.distributed import launch, strip_nproc; n, rest = strip_nproc(sys.argv[1:]); "
            "raise SystemExit(launch(n, rest, module='probe_mod'))")
    r = subprocess.run([sys.executable, "-c", code, "--nproc", "2", str(out)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text()) == {"world": 2, "sum": 3.0, "addr": "127.0.0.1", "argv": [str(out)]}


def test_strip_nproc_and_errors():
    from qlora70.distributed import DistributedTrainer, ShardedOptimizer, launch, shard_model, strip_nproc

    assert strip_nproc(["train", "--nproc", "4", "--lr", "1"]) == (4, ["train", "--lr", "1"])
    assert strip_nproc(["train", "--nproc=2"]) == (2, ["train"])
    assert strip_nproc(["train"]) == (None, ["train"])
    with pytest.raises(ValueError, match="--nproc must be an integer"):
        strip_nproc(["--nproc", "two"])
    with pytest.raises(ValueError, match="--nproc must be an int >= 1"):
        launch(0, [])
    with pytest.raises(ValueError, match="init_distributed"):
        shard_model(build_model())
    with pytest.raises(ValueError, match="no LoRA layers"):
        DistributedTrainer(build_model(), config("unused", 2), build_data())
    with pytest.raises(ValueError, match="optim_bits=8"):
        ShardedOptimizer([torch.nn.Parameter(torch.zeros(3))], optim_bits=8)
