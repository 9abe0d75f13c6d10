"""LoRA: injection, freezing, forward math, merge, PEFT-format adapters (round trips with PEFT), 4-bit autograd."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import conftest
from qlora70 import ops
from qlora70.config import LoRAConfig
from qlora70.layers import Linear4bit
from qlora70.lora import (LoRALinear, get_lora_config, inject_lora, load_adapter, lora_modules, merge_lora,
                          save_adapter)
from qlora70.model import Llama
from qlora70.nf4 import quantize_nf4




def tiny_llama(seed: int = 0, quantize: bool = False, **overrides) -> Llama:
    """conftest's builder with norms that matter (nn.Embedding/Linear defaults are fine)."""
    return conftest.tiny_llama(seed, quantize=quantize, init=conftest.uniform_norms, eval=not quantize, **overrides)


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(3))


# GOLDEN values; regenerate: `python tests/make_golden.py lora` (oracles installed; see its docstring).
# GOLDEN: peft 0.21.2 on transformers 5.24.0 (CPU fp32, one thread, torch 2.13.0+cpu), computed once as in
# test_peft_loads_our_adapter: out = peft.PeftModel.from_pretrained(hf_twin(tiny_llama()), <our adapter>)(IDS).logits,
# pinned as conftest.logit_probe(out); "keys" = sha256_json(sorted keys of the adapter_model.safetensors PEFT itself
# writes for LoraConfig(r=4, lora_alpha=8, target_modules=<all 7>)); "inputs" = state_fingerprint(<our adapter's
# tensors>) + tensor_fingerprint(IDS).
PEFT_LORA_GOLDEN = {"inputs": [7.506138443, 439.063689681, 6451.0, 6451.0], "n_keys": 28,
                    "keys": "ee4bf6efccee386a2a34196490bfe3b39e581a500822abca7a774de4b87b5db1",
                    "logits": {"sum": -27.0074, "at": [-0.6044644, 0.3433299, 0.0840472, -0.1207253,
                                                       -0.2380117, -0.0922537, -0.9907597, -0.4063276]}}


# ---- LoRALinear -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("shape", [(37, 53), (64, 128)])
def test_lora_linear_math_and_zero_b(four_bit, shape):
    torch.manual_seed(0)
    n_in, n_out = shape
    base = nn.Linear(n_in, n_out, bias=True)
    if four_bit:
        base = Linear4bit.from_linear(base, blocksize=64)
    x = torch.randn(3, 5, n_in)
    ref = base(x)
    lin = LoRALinear(base, r=4, alpha=8, dropout=0.2)
    lin.eval()
    assert torch.equal(lin(x), ref), "B = 0 must leave the output unchanged"
    assert lin.lora_A.weight.dtype == torch.float32 and lin.lora_B.weight.dtype == torch.float32
    bound = 1 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert lin.lora_A.weight.abs().max() <= bound and lin.lora_A.weight.abs().max() > 0.5 * bound
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    want = ref + (x @ lin.lora_A.weight.t() @ lin.lora_B.weight.t()) * (8 / 4)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)


def test_rslora_scale_and_dropout_only_on_branch():
    base = nn.Linear(16, 8)
    lin = LoRALinear(base, r=4, alpha=8, dropout=0.5, use_rslora=True)
    assert lin.scale == pytest.approx(8 / 2)
    with torch.no_grad():
        lin.lora_B.weight.zero_()
    lin.train()
    x = torch.randn(4, 16)
    # training mode with B = 0: dropout is on the LoRA branch only, so the base path is untouched
    assert torch.equal(lin(x), base(x))


def test_inject_freezes_everything_but_lora_and_only_lora_trains():
    m = tiny_llama(quantize=True)
    inject_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * m.config.num_hidden_layers
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    m(IDS).float().pow(2).mean().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    opt.step()
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{n} changed"


def test_zero_b_model_output_unchanged():
    m = tiny_llama(quantize=True)
    m.eval()
    ref = m(IDS)
    inject_lora(m, LoRAConfig(r=8, alpha=16, dropout=0.1))
    m.eval()
    assert torch.equal(m(IDS), ref)


def test_targets_by_suffix():
    m = tiny_llama()
    inject_lora(m, LoRAConfig(r=2, alpha=2, targets=("q_proj", "v_proj")))
    names = [n for n, _ in lora_modules(m)]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert get_lora_config(m).targets == ("q_proj", "v_proj")


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r must be"), (dict(r=-2), "r must be"), (dict(r=2.5), "r must be"),
    (dict(alpha=0), "alpha must be"), (dict(alpha=-1.0), "alpha must be"),
    (dict(dropout=1.0), "dropout must be"), (dict(dropout=-0.1), "dropout must be"),
    (dict(targets=()), "targets is empty"),
])
def test_bad_lora_config(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kw)


