"""Trainer: learning, token-normalized accumulation, exact resume (Ctrl-C, mid-window, kill -9), validation, early
stopping, NaN stop, bad resumes, schedule."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from qlora70.config import LoRAConfig, TrainConfig
from qlora70.data import TokenizedData
from qlora70.lora import lora_modules
from qlora70.model import Llama
from qlora70.trainer import Trainer, lr_factor

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))




def build_model(seed: int = 0, **overrides) -> Llama:
    return tiny_llama(seed, quantize=True, eval=False, **overrides)


def build_data(n: int = 24, seed: int = 0, V: int = 512, lo: int = 6, hi: int = 20) -> TokenizedData:
    """Random token sequences; the first half of each is 'prompt' (label -100)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi, n)
    toks = rng.integers(3, V, int(lens.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return TokenizedData(toks, offsets, (lens // 2).astype(np.int32), [f"rand:{i}" for i in range(n)])


LORA = LoRAConfig(r=4, alpha=8, dropout=0.1)


def config(tmp, **kw) -> TrainConfig:
    base = dict(lr=5e-3, batch_size=4, micro_batch_size=2, max_steps=8, save_every=3, warmup_ratio=0.1,
                lr_schedule="cosine", out_dir=str(tmp), progress=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def adapter_tensors(out_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out_dir, "adapter_model.safetensors"))


def train_losses(trainer) -> list[float]:
    return [r["loss"] for r in trainer.history if "loss" in r]


# ---- learning -------------------------------------------------------------------------------------------------------

def test_loss_falls_when_overfitting_one_batch(tmp_path):
    data = build_data(n=4)
    cfg = config(tmp_path, lr=1e-2, batch_size=4, micro_batch_size=4, max_steps=None, epochs=25, save_every=0,
                 warmup_ratio=0.0, lr_schedule="constant", max_grad_norm=1.0)
    t = Trainer(build_model(), cfg, data, lora_config=LoRAConfig(r=8, alpha=16, dropout=0.0))
    out = t.train()
    losses = train_losses(t)
    assert len(losses) == 25 and out["step"] == 25 and out["epoch"] == 25
    assert losses[-1] < 0.5 * losses[0], losses
    # only LoRA weights moved: base buffers untouched, LoRA B left zero init
    assert all(m.lora_B.weight.abs().sum() > 0 for _, m in lora_modules(t.model))
    assert os.path.isfile(tmp_path / "loss_curve.png") and os.path.isfile(tmp_path / "adapter_config.json")
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, 26))
    assert all(r["tokens_per_s"] > 0 and r["trained_tokens"] > 0 for r in recs)


def test_accumulation_normalizes_by_window_tokens(tmp_path):
    """The gradient of one step with 4 micro-batches of 1 equals that of one micro-batch of 4 (token-weighted)."""
    data = build_data(n=4, lo=4, hi=30)
    grads = {}
    for mb in (1, 4):
        cfg = config(tmp_path / f"mb{mb}", micro_batch_size=mb, max_steps=1, save_every=0)
        t = Trainer(build_model(), cfg, data, lora_config=LoRAConfig(r=4, alpha=8, dropout=0.0))
        step = t.optimizer.step

        def capture(*a, _t=t, _mb=mb, _step=step, **k):
            grads[_mb] = [p.grad.detach().clone() for _, p in _t.params]
            return _step(*a, **k)

        t.optimizer.step = capture
        t.cfg.max_grad_norm = None
        t.train()
    for a, b in zip(grads[1], grads[4]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ---- resume ---------------------------------------------------------------------------------------------------

class Interrupt:
    """A callback raising KeyboardInterrupt after step `at` (like Ctrl-C between steps)."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, trainer, rec):
        if rec.get("step") == self.at and "loss" in rec:
            raise KeyboardInterrupt


def uninterrupted(tmp_path, **kw):
    t = Trainer(build_model(), config(tmp_path / "full", **kw), build_data(), lora_config=LORA)
    t.train()
    return train_losses(t), adapter_tensors(tmp_path / "full")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """8 steps, 2 epochs of 6 micro-batches (3 steps each), validation every 2 steps, dropout 0.1."""
    tmp = tmp_path_factory.mktemp("ref")
    kw = dict(val_size=4, eval_every=2)
    t = Trainer(build_model(), config(tmp / "full", **kw), build_data(n=16), lora_config=LORA)
    t.train()
    return kw, t, train_losses(t), adapter_tensors(tmp / "full")


def assert_same_run(trainer, out_dir, ref_losses, ref_adapter):
    assert train_losses(trainer) == ref_losses
    got = adapter_tensors(out_dir)
    assert got.keys() == ref_adapter.keys()
    for k in got:
        assert torch.equal(got[k], ref_adapter[k]), k


def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path, reference_run):
    kw, ref_t, ref_losses, ref_adapter = reference_run
    assert ref_t.epoch == 2 and len(ref_losses) == 8  # the run crosses epoch ends
    out = tmp_path / "run"
    t = Trainer(build_model(), config(out, **kw), build_data(n=16), lora_config=LORA, callbacks=[Interrupt(4)])
    with pytest.raises(KeyboardInterrupt):
        t.train()
    latest = json.load(open(out / "checkpoints" / "latest.json"))
    assert latest["step"] == 4, "Ctrl-C must leave a resumable checkpoint of the last completed step"
    t2 = Trainer(build_model(), config(out, **kw), build_data(n=16), lora_config=LORA)
    t2.train()  # resume="auto"
    assert_same_run(t2, out, ref_losses, ref_adapter)
    assert [r["val_loss"] for r in t2.history if "val_loss" in r] == \
        [r["val_loss"] for r in ref_t.history if "val_loss" in r]


def test_resume_after_interrupt_mid_window(tmp_path, reference_run):
    """Ctrl-C inside the second micro-batch of step 5: the checkpoint holds step 4 and its data position/RNG."""
    kw, _, ref_losses, ref_adapter = reference_run
    out = tmp_path / "run"
    model = build_model()
    t = Trainer(model, config(out, **kw), build_data(n=16), lora_config=LORA)
    calls = {"n": 0}

    def hook(module, args, kwargs):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 2 * 4 + 2:  # 2 micro-batches per step: the 10th training forward is step 5's second
                raise KeyboardInterrupt

    model.register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert json.load(open(out / "checkpoints" / "latest.json"))["step"] == 4
    t2 = Trainer(build_model(), config(out, **kw), build_data(n=16), lora_config=LORA)
    t2.train()
    assert_same_run(t2, out, ref_losses, ref_adapter)


KILL_SCRIPT = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_trainer import LORA, build_data, build_model, config
from qlora70.trainer import Trainer

def kill(trainer, rec):
    if rec.get("step") == 5 and "loss" in rec:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no checkpoint of step 5

t = Trainer(build_model(), config({out!r}, **{kw!r}), build_data(n=16), lora_config=LORA, callbacks=[kill])
t.train()
"""


def test_resume_after_kill_9_equals_uninterrupted(tmp_path, reference_run):
    kw, _, ref_losses, ref_adapter = reference_run
    out = tmp_path / "run"
    script = tmp_path / "killme.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(tests=TESTS_DIR, out=str(out), kw=kw)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.load(open(out / "checkpoints" / "latest.json"))["step"] == 3
    steps_logged = [json.loads(x)["step"] for x in open(out / "metrics.jsonl")]
    assert max(steps_logged) == 5, "the killed run got past its last checkpoint"
    t2 = Trainer(build_model(), config(out, **kw), build_data(n=16), lora_config=LORA)
    t2.train()
    assert_same_run(t2, out, ref_losses, ref_adapter)
    steps_logged = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if "loss" in json.loads(x)]
    assert steps_logged == list(range(1, 9)), "metrics after the checkpoint were replaced, not duplicated"


def test_resume_refuses_other_model_or_lora(tmp_path):
    out = tmp_path / "run"
    Trainer(build_model(), config(out, max_steps=2, save_every=1), build_data(), lora_config=LORA).train()
    with pytest.raises(ValueError, match=r"lora\.r: checkpoint 4 vs now 8"):
        Trainer(build_model(), config(out, max_steps=4), build_data(),
                lora_config=LoRAConfig(r=8, alpha=8, dropout=0.1)).train()
    with pytest.raises(ValueError, match=r"model_config\.intermediate_size"):
        Trainer(build_model(intermediate_size=128), config(out, max_steps=4), build_data(),
                lora_config=LORA).train()
    with pytest.raises(ValueError, match=r"base\.checksum"):  # same shapes, other base weights
        Trainer(build_model(seed=1), config(out, max_steps=4), build_data(), lora_config=LORA).train()
    with pytest.raises(ValueError, match=r"train\.micro_batch_size"):
        Trainer(build_model(), config(out, max_steps=4, micro_batch_size=1), build_data(), lora_config=LORA).train()
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        Trainer(build_model(), config(out, max_steps=4), build_data(), lora_config=LORA).train(resume=False)


# ---- validation, early stopping, failures ----------------------------------------------------------------------------

def test_early_stopping_keeps_best_adapter(tmp_path):
    # memorizing random tokens with a large lr: validation loss (other random tokens) rises after a few steps
    cfg = config(tmp_path, lr=5e-2, max_steps=40, val_size=6, eval_every=1, early_stopping_patience=2,
                 warmup_ratio=0.0, lr_schedule="constant", max_grad_norm=None, save_every=0)
    t = Trainer(build_model(), cfg, build_data(n=14), lora_config=LoRAConfig(r=8, alpha=32, dropout=0.0))
    out = t.train()
    vals = [r["val_loss"] for r in t.history if "val_loss" in r]
    assert out["stopped_early"] and out["step"] < 40
    assert out["best_val"] == min(vals) and vals[-1] > out["best_val"]
    best = json.load(open(tmp_path / "best_adapter" / "best.json"))
    assert best["step"] == out["best_step"]
    final = adapter_tensors(tmp_path)
    want = load_file(tmp_path / "best_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], want[k]) for k in want), "the final adapter is the best one"
    assert t.evaluate() == pytest.approx(out["best_val"], rel=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(trainer, rec):
        if rec.get("step") == 3:
            with torch.no_grad():
                next(m for _, m in lora_modules(trainer.model)).lora_A.weight.fill_(float("nan"))

    t = Trainer(build_model(), config(tmp_path, save_every=2, max_steps=6), build_data(), lora_config=LORA,
                callbacks=[poison])
    with pytest.raises(FloatingPointError, match=r"loss is nan .* step 4.*step-000002"):
        t.train()
    assert json.load(open(tmp_path / "checkpoints" / "latest.json"))["step"] == 2
    sd = load_file(tmp_path / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_deterministic_with_seed(tmp_path):
    runs = []
    for i in range(2):
        t = Trainer(build_model(), config(tmp_path / str(i), max_steps=3, save_every=0), build_data(),
                    lora_config=LORA)
        t.train()
        runs.append(train_losses(t))
    assert runs[0] == runs[1]


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == 1.0 and all(a > b for a, b in zip(cos[2:], cos[3:]))
    assert cos[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=6, micro_batch_size=4), "multiple of"), (dict(lr=0), "lr"),
    (dict(lr_schedule="linear"), "lr_schedule"), (dict(warmup_ratio=1.0), "warmup_ratio"),
    (dict(val_fraction=0.1, val_size=3), "not both"), (dict(early_stopping_patience=2), "validation split"),
    (dict(optim_bits=4), "optim_bits"), (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(checkpoint_policy="some"), "checkpoint_policy"),
])
def test_bad_train_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_trainer_without_lora_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        Trainer(build_model(), config(tmp_path), build_data())


def test_keep_base_outputs_policy_gives_the_same_run(tmp_path):
    runs = []
    for policy in ("full", "keep_base_outputs"):
        t = Trainer(build_model(), config(tmp_path / policy, max_steps=3, save_every=0, checkpoint_policy=policy),
                    build_data(), lora_config=LORA)
        assert t.model.checkpoint_policy == policy and t.model.gradient_checkpointing
        t.train()
        runs.append((train_losses(t), adapter_tensors(tmp_path / policy)))
    assert runs[0][0] == runs[1][0]
    t = Trainer(build_model(), config(tmp_path / "auto", max_steps=1), build_data(), lora_config=LORA)
    assert t.model.checkpoint_policy == "keep_base_outputs", "auto keeps base outputs on CPU"
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_sigint_during_optimizer_step_finishes_the_step(tmp_path, reference_run):
    """A real SIGINT arriving inside optimizer.step is deferred: the step completes, a checkpoint of it is written,
    and the resumed run equals the uninterrupted one."""
    kw, _, ref_losses, ref_adapter = reference_run
    out = tmp_path / "run"
    t = Trainer(build_model(), config(out, **kw), build_data(n=16), lora_config=LORA)
    step = t.optimizer.step

    def step_with_sigint(*a, **k):
        if t.step == 4:  # the 5th optimizer step (t.step counts completed steps)
            os.kill(os.getpid(), signal.SIGINT)
        return step(*a, **k)

    t.optimizer.step = step_with_sigint
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert json.load(open(out / "checkpoints" / "latest.json"))["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the SIGINT handler was restored"
    t2 = Trainer(build_model(), config(out, **kw), build_data(n=16), lora_config=LORA)
    t2.train()
    assert_same_run(t2, out, ref_losses, ref_adapter)
