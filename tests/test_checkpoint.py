"""Streaming loading of HF / bitsandbytes checkpoints, saving in both layouts, round trips with transformers+bnb,
and the errors for broken checkpoints."""
import json
import os
import shutil

import pytest
import torch

from qlora70.checkpoint import (SafetensorsFile, load_model, parse_size, save_hf, save_quantized,
                                write_safetensors)
from qlora70.config import LlamaConfig
from qlora70.layers import Linear4bit
from qlora70.model import Llama, quantize_model_
from qlora70.nf4 import quantize_nf4

transformers = pytest.importorskip("transformers")




def hf_config(tie=False, kv=2, theta=10000.0):
    # intermediate_size is a multiple of the NF4 blocksize: bitsandbytes 0.50.2's CPU dequantize is wrong when rows
    # do not hold whole blocks (its own quantize->dequantize of a (64, 96) weight errs by 2x the weight scale)
    return transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tie,
                                    rope_theta=theta, rms_norm_eps=1e-5, max_position_embeddings=128)


def make_hf(tmp_path, name="dense", tie=False, kv=2, theta=10000.0, seed=0, **save_kw):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config(tie, kv, theta)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    d = tmp_path / name
    hf.save_pretrained(d, **save_kw)
    return hf, str(d)


IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 4, 8, 15], [3, 3, 60, 12, 90, 1, 0, 7, 7, 42]])


def bnb_reference_path(model):
    """Make bitsandbytes' CPU Linear4bit use its plain dequantize+matmul path. Its avx512-bf16 fast path (taken in eval
    mode without grad) repacks the weight with bf16 block scales, so it is not the fp32 reference, and it crashes when
    in_features is not a multiple of the blocksize (bitsandbytes 0.50.2, `_convert_weight_packed_for_cpu`)."""
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    return model


def logits(m):
    with torch.no_grad():
        out = m(IDS)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("tie,kv,theta", [(False, 2, 10000.0), (True, 1, 500000.0)])
def test_load_dense_hf_dir_exact(tmp_path, tie, kv, theta):
    hf, d = make_hf(tmp_path, tie=tie, kv=kv, theta=theta)
    m = load_model(d, quantize=None, progress=False)
    assert m.config.rope_theta == theta and m.config.tie_word_embeddings == tie  # rope_parameters (transformers 5)
    assert (logits(m) - logits(hf)).abs().max().item() < 1e-5
    assert not any(p.is_meta for p in m.parameters())


def test_sharded_checkpoint_and_quantize_on_load(tmp_path):
    hf, d = make_hf(tmp_path, max_shard_size="60KB")
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 2
    dense = load_model(d, quantize=None, progress=False)
    assert (logits(dense) - logits(hf)).abs().max().item() < 1e-5
    q = load_model(d, quantize="nf4", blocksize=64, double_quant=True, progress=False)
    ref = quantize_nf4(hf.model.layers[1].mlp.down_proj.weight.detach(), 64, True)
    got = q.model.layers[1].mlp.down_proj
    assert isinstance(got, Linear4bit) and torch.equal(got.weight.data, ref.packed)
    assert torch.equal(got.weight_absmax, ref.absmax) and got.quant.offset == ref.offset
    err = (logits(q) - logits(hf)).abs().max().item()
    assert 1e-6 < err < 0.2 * logits(hf).abs().max().item()  # quantized, but close


@pytest.mark.parametrize("shape,bs,dq,chunk", [((37, 999), 64, True, 4096), ((300, 515), 128, False, 1024),
                                               ((1000, 333), 64, True, 64 * 7), ((8, 8), 64, True, 64)])
def test_chunked_torch_quantize_is_bit_identical(shape, bs, dq, chunk, monkeypatch):
    """The torch path's chunking (no whole-weight fp32 copy) gives the bytes of one whole-tensor pass, and so does the
    CPU fast path; `dtype=` records another original dtype without touching the bytes."""
    from qlora70 import native, nf4
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    flat = w.reshape(-1)
    one = nf4._quantize_torch(flat, bs, chunk=1 << 30)
    chunked = nf4._quantize_torch(flat, bs, chunk=chunk)
    assert all(torch.equal(x, y) for x, y in zip(one[:2], chunked[:2])) and one[2] == chunked[2] == 0
    a = quantize_nf4(w, bs, dq, dtype=torch.float32)
    monkeypatch.setattr(native, "available", lambda: False)
    b = quantize_nf4(w, bs, dq)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax) and a.offset == b.offset
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and a.shape == b.shape
    assert (a.nested_absmax is None and b.nested_absmax is None) or torch.equal(a.nested_absmax, b.nested_absmax)
    if not dq:
        assert torch.equal(b.absmax, chunked[1])


def test_bf16_load(tmp_path):
    hf, d = make_hf(tmp_path)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # a bf16 file loaded as fp32: quantized without a copy
    m32 = load_model(tmp_path / "bf16", quantize="nf4", dtype=torch.float32, progress=False)
    ref = quantize_nf4(hf.model.layers[0].mlp.gate_proj.weight.detach().float(), 64, True)
    got = m32.model.layers[0].mlp.gate_proj.quant
    assert got.dtype == torch.float32 and torch.equal(got.packed, ref.packed) and torch.equal(got.absmax, ref.absmax)
    m = load_model(d, quantize="nf4", dtype=torch.bfloat16, progress=False)
    assert m.dtype == torch.bfloat16 and m.model.layers[0].self_attn.q_proj.quant.dtype == torch.bfloat16
    assert logits(m).dtype == torch.bfloat16


