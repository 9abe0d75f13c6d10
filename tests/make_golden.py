"""Recompute the golden values the parity tests pin, with the reference libraries (the `[test]` extras) installed.

    TRITON_INTERPRET=1 QLORA70_BACKEND=torch PYTHONPATH=$PWD python tests/make_golden.py [section ...]

Sections: nf4 model lora dora gguf tokenizer checkpoint evaluate (default: all). Prints JSON; copy the values into the
GOLDEN dicts at the top of the test files (each says which section it came from). Not a test module (not collected).
Run it only when an oracle's result is meant to change (a new oracle version, new inputs), and say so in the commit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("QLORA70_BACKEND", "torch")
os.environ.setdefault("QLORA70_CPU_COMPUTE_DTYPE", "fp32")
import torch  # noqa: E402

from conftest import (hf_twin, logit_probe, sha256_json, sha256_tensor, state_fingerprint,  # noqa: E402
                      tensor_fingerprint)

torch.set_num_threads(1)  # as the test session (conftest)


def nf4() -> dict:
    import bitsandbytes.functional as F
    import test_nf4 as T
    out = {"DYNAMIC_MAP_SHA256": sha256_tensor(F.create_dynamic_map(signed=True)), "BNB_GOLDEN": {}}
    for shape in [(5, 7), (33, 129), (300, 257)]:
        for dt in T.DTYPES:
            w = T._rand(shape, dt, seed=hash(shape) % 1000)
            qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            _, sb2 = F.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
            out["BNB_GOLDEN"][f"{shape[0]}x{shape[1]}:{str(dt)[6:]}"] = dict(
                input=tensor_fingerprint(w), offset=float(sb.offset.item()), packed=sha256_tensor(qb),
                nested_absmax=sha256_tensor(sb.state2.absmax), absmax=sha256_tensor(sb2.absmax))
    return out


def model() -> dict:
    import test_model as M
    out = {}
    for tie, theta, kv in M.CASES:
        m = M.random_model(M.tiny(tie_word_embeddings=tie, rope_theta=theta, num_key_value_heads=kv))
        hf = M.hf_twin(m)
        ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref, ref_h = hf(ids).logits, hf(ids, output_hidden_states=True).hidden_states[-1]
        out[str((tie, theta, kv))] = dict(inputs=state_fingerprint(m.state_dict()) + tensor_fingerprint(ids),
                                          logits=logit_probe(ref), hidden=logit_probe(ref_h))
    return {"HF_LOGITS_GOLDEN": out}


def _peft_run(ours, hf, ids, use_dora: bool) -> dict:
    """Our saved adapter read by PEFT: its logits, and the key list PEFT writes itself for the same LoraConfig."""
    import peft
    from safetensors.torch import load_file
    from qlora70.lora import save_adapter
    with tempfile.TemporaryDirectory() as d:
        save_adapter(ours, d)
        sd = load_file(os.path.join(d, "adapter_model.safetensors"))
        with torch.no_grad():
            logits = peft.PeftModel.from_pretrained(hf, d).eval()(input_ids=ids).logits
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], r=4, lora_alpha=8,
                          use_dora=use_dora)
    pm = peft.get_peft_model(hf, cfg)
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        keys = sorted(load_file(os.path.join(d, "adapter_model.safetensors")))
    assert keys == sorted(sd), "our adapter's keys differ from PEFT's: fix the code, not the golden value"
    return dict(inputs=state_fingerprint(sd) + tensor_fingerprint(ids), n_keys=len(keys), keys=sha256_json(keys),
                logits=logit_probe(logits))


def lora() -> dict:
    import test_lora as L
    from qlora70.config import LoRAConfig
    from qlora70.lora import inject_lora
    ours = L.tiny_llama()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj")))
    L.randomize_b(ours)
    return {"PEFT_LORA_GOLDEN": _peft_run(ours.eval(), hf_twin(L.tiny_llama()), L.IDS, False)}


def dora() -> dict:
    import test_dora as D
    from qlora70.config import LoRAConfig
    from qlora70.lora import inject_lora
    out = {}
    for q in (False, True):
        ours = D.tiny_llama(quantize=q)
        inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=D.ALL, use_dora=True))
        D.randomize(ours)
        out[str(q)] = _peft_run(ours.eval(), D.hf_twin(D.dense_twin(D.tiny_llama(quantize=q))), D.IDS, True)
    return {"PEFT_DORA_GOLDEN": out}


def gguf() -> dict:
    import transformers
    import test_gguf as G
    from qlora70.checkpoint import export_gguf
    out = {}
    for tie, qtype in [(False, "F16"), (True, "Q8_0")]:
        m = G.random_model(tie)
        with tempfile.TemporaryDirectory() as d:
            export_gguf(m, os.path.join(d, "m.gguf"), qtype=qtype, progress=False)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf").eval()
            with torch.no_grad():
                logits = hf(G.IDS).logits
        out[str((tie, qtype))] = dict(inputs=state_fingerprint(m.state_dict()), logits=logit_probe(logits))
    res = {"HF_GGUF_GOLDEN": out}
    if G.SMOL:
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(G.SMOL), dtype=torch.float32,
                                                               gguf_file=os.path.basename(G.SMOL)).eval()
        with torch.no_grad():
            b = hf(torch.tensor(G.SMOLLM2_IDS)).logits
        res["HF_SMOLLM2_GOLDEN"] = dict(size=os.path.getsize(G.SMOL), argmax=b[0].argmax(-1).tolist(),
                                        logits=logit_probe(b))
    return res


def tokenizer() -> dict:
    import gguf as gguf_pkg
    import regex
    import tokenizers as tk
    import transformers
    import test_tokenizer as T
    texts = T.fuzz_texts(400, seed=1) + T.TEXTS
    res = {"REGEX_TEXTS_SHA256": sha256_json(texts), "REGEX_GOLDEN": {}}
    for pattern in T.REGEX_GOLDEN:
        split = tk.pre_tokenizers.Split(tk.Regex(pattern), "isolated")
        res["REGEX_GOLDEN"][pattern] = (sha256_json([regex.compile(pattern).findall(t) for t in texts]),
                                        sha256_json([[s for s, _ in split.pre_tokenize_str(t)] for t in texts]))
    if T.SMOL_GGUF is not None:
        r = gguf_pkg.GGUFReader(str(T.SMOL_GGUF), "r")
        tokens, types = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.token_type"].contents()
        merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
        ref = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges))  # as the `smol` fixture
        ref.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
        ref.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
        texts = T._golden_smol_texts()
        ids = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
        res["SMOLLM2_REF_GOLDEN"] = dict(texts=sha256_json(texts), n_tokens=sum(map(len, ids)), ids=sha256_json(ids))
        hf = transformers.AutoTokenizer.from_pretrained(str(T.SMOL_GGUF.parent), gguf_file=T.SMOL_GGUF.name)
        same = [t for t in texts if not any(c.isnumeric() and not c.isascii() for c in t)
                and not re.search(r"\s\s\d", t)]
        ids = [hf.encode(t, add_special_tokens=False) for t in same]
        res["SMOLLM2_HF_GOLDEN"] = dict(texts=sha256_json(same), n_tokens=sum(map(len, ids)), ids=sha256_json(ids),
                                        pieces=sha256_json(hf.convert_ids_to_tokens(list(range(0, 49152, 97)))))
    llama2 = T.LLAMA2_MODEL if T.LLAMA2_MODEL.is_file() else Path("/work/shared/data/llama2_tokenizer/tokenizer.model")
    if llama2.is_file():
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(llama2, Path(d) / "tokenizer.model")
            ref = transformers.LlamaTokenizer.from_pretrained(d, legacy=True)
            texts = T._llama2_golden_texts()
            ids = [ref.encode(t, add_special_tokens=False) for t in texts]
        res["LLAMA2_HF_GOLDEN"] = dict(texts=sha256_json(texts), n_tokens=sum(map(len, ids)), ids=sha256_json(ids))
    return res


def checkpoint() -> dict:
    import transformers
    import test_checkpoint_golden as G
    from qlora70.checkpoint import load_model, save_hf, save_quantized
    out = {}
    for tie in (False, True):
        m = G.seeded_model(tie)
        with tempfile.TemporaryDirectory() as d:
            dense = save_hf(m, os.path.join(d, "dense"), dtype=torch.float32, progress=False)
            cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
            transformers.AutoModelForCausalLM.from_pretrained(dense, quantization_config=cfg, dtype=torch.float32,
                                                              device_map="cpu").save_pretrained(os.path.join(d, "bnb"))
            sd = G.read_dir(os.path.join(d, "bnb"))
            layout = [[k, str(sd[k].dtype).removeprefix("torch."), list(sd[k].shape)] for k in sorted(sd)]
            ours = save_quantized(load_model(dense, quantize="nf4", progress=False), os.path.join(d, "q4"),
                                  progress=False)
            tq = transformers.AutoModelForCausalLM.from_pretrained(ours, device_map="cpu").eval()
            for mod in tq.modules():  # bitsandbytes' plain dequantize + matmul path (see test_checkpoint)
                if hasattr(mod, "support_avx512bf16_for_cpu"):
                    mod.support_avx512bf16_for_cpu = False
            with torch.no_grad():
                logits = tq(G.IDS).logits
        out[str(tie)] = dict(inputs=state_fingerprint(m.state_dict()), n_keys=len(layout), layout=sha256_json(layout),
                             bytes=G.checkpoint_bytes_sha256(sd), logits=logit_probe(logits))
    return {"BNB_CHECKPOINT_GOLDEN": out}


def evaluate() -> dict:
    import test_evaluate as T
    from qlora70 import evaluate as E
    tok = T.train_tokenizer()
    m = T.seeded_llama(tok)
    hf = hf_twin(m)
    fmt_of = lambda it: E.FORMATS["lm-eval-pubmedqa" if it.context else "lm-eval-mcq"]  # noqa: E731
    pairs = [(fmt_of(it).render(it), " " + lab) for it in T.golden_items() for lab in it.labels]
    return {"HF_LOGLIK_GOLDEN": dict(inputs=state_fingerprint(m.state_dict()),
                                     encoded=sha256_json([tok.encode(p + c) for p, c in pairs])),
            "HF_LOGLIK_REFS": [round(T.reference_loglik(hf, tok, p, c), 6) for p, c in pairs]}


SECTIONS = {f.__name__: f for f in (nf4, model, lora, dora, gguf, tokenizer, checkpoint, evaluate)}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; known: {list(SECTIONS)}")
    print(json.dumps({n: SECTIONS[n]() for n in names}, indent=1, ensure_ascii=False))
