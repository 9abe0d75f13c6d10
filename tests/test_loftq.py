"""LoftQ: the alternation against PEFT's loftq_utils (same bytes, same start), error bounds, the scaling convention,
and the streamed model-level hook (base bytes replaced, A/B set, DoRA magnitude re-initialised)."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from qlora70.config import LlamaConfig, LoRAConfig
from qlora70.layers import Linear4bit
from qlora70.loftq import apply_loftq, loftq, loftq_init
from qlora70.lora import inject_lora, lora_modules
from qlora70.model import Llama, decoder_linears, quantize_model_
from qlora70.nf4 import NF4Weight, quantize_nf4


def _weight(shape, seed=0, heavy=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if heavy:  # low-rank structure + outliers, as in trained weights: what LoftQ's SVD can capture
        w += torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g) * 0.01
        w.view(-1)[torch.randint(0, w.numel(), (w.numel() // 200,), generator=g)] *= 8
    return w


def _peft_loftq_init_cpu(monkeypatch):
    """PEFT's `loftq_init` run on CPU: its source with the compute device "cuda" -> "cpu", and bitsandbytes'
    `dequantize_4bit` decoding bnb's own bytes with the reference NF4 table (bnb 0.50's CPU dequantize_4bit
    mis-reads absmax blocks past element 128 here; its packed bytes and absmax equal ours, see test_nf4)."""
    lu = pytest.importorskip("peft.utils.loftq_utils")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    src = inspect.getsource(lu.loftq_init)
    if src.count('else "cuda"') != 1:
        pytest.skip("PEFT's loftq_init changed shape; the CPU patch does not apply")

    def dequantize_4bit(packed, qs, *a, **k):
        q = NF4Weight(packed=packed.reshape(-1, 1), absmax=qs.absmax.float(), shape=torch.Size(qs.shape),
                      dtype=qs.dtype, blocksize=qs.blocksize)
        return q.dequantize(torch.float32)

    monkeypatch.setattr(bnbf, "dequantize_4bit", dequantize_4bit)
    ns = dict(vars(lu))
    exec(compile(src.replace('else "cuda"', 'else "cpu"'), lu.__file__, "exec"), ns)
    return ns["loftq_init"]


@pytest.mark.parametrize("shape", [(96, 80), (64, 192)])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_matches_peft_loftq(monkeypatch, shape, iters):
    peft_init = _peft_loftq_init_cpu(monkeypatch)
    w = _weight(shape)
    r = 4
    want_dq, want_a, want_b = peft_init(w, num_bits=4, reduced_rank=r, num_iter=iters)
    got = loftq(w, r, scale=1.0, iters=iters, blocksize=64, double_quant=False)  # PEFT: no double quant, s ignored
    torch.testing.assert_close(got.q.dequantize(torch.float32), want_dq, rtol=0, atol=0)
    torch.testing.assert_close(got.lora_B @ got.lora_A, want_b @ want_a, rtol=1e-4, atol=1e-6)
    err = torch.linalg.norm(w - want_dq - want_b @ want_a).item() / torch.linalg.norm(w).item()
    assert got.errors[-1] == pytest.approx(err, rel=1e-4)


def test_error_decreases_and_beats_plain_nf4():
    w = _weight((128, 96), seed=2)
    res = loftq(w, r=8, scale=0.25, iters=5)
    plain = torch.linalg.norm(w - quantize_nf4(w).dequantize(torch.float32)) / torch.linalg.norm(w)
    assert res.nf4_error == pytest.approx(plain.item(), rel=1e-5)
    assert res.errors[0] < res.nf4_error
    assert all(b <= a * (1 + 1e-6) for a, b in zip(res.errors, res.errors[1:])), res.errors
    assert res.errors[-1] < 0.8 * res.nf4_error, (res.nf4_error, res.errors)
    # the reported error is the real one, with our scale convention: s B A = L R whatever alpha is
    recon = res.q.dequantize(torch.float32) + 0.25 * res.lora_B @ res.lora_A
    torch.testing.assert_close(torch.linalg.norm(w - recon) / torch.linalg.norm(w),
                               torch.tensor(res.errors[-1]), rtol=1e-4, atol=0)
    # pinned golden values (checked against PEFT's alternation in test_matches_peft_loftq; regenerate only if
    # _weight or the NF4 quantizer changes)
    assert res.nf4_error == pytest.approx(0.115972, abs=1e-5)
    assert res.errors[0] == pytest.approx(0.090023, abs=1e-5) and res.errors[-1] == pytest.approx(0.078040, abs=1e-5)


def test_loftq_init_signature_and_bad_input():
    w = _weight((40, 24), heavy=False)
    q, a, b = loftq_init(w, r=4, alpha=16, iters=2)
    assert isinstance(q, NF4Weight) and q.double_quant and a.shape == (4, 24) and b.shape == (40, 4)
    assert a.dtype == b.dtype == torch.float32
    res = loftq(w, 4, 4.0, 2)
    torch.testing.assert_close(4.0 * b @ a, 4.0 * res.lora_B @ res.lora_A)
    for kw, match in ((dict(r=0), "rank"), (dict(r=25), "rank"), (dict(iters=0), "iters")):
        args = dict(r=4, alpha=8, iters=1) | kw
        with pytest.raises(ValueError, match=match):
            loftq_init(w, **args)
    with pytest.raises(ValueError, match="2-D"):
        loftq_init(torch.randn(3, 4, 5), r=2, alpha=2)
    with pytest.raises(ValueError, match="loftq_iters"):
        LoRAConfig(init_lora_weights="loftq", loftq_iters=0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRAConfig(init_lora_weights="pissa")


# ---- model level -----------------------------------------------------------------------------------------------------

def _tiny_full_precision(seed=0) -> Llama:
    torch.manual_seed(seed)
    m = Llama(LlamaConfig.from_name("tiny"))
    with torch.no_grad():
        for _, _, _, lin in decoder_linears(m):
            lin.weight.add_(_weight(tuple(lin.weight.shape), seed=seed + lin.weight.shape[0]) * 5)
    return m.eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_apply_loftq_streams_and_starts_closer(use_dora):
    full = _tiny_full_precision()
    dense = {f"{n}.weight": mod.weight.detach().clone() for n, _, _, mod in decoder_linears(full)}
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(4))
    ref = full(ids)
    model = quantize_model_(_tiny_full_precision())
    zero_start = model(ids)
    cfg = LoRAConfig(r=8, alpha=16, dropout=0.0, use_dora=use_dora, init_lora_weights="loftq", loftq_iters=3)
    inject_lora(model, cfg)
    asked = []
    report = apply_loftq(model, lambda name: asked.append(name) or dense[name].clone())
    names = [n for n, _ in lora_modules(model)]
    assert asked == [f"{n}.weight" for n in names] and names == [r["name"] for r in report] and len(names) == 14
    for n, m in lora_modules(model):
        assert isinstance(m.base_layer, Linear4bit) and m.base_layer.quant.double_quant
        w = dense[f"{n}.weight"]
        recon = m.base_weight() + m.delta_weight()
        rel = (torch.linalg.norm(w - recon) / torch.linalg.norm(w)).item()
        rec = next(r for r in report if r["name"] == n)
        assert rel == pytest.approx(rec["loftq_error"], rel=1e-3) and rel < rec["nf4_error"]
        if use_dora:  # magnitude re-initialised from the LoftQ base: the layer computes W_q + s B A exactly
            torch.testing.assert_close(m.lora_magnitude_vector, torch.linalg.norm(recon, dim=1))
    loftq_out = model(ids)
    assert (loftq_out - ref).abs().mean() < (zero_start - ref).abs().mean()
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.requires_grad


def test_apply_loftq_errors():
    m = Llama(LlamaConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="no LoRA layers"):
        apply_loftq(m, lambda n: None)
    inject_lora(m, LoRAConfig(r=2, alpha=2, targets=("q_proj",)))
    with pytest.raises(TypeError, match="dense Linear base"):
        apply_loftq(m, lambda n: torch.zeros(64, 64))
    q = quantize_model_(Llama(LlamaConfig.from_name("tiny")))
    inject_lora(q, LoRAConfig(r=2, alpha=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="has shape \\(3, 3\\).*wrong checkpoint"):
        apply_loftq(q, lambda n: torch.zeros(3, 3))


def test_loftq_base_roundtrips_through_state_dict():
    """The replaced NF4 bytes are the module's real state: a bnb-layout state dict of them loads back exactly."""
    lin = Linear4bit.from_linear(nn.Linear(48, 40, bias=False))
    from qlora70.lora import LoRALinear
    m = LoRALinear(lin, r=4, alpha=8)
    w = _weight((40, 48))
    apply_loftq(nn.ModuleDict({"p": m}), lambda n: w)
    sd = m.base_layer.state_dict()
    other = Linear4bit.from_linear(nn.Linear(48, 40, bias=False))
    other.load_state_dict(sd)
    assert torch.equal(other.dequantize(torch.float32), m.base_weight())
    assert torch.equal(m.base_weight(), loftq(w, 4, 2.0, 1).q.dequantize(torch.float32))


