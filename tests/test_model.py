"""The hand-written Llama against transformers' LlamaForCausalLM, the KV cache, masks, NF4 swap, checkpointing."""
import pytest
import torch
from torch import nn

from conftest import (check_inputs, check_probe, normal_init, state_fingerprint, tensor_fingerprint, tiny_config,
                      tiny_llama)
from qlora70.config import LlamaConfig
from qlora70.layers import Linear4bit
from qlora70.model import KVCache, Llama, count_parameters, quantize_model_, set_gradient_checkpointing




def tiny(**kw) -> LlamaConfig:
    return tiny_config(**{"vocab_size": 97, "intermediate_size": 96, "max_position_embeddings": 128, "name": "custom",
                          **kw})


def random_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    return tiny_llama(seed, init=normal_init(0.2, 0.1), config=cfg)


def hf_twin(m: Llama):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**m.config.to_hf())).eval()
    hf.load_state_dict(m.state_dict())
    return hf


CASES = [  # (tie, rope_theta, kv heads)
    (False, 10000.0, 2),  # GQA
    (True, 500000.0, 2),  # GQA, tied, Llama-3 style theta
    (False, 500000.0, 4),  # MHA
    (True, 10000.0, 1),  # MQA
]


# GOLDEN values; regenerate: `python tests/make_golden.py model` (oracles installed; see its docstring).
# GOLDEN: transformers 5.24.0 LlamaForCausalLM (CPU fp32, one thread, torch 2.13.0+cpu), computed once as in
# test_logits_match_transformers: hf = hf_twin(m); ref = hf(ids).logits; ref_h = hf(ids, output_hidden_states=True)
# .hidden_states[-1]; pinned as conftest.logit_probe(ref) / logit_probe(ref_h) (8 values at evenly spaced flat positions
# + the float64 sum). "inputs" = state_fingerprint(m.state_dict()) + tensor_fingerprint(ids) (the seeded inputs).
HF_LOGITS_GOLDEN = {  # (tie, rope_theta, kv heads) as in CASES
    (False, 10000.0, 2): {"inputs": [304.302712315, 12108.77133519, 1547.0, 1547.0],
        "logits": {"sum": 75.917234, "at": [0.025609, -3.4826226, 0.313915, 3.0458639,
                                            -2.3689394, -3.0893579, 1.191765, 1.1252235]},
        "hidden": {"sum": 37.41011, "at": [-0.856931, -0.96729, -0.4185261, -1.9147321,
                                           -1.513003, -1.9617163, -0.0959052, 0.0383107]}},
    (True, 500000.0, 2): {"inputs": [275.232655196, 12112.105570125, 1547.0, 1547.0],
        "logits": {"sum": -177.310173, "at": [-1.7196789, -0.3432284, 1.232782, 3.4615309,
                                              -0.5559769, -0.4526448, -0.4635349, 1.7885494]},
        "hidden": {"sum": 38.645365, "at": [-0.856931, -0.9189923, -0.4224938, -0.6174564,
                                            -1.5836618, -1.8969988, 0.6820822, -0.8037937]}},
    (False, 500000.0, 4): {"inputs": [290.461772969, 13426.024331082, 1547.0, 1547.0],
        "logits": {"sum": -32.731507, "at": [-0.0448618, -0.6466537, 0.9391689, -0.3333045,
                                             1.0839949, -0.3611863, 1.8070664, -0.3428419]},
        "hidden": {"sum": 92.529816, "at": [0.2535477, -1.2037114, -2.8124745, -0.6172111,
                                            -0.6644811, -0.529801, -0.9567165, 1.941605]}},
    (True, 10000.0, 1): {"inputs": [261.836148008, 11500.571725994, 1547.0, 1547.0],
        "logits": {"sum": -35.445249, "at": [-0.5814233, 1.4747267, 0.2292058, 2.0119443,
                                             1.6799634, 0.9287117, 1.4913108, -1.0499177]},
        "hidden": {"sum": -110.708341, "at": [0.7551706, -0.6795858, -1.2885636, 1.1142602,
                                              0.6208372, 0.1467975, -1.7101408, -1.1036619]}},
}


@pytest.mark.parametrize("tie,theta,kv", CASES)
def test_logits_match_transformers(tie, theta, kv):
    m = random_model(tiny(tie_word_embeddings=tie, rope_theta=theta, num_key_value_heads=kv))
    hf = hf_twin(m)
    assert set(m.state_dict()) == set(hf.state_dict())
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = m(ids), hf(ids).logits
        hidden = m(ids, return_hidden=True)
        ref_h = hf(ids, output_hidden_states=True).hidden_states[-1]
    assert ours.shape == (2, 19, 97)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (hidden - ref_h).abs().max().item() < 1e-4
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("tie,theta,kv", CASES)
def test_logits_golden(tie, theta, kv):
    """Without transformers: our logits and last hidden state equal transformers' pinned values for the same seeded
    model and ids (companion of test_logits_match_transformers)."""
    m = random_model(tiny(tie_word_embeddings=tie, rope_theta=theta, num_key_value_heads=kv))
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    want = HF_LOGITS_GOLDEN[(tie, theta, kv)]
    check_inputs(state_fingerprint(m.state_dict()) + tensor_fingerprint(ids), want["inputs"],
                 f"test_logits_golden[{tie}-{theta}-{kv}]")
    with torch.no_grad():
        ours, hidden = m(ids), m(ids, return_hidden=True)
    check_probe(ours, want["logits"], atol=1e-5)
    check_probe(hidden, want["hidden"], atol=1e-5)


