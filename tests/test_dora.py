"""DoRA: forward math against a float64 reference, merge, adapter files, and parity with PEFT (logits both ways, one
training step's gradients of the magnitude and LoRA weights) on dense and NF4 tiny Llamas."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import conftest
from conftest import check_inputs, check_probe, hf_twin, sha256_json, state_fingerprint, tensor_fingerprint
from qlora70.config import LoRAConfig
from qlora70.layers import Linear4bit
from qlora70.lora import LoRALinear, get_lora_config, inject_lora, load_adapter, lora_modules, merge_lora, save_adapter
from qlora70.model import Llama

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(3))


# GOLDEN values; regenerate: `python tests/make_golden.py dora` (oracles installed; see its docstring).
# GOLDEN: peft 0.21.2 on transformers 5.24.0 (CPU fp32, one thread, torch 2.13.0+cpu), computed once as in
# test_peft_loads_our_dora_adapter: out = peft.PeftModel.from_pretrained(hf_twin(dense_twin(tiny_llama(quantize=q))),
# <our DoRA adapter>)(IDS).logits, pinned as conftest.logit_probe(out); "keys" = sha256_json(sorted keys of the
# adapter_model.safetensors PEFT itself writes for LoraConfig(r=4, lora_alpha=8, target_modules=ALL, use_dora=True));
# "inputs" = state_fingerprint(<our adapter's tensors>) + tensor_fingerprint(IDS).
PEFT_DORA_GOLDEN = {  # quantize -> pinned values
    False: {"inputs": [703.954088226, 1131.640803442, 6451.0, 6451.0], "n_keys": 42,
            "keys": "da151a479b774fb02bdce0e81ff9501bd12212916bcb133854b6484029d21006",
            "logits": {"sum": -15.419158, "at": [-0.6775815, 0.283212, 0.0274544, -0.0212843,
                                                 -0.3227638, 0.0655358, -1.0354805, -0.3607879]}},
    True: {"inputs": [709.512621686, 1137.199336902, 6451.0, 6451.0], "n_keys": 42,
           "keys": "da151a479b774fb02bdce0e81ff9501bd12212916bcb133854b6484029d21006",
           "logits": {"sum": -11.760903, "at": [-0.7221769, 0.2827663, 0.0061504, -0.0362786,
                                                -0.3017097, 0.0963002, -1.0464449, -0.3556297]}},
}


def tiny_llama(seed: int = 0, quantize: bool = False, **overrides) -> Llama:
    """conftest's builder with norms that matter (as tests/test_lora.py)."""
    return conftest.tiny_llama(seed, quantize=quantize, init=conftest.uniform_norms, eval=not quantize, **overrides)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Random B (so the adapter matters) and a magnitude away from its init (so m / ||.|| != 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
            if m.use_dora:
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.out_features, generator=g))


def dense_twin(model: Llama) -> Llama:
    """The same model with every 4-bit linear replaced by an fp32 nn.Linear holding its dequantized weight."""
    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            if isinstance(mod, Linear4bit):
                lin = nn.Linear(mod.in_features, mod.out_features, bias=False)
                lin.weight.copy_(mod.dequantize(torch.float32))
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, lin)
    return model


def reference_dora(x, w, bias, a, b, m, scale, keep=None):
    """float64 DoRA as in the paper + PEFT: y = x W^T + b + (m/n - 1) x_d W^T + (m/n) s x_d A^T B^T, n detached."""
    x, w, a, b, m = (t.double() for t in (x, w, a, b, m))
    xd = x if keep is None else x * keep.double()
    n = torch.linalg.norm(w + scale * b @ a, dim=1)
    mns = m / n
    y = x @ w.t() + (0 if bias is None else bias.double())
    return y + (mns - 1) * (xd @ w.t()) + mns * scale * (xd @ a.t() @ b.t())


