"""GGUF export of fine-tunes: `export-gguf --adapter` merges onto the NF4-dequantized base the adapter was trained
against (as `qlora70 merge`), the exported logits equal the trained model's, llama-quantize's tensor-type mixtures,
the chat/provenance metadata read back with gguf's GGUFReader, and llama.cpp itself on the files (when
llama-cpp-python is installed)."""
import json
import os

import numpy as np
import pytest
import torch

from qlora70 import gguf_io, gguf_kquants
from qlora70.tokenizer import gguf_meta
from qlora70.checkpoint import export_gguf, load_model, save_hf
from qlora70.cli import GGUF_EXPORT_QTYPES, main
from qlora70.config import LlamaConfig, LoRAConfig
from qlora70.lora import inject_lora, lora_modules, save_adapter
from qlora70.model import Llama

gguf = pytest.importorskip("gguf")


def tiny_hf_dir(tmp_path, hidden=256, inter=512, layers=2, vocab=160, seed=0) -> str:
    """A random tiny Llama saved as an HF checkpoint (fp32). Weight std 0.03: larger random weights make the net
    chaotic (it amplifies any weight noise several-fold, unlike a trained model)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0)
    m = Llama(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(1.0 if "norm" in n else 0.0, 0.05 if "norm" in n else 0.03)
    d = str(tmp_path / "base")
    save_hf(m, d, dtype=torch.float32, progress=False)
    return d


def trained_adapter(base_dir, out_dir, seed=1):
    """(NF4 base + adapter model, adapter dir): LoRA with random B (a 'trained' adapter), saved in PEFT format."""
    m = load_model(base_dir, quantize="nf4", progress=False)
    inject_lora(m, LoRAConfig(r=8, alpha=16, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.05)
    m.eval()
    save_adapter(m, out_dir, base_model_name_or_path="tiny-base")
    return m, out_dir


def ids(vocab, n=4, t=24, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_export_adapter_merges_onto_the_nf4_base_it_was_trained_against(tmp_path, seed):
    base = tiny_hf_dir(tmp_path, seed=seed)
    trained, adir = trained_adapter(base, str(tmp_path / "adapter"), seed=seed + 1)
    x = ids(trained.config.vocab_size, n=8, t=32, seed=seed)
    with torch.no_grad():
        want = trained(x)
        logits = {}
        for qtype, extra in (("F16", []), ("Q8_0", []), ("F16", ["--from-full-precision"])):
            out = str(tmp_path / f"m-{qtype}{len(extra)}.gguf")
            assert main(["export-gguf", "--model", base, "--adapter", adir, "--out", out, "--qtype", qtype,
                         *extra]) == 0
            md = gguf_io.GGUFFile(out).metadata
            assert md["qlora70.merge_base"] == ("full-precision" if extra else "nf4-dequantized")
            logits[qtype, bool(extra)] = load_model(out, quantize=None, progress=False)(x)
    err_f16 = _rel(logits["F16", False], want)
    err_fp = _rel(logits["F16", True], want)
    assert err_f16 < 2e-3, err_f16  # fp16 storage of the merged weights only
    assert err_fp > 10 * err_f16, (err_fp, err_f16)  # the other merge is a different model
    top1 = (logits["Q8_0", False].argmax(-1) == want.argmax(-1)).float().mean().item()
    assert top1 >= 0.95, top1


def test_export_f16_equals_the_merged_weights_rounded_to_fp16(tmp_path):
    """Tensor-level check of the merge: every exported weight == fp16(dequant(W0) + scale * B @ A)."""
    base = tiny_hf_dir(tmp_path, hidden=64, inter=128, layers=1)
    trained, _ = trained_adapter(base, str(tmp_path / "adapter"))
    p = export_gguf(trained, tmp_path / "m.gguf", qtype="F16", progress=False)
    back = load_model(p, quantize=None, progress=False).state_dict()
    for name, mod in lora_modules(trained):
        want = (mod.base_layer.dequantize(torch.float32) + mod.delta_weight()).half().float()
        assert torch.equal(back[f"{name}.weight"], want), name


def _names(cfg_layers=32, tied=False):
    names = [("token_embd.weight", (32000, 4096))]
    for i in range(cfg_layers):
        for n, shape in (("attn_norm", (4096,)), ("attn_q", (4096, 4096)), ("attn_k", (4096, 4096)),
                         ("attn_v", (4096, 4096)), ("attn_output", (4096, 4096)), ("ffn_gate", (11008, 4096)),
                         ("ffn_up", (11008, 4096)), ("ffn_down", (4096, 11008)), ("ffn_norm", (4096,))):
            names.append((f"blk.{i}.{n}.weight", shape))
    names.append(("output_norm.weight", (4096,)))
    if not tied:
        names.append(("output.weight", (32000, 4096)))
    return names


def test_q4_k_m_mixture_matches_llama_quantize_for_llama2_7b():
    t = gguf_kquants.tensor_types(_names(), "Q4_K_M", 32, 32, 32)
    more = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]  # llama.cpp use_more_bits(i, 32)
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for i in range(32):
        assert t[f"blk.{i}.attn_v.weight"] == t[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert t[f"blk.{i}.attn_q.weight"] == t[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert t[f"blk.{i}.attn_norm.weight"] == "F32"
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    t5 = gguf_kquants.tensor_types(_names(), "Q5_K_M", 32, 32, 32)
    assert t5["blk.6.attn_v.weight"] == "Q6_K" and t5["blk.7.attn_v.weight"] == "Q5_K"
    assert t5["output.weight"] == "Q6_K" and t5["blk.5.ffn_gate.weight"] == "Q5_K"
    pure = gguf_kquants.tensor_types(_names(), "Q4_K", 32, 32, 32)
    assert {v for k, v in pure.items() if not k.endswith("norm.weight")} == {"Q4_K"}
    assert gguf_kquants.tensor_types(_names(), "Q4_0", 32, 32, 32)["output.weight"] == "Q6_K"


def test_70b_attn_v_gets_q5_k_and_smollm2_rows_fall_back():
    names = [(f"blk.{i}.attn_v.weight", (1024, 8192)) for i in range(80)] + [("output.weight", (32000, 8192))]
    t = gguf_kquants.tensor_types(names, "Q4_K_M", 80, 64, 8)
    assert t["blk.11.attn_v.weight"] == "Q5_K" and t["blk.12.attn_v.weight"] == "Q6_K"  # 12 - 80 // 8 = 2 (mod 3)
    # SmolLM2-135M (30 layers): dim 576 is not a multiple of 256 (only ffn_down's 1536 is); tied embeddings
    smol = [("token_embd.weight", (49152, 576))] + [
        (f"blk.{i}.{n}.weight", shape) for i in range(30) for n, shape in
        (("attn_q", (576, 576)), ("attn_v", (192, 576)), ("ffn_up", (1536, 576)), ("ffn_down", (576, 1536)))]
    t = gguf_kquants.tensor_types(smol, "Q4_K_M", 30, 9, 3)
    assert t["token_embd.weight"] == "Q8_0"  # the tied output: Q6_K wanted, rows of 576 -> Q8_0
    for i in range(30):
        more = i < 3 or i >= 26 or (i - 3) % 3 == 2
        assert t[f"blk.{i}.attn_v.weight"] == ("Q8_0" if more else "Q5_0"), i  # Q6_K / Q4_K fall back
        assert t[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if more else "Q4_K"), i
        assert t[f"blk.{i}.attn_q.weight"] == t[f"blk.{i}.ffn_up.weight"] == "Q5_0"
    assert gguf_kquants.tensor_types(smol, "Q5_K_M", 30, 9, 3)["blk.2.ffn_up.weight"] == "Q5_1"
    odd = gguf_kquants.tensor_types([("blk.0.ffn_up.weight", (8, 48))], "Q4_K_M", 1, 1, 1)
    assert odd["blk.0.ffn_up.weight"] == "F16"
    with pytest.raises(ValueError, match="must be one of"):
        gguf_kquants.tensor_types(smol, "Q3_K_M", 30, 9, 3)
    assert GGUF_EXPORT_QTYPES == gguf_io.GGUF_QTYPES


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K", "Q4_K_M", "Q5_K_M", "BF16"])
def test_every_export_type_reads_back_with_gguf_and_our_loader(tmp_path, qtype):
    """The file's tensors, decoded by gguf's reference decoders, == our loader's weights; close to the source."""
    base = tiny_hf_dir(tmp_path, hidden=256, inter=512, layers=2)
    m = load_model(base, quantize=None, progress=False)
    p = export_gguf(m, tmp_path / "m.gguf", qtype=qtype, progress=False)
    r = gguf.GGUFReader(p)
    back = load_model(p, quantize=None, progress=False)
    sd, c = back.state_dict(), back.config
    src = m.state_dict()
    for t in r.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        hf = gguf_io.gguf_to_hf_name(t.name)
        w = torch.from_numpy(np.array(ref, dtype=np.float32))
        if "attn_q" in t.name:
            w = gguf_io.unpermute_qk(w, c.num_attention_heads)
        elif "attn_k" in t.name:
            w = gguf_io.unpermute_qk(w, c.num_key_value_heads)
        assert torch.equal(sd[hf], w), t.name
        assert _rel(sd[hf], src[hf]) < 0.12, (t.name, t.tensor_type.name)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    if qtype == "Q4_K_M":
        # 2 layers: use_more_bits(0, 2) is false, use_more_bits(1, 2) true (1 >= 7 * 2 // 8)
        assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
        assert types["blk.0.attn_v.weight"] == types["blk.0.attn_q.weight"] == "Q4_K"
        assert types["output.weight"] == "Q6_K"
    ftype = gguf_kquants.FTYPES[gguf_kquants.PURE_ALIASES.get(qtype, qtype)][0]
    assert int(r.fields["general.file_type"].contents()) == ftype


