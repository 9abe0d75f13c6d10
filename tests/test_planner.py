"""Memory planner: terms add up, scale as their formulas say, and the CLI answers fits / largest micro-batch."""
import json

import pytest

from qlora70 import LlamaConfig
from qlora70.cli import main
from qlora70.planner import ALLOCATOR_SLACK, CUDA_CONTEXT, GiB, parse_size, plan_memory


def test_terms_match_their_formulas_for_70b():
    cfg = LlamaConfig.from_name("llama2-70b")
    p = plan_memory(cfg, seq_len=1024, micro_batch_size=1)
    lin = 80 * (8192 * 8192 * 2 + 1024 * 8192 * 2 + 3 * 8192 * 28672)
    assert p.terms["weights_4bit"] == pytest.approx(lin * 4.127 / 8, rel=1e-3)
    lora = 80 * 64 * (2 * (8192 + 8192) + 2 * (1024 + 8192) + 3 * (8192 + 28672))
    assert lora == pytest.approx(828e6, rel=0.01)  # DESIGN.md: 828M trainable params
    assert p.terms["lora_params"] == lora * 4 and p.terms["lora_grads"] == lora * 4
    assert p.terms["checkpoints"] == 80 * 1024 * 8192 * 2  # 16.8 MB per layer per 1024-token sequence
    assert p.total == pytest.approx(sum(p.terms.values()))
    assert 35 * GiB < p.total < 80 * GiB


def test_scaling_and_switches():
    cfg = LlamaConfig.from_name("llama2-7b")
    p1 = plan_memory(cfg, micro_batch_size=1)
    p4 = plan_memory(cfg, micro_batch_size=4)
    assert p4.terms["checkpoints"] == 4 * p1.terms["checkpoints"]
    assert p4.terms["weights_4bit"] == p1.terms["weights_4bit"]
    assert plan_memory(cfg, offload_checkpoints=True).terms["checkpoints"] == 0
    assert plan_memory(cfg, paged=False).terms["optimizer"] == p1.terms["lora_params"] * 2
    largest = 64 * 11008  # lora_B of gate/up (11008 x 64) or lora_A of down_proj: fp32 m and v decoded in 8-bit mode
    assert plan_memory(cfg, paged=False, optim_bits=8).terms["optimizer"] == p1.terms["lora_params"] / 2 + 8 * largest
    assert plan_memory(cfg, double_quant=False).terms["weights_4bit"] > p1.terms["weights_4bit"]


def test_fits_and_largest_micro_batch():
    cfg = LlamaConfig.from_name("llama2-70b")
    p = plan_memory(cfg, gpu_memory="80GiB")
    assert p.fits and p.max_micro_batch >= 1
    assert plan_memory(cfg, micro_batch_size=p.max_micro_batch, gpu_memory="80GiB").fits
    assert not plan_memory(cfg, micro_batch_size=p.max_micro_batch + 1, gpu_memory="80GiB").fits
    assert not plan_memory(cfg, gpu_memory="24GiB").fits


def test_parse_size_and_bad_input():
    assert parse_size("80GiB") == 80 * GiB and parse_size("80GB") == 80e9 and parse_size(24) == 24 * GiB
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("lots")
    with pytest.raises(ValueError, match="micro_batch_size"):
        plan_memory(LlamaConfig.from_name("tiny"), micro_batch_size=0)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        plan_memory(LlamaConfig.from_name("tiny"), targets=("qkv",))


def test_cli_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama2-70b", "--gpu-memory", "80GiB", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fits: yes" in text and "weights_4bit" in text
    assert json.loads(out.read_text())["fits"] is True
    assert main(["plan", "--model", "llama2-70b", "--gpu-memory", "24GiB"]) == 3
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", "--model", "llama9-1t"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qlora70: error:") and "llama9-1t" in err and "Traceback" not in err


# ---- the terms added for the GPU (hand-computed on the tiny config) -------------------------------------------------
# tiny: hidden 64, ffn 176, 2 layers, 4 heads x 16, 2 kv heads -> q (64, 64), k/v (32, 64), o (64, 64),
# gate/up (176, 64), down (64, 176). LoRA r=8 on all 7: 8 x (128 + 96 + 96 + 128 + 240 + 240 + 240) = 9344 params
# per layer, 18688 in all.
TINY_LORA = 2 * 8 * (128 + 96 + 96 + 128 + 240 + 240 + 240)


def tiny_plan(**kw):
    return plan_memory(LlamaConfig.from_name("tiny"), seq_len=16, micro_batch_size=2, lora_r=8, **kw)


def test_lora_bf16_copies_term():
    assert TINY_LORA == 18688
    p = tiny_plan()
    assert p.terms["lora_params"] == TINY_LORA * 4
    assert p.terms["lora_bf16"] == TINY_LORA * 2  # autocast's bf16 copy of every LoRA weight
    assert tiny_plan(compute_dtype="fp32").terms["lora_bf16"] == 0  # no autocast, no copies
    p70 = plan_memory(LlamaConfig.from_name("llama2-70b"))
    assert 1.4 * GiB < p70.terms["lora_bf16"] < 1.6 * GiB  # the "about 1.5 GiB at 70B r=64"


