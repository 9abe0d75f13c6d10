"""Memory planner: terms add up, scale as their formulas say, and the CLI answers fits / largest micro-batch."""
import json

import pytest

from qlora70 import LlamaConfig
from qlora70.cli import main
from qlora70.planner import GiB, parse_size, plan_memory


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
    assert plan_memory(cfg, paged=False, optim_bits=8).terms["optimizer"] == p1.terms["lora_params"] / 2
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
