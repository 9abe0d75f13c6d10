"""LlamaConfig / LoRAConfig: named sizes, HF config.json (transformers 4 and 5 spellings), validation errors."""
import json

import pytest

from qlora70 import LlamaConfig, LoRAConfig


@pytest.mark.parametrize("name,params_b", [("llama2-7b", 6.74), ("llama2-13b", 13.0), ("llama2-70b", 68.98)])
def test_named_sizes(name, params_b):
    c = LlamaConfig.from_name(name)
    assert c.num_params() / 1e9 == pytest.approx(params_b, rel=0.01)
    assert c.head_dim == 128 and c.vocab_size == 32000 and not c.tie_word_embeddings


def test_overrides_and_gqa():
    c = LlamaConfig.from_name("llama2-70b", num_hidden_layers=2)
    assert c.num_hidden_layers == 2 and c.n_rep == 8
    with pytest.raises(ValueError, match="unknown model name"):
        LlamaConfig.from_name("llama2-8b")


def _hf(**kw):
    d = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)
    d.update(kw)
    return d


def test_from_hf_file_and_roundtrip(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_hf(rope_theta=5e5, tie_word_embeddings=True, eos_token_id=[2, 3])))
    c = LlamaConfig.from_hf(tmp_path)
    assert c.rope_theta == 5e5 and c.tie_word_embeddings and c.eos_token_id == 2 and c.num_key_value_heads == 2
    c2 = LlamaConfig.from_hf(c.to_hf())
    assert (c2.hidden_size, c2.num_key_value_heads, c2.rope_theta) == (64, 2, 5e5)


def test_from_hf_transformers5_spelling():
    c = LlamaConfig.from_hf(_hf(rope_parameters={"rope_type": "default", "rope_theta": 123456.0}, dtype="float16"))
    assert c.rope_theta == 123456.0 and c.torch_dtype == "float16"
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf(_hf(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}))


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="not a Llama"):
        LlamaConfig.from_hf(_hf(model_type="gpt2"))
    with pytest.raises(ValueError, match="missing required keys"):
        LlamaConfig.from_hf({"model_type": "llama", "hidden_size": 64})
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf(_hf(rope_scaling={"type": "linear", "factor": 2.0}))


@pytest.mark.parametrize("kw,match", [(dict(hidden_size=0), "hidden_size"), (dict(num_attention_heads=3), "divisible"),
                                      (dict(num_key_value_heads=3), "multiple"), (dict(rms_norm_eps=0), "rms_norm_eps")])
def test_llama_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_name("tiny", **kw)


@pytest.mark.parametrize("kw,match", [(dict(r=0), "r must"), (dict(r=-4), "r must"), (dict(alpha=0), "alpha"),
                                      (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
                                      (dict(targets=()), "targets")])
def test_lora_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kw)


def test_lora_scale():
    assert LoRAConfig(r=64, alpha=16).scale == 0.25
    assert LoRAConfig(r=64, alpha=16, use_rslora=True).scale == 2.0
    assert LoRAConfig(targets="q_proj").targets == ("q_proj",)


def test_run_config_validates_before_loading_and_names_the_field():
    from qlora70.config import TEMPLATE_NAMES, EvalConfig, RunConfig, parse_eval_tasks
    from qlora70.data.templates import TEMPLATES

    assert set(TEMPLATE_NAMES) == set(TEMPLATES)  # the config's names are the data module's templates
    for kw, needle in [(dict(template="alpaca"), "RunConfig.template"), (dict(val_size=1.5), "RunConfig.val_size"),
                       (dict(val_size=-0.1), "RunConfig.val_size"), (dict(device="gpu"), "RunConfig.device")]:
        with pytest.raises(ValueError, match=needle):
            RunConfig(**kw)
    with pytest.raises(ValueError, match="EvalConfig.limit"):
        EvalConfig(limit=0)
    with pytest.raises(ValueError, match="EvalConfig.tasks"):
        EvalConfig(tasks=("medqa", "mmlu"))
    assert parse_eval_tasks(None) is None and parse_eval_tasks("none") == ()
    assert parse_eval_tasks("pubmedqa, medqa,medqa") == ("pubmedqa", "medqa")
    assert RunConfig(val_size=48).flat()["val_size"] == 48


def test_presets_are_run_configs_and_flags_replace_fields():
    import argparse

    from qlora70.config import RunConfig
    from qlora70.recipe import PRESETS, add_train_args, run_config_from_args

    assert all(isinstance(p, RunConfig) for p in PRESETS.values())
    ap = argparse.ArgumentParser()
    add_train_args(ap)
    cfg = run_config_from_args(ap.parse_args(["--preset", "demo", "--lr", "1e-3", "--epochs", "2.5", "--no-paged",
                                              "--eval", "medqa"]), "runs/x")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.paged, cfg.train.max_steps) == (1e-3, 3, False, 30)
    assert cfg.eval.tasks == ("medqa",) and cfg.eval.limit == 100 and cfg.val_size == 48 and cfg.train.out_dir == "runs/x"
    assert PRESETS["demo"].train.lr == 3e-4  # the preset itself is untouched
    with pytest.raises(ValueError, match="TrainConfig.batch_size=10 must be a multiple of micro_batch_size=4"):
        run_config_from_args(ap.parse_args(["--preset", "demo", "--batch-size", "10"]), "runs/x")