# ---- the layer -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("shape", [(37, 53), (64, 96)])
def test_dora_layer_math(four_bit, shape):
    torch.manual_seed(0)
    n_in, n_out = shape
    base = nn.Linear(n_in, n_out, bias=True)
    if four_bit:
        base = Linear4bit.from_linear(base, blocksize=64)
    w = base.dequantize(torch.float32) if four_bit else base.weight.detach()
    x = torch.randn(3, 5, n_in)
    lin = LoRALinear(base, r=4, alpha=8, dropout=0.2, use_dora=True).eval()
    torch.testing.assert_close(lin.lora_magnitude_vector, torch.linalg.norm(w, dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(lin(x), base(x), rtol=1e-5, atol=1e-5)  # fresh DoRA == base
    randomize(nn.Sequential(lin))
    want = reference_dora(x, w, base.bias.detach(), lin.lora_A.weight, lin.lora_B.weight, lin.lora_magnitude_vector,
                          2.0)
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-5, atol=1e-5)
    # training with dropout: the mask applies to the direction's input (both terms), as PEFT
    lin.train()
    torch.manual_seed(7)
    got = lin(x)
    torch.manual_seed(7)
    keep = lin.lora_dropout(torch.ones_like(x))  # the same mask (same RNG draw) times 1/(1-p)
    want = reference_dora(x, w, base.bias.detach(), lin.lora_A.weight, lin.lora_B.weight,
                          lin.lora_magnitude_vector, 2.0, keep=keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_dora_norm_is_detached_and_magnitude_gets_grad():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(24, 10), r=3, alpha=6, use_dora=True)
    randomize(nn.Sequential(lin))
    x = torch.randn(4, 24)
    g = torch.randn(4, 10)
    lin(x).backward(g)
    # reference gradient with n a constant
    a = lin.lora_A.weight.detach().double().requires_grad_()
    b = lin.lora_B.weight.detach().double().requires_grad_()
    m = lin.lora_magnitude_vector.detach().double().requires_grad_()
    w = lin.base_layer.weight.detach().double()
    n = torch.linalg.norm(w + 2.0 * b.detach() @ a.detach(), dim=1)
    y = x.double() @ w.t() + lin.base_layer.bias.double() + (m / n - 1) * (x.double() @ w.t()) \
        + (m / n) * 2.0 * (x.double() @ a.t() @ b.t())
    y.backward(g.double())
    for ours, ref in ((lin.lora_A.weight, a), (lin.lora_B.weight, b), (lin.lora_magnitude_vector, m)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("shape", [(1, 7), (33, 65), (130, 48)])
def test_fast_norm_equals_direct_norm(four_bit, shape):
    """The expanded norm (no [out, in] temporaries) equals ||W + s B A||_row in float64 on odd shapes."""
    from qlora70 import dora

    torch.manual_seed(shape[0])
    base = nn.Linear(shape[1], shape[0], bias=False)
    if four_bit:
        base = Linear4bit.from_linear(base, blocksize=32)
    a, b = torch.randn(5, shape[1]) * 0.3, torch.randn(shape[0], 5) * 0.3
    w = dora.base_weight(base).double()
    want = torch.linalg.norm(w + 0.7 * b.double() @ a.double(), dim=1)
    got = dora.fast_weight_norm(base, dora.weight_sq_norm(base), a, b, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dora.weight_norm(w.float(), a, b, 0.7).double(), want, rtol=1e-5, atol=1e-6)


def test_cached_base_norm_follows_new_base_bytes():
    """||W||^2 is cached per base; new NF4 bytes (load_state_dict, LoftQ) or a new dense weight recompute it."""
    torch.manual_seed(0)
    lin = LoRALinear(Linear4bit.from_linear(nn.Linear(40, 24, bias=False)), r=2, alpha=4, use_dora=True).eval()
    randomize(nn.Sequential(lin))
    x = torch.randn(3, 40)
    lin(x)
    other = Linear4bit.from_linear(nn.Linear(40, 24, bias=False))
    lin.base_layer.load_state_dict(other.state_dict())
    w = other.dequantize(torch.float32)
    want = reference_dora(x, w, None, lin.lora_A.weight, lin.lora_B.weight, lin.lora_magnitude_vector, 2.0)
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-5, atol=1e-5)
    dense = LoRALinear(nn.Linear(40, 24, bias=False), r=2, alpha=4, use_dora=True).eval()
    randomize(nn.Sequential(dense))
    dense(x)
    with torch.no_grad():
        dense.base_layer.weight.mul_(2)
    want = reference_dora(x, dense.base_layer.weight, None, dense.lora_A.weight, dense.lora_B.weight,
                          dense.lora_magnitude_vector, 2.0)
    torch.testing.assert_close(dense(x).double(), want, rtol=1e-5, atol=1e-5)


def test_plain_lora_has_no_magnitude():
    lin = LoRALinear(nn.Linear(8, 4), r=2, alpha=2)
    assert not hasattr(lin, "lora_magnitude_vector") and not lin.use_dora
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        LoRAConfig(use_dora="yes")


# ---- model level: merge, files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [False, True])
def test_dora_merge_equals_unmerged(quantize):
    m = tiny_llama(quantize=quantize)
    inject_lora(m, LoRAConfig(r=8, alpha=16, dropout=0.1, use_dora=True))
    randomize(m)
    m.eval()
    ref = m(IDS)
    q = m.model.layers[0].self_attn.q_proj
    w = q.base_weight() + q.delta_weight()
    want = w * (q.lora_magnitude_vector / torch.linalg.norm(w, dim=1)).unsqueeze(1)
    merge_lora(m, dtype=torch.float32)
    torch.testing.assert_close(m.model.layers[0].self_attn.q_proj.weight, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m(IDS), ref, rtol=1e-4, atol=1e-4)


def test_dora_merge_bf16_and_requantize():
    m = tiny_llama(quantize=True)
    inject_lora(m, LoRAConfig(r=4, alpha=8, targets=("q_proj", "down_proj"), use_dora=True))
    randomize(m)
    want = m.model.layers[1].mlp.down_proj.merged_weight()
    m2 = merge_lora(m, dtype=torch.bfloat16)
    assert torch.equal(m2.model.layers[1].mlp.down_proj.weight, want.to(torch.bfloat16))
    m3 = tiny_llama(quantize=True)
    inject_lora(m3, LoRAConfig(r=4, alpha=8, targets=("q_proj",), use_dora=True))
    randomize(m3)
    want = m3.model.layers[0].self_attn.q_proj.merged_weight()
    merge_lora(m3, dtype=torch.float32, requantize=True)
    from qlora70.nf4 import quantize_nf4
    q = m3.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit)
    torch.testing.assert_close(q.dequantize(torch.float32), quantize_nf4(want).dequantize(torch.float32))