def test_metadata_chat_template_stop_tokens_and_provenance(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from qlora70.tokenizer import load_tokenizer
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the patient has a fever and a cough"] * 20, trainer)
    (tmp_path / "tok").mkdir()
    tk.save(str(tmp_path / "tok" / "tokenizer.json"))
    base = tiny_hf_dir(tmp_path, hidden=64, inter=128, layers=1, vocab=300)
    for f in os.listdir(tmp_path / "tok"):
        os.replace(tmp_path / "tok" / f, os.path.join(base, f))
    _, adir = trained_adapter(base, str(tmp_path / "adapter"))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    out = str(tmp_path / "ft.gguf")
    assert main(["export-gguf", "--model", base, "--adapter", adir, "--out", out, "--qtype", "Q8_0", "--name", "sm70",
                 "--license", "llama2", "--training-data", str(data)]) == 0
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.name"] == "sm70" and f["general.license"] == "llama2"
    assert f["general.base_model.0.name"] == "tiny-base" and f["general.base_model.count"] == 1
    assert f["qlora70.merge_base"] == "nf4-dequantized" and f["qlora70.nf4.blocksize"] == 64
    assert f["qlora70.adapter.path"] == os.path.abspath(adir)
    assert f["qlora70.adapter.sha256"] == gguf_io.file_sha256(os.path.join(adir, "adapter_model.safetensors"))
    assert f["qlora70.training_data.files"] == [str(data)] and f["general.dataset.0.name"] == "train.jsonl"
    assert f["qlora70.training_data.sha256"] == [gguf_io.file_sha256(data)]
    tok = load_tokenizer(base)
    assert f["tokenizer.chat_template"] == gguf_meta.CHATML_JINJA
    assert f["tokenizer.ggml.eot_token_id"] == tok.encode("<|im_end|>", bos=False)[0] == 2
    msgs = [{"role": "user", "content": "Is fever a symptom?"}]
    assert load_tokenizer(out).apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_llama2_chat_template_renders_like_the_builtin_format():
    pytest.importorskip("jinja2")
    from qlora70.tokenizer.base import _jinja_template, _render_llama2
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What causes gout?"},
            {"role": "assistant", "content": "Uric acid."}, {"role": "user", "content": "Treatment?"}]
    got = _jinja_template(gguf_meta.LLAMA2_JINJA).render(messages=msgs, bos_token="<s>", eos_token="</s>",
                                                       add_generation_prompt=True)
    assert got == _render_llama2(msgs, "<s>", "</s>")


