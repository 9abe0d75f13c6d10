"""Golden companions of tests/test_checkpoint.py's transformers + bitsandbytes round trips, for when those oracles are
missing (test_checkpoint.py needs transformers to build its checkpoints, so these live in their own file): our
save_quantized writes bitsandbytes' exact key / dtype / shape layout and bytes, and our NF4 logits equal the ones
transformers + bitsandbytes computed from our file."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import check_inputs, check_probe, normal_init, sha256_json, state_fingerprint, tiny_llama
from qlora70.checkpoint import load_model, save_hf, save_quantized

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 4, 8, 15], [3, 3, 60, 12, 90, 1, 0, 7, 7, 42]])  # test_checkpoint's

# GOLDEN values; regenerate: `python tests/make_golden.py checkpoint` (oracles installed; see its docstring).
# GOLDEN: transformers 5.24.0 + bitsandbytes 0.50.2 (CPU fp32, one thread, torch 2.13.0+cpu), computed once for
# m = seeded_model(tie), dense = save_hf(m, dtype=float32):
# - "layout" / "n_keys": sha256_json([[key, dtype, shape] for sorted keys]) of the safetensors that transformers writes
#   for AutoModelForCausalLM.from_pretrained(dense, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
#   bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)).save_pretrained(...)
# - "bytes": checkpoint_bytes_sha256 of that file: the packed 4-bit weights, nested absmax / code tables and dense
#   tensors, except the 8-bit `.absmax` codes (3 of 28 tensors differ by one code near ties, bitsandbytes' CPU search:
#   see test_nf4.test_double_quant_codes_match_bitsandbytes_except_near_ties) and the quant_state JSON blobs.
# - "logits": conftest.logit_probe of the logits(IDS) transformers + bitsandbytes (bnb_reference_path) computes from
#   our save_quantized(load_model(dense, quantize="nf4")) directory, as in
#   test_save_quantized_loads_in_transformers_bnb_and_back_bit_identical; "inputs" = state_fingerprint(m.state_dict()).
BNB_CHECKPOINT_GOLDEN = {  # tie_word_embeddings -> pinned values
    False: {"inputs": [274.645955162, 14166.170407124], "n_keys": 91,
           "layout": "fbe9e2dba0d8f686a58e9d1ab93fb3a62fe9d21dc340d87f771d93c38d4b33f7",
           "bytes": "618e9096f54fa9dbdc079ab9cf0911a6f19556a81d0def81ae1323c8250401cd",
           "logits": {"sum": -172.237335, "at": [-0.3873853, -1.6261948, -1.9328281, -1.2257768,
                                                 0.0710542, 1.773169, 0.9007832, 0.2879941]}},
    True: {"inputs": [286.191571959, 14175.79626558], "n_keys": 90,
           "layout": "51f479b8ef4108b967e5d15575d03a7978dece4c27426091b06b46a5f19cfa74",
           "bytes": "2c21e1286671d4f6965fcef49972625cc0ddee034824d212e5f23bad8f0b57a0",
           "logits": {"sum": 85.538858, "at": [-0.7869825, -2.0724728, -3.2844155, 2.0569625,
                                               0.8399644, 1.0232267, -1.9148637, -0.7227639]}},
}


def seeded_model(tie: bool):
    return tiny_llama(0, init=normal_init(0.2, 0.1), vocab_size=101, intermediate_size=128, tie_word_embeddings=tie,
                      max_position_embeddings=128)


def read_dir(d: str) -> dict:
    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    return sd


def checkpoint_bytes_sha256(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        if "quant_state" not in k and not k.endswith(".absmax"):
            h.update(k.encode())
            h.update(sd[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("tie", [False, True])
def test_save_quantized_golden(tmp_path, tie):
    m = seeded_model(tie)
    want = BNB_CHECKPOINT_GOLDEN[tie]
    check_inputs(state_fingerprint(m.state_dict()), want["inputs"], f"test_save_quantized_golden[{tie}]")
    dense = save_hf(m, tmp_path / "dense", dtype=torch.float32, progress=False)
    q = load_model(dense, quantize="nf4", progress=False)
    sd = read_dir(save_quantized(q, tmp_path / "q4", progress=False))
    layout = [[k, str(sd[k].dtype).removeprefix("torch."), list(sd[k].shape)] for k in sorted(sd)]
    assert len(layout) == want["n_keys"] and sha256_json(layout) == want["layout"], \
        "key / dtype / shape layout differs from the checkpoint transformers + bitsandbytes writes (pinned)"
    assert checkpoint_bytes_sha256(sd) == want["bytes"], "tensor bytes differ from bitsandbytes' checkpoint (pinned)"
    with torch.no_grad():
        check_probe(q(IDS), want["logits"], atol=1e-5)