def test_dora_adapter_roundtrip_ours(tmp_path):
    m = tiny_llama(quantize=True)
    inject_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.05, targets=("q_proj", "v_proj", "down_proj"), use_dora=True))
    randomize(m)
    m.eval()
    ref = m(IDS)
    save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["init_lora_weights"] is True
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sd["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (64,)
    assert len(sd) == 3 * 3 * 2
    fresh = tiny_llama(quantize=True)
    load_adapter(fresh, tmp_path)
    assert get_lora_config(fresh).use_dora is True
    fresh.eval()
    assert torch.equal(fresh(IDS), ref)
    plain = tiny_llama(quantize=True)
    inject_lora(plain, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    with pytest.raises(ValueError, match="use_dora: model False vs adapter True"):
        load_adapter(plain, tmp_path)


# ---- PEFT oracles ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [False, True])
def test_peft_loads_our_dora_adapter(tmp_path, quantize):
    peft = pytest.importorskip("peft")
    ours = tiny_llama(quantize=quantize)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=ALL, use_dora=True))
    randomize(ours)
    ours.eval()
    save_adapter(ours, tmp_path)
    hf = hf_twin(dense_twin(tiny_llama(quantize=quantize)))  # the NF4 base as its dequantized fp32 weights
    plain = hf(IDS).logits
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    out = pm(input_ids=IDS).logits
    torch.testing.assert_close(out, ours(IDS), rtol=1e-5, atol=1e-5)
    assert (out - plain).abs().max() > 1e-3, "the adapter must change the logits"