def test_head_dim_not_hidden_over_heads():
    m = random_model(tiny(head_dim=24))
    hf = hf_twin(m)
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_padding_mask_matches_transformers():
    m = random_model(tiny())
    hf = hf_twin(m)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        ours = m(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
    assert torch.isfinite(ours).all()
    assert (ours[mask.bool()] - ref[mask.bool()]).abs().max().item() < 1e-4
    left = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])  # left padding with positions counted from the first token
    pos = (left.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = m(ids[:1], attention_mask=left, position_ids=pos)[0, 3:]
        b = m(ids[:1, 3:])[0]
    assert (a - b).abs().max().item() < 1e-5


def test_packed_documents_do_not_attend_across():
    m = random_model(tiny())
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(1, 97, (n,), generator=g) for n in (5, 3, 6)]
    packed = torch.cat(docs + [torch.zeros(2, dtype=torch.long)])[None]  # (1, 16) with 2 padding tokens
    doc_ids = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)] + [torch.zeros(2, dtype=torch.long)])
    pos = torch.cat([torch.arange(len(d)) for d in docs] + [torch.zeros(2, dtype=torch.long)])
    with torch.no_grad():
        out = m(packed, attention_mask=doc_ids[None], position_ids=pos[None])[0]
        start = 0
        for d in docs:
            alone = m(d[None])[0]
            assert (out[start:start + len(d)] - alone).abs().max().item() < 1e-5
            start += len(d)
    assert torch.isfinite(out).all()


def test_kv_cache_matches_full_forward():
    m = random_model(tiny(num_key_value_heads=1))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache.for_model(m, 2, 16)
        parts = [m(ids[:, :5], cache=cache, start_pos=0), m(ids[:, 5:8], cache=cache, start_pos=5)]
        parts += [m(ids[:, i:i + 1], cache=cache, start_pos=i) for i in range(8, 12)]
    inc = torch.cat(parts, dim=1)
    assert (inc - full).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="KVCache holds"):
        m(ids[:, :5], cache=cache, start_pos=14)


def test_quantize_model_swaps_decoder_linears_only():
    m = random_model(tiny())
    dense = random_model(tiny())
    quantize_model_(m, blocksize=64, double_quant=True)
    n4 = [n for n, mod in m.named_modules() if isinstance(mod, Linear4bit)]
    assert len(n4) == 7 * 2 and all(n.startswith("model.layers.") for n in n4)
    assert type(m.lm_head) is nn.Linear and type(m.model.embed_tokens) is nn.Embedding
    assert count_parameters(m)["total"] == count_parameters(dense)["total"]
    # the NF4 model computes exactly what a dense model holding the dequantized weights computes
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, Linear4bit):
                dense.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (m(ids) - dense(ids)).abs().max().item() < 1e-4
    sd = m.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd


def _grads(m, ids):
    m.zero_grad(set_to_none=True)
    loss = m(ids).float().logsumexp(-1).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quant", [False, True])
def test_gradient_checkpointing_same_grads_and_fewer_saved(quant, monkeypatch):
    m = random_model(tiny())
    if quant:
        quantize_model_(m)
    m.train()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(7))
    assert m.gradient_checkpointing is False  # off until asked
    ref = _grads(m, ids)

    def n_saved():
        count = [0]

        def pack(t):
            count[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(ids).float().logsumexp(-1).mean()
        return count[0]

    plain = n_saved()
    set_gradient_checkpointing(m, True)
    assert n_saved() < plain / 2
    got = _grads(m, ids)
    assert ref.keys() == got.keys() and len(got) > 0
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5, rtol=1e-4), k
    calls = []
    orig = torch.autograd.graph.save_on_cpu

    def spy(*a, **kw):
        calls.append(kw)
        return orig(*a, **kw)
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    set_gradient_checkpointing(m, True, offload=True)
    got = _grads(m, ids)
    assert len(calls) == m.config.num_hidden_layers and calls[0] == {"pin_memory": False}
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5, rtol=1e-4), k
    set_gradient_checkpointing(m, False)
    assert n_saved() == plain


def test_keep_base_outputs_policy_with_lora():
    from qlora70 import lora
    from qlora70.config import LoRAConfig

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(9))
    results = {}
    for mode in ("plain", "full", "keep_base_outputs"):
        m = quantize_model_(random_model(tiny()))
        torch.manual_seed(0)
        lora.inject_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, lora.LoRALinear):
                    mod.lora_B.weight.normal_(0, 0.1)
        calls = []
        for mod in m.modules():
            if isinstance(mod, Linear4bit):
                mod.register_forward_hook(lambda *a: calls.append(1))
        if mode != "plain":
            set_gradient_checkpointing(m, True, policy=mode)
        m.train()
        m(ids).float().pow(2).mean().backward()
        results[mode] = (len(calls), [p.grad for p in m.parameters() if p.requires_grad])
    n = results["plain"][0]
    assert n == 14 and results["full"][0] == 2 * n and results["keep_base_outputs"][0] == n
    for mode in ("full", "keep_base_outputs"):
        for a, b in zip(results["plain"][1], results[mode][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="policy"):
        set_gradient_checkpointing(m, True, policy="fast")


def test_bf16_forward_runs_and_tracks_fp32():
    m = random_model(tiny())
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = m(ids)
        out = m.to(torch.bfloat16)(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_bad_inputs():
    m = random_model(tiny())
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="expects a qlora70 Llama"):
        set_gradient_checkpointing(nn.Linear(2, 2))