# ---- llama.cpp itself (llama-cpp-python, optional) -------------------------------------------------------------------
def tiny_model_with_vocab(tmp_path, hidden=256, inter=512, layers=2):
    """(HF dir with a byte-level BPE tokenizer.json, vocab size): llama.cpp refuses files without a vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the patient has a fever, a cough and chest pain since two days"] * 30, trainer)
    vocab = tk.get_vocab_size()
    base = tiny_hf_dir(tmp_path, hidden=hidden, inter=inter, layers=layers, vocab=vocab)
    tk.save(os.path.join(base, "tokenizer.json"))
    return base, vocab


def _llama(path, n_ctx=64):
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False)


def _llama_logits(llm, x):
    out = []
    for row in x.tolist():
        llm.reset()
        llm.eval(row)
        out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    return torch.from_numpy(np.stack(out))


def test_llama_cpp_runs_the_exported_finetune(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional extra)")
    base, vocab = tiny_model_with_vocab(tmp_path)
    trained, adir = trained_adapter(base, str(tmp_path / "adapter"))
    x = ids(vocab, n=3, t=32, seed=5)
    with torch.no_grad():
        want = trained(x)
        for qtype in ("F16", "Q8_0", "Q6_K", "Q4_K_M", "Q5_K_M", "Q4_0"):
            out = tmp_path / f"ft-{qtype}.gguf"
            assert main(["export-gguf", "--model", base, "--adapter", adir, "--out", str(out), "--qtype", qtype]) == 0
            got = _llama_logits(_llama(out), x)
            ours = load_model(out, quantize=None, progress=False)(x)  # the same file through qlora70's decoders
            top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            if qtype == "F16":
                assert _rel(got, want) < 5e-3 and top1 == 1.0, (_rel(got, want), top1)
            elif qtype == "Q8_0":
                assert top1 >= 0.95 and _rel(got, ours) < 3e-2, (top1, _rel(got, ours))  # measured 0.99, 1.3e-2
            else:  # llama.cpp multiplies K-quant weights with 8-bit-quantized activations: looser
                assert _rel(got, ours) < 3e-2, (qtype, _rel(got, ours))  # measured 1.3e-2 .. 1.8e-2


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "Q5_1", "Q8_0"])
def test_llama_quantize_writes_the_same_bytes_as_our_export(tmp_path, qtype):
    """llama.cpp's own quantizer (llama_model_quantize, as `llama-quantize f16.gguf out.gguf TYPE`) on our F16 export
    and our export of the same fp16 weights agree on every tensor's type and bytes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional extra)")
    base, _ = tiny_model_with_vocab(tmp_path, layers=3)
    f16 = str(tmp_path / "f16.gguf")
    assert main(["export-gguf", "--model", base, "--out", f16, "--qtype", "F16"]) == 0
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_kquants.FTYPES[qtype][0]
    params.nthread = 1
    lq = str(tmp_path / "llama-quantize.gguf")
    assert llama_cpp.llama_model_quantize(f16.encode(), lq.encode(), params) == 0
    mine = export_gguf(load_model(f16, quantize=None, progress=False), tmp_path / "ours.gguf", qtype=qtype,
                       tokenizer=f16, progress=False)
    a, b = gguf_io.GGUFFile(lq), gguf_io.GGUFFile(mine)
    assert set(a.tensors) == set(b.tensors)
    for n in a.tensors:
        assert a.tensors[n].type_name == b.tensors[n].type_name, n
        assert torch.equal(a.raw(n), b.raw(n)), (n, a.tensors[n].type_name)


def test_training_files_default_to_the_run_config_of_a_run_directory(tmp_path):
    base = tiny_hf_dir(tmp_path, hidden=64, inter=128, layers=1)
    _, adir = trained_adapter(base, str(tmp_path / "run"))
    data = tmp_path / "meadow.json"
    data.write_text("[]")
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"train_paths": [str(data), str(tmp_path / "gone")]}))
    out = str(tmp_path / "m.gguf")
    assert main(["export-gguf", "--model", base, "--adapter", adir, "--out", out]) == 0
    md = gguf_io.GGUFFile(out).metadata
    assert md["qlora70.training_data.files"] == [str(data)]
    assert md["qlora70.training_data.sha256"] == [gguf_io.file_sha256(data)]
    assert main(["export-gguf", "--model", base, "--from-full-precision", "--out", out]) == 1  # needs --adapter