def test_unknown_target_lists_linear_names():
    m = tiny_llama()
    with pytest.raises(ValueError, match=r"qkv_proj.*match no linear layer.*'q_proj'"):
        inject_lora(m, LoRAConfig(r=2, alpha=2, targets=("q_proj", "qkv_proj")))
    assert not any(True for _ in lora_modules(m)), "a failed injection must not change the model"
    assert all(p.requires_grad for p in m.parameters())


def test_double_injection_rejected():
    m = tiny_llama()
    inject_lora(m, LoRAConfig(r=2, alpha=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(m, LoRAConfig(r=2, alpha=2))


def test_lora_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear or Linear4bit"):
        LoRALinear(nn.Conv1d(3, 3, 1), r=2, alpha=2)


# ---- merge -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [False, True])
def test_merge_equals_unmerged_fp32(quantize):
    m = tiny_llama(quantize=quantize)
    inject_lora(m, LoRAConfig(r=8, alpha=16, dropout=0.1))
    randomize_b(m)
    m.eval()
    ref = m(IDS)
    merge_lora(m, dtype=torch.float32)
    assert not any(True for _ in lora_modules(m))
    lin = m.model.layers[0].self_attn.q_proj
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
    torch.testing.assert_close(m(IDS), ref, rtol=1e-4, atol=1e-4)


def test_merge_bf16_default_and_explicit_requantize():
    m = tiny_llama(quantize=True)
    inject_lora(m, LoRAConfig(r=4, alpha=8, targets=("q_proj", "down_proj")))
    randomize_b(m)
    lora_q = m.model.layers[0].self_attn.q_proj
    want = (lora_q.base_weight() + lora_q.delta_weight()).to(torch.bfloat16)
    m2 = merge_lora(m, dtype=torch.bfloat16)
    q = m2.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.bfloat16, "no silent re-quantization"
    assert torch.equal(q.weight, want)
    assert isinstance(m2.model.layers[0].self_attn.k_proj, Linear4bit), "untargeted 4-bit layers stay 4-bit"
    assert m2.model.norm.weight.dtype == torch.bfloat16
    m3 = tiny_llama(quantize=True)
    inject_lora(m3, LoRAConfig(r=4, alpha=8, targets=("q_proj",)))
    randomize_b(m3)
    dense = m3.model.layers[0].self_attn.q_proj
    want = dense.base_weight() + dense.delta_weight()
    merge_lora(m3, dtype=torch.float32, requantize=True)
    q = m3.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit)
    torch.testing.assert_close(q.dequantize(torch.float32), quantize_nf4(want).dequantize(torch.float32))


def test_merge_without_lora_errors():
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(tiny_llama())


# ---- adapter files -----------------------------------------------------------------------------------------------

def test_adapter_roundtrip_ours(tmp_path):
    m = tiny_llama(quantize=True)
    inject_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.05, targets=("q_proj", "v_proj", "down_proj")))
    randomize_b(m)
    m.eval()
    ref = m(IDS)
    save_adapter(m, tmp_path, base_model_name_or_path="tiny-base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["bias"] == "none"
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == "tiny-base"
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"] and cfg["use_rslora"] is False
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sd["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")], "temp files left behind"
    fresh = tiny_llama(quantize=True)  # no LoRA yet: load_adapter injects it from adapter_config.json
    load_adapter(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(fresh(IDS), ref)


def test_load_adapter_mismatches(tmp_path):
    m = tiny_llama()
    inject_lora(m, LoRAConfig(r=4, alpha=8, targets=("q_proj",)))
    save_adapter(m, tmp_path)
    other_r = tiny_llama()
    inject_lora(other_r, LoRAConfig(r=8, alpha=8, targets=("q_proj",)))
    with pytest.raises(ValueError, match="r: model 8 vs adapter 4"):
        load_adapter(other_r, tmp_path)
    with pytest.raises(ValueError, match="needs .*another model size"):
        load_adapter(tiny_llama(hidden_size=96, intermediate_size=128), tmp_path)
    with pytest.raises(ValueError, match="adapter keys do not match"):
        load_adapter(tiny_llama(num_hidden_layers=3), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "nope")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(tiny_llama(), tmp_path)


# ---- PEFT oracles ------------------------------------------------------------------------------------------------

def test_peft_loads_our_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    hf = conftest.hf_twin(base)
    plain = base(IDS)
    torch.testing.assert_close(hf(IDS).logits, plain, rtol=1e-4, atol=1e-4)
    ours = tiny_llama()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj")))
    randomize_b(ours)
    ours.eval()
    save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    out = pm(input_ids=IDS).logits
    torch.testing.assert_close(out, ours(IDS), rtol=1e-4, atol=1e-4)
    assert (out - plain).abs().max() > 1e-3, "the adapter must change the logits"


def test_peft_loads_our_adapter_golden(tmp_path):
    """Without peft: our saved adapter has exactly PEFT's key set, and our logits with it equal the pinned logits PEFT
    computed from the same file (companion of test_peft_loads_our_adapter)."""
    ours = tiny_llama()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj")))
    randomize_b(ours)
    ours.eval()
    save_adapter(ours, tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    want = PEFT_LORA_GOLDEN
    assert len(sd) == want["n_keys"] and conftest.sha256_json(sorted(sd)) == want["keys"], \
        f"adapter keys differ from PEFT's: {sorted(sd)[:4]}..."
    conftest.check_inputs(conftest.state_fingerprint(sd) + conftest.tensor_fingerprint(IDS), want["inputs"],
                          "test_peft_loads_our_adapter_golden")
    with torch.no_grad():
        conftest.check_probe(ours(IDS), want["logits"], atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_we_load_peft_adapter(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    hf = conftest.hf_twin(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                          task_type="CAUSAL_LM", init_lora_weights=False, use_rslora=rslora)  # random B too
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(str(tmp_path))
    want = pm(input_ids=IDS).logits
    load_adapter(base, tmp_path)
    base.eval()
    assert get_lora_config(base).use_rslora is rslora
    torch.testing.assert_close(base(IDS), want, rtol=1e-4, atol=1e-4)
    assert (want - conftest.hf_twin(tiny_llama())(IDS).logits).abs().max() > 1e-3, "the adapter must change the logits"


# ---- the 4-bit autograd Function -----------------------------------------------------------------------------------

def test_nf4_linear_gradcheck_float64():
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(7, 96), blocksize=32)  # odd out, 21 blocks, double quantized
    x = torch.randn(2, 1, 96, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: ops.NF4LinearFunction.apply(x, b, q, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b), eps=1e-6, atol=1e-6)
    w = q.dequantize(torch.float32).double()
    torch.testing.assert_close(fn(x, b), x @ w.t() + b)


@pytest.mark.parametrize("shape", [(13, 64), (33, 200)])
def test_nf4_linear_backward_matches_dense(shape):
    """fp32: the Function's grads equal autograd through the dequantized dense weight; no weight gradient exists."""
    torch.manual_seed(1)
    n_out, n_in = shape
    q = quantize_nf4(torch.randn(n_out, n_in))
    w = q.dequantize(torch.float32)
    x = torch.randn(5, n_in, requires_grad=True)
    b = torch.randn(n_out, requires_grad=True)
    g = torch.randn(5, n_out)
    y = ops.nf4_linear(x, q, b, backend="torch")
    dx, db = torch.autograd.grad(y, (x, b), g)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = x2 @ w.t() + b2
    dx2, db2 = torch.autograd.grad(y2, (x2, b2), g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db2)


# ---- merged exports ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["hf", "bnb4", "gguf"])
def test_save_merged_loads_back(tmp_path, fmt):
    from qlora70.checkpoint import load_model
    from qlora70.checkpoint import save_merged

    m = tiny_llama(quantize=True)
    inject_lora(m, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj")))
    randomize_b(m)
    m.eval()
    ref = m(IDS)
    path = tmp_path / ("merged.gguf" if fmt == "gguf" else "merged")
    kw = dict(gguf_type="f16") if fmt == "gguf" else {}
    out = save_merged(m, path, dtype=torch.float32, format=fmt, progress=False, **kw)
    assert any(True for _ in lora_modules(m)), "save_merged must not consume the caller's adapter model"
    back = load_model(out, quantize="nf4" if fmt == "bnb4" else None, progress=False)
    if fmt == "bnb4":
        assert isinstance(back.model.layers[0].self_attn.q_proj, Linear4bit)
        tol = 0.5  # re-quantization error of the merged weights
    else:
        tol = 2e-2 if fmt == "gguf" else 1e-4  # f16 weights vs fp32
    got = back(IDS)
    assert (got - ref).abs().max() < tol
    if fmt == "bnb4":  # the 4-bit export is exactly what merge_lora(requantize=True) computes in memory
        merge_lora(m, dtype=torch.float32, requantize=True)
        torch.testing.assert_close(got, m(IDS), rtol=1e-5, atol=1e-5)


# ---- dropout ---------------------------------------------------------------------------------------------------------

def test_fast_dropout_module():
    """LoRA's dropout module: train-only, seeded, the mask of ops.seeded_dropout, fp32 in -> bf16 out under CPU
    autocast (the fused cast); p outside [0, 1) is refused (the kernel itself is tested in test_ops)."""
    from qlora70.lora import FastDropout
    from qlora70.ops import dropout_keep_reference, dropout_threshold

    d = FastDropout(0.1)
    x = torch.randn(37, 101)
    torch.manual_seed(0)
    y = d(x)
    torch.manual_seed(0)
    assert torch.equal(d(x), y), "seeded: the same mask again"
    keep = y != 0
    thr, scale = dropout_threshold(0.1)
    torch.manual_seed(0)
    seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64)) % 2 ** 64
    assert torch.equal(keep.flatten(), dropout_keep_reference(x.numel(), seed, thr) & (x != 0).flatten())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        yb = d(x)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="dropout p"):
        FastDropout(1.0)


def test_dropout_masks_survive_gradient_checkpointing():
    """Recomputation inside checkpointed layers must redraw the same LoRA dropout masks: grads equal no-checkpoint."""
    from qlora70.model import set_gradient_checkpointing

    grads = []
    for ckpt in (False, True):
        m = tiny_llama(quantize=True)
        torch.manual_seed(0)
        inject_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.3))
        randomize_b(m)
        set_gradient_checkpointing(m, ckpt)
        m.train()
        torch.manual_seed(1)
        m(IDS).float().pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("four_bit", [False, True])