def test_lora_dropout_term():
    # one recomputed layer: a dropped copy of each adapted linear's input (B x T x in) in bf16 + its bool mask
    dropped = 2 * 16 * (64 * 6 + 176)
    assert tiny_plan().terms["lora_dropout"] == dropped * (2 + 1) == 53760
    assert tiny_plan(lora_dropout=0.0).terms["lora_dropout"] == 0
    assert tiny_plan(gradient_checkpointing=False).terms["lora_dropout"] == 2 * 53760  # every layer live
    with pytest.raises(ValueError, match="lora_dropout"):
        tiny_plan(lora_dropout=1.0)


def test_context_slack_and_what_total_predicts():
    p = tiny_plan()
    assert p.terms["cuda_context"] == CUDA_CONTEXT == 0.5 * GiB
    rest = sum(v for k, v in p.terms.items() if k not in ("allocator_slack", "cuda_context"))
    assert p.terms["allocator_slack"] == pytest.approx(ALLOCATOR_SLACK * rest)
    assert p.total == pytest.approx(sum(p.terms.values()))
    assert "max_memory_reserved + CUDA context" in p.table()


def test_optimizer_placement_terms_and_choice():
    dev = tiny_plan(paged=False)
    assert dev.terms["optimizer"] == TINY_LORA * 8 and dev.settings["optim_placement"] == "device"
    off = tiny_plan(optim_offload=True)
    assert off.terms["optimizer"] == 2 * (8 * 176) * 8  # current + prefetched tensor (largest: 8 x 176)
    assert off.settings["optim_placement"] == "offload"
    assert tiny_plan(paged=False, optim_bits=8).terms["optimizer"] == TINY_LORA * 2 + 8 * (8 * 176)
    assert tiny_plan().settings["optim_placement"] == "device"  # auto without a GPU size: assumed to fit
    # auto at 70B: on the GPU with 80 GiB; offloaded (and then fitting) when the states would not fit
    cfg = LlamaConfig.from_name("llama2-70b")
    p80 = plan_memory(cfg, gpu_memory="80GiB")
    assert p80.settings["optim_placement"] == "device" and p80.terms["optimizer"] == pytest.approx(6.17 * GiB, rel=1e-3)
    p48 = plan_memory(cfg, gpu_memory="48GiB")
    assert p48.settings["optim_placement"] == "offload" and p48.fits
    assert p48.terms["optimizer"] == 2 * (64 * 28672) * 8  # two lora_B of gate_proj-sized states
    assert not plan_memory(cfg, gpu_memory="48GiB", paged=False).fits  # forcing the states on the GPU does not fit
    assert "optimizer states: offload" in p48.table()


def test_dora_term():
    # tiny: per layer the 7 adapted outputs sum to 64 + 32 + 32 + 64 + 176 + 176 + 64 = 608 features
    outs = 608
    persistent = 2 * outs * (4 + 4 + 8 + 4)  # magnitude, its grad, AdamW m + v, cached ||W||^2 rows; 2 layers
    live = 2 * 16 * outs * (4 + 2)  # one recomputed layer: fp32 combine + bf16 base output on the dropped input
    assert tiny_plan().terms["dora"] == 0
    assert tiny_plan(use_dora=True).terms["dora"] == persistent + live == 141056
    assert tiny_plan(use_dora=True, lora_dropout=0.0).terms["dora"] == persistent + 2 * 16 * outs * 4
    assert tiny_plan(use_dora=True, gradient_checkpointing=False).terms["dora"] == persistent + 2 * live
    assert tiny_plan(use_dora=True).total > tiny_plan().total


def test_lora_fp32_sums_term():
    # tiny: q 128, k 32 (2 KV heads x 16... as its config), gate/up 240 outputs; one live layer, B x T = 32 tokens
    from qlora70.planner import _KEPT_OUTPUTS

    cfg = LlamaConfig.from_name("tiny")
    outs = {"q_proj": cfg.num_attention_heads * cfg.head_dim, "k_proj": cfg.num_key_value_heads * cfg.head_dim,
            "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
    assert set(outs) == set(_KEPT_OUTPUTS)
    assert tiny_plan().terms["lora_fp32_sums"] == 2 * 16 * sum(outs.values()) * (4 - 2)
    assert tiny_plan(compute_dtype="fp32").terms["lora_fp32_sums"] == 0
    assert tiny_plan(gradient_checkpointing=False).terms["lora_fp32_sums"] == \
        cfg.num_hidden_layers * tiny_plan().terms["lora_fp32_sums"]
    p70 = plan_memory(LlamaConfig.from_name("llama2-70b"))
    assert p70.terms["lora_fp32_sums"] == 1024 * (8192 + 1024 + 2 * 28672) * 2  # 136 MB at seq 1024