@pytest.mark.parametrize("tie", [False, True])
def test_save_quantized_loads_in_transformers_bnb_and_back_bit_identical(tmp_path, tie):
    pytest.importorskip("bitsandbytes")
    _, d = make_hf(tmp_path, tie=tie)
    ours = load_model(d, quantize="nf4", progress=False)
    out = save_quantized(ours, tmp_path / "q4", progress=False)
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True and qc["bnb_4bit_quant_storage"] == "uint8"
    tq = bnb_reference_path(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval())
    assert type(tq.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # bitsandbytes' module
    assert (logits(ours) - logits(tq)).abs().max().item() < 1e-3  # same packed weights, two implementations
    back = load_model(out, quantize="nf4", progress=False)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(logits(ours), logits(back))


def test_transformers_bnb_checkpoint_loads_without_requantizing(tmp_path):
    pytest.importorskip("bitsandbytes")
    _, d = make_hf(tmp_path)
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    tq = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_cfg, dtype=torch.float32,
                                                           device_map="cpu").eval()
    bnb_reference_path(tq)
    tq.save_pretrained(tmp_path / "bnb")
    ours = load_model(tmp_path / "bnb", quantize="nf4", progress=False)
    bnb_w = tq.model.layers[0].mlp.up_proj.weight
    assert torch.equal(ours.model.layers[0].mlp.up_proj.weight.data.view(-1), bnb_w.data.view(-1))
    assert (logits(ours) - logits(tq)).abs().max().item() < 1e-3
    dense = load_model(tmp_path / "bnb", quantize=None, progress=False)  # dequantized on load
    assert type(dense.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert (logits(dense) - logits(tq)).abs().max().item() < 1e-3


def test_save_hf_round_trip_sharded(tmp_path):
    hf, d = make_hf(tmp_path)
    m = load_model(d, quantize=None, progress=False)
    out = save_hf(m, tmp_path / "hf32", dtype=torch.float32, max_shard_size="50KB", progress=False)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(back), logits(hf))
    q = load_model(d, quantize="nf4", progress=False)  # 4-bit linears are dequantized on export
    out = save_hf(q, tmp_path / "hf32", dtype=torch.float32, progress=False)  # same dir: replaced in place
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]  # stale shards gone
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")] and not [f for f in os.listdir(out) if
                                                                                f.startswith(".tmp")]
    back = load_model(out, quantize=None, progress=False)
    assert (logits(back) - logits(q)).abs().max().item() < 1e-5
    bf = save_hf(m, tmp_path / "hf16", progress=False)  # default bf16
    assert json.load(open(os.path.join(bf, "config.json")))["torch_dtype"] == "bfloat16"
    assert SafetensorsFile(os.path.join(bf, "model.safetensors")).entries["model.norm.weight"][0] == torch.bfloat16


def test_save_quantized_needs_quantized_model(tmp_path):
    m = Llama(LlamaConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="quantize_model_"):
        save_quantized(m, tmp_path / "x", progress=False)
    quantize_model_(m)
    save_quantized(m, tmp_path / "x", progress=False)


def test_safetensors_writer_is_readable_by_safetensors(tmp_path):
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
          "c": torch.arange(9, dtype=torch.uint8).reshape(9, 1)}
    p = str(tmp_path / "x.safetensors")
    write_safetensors(p, [(k, tuple(v.shape), v.dtype, (lambda t: lambda: t)(v)) for k, v in ts.items()])
    back = load_file(p)
    assert all(torch.equal(back[k], ts[k]) for k in ts)
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2MiB") == 2 << 20 and parse_size(123) == 123


# ---- bad input: each error names the file and the tensor -------------------------------------------------------
def test_missing_config(tmp_path):
    _, d = make_hf(tmp_path)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(d, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope", progress=False)


def test_missing_shard(tmp_path):
    _, d = make_hf(tmp_path, max_shard_size="60KB")
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    shard = sorted(set(idx["weight_map"].values()))[1]
    os.remove(os.path.join(d, shard))
    with pytest.raises(FileNotFoundError, match=rf"shard {shard} \(holding tensor 'model\.layers"):
        load_model(d, progress=False)


def test_truncated_file(tmp_path):
    _, d = make_hf(tmp_path)
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated: tensor '.*' needs bytes"):
        load_model(d, progress=False)
    with open(f, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(ValueError, match="truncated"):
        load_model(d, progress=False)


def test_wrong_shape_and_unexpected_tensor(tmp_path):
    _, d = make_hf(tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 192
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                                         r"shape \(128, 64\) but the config needs \(192, 64\)"):
        load_model(d, progress=False)
    _, d2 = make_hf(tmp_path, name="extra")
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(d2, "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, os.path.join(d2, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensors.*q_proj.bias"):
        load_model(d2, progress=False)
    del sd["model.layers.0.self_attn.q_proj.bias"], sd["model.norm.weight"]
    save_file(sd, os.path.join(d2, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model\.norm\.weight'\]"):
        load_model(d2, progress=False)


def test_pickle_only_dir_refused(tmp_path):
    _, d = make_hf(tmp_path)
    shutil.move(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_model(d, progress=False)
