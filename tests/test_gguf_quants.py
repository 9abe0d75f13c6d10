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


# ---- encoders --------------------------------------------------------------------------------------------------------
from qlora70 import gguf_kquants as gk  # noqa: E402

ENC_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def awkward_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows of mixed scales plus the edge cases of the C loops: zero blocks, constant runs, one-signed rows,
    exact zeros, heavy tails, values on rounding midpoints."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 3, (rows, 1))).astype(np.float32)
    w[0, :256] = 0
    w[1, : cols // 2 + 3] = 0.5
    w[2] = np.abs(w[2])
    w[3, ::3] = 0
    w[4] = -w[4] ** 2
    w[5] = rng.standard_t(2, cols).astype(np.float32)
    w[6, :32] = np.linspace(-1.5, 1.5, 32)
    return w


def ggml_reference_lib():
    """ggml's C quantizers (quantize_row_*_ref), from $QLORA70_GGML_LIB or llama-cpp-python's libggml-base; or None."""
    import ctypes
    import glob
    import importlib.util
    import os
    cands = [os.environ.get("QLORA70_GGML_LIB", "")]
    spec = importlib.util.find_spec("llama_cpp")
    if spec and spec.submodule_search_locations:
        cands += glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "lib", "libggml-base.so*"))
    for c in cands:
        if c and os.path.isfile(c):
            try:
                lib = ctypes.CDLL(c)
                lib.quantize_row_q4_K_ref  # noqa: B018 (the symbol must exist)
                return lib
            except (OSError, AttributeError):
                continue
    return None


@pytest.mark.parametrize("t", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_encoder_bytes_equal_gguf_reference_quantizer(t):
    w = awkward_weights(9, 288, seed=3)
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[t])
    assert np.array_equal(gk.encode(torch.from_numpy(w), t).numpy(), ref), t


@pytest.mark.parametrize("t", ENC_TYPES)
def test_encoder_bytes_equal_ggml_c_reference(t):
    import ctypes
    lib = ggml_reference_lib()
    if lib is None:
        pytest.skip("no ggml library (pip install llama-cpp-python, or set QLORA70_GGML_LIB to a libggml-base.so)")
    w = awkward_weights(23, 1024, seed=11)
    bs, bb = gq.BLOCK[t]
    out = np.zeros(w.size // bs * bb, np.uint8)
    fn = getattr(lib, f"quantize_row_{t[:-1].lower() + t[-1]}_ref")
    fn(ctypes.c_void_p(w.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(w.size))
    ours = gk.encode(torch.from_numpy(w), t).numpy().reshape(-1, bb)
    assert np.array_equal(ours, out.reshape(-1, bb)), f"{t}: {(ours != out.reshape(-1, bb)).any(1).sum()} blocks differ"


# sha256[:16] of encode(awkward_weights(7, 512, seed=5)), checked equal to ggml's C reference quantizers (ggml-quants.c
# of llama.cpp as vendored by llama-cpp-python 0.3.36) when they were pinned
GOLDEN = {"Q4_K": "cd77d276efa7d093", "Q5_K": "f25221815763c523", "Q6_K": "16f005929ed12a3b"}


@pytest.mark.parametrize("t", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_encoder_golden_bytes(t):
    import hashlib
    b = gk.encode(torch.from_numpy(awkward_weights(7, 512, seed=5)), t).numpy()
    assert hashlib.sha256(b.tobytes()).hexdigest()[:16] == GOLDEN[t]


@pytest.mark.parametrize("t", ENC_TYPES + ["F16", "BF16", "F32"])
@pytest.mark.parametrize("shape", [(1, 256), (5, 768), (3, 1280)])
def test_encoder_round_trips_through_gguf_decoder(t, shape):
    """our bytes -> gguf's reference decoder == our decoder, bit for bit (and the GGUF byte size is right)."""
    w = awkward_weights(max(shape[0], 7), shape[1], seed=shape[1])[: shape[0]]
    b = gk.encode(torch.from_numpy(w), t)
    assert b.dtype == torch.uint8 and tuple(b.shape) == (shape[0], gq.row_bytes(t, shape[1]))
    qt = gguf.GGMLQuantizationType[t]
    ref = gguf.quants.dequantize(b.numpy() if t not in ("F16", "F32") else b.numpy().view(
        np.float16 if t == "F16" else np.float32), qt).reshape(shape)
    ours = gq.dequantize(b.reshape(-1), t, shape).numpy()
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


# relative RMSE bands on N(0, 1) rows (measured 0.0054, 0.0178, 0.0362, 0.0378, 0.0428, 0.0716, 0.0783, 0.0862)
BANDS = {"Q8_0": (0.004, 0.007), "Q6_K": (0.013, 0.023), "Q5_K": (0.027, 0.045), "Q5_1": (0.028, 0.047),
         "Q5_0": (0.032, 0.053), "Q4_K": (0.055, 0.09), "Q4_1": (0.06, 0.097), "Q4_0": (0.066, 0.107)}


def test_quantization_error_bands_and_order():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 512))
    err = {}
    for t, (lo, hi) in BANDS.items():
        back = gq.dequantize(gk.encode(torch.from_numpy(w.astype(np.float32)), t).reshape(-1), t, w.shape)
        err[t] = float(np.sqrt(((back.double().numpy() - w) ** 2).mean()) / w.std())
        assert lo < err[t] < hi, (t, err[t])
    assert err["Q4_K"] < err["Q4_1"] < err["Q4_0"] and err["Q5_K"] < err["Q5_1"] < err["Q5_0"]
    assert err["Q8_0"] < err["Q6_K"] < err["Q5_K"] < err["Q4_K"]


def test_encoder_errors():
    with pytest.raises(ValueError, match="not a whole number of Q4_K blocks"):
        gk.encode(torch.zeros(2, 576), "Q4_K")
    with pytest.raises(ValueError, match="NaN/Inf"):
        gk.encode(torch.full((1, 32), float("nan")), "Q8_0")
    with pytest.raises(ValueError, match="cannot encode GGUF type 'Q3_K'"):
        gk.encode(torch.zeros(1, 256), "Q3_K")