def test_streamed_from_hf_checkpoint_and_base_saved(tmp_path):
    """The loader hook: `checkpoint.weight_reader` streams the fp32 weights of an HF checkpoint into `apply_loftq`
    (via run._loftq_start, the `--lora-init loftq` path), and the LoftQ base written to base_loftq loads back with
    the same NF4 bytes, so the trained adapter can be evaluated on it."""
    from qlora70.checkpoint import load_model, save_hf, weight_reader
    from qlora70.run import _loftq_start

    full = _tiny_full_precision(seed=1)
    save_hf(full, tmp_path / "hf", dtype=torch.float32, progress=False)
    read = weight_reader(tmp_path / "hf")
    torch.testing.assert_close(read("model.layers.1.mlp.up_proj.weight"), full.model.layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        read("nope")
    model = load_model(tmp_path / "hf", quantize="nf4", progress=False)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "down_proj"), init_lora_weights="loftq",
                     loftq_iters=2)
    _loftq_start(model, cfg, str(tmp_path / "hf"), tmp_path, seed=0, main=True, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    w = full.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(q.base_weight(), loftq(w, 4, 2.0, 2).q.dequantize(torch.float32))
    back = load_model(tmp_path / "base_loftq", progress=False)
    assert torch.equal(back.model.layers[0].self_attn.q_proj.weight, q.base_layer.weight)
    assert torch.equal(back.model.layers[1].mlp.down_proj.dequantize(torch.float32),
                       model.model.layers[1].mlp.down_proj.base_weight())
    assert torch.equal(back.model.layers[0].self_attn.k_proj.weight, model.model.layers[0].self_attn.k_proj.weight)
    with pytest.raises(ValueError, match="no full-precision weights"):
        weight_reader(tmp_path / "base_loftq")


def test_trainer_refuses_a_loftq_config_without_apply_loftq(tmp_path):
    """A LoftQ config whose start was never computed must not train silently from the default init."""
    from conftest import tiny_llama

    from qlora70.config import LoRAConfig, TrainConfig
    from qlora70.lora import inject_lora
    from qlora70.trainer import Trainer

    model = tiny_llama(0, quantize=True, eval=False)
    inject_lora(model, LoRAConfig(r=4, alpha=8, init_lora_weights="loftq"))
    data = [[1, 2, 3, 4, 5, 6]] * 4
    with pytest.raises(ValueError, match="apply_loftq was never run"):
        Trainer(model, TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=2, micro_batch_size=2), data)