@pytest.mark.parametrize("quantize", [False, True])
def test_peft_loads_our_dora_adapter_golden(tmp_path, quantize):
    """Without peft: our DoRA adapter has exactly PEFT's key set, and our logits with it equal the pinned logits PEFT
    computed from the same file (companion of test_peft_loads_our_dora_adapter)."""
    ours = tiny_llama(quantize=quantize)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=ALL, use_dora=True))
    randomize(ours)
    ours.eval()
    save_adapter(ours, tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    want = PEFT_DORA_GOLDEN[quantize]
    assert len(sd) == want["n_keys"] and sha256_json(sorted(sd)) == want["keys"], \
        f"adapter keys differ from PEFT's: {sorted(sd)[:4]}..."
    check_inputs(state_fingerprint(sd) + tensor_fingerprint(IDS), want["inputs"],
                 f"test_peft_loads_our_dora_adapter_golden[{quantize}]")
    with torch.no_grad():
        check_probe(ours(IDS), want["logits"], atol=1e-5)


@pytest.mark.parametrize("quantize", [False, True])
def test_we_load_peft_dora_adapter(tmp_path, quantize):
    peft = pytest.importorskip("peft")
    base = tiny_llama(quantize=quantize)
    hf = hf_twin(dense_twin(tiny_llama(quantize=quantize)))
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                          task_type="CAUSAL_LM", init_lora_weights=False, use_dora=True)
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():  # move the magnitude off its init so it matters
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.1)
    pm.save_pretrained(str(tmp_path))
    want = pm(input_ids=IDS).logits
    load_adapter(base, tmp_path)
    base.eval()
    assert get_lora_config(base).use_dora is True
    torch.testing.assert_close(base(IDS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_training_step_grads_match_peft(tmp_path, quantize, dropout):
    """Same adapter, same data, same dropout masks (nn.Dropout on both sides with the same seed): equal loss and equal
    gradients of every magnitude and LoRA weight."""
    peft = pytest.importorskip("peft")
    ours = tiny_llama(quantize=quantize)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=dropout, targets=ALL, use_dora=True))
    randomize(ours)
    save_adapter(ours, tmp_path)
    hf = hf_twin(dense_twin(tiny_llama(quantize=quantize)))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path), is_trainable=True)
    if dropout:  # our FastDropout draws its masks differently: use torch's dropout on both sides for this check
        for _, m in lora_modules(ours):
            m.lora_dropout = nn.Dropout(dropout)
    ours.train()
    pm.train()
    labels = torch.randint(0, 512, IDS.shape, generator=torch.Generator().manual_seed(9))
    losses, grads = [], []
    for model, fwd in ((ours, lambda: ours(IDS)), (pm, lambda: pm(input_ids=IDS).logits)):
        torch.manual_seed(11)
        logits = fwd()
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        g = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                key = n.replace("base_model.model.", "").replace(".default", "")
                key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                g[key] = p.grad
        grads.append(g)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 3 * 7 * 2
    n_mag = 0
    for k, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][k], rtol=1e-4, atol=1e-6, msg=lambda s: f"{k}: {s}")
        n_mag += k.endswith("lora_magnitude_vector")
    assert n_mag == 14
    assert grads[0]["model.layers.0.self_attn.q_proj.lora_magnitude_vector"].abs().max() > 0


# ---- FSDP2 (2 CPU processes, gloo) -----------------------------------------------------------------------------------

def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from qlora70.distributed import _full, init_distributed, load_adapter_sharded, save_adapter_sharded, shard_model

    init_distributed(backend="gloo")
    try:
        model = _fsdp_model()
        shard_model(model)
        model.train()
        model(IDS[rank:rank + 1]).float().pow(2).mean().backward()  # each rank its own sequence; grads are summed
        grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_adapter_sharded(model, os.path.join(out_dir, "adapter"))
        with torch.no_grad():  # scramble, then load back from the file: every shard must return
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.zero_()
        load_adapter_sharded(model, os.path.join(out_dir, "adapter"))
        back = {n: _full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save({"grads": grads, "back": back}, os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp_model() -> Llama:
    """Tiny NF4 Llama with DoRA on all linears, LoftQ-initialised from its own full-precision weights."""
    from qlora70.loftq import apply_loftq
    from qlora70.model import decoder_linears

    full = tiny_llama(seed=4)
    dense = {f"{n}.weight": mod.weight.detach().clone() for n, _, _, mod in decoder_linears(full)}
    model = tiny_llama(seed=4, quantize=True)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=ALL, use_dora=True,
                                  init_lora_weights="loftq", loftq_iters=2))
    apply_loftq(model, dense.__getitem__)
    randomize(model)
    return model