def test_keep_base_outputs_checkpointing_matches_and_skips_base_recompute(four_bit):
    """Selective recomputation: same grads as no checkpointing, and each base layer runs once (not twice)."""
    from torch.utils.checkpoint import checkpoint

    from qlora70.recompute import keep_base_outputs_context_fn

    def build():
        torch.manual_seed(0)
        l1, l2 = nn.Linear(48, 80), nn.Linear(80, 33)
        if four_bit:
            l1, l2 = Linear4bit.from_linear(l1), Linear4bit.from_linear(l2)
        net = nn.Sequential(LoRALinear(l1, r=4, alpha=8, dropout=0.2), nn.GELU(), LoRALinear(l2, r=4, alpha=8,
                                                                                          dropout=0.2))
        randomize_b(net)
        return net

    x0 = torch.randn(3, 7, 48)
    results = []
    for mode in ("plain", "full", "keep"):
        net = build()
        calls = []
        for m in net:
            if isinstance(m, LoRALinear):
                m.base_layer.register_forward_hook(lambda *a: calls.append(1))
        x = x0.clone().requires_grad_()
        torch.manual_seed(1)
        if mode == "plain":
            y = net(x)
        else:
            kw = dict(context_fn=keep_base_outputs_context_fn) if mode == "keep" else {}
            y = checkpoint(net, x, use_reentrant=False, **kw)
        y.pow(2).sum().backward()
        results.append((y.detach(), x.grad, [p.grad for p in net.parameters() if p.requires_grad], len(calls)))
    (y0, gx0, g0, c0), (y1, gx1, g1, c1), (y2, gx2, g2, c2) = results
    assert (c0, c1, c2) == (2, 4, 2)
    for y, gx, g in ((y1, gx1, g1), (y2, gx2, g2)):
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx0, rtol=1e-5, atol=1e-6)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("four_bit", [False, True])
def test_autocast_sum_keeps_the_small_lora_delta(four_bit):
    """Under bf16 autocast the output is fp32: base and LoRA matmuls in bf16, their sum in fp32. The learned delta
    (here ~1e-3 of the base output) keeps its bf16 precision (~2^-8 relative) instead of being rounded with the base
    output's step, which would lose most of it; gradients come back in the input's dtype."""
    torch.manual_seed(0)
    base = nn.Linear(96, 72, bias=False)
    with torch.no_grad():
        base.weight.mul_(20.0)
    if four_bit:
        base = Linear4bit.from_linear(base)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 1e-4)
    x = torch.randn(5, 11, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_base = layer.base_layer(x)
    assert y.dtype == torch.float32 and y_base.dtype == torch.bfloat16
    delta_ref = (x.detach().double() @ layer.lora_A.weight.double().t() @ layer.lora_B.weight.double().t()) * layer.scale
    got = y.detach().double() - y_base.detach().double()
    assert (delta_ref.abs() / y_base.detach().double().abs().clamp(min=1e-30)).median() < 3e-3  # a small delta
    rel = ((got - delta_ref).norm() / delta_ref.norm()).item()
    assert rel < 0.02, rel  # bf16-rounded sum: ~0.3 here (delta ~1 ulp of the base output)
    rounded = (y_base.double() + delta_ref).to(torch.bfloat16).double() - y_base.double()
    assert ((rounded - delta_ref).norm() / delta_ref.norm()).item() > 10 * rel  # what the fp32 sum avoids
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32
