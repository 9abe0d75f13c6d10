"""The `qlora70` command: train, eval, quantize, merge, generate, export-gguf, plan.

Each command is a pair: `add_<cmd>_parser(sub)` (its flags and examples) and `cmd_<cmd>(args)` (what it does).
Errors are one clear line on stderr and a non-zero exit (add `--debug` for the traceback). Heavy modules (torch,
the loaders) are imported inside the commands, after the flags are validated, so a bad flag fails in well under a
second.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from .recipe import add_model_args, add_train_args, check_out_dir, run_config_from_args

EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130
# = qlora70.gguf_io.GGUF_QTYPES (kept literal so building the parser imports nothing heavy; tests check they agree)
GGUF_EXPORT_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K_S", "Q4_K_M",
                      "Q5_K_S", "Q5_K_M", "Q4_K", "Q5_K")


class CLIError(Exception):
    """An error whose message is the whole story (printed without a traceback)."""


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=110)


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def _need_path(p: str, what: str) -> None:
    if not os.path.exists(p):
        raise CLIError(f"{what} {p!r} does not exist")


def _load(a: argparse.Namespace, adapter: str | None, quantize: str | None, device: str | None = None):
    """The model named by --model (+ adapter) through `qlora70.checkpoint.load_pretrained`."""
    from .checkpoint import load_pretrained

    return load_pretrained(a.model, adapter, quantize=quantize, device=device or a.device)


def _command(sub, name: str, fn, help_: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_, epilog=_examples(examples), formatter_class=_formatter)
    p.set_defaults(fn=fn)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


# ---- train -----------------------------------------------------------------------------------------------------
def add_train_parser(sub) -> None:
    p = _command(sub, "train", cmd_train, "QLoRA-train a Llama model on medical QA data (writes a PEFT adapter)", """
        qlora70 train --model ./Llama-2-7b-hf --data data/medical_meadow --out runs/7b --max-steps 200
        qlora70 train --model llama.gguf --data train.jsonl --out runs/x --epochs 5 --batch-size 32 --lr 2e-4
        qlora70 train --model ./Llama-2-7b-hf --data meadow/ --out runs/x --eval medqa,pubmedqa   # or --eval none
        qlora70 train --model ./Llama-2-70b-hf --data meadow/ --out runs/sm70 --resume""")
    add_train_args(p)


def cmd_train(a) -> int:
    if not a.data:
        raise CLIError("no training data: pass --data PATH (repeatable; a JSON/JSONL file or a directory)")
    if not a.out:
        raise CLIError("no run directory: pass --out DIR")
    cfg = run_config_from_args(a, a.out)  # every value validated before anything is loaded
    for p in a.data:
        _need_path(p, "--data")
    from .run import train_from_args

    train_from_args(cfg, a.data, a.resume)
    return 0


# ---- eval ------------------------------------------------------------------------------------------------------
def add_eval_parser(sub) -> None:
    p = _command(sub, "eval", cmd_eval, "Evaluate a model (optionally with an adapter) on MedQA / PubMedQA / USMLE / MCQ",
                 """
        qlora70 eval --model ./Llama-2-7b-hf --task medqa --data data/medqa/US_4options_test_200.jsonl --limit 100
        qlora70 eval --model m.gguf --adapter runs/x --task pubmedqa --data data/pubmedqa --out rep/
        qlora70 eval --model m.gguf --task pubmedqa --data data/pubmedqa --split all   # all 1,000 labelled, on purpose
        qlora70 eval --model m.gguf --task usmle --data data/usmle
        qlora70 eval --compare runs/a/eval/medqa_after_predictions.jsonl runs/b/eval/medqa_after_predictions.jsonl
        qlora70 eval --compare runs/demo          # one run directory: its before vs its after, every task
        qlora70 eval --model m.gguf --task medqa --data test.jsonl --target-accuracy 0.8 --out rep/
        qlora70 eval --model m.gguf --task medqa --data test.jsonl --k-shot 3 --fewshot-data dev.jsonl --shot-seeds 5""")
    add_model_args(p)
    p.add_argument("--adapter", help="PEFT adapter directory to apply")
    p.add_argument("--task", choices=["medqa", "pubmedqa", "usmle", "mcq"], help="required unless --compare")
    p.add_argument("--data", help="the task's native file or directory (required unless --compare)")
    p.add_argument("--split", help="PubMedQA: a split file whose PMIDs to score, or `all` to score every labelled "
                   "item of ori_pqal.json (training, dev and test mixed); default: the test split named by "
                   "test_ground_truth.json beside ori_pqal.json (required for a directory)")
    p.add_argument("--mode", default="letter", choices=["letter", "option", "option_norm", "generate"],
                   help="letter log-likelihood (lm-eval), full-option log-likelihood, or generation (medAlpaca)")
    p.add_argument("--limit", type=int, help="score a seeded random sample of N items (never the first N)")
    p.add_argument("--k-shot", type=int, default=0)
    p.add_argument("--fewshot-data", help="dev split for k-shot examples")
    p.add_argument("--prompt-format", help="named prompt format (default: lm-eval's for the task)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--out", help="write eval_<task>.json/.md and per-item predictions here (a directory)")
    p.add_argument("--no-quantize", action="store_true", help="evaluate the full-precision weights")
    p.add_argument("--compare", nargs="+", metavar="PATH",
                   help="paired comparison, no model needed: two *_predictions.jsonl files (A = before, B = after), "
                        "two run directories (A's after vs B's after, per task), or one run directory (its before "
                        "vs its after): flip table, McNemar exact test, paired bootstrap 95%% interval, verdict")
    p.add_argument("--intersect", action="store_true", help="with --compare: use only the ids both runs share")
    p.add_argument("--target-accuracy", type=float, metavar="A",
                   help="the confidence threshold reaching accuracy A, chosen on a seeded half of the items and "
                        "reported on the other half")
    p.add_argument("--shot-seeds", type=int, metavar="N",
                   help="with --k-shot K: N independent draws of the K shots (seeds seed..seed+N-1; the --limit "
                        "items stay the same); reports mean / std / min / max accuracy")


def cmd_eval(a) -> int:
    check_out_dir(a.out)
    if a.target_accuracy is not None and not 0 < a.target_accuracy <= 1:
        raise CLIError(f"--target-accuracy must be in (0, 1], got {a.target_accuracy}")
    if a.compare:
        return _eval_compare(a)
    if not a.task or not a.data:
        raise CLIError("qlora70 eval needs --task and --data (or --compare A B to compare two predictions files)")
    if a.shot_seeds is not None and (a.shot_seeds < 1 or not a.k_shot):
        raise CLIError(f"--shot-seeds N needs N >= 1 and --k-shot K >= 1 with --fewshot-data (got --shot-seeds "
                       f"{a.shot_seeds}, --k-shot {a.k_shot})")
    if a.split is not None and a.task != "pubmedqa":
        raise CLIError(f"--split applies to --task pubmedqa only (got --task {a.task})")
    _need_path(a.model, "--model")
    _need_path(a.data, "--data")
    from .tasks import load_task

    loader_kw = {"split": a.split} if a.split is not None else {}
    load_task(a.task, a.data, **loader_kw)  # a bad data path or split fails here, before the model loads
    from .checkpoint import tokenizer_for
    from .evaluate import evaluate_task

    model = _load(a, a.adapter, None if a.no_quantize else "nf4")
    tok = tokenizer_for(a.model, a.tokenizer)
    kw = dict(mode=a.mode, limit=a.limit, seed=a.seed, k_shot=a.k_shot, fewshot_data=a.fewshot_data,
              batch_size=a.batch_size, max_length=a.max_length, prompt_format=a.prompt_format,
              target_accuracy=a.target_accuracy, **loader_kw)
    if a.shot_seeds:
        print(_eval_shot_seeds(a, model, tok, kw))
        return 0
    rep = evaluate_task(model, tok, a.task, a.data, out_dir=a.out, **kw)
    print(rep.to_markdown())
    return 0


def _eval_shot_seeds(a: argparse.Namespace, model, tok, kw: dict) -> str:
    """`--k-shot K --shot-seeds N`: N shot draws over the same items (the model is loaded once)."""
    from pathlib import Path

    from .evaluate import evaluate_task
    from .io import atomic_write_json, atomic_write_text
    from .metrics_report import shot_robustness, shot_seeds

    seeds = shot_seeds(a.seed, a.shot_seeds)
    reps = [evaluate_task(model, tok, a.task, a.data, shot_seed=s, name=f"{a.task}_shots{s}", **kw) for s in seeds]
    rob = shot_robustness([r.accuracy for r in reps], seeds, a.k_shot)
    md = (f"### {a.task}: {a.k_shot}-shot accuracy over {len(seeds)} independent shot draws "
          f"(same {reps[0].n_scored} items, item seed {a.seed})\n\n" + rob.to_markdown())
    if a.out:
        for r in reps:
            r.save(a.out)
        atomic_write_json(Path(a.out) / f"eval_{a.task}_shot_robustness.json", rob.to_dict())
        atomic_write_text(Path(a.out) / f"eval_{a.task}_shot_robustness.md", md)
    return md


def _compare_inputs(paths: list[str]) -> tuple[dict, dict, tuple[str, str]]:
    """({task: file} for A, {task: file} for B, names) from the --compare arguments."""
    from pathlib import Path

    def runs(d: Path, which: str) -> dict:
        ev = d / "eval" if (d / "eval").is_dir() else d
        return {p.name[: -len(f"_{which}_predictions.jsonl")]: p
                for p in sorted(ev.glob(f"*_{which}_predictions.jsonl"))}

    if len(paths) not in (1, 2):
        raise CLIError(f"--compare takes two predictions files, two run directories or one run directory, got "
                       f"{len(paths)} paths")
    for p in paths:
        _need_path(p, "--compare")
    ps = [Path(p) for p in paths]
    if len(ps) == 1:
        if not ps[0].is_dir():
            raise CLIError(f"--compare {paths[0]}: one argument must be a run directory (eval/<task>_before_ and "
                           "_after_predictions.jsonl); give two predictions files to compare them")
        a, b, names = runs(ps[0], "before"), runs(ps[0], "after"), ("before", "after")
    elif all(p.is_dir() for p in ps):
        a, b, names = runs(ps[0], "after"), runs(ps[1], "after"), (ps[0].name or "A", ps[1].name or "B")
        names = names if names[0] != names[1] else ("A", "B")
    elif any(p.is_dir() for p in ps):
        raise CLIError(f"--compare {paths[0]} {paths[1]}: give two predictions files or two run directories")
    else:
        a, b = {"compare": ps[0]}, {"compare": ps[1]}
        names = tuple(p.name.removesuffix("_predictions.jsonl") for p in ps)
        names = names if names[0] != names[1] else ("A", "B")
    if not set(a) & set(b):
        raise CLIError(f"--compare {' '.join(paths)}: no task has predictions on both sides (found {sorted(a)} "
                       f"and {sorted(b)}; run directories hold eval/<task>_<before|after>_predictions.jsonl)")
    return a, b, names


def _eval_compare(a: argparse.Namespace) -> int:
    """`--compare`: the paired table per task (the same `before_after` section as the run report) + calibration."""
    from pathlib import Path

    from .io import atomic_write_json, atomic_write_text
    from .metrics import read_predictions
    from .metrics_report import before_after

    runs_a, runs_b, names = _compare_inputs(a.compare)
    if a.intersect:  # align the id sets before the section is built (it compares on identical ids)
        from .metrics import align
        for t in set(runs_a) & set(runs_b):
            pa, pb = read_predictions(runs_a[t]), read_predictions(runs_b[t])
            ia, ib = align(pa, pb, intersect=True)
            runs_a[t], runs_b[t] = pa.subset(ia), pb.subset(ib)
    sec = before_after(runs_a, runs_b, plots_dir=a.out, target=a.target_accuracy, seed=a.seed, names=names)
    md = f"## Paired comparison: {names[0]} (A) vs {names[1]} (B)\n\n" + sec.to_markdown(link_dir=a.out)
    if a.out:
        atomic_write_json(Path(a.out) / "compare.json", sec.to_dict())
        atomic_write_text(Path(a.out) / "compare.md", md)
    print(md)
    return 0


# ---- quantize --------------------------------------------------------------------------------------------------
def add_quantize_parser(sub) -> None:
    p = _command(sub, "quantize", cmd_quantize, "Quantize an HF/GGUF Llama to NF4+DQ in the bitsandbytes checkpoint "
                 "layout", """
        qlora70 quantize --model ./Llama-2-7b-hf --out ./Llama-2-7b-nf4""")
    p.add_argument("--model", required=True, help="HF directory or .gguf file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="auto")


def cmd_quantize(a) -> int:
    from .checkpoint import save_quantized

    check_out_dir(a.out)
    _need_path(a.model, "--model")
    save_quantized(_load(a, None, "nf4"), a.out)
    print(f"wrote NF4+DQ checkpoint to {a.out} (bitsandbytes layout; transformers loads it)")
    return 0


# ---- generate --------------------------------------------------------------------------------------------------
def add_generate_parser(sub) -> None:
    p = _command(sub, "generate", cmd_generate, "Generate text from a prompt", """
        qlora70 generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt "The capital of France is"
        qlora70 generate --model ./Llama-2-7b-hf --adapter runs/7b --chat --prompt "What causes gout?" """)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--tokenizer", help="tokenizer file/dir (default: found beside the model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quantize", action="store_true", help="keep the weights in full precision")
    p.add_argument("--device", default="auto")


def cmd_generate(a) -> int:
    from .checkpoint import tokenizer_for
    from .generation import generate

    _need_path(a.model, "--model")
    m = _load(a, a.adapter, None if a.no_quantize else "nf4")
    tok = tokenizer_for(a.model, a.tokenizer)
    prompt = a.prompt
    if a.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    print(generate(m, tok, prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                   stop=a.stop, seed=a.seed))
    return 0


# ---- merge -----------------------------------------------------------------------------------------------------
def add_merge_parser(sub) -> None:
    p = _command(sub, "merge", cmd_merge, "Merge a LoRA adapter into the base and save a standard HF checkpoint", """
        qlora70 merge --model ./Llama-2-7b-hf --adapter runs/7b --out ./merged
        qlora70 merge --model ./Llama-2-7b-hf --adapter runs/7b --out ./merged-nf4 --quantize""")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--out", required=True)
    p.add_argument("--quantize", action="store_true", help="re-quantize the merged weights to NF4 (explicit only)")
    p.add_argument("--from-full-precision", action="store_true",
                   help="merge into the full-precision base weights instead of the NF4-dequantized ones")
    p.add_argument("--device", default="cpu")


def cmd_merge(a) -> int:
    from .checkpoint import save_merged

    check_out_dir(a.out)
    _need_path(a.model, "--model")
    _need_path(a.adapter, "--adapter")
    m = _load(a, a.adapter, None if a.from_full_precision else "nf4")
    save_merged(m, a.out, format="bnb4" if a.quantize else "hf", inplace=True)
    print(f"wrote merged checkpoint to {a.out}" + (" (re-quantized to NF4)" if a.quantize else ""))
    return 0


# ---- export-gguf -----------------------------------------------------------------------------------------------
def add_export_gguf_parser(sub) -> None:
    p = _command(sub, "export-gguf", cmd_export_gguf, "Export a (merged) model as a llama.cpp GGUF file", """
        qlora70 export-gguf --model ./Llama-2-7b-hf --adapter runs/7b --out model-f16.gguf
        qlora70 export-gguf --model ./merged --out model-q8.gguf --qtype Q8_0
        qlora70 export-gguf --model ./Llama-2-7b-hf --adapter runs/7b --qtype Q4_K_M --out sm70-q4km.gguf \\
            --license llama2 --training-data data/medical_meadow/train.jsonl""")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--qtype", type=str.upper, choices=GGUF_EXPORT_QTYPES, default="F16",
                   help="tensor types as llama-quantize composes them (Q4_K_M: Q4_K with Q6_K attn_v/ffn_down in "
                        "some layers; Q4_K / Q5_K: one type throughout)")
    p.add_argument("--pure", action="store_true", help="one type for every weight (no mixture rules)")
    p.add_argument("--from-full-precision", action="store_true",
                   help="merge the adapter onto the full-precision base weights instead of the NF4-dequantized ones "
                        "it was trained against (the default, as in `qlora70 merge`)")
    p.add_argument("--name", help="general.name (default: the model's name)")
    p.add_argument("--base-model",
                   help="base model name for the metadata (default: the adapter's base_model_name_or_path)")
    p.add_argument("--license", help="general.license, e.g. llama2")
    p.add_argument("--training-data", action="append", metavar="FILE",
                   help="training data file recorded with its sha256 (repeatable; default: the train_paths of the "
                        "adapter's run_config.json when it is a qlora70 run directory)")


def cmd_export_gguf(a) -> int:
    from .checkpoint import export_gguf, tokenizer_for

    _need_path(a.model, "--model")
    if a.from_full_precision and not a.adapter:
        raise CLIError("--from-full-precision chooses the base an adapter is merged onto; it needs --adapter")
    if a.tokenizer is not None:  # asked for by name: an error, never a file without a vocabulary
        _need_path(a.tokenizer, "--tokenizer")
        tok = tokenizer_for(a.model, a.tokenizer)
    else:
        tok = None
        try:
            tok = tokenizer_for(a.model, None)
        except (FileNotFoundError, ValueError) as e:
            print(f"note: no tokenizer embedded ({e})", file=sys.stderr)
    prov = _provenance(a)  # hashes the adapter and training files (a bad --training-data fails before the load);
    # general.name: --name, else export_gguf's default, the model's name
    # the adapter is merged onto the base it was trained against (NF4-dequantized), as `qlora70 merge` does
    m = _load(a, a.adapter, "nf4" if a.adapter and not a.from_full_precision else None, device="cpu")
    export_gguf(m, a.out, tokenizer=tok, qtype=a.qtype, pure=a.pure, provenance=prov)
    merged = "" if not a.adapter else (" (adapter merged onto the " +
                                       ("full-precision" if a.from_full_precision else "NF4-dequantized") + " base)")
    print(f"wrote {a.out} ({a.qtype}){merged}")
    return 0


def _provenance(a):
    """gguf_io.Provenance from the export-gguf flags: adapter and training files are hashed (sha256)."""
    import json

    from .gguf_io import Provenance
    from .io import file_sha256
    from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    base, sha = os.path.basename(os.path.normpath(a.model)), None
    if a.adapter:
        weights = os.path.join(a.adapter, ADAPTER_WEIGHTS)
        sha = file_sha256(weights) if os.path.isfile(weights) else None
        cfg = os.path.join(a.adapter, ADAPTER_CONFIG)
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path") or base
    paths = list(a.training_data or [])
    run_cfg = os.path.join(a.adapter or "", "run_config.json")
    if not paths and a.adapter and os.path.isfile(run_cfg):  # a qlora70 run directory records its training files
        with open(run_cfg, encoding="utf-8") as f:
            paths = [p for p in json.load(f).get("train_paths", []) if os.path.isfile(p)]
    data = []
    for p in paths:
        _need_path(p, "--training-data")
        data.append((os.path.abspath(p), file_sha256(p)))
    return Provenance(name=a.name, base_model=a.base_model or base, license=a.license,
                      adapter_path=os.path.abspath(a.adapter) if a.adapter else None, adapter_sha256=sha,
                      training_data=tuple(data))


# ---- plan ------------------------------------------------------------------------------------------------------
def add_plan_parser(sub) -> None:
    p = _command(sub, "plan", cmd_plan, "Predict peak GPU memory of a QLoRA run and whether it fits", """
        qlora70 plan --model llama2-70b --seq-len 1024 --micro-batch-size 1 --gpu-memory 80GiB
        qlora70 plan --model ./Llama-2-13b-hf/config.json --micro-batch-size 4 --gpu-memory 24GiB --offload""")
    p.add_argument("--model", required=True, help="a named size (llama2-7b/13b/70b) or an HF config.json / directory")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-variant", choices=["lora", "dora"], default="lora", help="dora: count DoRA's magnitudes")
    p.add_argument("--gpu-memory", help="e.g. 80GiB; enables the fits / largest-micro-batch answer")
    p.add_argument("--offload", action="store_true", help="offload checkpointed activations to CPU")
    p.add_argument("--optim-bits", type=int, choices=[8, 32], default=32)
    p.add_argument("--no-paged", action="store_true", help="keep optimizer states on the GPU")
    p.add_argument("--optim-offload", action="store_true", help="offload optimizer states to pinned host memory")
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--json", help="also write the plan as JSON here")


def cmd_plan(a) -> int:
    from .config import LlamaConfig
    from .io import atomic_write_json
    from .planner import GiB, plan_memory

    if os.path.exists(a.model):
        cfg = LlamaConfig.from_hf(a.model)
    else:
        try:
            cfg = LlamaConfig.from_name(a.model)
        except ValueError as e:
            raise CLIError(f"--model {a.model!r}: not a file/directory and {e}") from None
    p = plan_memory(cfg, seq_len=a.seq_len, micro_batch_size=a.micro_batch_size, lora_r=a.lora_r,
                    double_quant=not a.no_double_quant, gradient_checkpointing=not a.no_gradient_checkpointing,
                    offload_checkpoints=a.offload, optim_bits=a.optim_bits, paged=not a.no_paged,
                    optim_offload=a.optim_offload, use_dora=a.lora_variant == "dora",
                    gpu_memory=a.gpu_memory)
    print(f"model {cfg.name}: {cfg.num_params() / 1e9:.2f}B params; seq {a.seq_len}, micro-batch {a.micro_batch_size}, "
          f"LoRA r={a.lora_r}")
    print(p.table())
    if a.json:
        atomic_write_json(a.json, p.to_dict(), default=str)
    if p.fits is False:
        print(f"does not fit: predicted {p.total / GiB:.1f} GiB > {p.gpu_memory / GiB:.1f} GiB. Try "
              f"--micro-batch-size {max(1, p.max_micro_batch or 1)}, --offload, --optim-bits 8", file=sys.stderr)
        return 3
    return 0


# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qlora70", formatter_class=_formatter,
                                 description="QLoRA for Llama-2: NF4+DQ, LoRA, medical QA evaluation.",
                                 epilog="run `qlora70 COMMAND --help` for each command's options and examples")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_train_parser, add_eval_parser, add_quantize_parser, add_merge_parser, add_generate_parser,
                add_export_gguf_parser, add_plan_parser):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if argv[:1] == ["train"] and "WORLD_SIZE" not in os.environ:  # --nproc N: re-launch under torchrun
        from .launch import launch, strip_nproc
        try:
            nproc, rest = strip_nproc(argv)
        except ValueError as e:
            print(f"qlora70: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if nproc is not None and nproc > 1:
            return launch(nproc, rest)
    try:
        ap = build_parser()
        a = ap.parse_args(argv)
        if not getattr(a, "fn", None):
            ap.print_help()
            return EXIT_USAGE
        return int(a.fn(a) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except Exception as e:  # one clear line, unless --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, CLIError):
            print(f"qlora70: error: {msg}", file=sys.stderr)
        else:
            print(f"qlora70: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