def test_dora_loftq_under_fsdp2_two_processes(tmp_path):
    """Sharded DoRA + LoftQ: the summed gradients of 2 ranks (one sequence each) equal one process on both sequences
    (sum of per-sequence losses), and the sharded adapter save/load round-trips every magnitude and LoRA weight."""
    import socket

    import torch.multiprocessing as mp

    from qlora70.lora import lora_state_dict

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt")
    ref = _fsdp_model()
    ref.train()
    for i in range(2):
        ref(IDS[i:i + 1]).float().pow(2).mean().backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(want) and sum("magnitude" in n for n in want) == 14
    for n, g in want.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
    sd = lora_state_dict(ref)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got["back"][n], p.detach(), rtol=0, atol=0)


# ---- checkpointing and autocast --------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["full", "keep_base_outputs"])
def test_dora_gradient_checkpointing_matches(policy):
    """DoRA under the trainer's checkpointing policies (dropout masks replayed) gives the un-checkpointed grads."""
    from qlora70.model import set_gradient_checkpointing

    grads = []
    for ckpt in (False, True):
        m = tiny_llama(quantize=True)
        torch.manual_seed(0)
        inject_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.3, use_dora=True))
        randomize(m)
        if ckpt:
            set_gradient_checkpointing(m, True, policy=policy)
        m.train()
        torch.manual_seed(1)
        m(IDS).float().pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert len(grads[0]) == 3 * 7 * 2
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dora_under_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    lin = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 48)), r=4, alpha=8, use_dora=True).eval()
    randomize(nn.Sequential(lin))
    x = torch.randn(5, 64)
    ref = lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin(x.bfloat16())
    assert torch.isfinite(got).all() and got.dtype == torch.float32  # the LoRA sum stays fp32 (as LoRALinear's)
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)
    lin.train()
    lin.lora_dropout.p = 0.25
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(xg)
    out.sum().backward()
    assert out.dtype == xg.grad.dtype == lin.lora_magnitude_vector.grad.dtype == torch.float32


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton path needs CUDA or TRITON_INTERPRET=1 (set by `make test`)")
def test_dora_triton_path_matches_torch_path(monkeypatch):
    """The GPU code path (Triton NF4 kernels for the base, the dropped-input matmul and W A^T) equals the torch path."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        base = Linear4bit.from_linear(nn.Linear(64, 48, bias=True), blocksize=64, backend=backend).to(dev)
        lin = LoRALinear(base, r=4, alpha=8, dropout=0.2, use_dora=True).to(dev).train()
        randomize(nn.Sequential(lin))
        x = torch.randn(6, 64, device=dev, requires_grad=True)
        torch.manual_seed(3)
        y = lin(x)
        y.pow(2).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in lin.parameters() if p.requires_grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_train_flags_reach_the_run_config():
    import argparse

    from qlora70.recipe import add_train_args, run_config_from_args

    ap = argparse.ArgumentParser()
    add_train_args(ap)
    cfg = run_config_from_args(ap.parse_args(["--preset", "demo", "--lora-variant", "dora", "--lora-init", "loftq",
                                              "--loftq-iters", "3"]), "runs/unused")
    assert (cfg.lora.use_dora, cfg.lora.init_lora_weights, cfg.lora.loftq_iters) == (True, "loftq", 3)
    cfg = run_config_from_args(ap.parse_args(["--preset", "demo"]), "runs/unused")
    assert (cfg.lora.use_dora, cfg.lora.init_lora_weights) == (False, "default")  # defaults: plain LoRA
