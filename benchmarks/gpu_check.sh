#!/usr/bin/env bash
# The GPU checks of qlora70 in ONE device command of at most 540 s, the most valuable step first. On the H200 lease
# (15 minutes of device time in all, machine start included; see /work/.library/device/README.md) the exact call is:
#
#     python benchmarks/prepare_gpu_wheels.py      # here, once: gguf + bitsandbytes wheels into the ignored .whl/
#     bash benchmarks/gpu_check.sh --dry-run       # here: plan, limits, imports, wheel install, importability
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=580)
#
# 580 s = the steps' limits (540 s) + 40 s for the kill grace and the closing lines; the lease has no room for a rerun,
# so every step writes its figures as it finishes: a kill loses only the running step.
#
# Steps (name, limit in s, what it measures):
#   preflight       40  GPU / versions / pip list; installs .whl/*.whl offline into /tmp/q70site (pip --no-index
#                       --find-links); makes qlora70 and qlora70.kernels importable (the repo is not pip-installed
#                       there and qlora70/kernels -> ../kernels is git-ignored, so it does not travel: a symlink is
#                       made and a shim folder holding only `qlora70` goes on PYTHONPATH, so the repo's top-level
#                       kernels/ never shadows the `kernels` package bitsandbytes looks for); imports what each step
#                       needs and skips only the steps whose needs are missing
#   kernel_tests    90  bf16 / fp16 / fp32 kernel correctness compiled on the GPU (tests/test_kernels.py incl. >2^31
#                       elements and the model-level `auto` backend test; tests/test_optim.py's CUDA placement tests)
#   fit_70b        140  one Llama-2-70B-shaped QLoRA step (r=64, seq 1024, micro-batch 1): fits?, peak allocated /
#                       reserved, CUDA context, tokens/s, the optimizer placement chosen, and the planner's
#                       prediction of peak reserved + context beside the measured figure
#   bench_kernels  110  dequant bandwidth vs a same-bytes copy and bitsandbytes, fused vs dequant+cuBLAS crossover
#                       (recommended FUSED_MAX_M), bf16 correctness of every timed kernel (no config sweep: --no-tune)
#   train_step_7b  120  the Llama-2-7B step, qlora70 vs transformers + PEFT + bitsandbytes (tokens/s, GPU memory)
#   fsdp_nccl       40  FSDP2 on NCCL, 1 rank under "$PY" -m torch.distributed.run, equal to the single-process step
#
# Files in $OUT (default benchmarks/out/gpu; at most 8 come back): gpu_check.log (everything, in order), summary.txt
# (the figures, one block per step, appended as each step ends), bench_kernels.json/.png, fit_70b.json,
# train_step_7b.json, fsdp_check.json. Paste figures into benchmarks/RESULTS.md (card, date, command, figure).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
# $PYTHON, else the project's .venv (where `make venv` put torch), else python3 (the GPU machine's own)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
OUT="${OUT:-$REPO/benchmarks/out/gpu}"
SITE=/tmp/q70site          # the carried wheels, installed there
SHIM=/tmp/q70shim          # holds only a `qlora70` link: what goes on PYTHONPATH
WHEELS="$REPO/.whl"
BUDGET=540
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

STEPS="preflight:40 kernel_tests:90 fit_70b:140 bench_kernels:110 train_step_7b:120 fsdp_nccl:40"
# what each step imports (checked by the preflight; "cuda" / "nccl" are checked only on a GPU machine)
NEEDS_kernel_tests="torch triton pytest qlora70 qlora70.kernels.nf4_kernels cuda"
NEEDS_fit_70b="torch qlora70.model qlora70.layers qlora70.lora qlora70.optim qlora70.planner tqdm cuda"
NEEDS_bench_kernels="torch triton qlora70.kernels.nf4_kernels matplotlib cuda"
NEEDS_train_step_7b="torch qlora70.checkpoint transformers peft accelerate bitsandbytes safetensors cuda"
NEEDS_fsdp_nccl="torch torch.distributed.fsdp qlora70.distributed cuda nccl"

HELP=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rm -rf "$HELP"' EXIT

# ---- Python helpers (written to $HELP; --dry-run compiles each) -------------------------------------------------------
cat >"$HELP/imports.py" <<'PYEOF'
"""imports.py [--strict] STEP=MOD,MOD ... -> one line per step: 'STEP ok' or 'STEP missing: a, b'. Without --strict
(the dry run) a missing GPU is 'unchecked here'; with it (the real run) a step that needs CUDA / NCCL is skipped."""
import importlib, sys
strict = sys.argv[1:2] == ["--strict"]
has_cuda = None
try:
    import torch
    has_cuda = torch.cuda.is_available()
except Exception:
    pass
seen = {}
def ok(mod):
    if mod not in seen:
        if mod == "cuda":
            seen[mod] = bool(has_cuda) if has_cuda is not None else False
        elif mod == "nccl":
            try:
                import torch.distributed as dist
                seen[mod] = bool(has_cuda) and dist.is_available() and dist.is_nccl_available()
            except Exception as e:  # no torch at all: "missing", not a traceback
                seen[mod] = f"{type(e).__name__}: {e}"[:160]
        else:
            try:
                importlib.import_module(mod)
                seen[mod] = True
            except Exception as e:  # any failure at import is "missing", with its reason
                seen[mod] = f"{type(e).__name__}: {e}"[:160]
    return seen[mod]
for arg in sys.argv[1 + strict:]:
    step, mods = arg.split("=", 1)
    bad, unchecked = [], []
    for m in mods.split(","):
        r = ok(m)
        if r is True:
            continue
        if m in ("cuda", "nccl") and not has_cuda and not strict:
            unchecked.append(m)
        else:
            bad.append(m if r is False else f"{m} ({r})")
    print(f"{step} " + (f"missing: {', '.join(bad)}" if bad else "ok" + (f" (unchecked here: {', '.join(unchecked)})"
                                                                          if unchecked else "")))
PYEOF

cat >"$HELP/fit70b.py" <<'PYEOF'
"""fit70b.py OUT_JSON: bench_train_step.fit_70b (reused, not forked) + CUDA context + the planner's prediction."""
import importlib.util, json, logging, os, sys, types
import torch
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # PagedAdamW logs its placement
spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join("benchmarks", "bench_train_step.py"))
bts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bts)
from qlora70.config import LlamaConfig
from qlora70.planner import GiB, plan_memory
name = os.environ.get("GPU_CHECK_FIT_MODEL", "llama2-70b")  # "tiny" + GPU_CHECK_FIT_DEVICE=cpu: a plumbing test
device = os.environ.get("GPU_CHECK_FIT_DEVICE", "cuda")
seq = 1024 if name == "llama2-70b" else 64
res = bts.fit_70b(types.SimpleNamespace(batch=1, seq=seq, steps=3), name=name, device=device)
if device == "cuda":
    free, total = torch.cuda.mem_get_info()
    ctx = (total - free) - torch.cuda.memory_reserved()  # driver memory outside the caching allocator (this process)
else:
    free, total, ctx = 0, 80 * 2 ** 30, 0
    res.update(max_allocated_gb=0.0, max_reserved_gb=0.0, fits_80gb=None)
cfg = LlamaConfig.from_name(name)
plan = plan_memory(cfg, seq_len=seq, micro_batch_size=1, lora_r=64, lora_dropout=0.1, gpu_memory=total / GiB)
p80 = plan_memory(cfg, seq_len=seq, micro_batch_size=1, lora_r=64, lora_dropout=0.1, gpu_memory=80)
measured = res["max_reserved_gb"] + ctx / GiB
res.update(cuda_context_gb=ctx / GiB, measured_peak_reserved_plus_context_gb=measured,
           planned_total_gb=plan.total / GiB, planned_over_measured=plan.total / GiB / measured if measured else None,
           planned_terms_gb={k: v / GiB for k, v in plan.terms.items()}, planned_placement=plan.settings["optim_placement"],
           planned_fits_80gib=p80.fits, planned_total_80gib_gb=p80.total / GiB, gpu_total_gb=total / GiB)
print(plan.table())
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(res, f, indent=1, default=str)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
PYEOF

cat >"$HELP/summary.py" <<'PYEOF'
"""summary.py STEP OUT RC SECONDS: the step's figures, appended to OUT/summary.txt (read from its JSON / the log)."""
import json, os, re, sys
step, out, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lines = [f"## {step}: rc={rc}{' (TIMEOUT)' if rc in (124, 137) else ''} in {secs}s"]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
log = open(os.path.join(out, "gpu_check.log"), errors="replace").read()
section = log[log.rfind(f"=== {step} "):]
try:
    if step == "kernel_tests":
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", section, re.M)
        lines.append(f"pytest: {m[-1] if m else 'no summary line'}")
        lines += [ln for ln in section.splitlines() if ln.startswith(("FAILED", "ERROR"))][:20]
    elif step == "fit_70b" and (r := load("fit_70b.json")):
        f = lambda k: f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "-"
        lines += [f"tokens/s {f('tokens_per_s')}; steps s {[round(s, 2) for s in r['step_s']]}; losses {r['losses']}",
                  f"max allocated {f('max_allocated_gb')} GiB, max reserved {f('max_reserved_gb')} GiB, CUDA context "
                  f"{f('cuda_context_gb')} GiB -> measured peak reserved + context "
                  f"{f('measured_peak_reserved_plus_context_gb')} GiB",
                  f"planner: {f('planned_total_gb')} GiB (placement {r['planned_placement']}), planned/measured "
                  f"{f('planned_over_measured')}; fits 80 GiB: measured {r.get('fits_80gb')}, planned "
                  f"{r['planned_fits_80gib']} ({f('planned_total_80gib_gb')} GiB)"]
        lines += [ln for ln in section.splitlines() if "PagedAdamW placement" in ln]
    elif step == "bench_kernels" and (r := load("bench_kernels.json")):
        checks = r.get("checks", [])
        lines.append(f"correctness checks ok: {sum(c['ok'] for c in checks)}/{len(checks)}")
        lines += [f"  FAILED {c}" for c in checks if not c["ok"]][:10]
        for row in r["rows"]:
            if row["kind"] == "dequant":
                lines.append(f"dequant {row['name']:<13} {row['method']:<20} {row['ms']:.4f} ms {row['gbps']:.0f} GB/s")
        c = r.get("crossover", {})
        lines.append(f"recommended FUSED_MAX_M = {c.get('recommended_FUSED_MAX_M')}; first M where buffer wins: "
                     f"{c.get('first_M_where_buffer_wins')}")
        lines += [f"target {'OK  ' if t['ok'] else 'MISS'} {t['target']} {t['name']} M={t.get('M', '-')} "
                  f"value={t['value']}" for t in r.get("targets", [])]
    elif step == "train_step_7b":
        r = load("train_step_7b.json")
        for run in (r or {}).get("runs", []):
            if "error" in run:
                lines.append(f"{run['framework']}: ERROR {run['error'].splitlines()[-1][:200]}")
            else:
                lines.append(f"{run['framework']}: {run['tokens_per_s']:.1f} tokens/s, max alloc "
                             f"{run.get('max_allocated_gb', 0):.2f} GiB, reserved {run.get('max_reserved_gb', 0):.2f} "
                             f"GiB, first loss {run['losses'][0]:.4f}")
        if r and "speedup" in r:
            lines.append(f"speedup ours/peers {r['speedup']:.2f}, GPU memory ratio {r.get('gpu_mem_ratio', 0):.2f}")
        if not r:  # killed: the per-framework lines bench_train_step printed as each finished
            lines += [ln for ln in section.splitlines() if re.match(r"^(ours|peers|ours-keep): ", ln)]
    elif step == "fsdp_nccl":
        js = [ln for ln in section.splitlines() if ln.startswith("{")]
        if js:
            with open(os.path.join(out, "fsdp_check.json"), "w") as fh:
                fh.write(js[-1] + "\n")
            lines.append(js[-1][:600])
    else:
        lines += section.splitlines()[1:40]
except Exception as e:  # a summary must never hide the raw log
    lines.append(f"(summary failed: {type(e).__name__}: {e}; see gpu_check.log)")
with open(os.path.join(out, "summary.txt"), "a") as fh:
    fh.write("\n".join(lines) + "\n\n")
print("\n".join(lines))
PYEOF

# ---- plumbing ----------------------------------------------------------------------------------------------------------
limit_of() { local s; for s in $STEPS; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}"; done; }

ensure_importable() {  # ensure_importable REPO_DIR: qlora70 + qlora70.kernels importable without installing
    local root=$1
    [ -e "$root/qlora70/kernels" ] || ln -s ../kernels "$root/qlora70/kernels"
    mkdir -p "$SHIM"
    ln -sfn "$root/qlora70" "$SHIM/qlora70"
    export PYTHONPATH="$SHIM:$SITE"
}

install_wheels() {  # install_wheels TARGET: the carried wheels, offline, into TARGET
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS (run benchmarks/prepare_gpu_wheels.py)"; return 1; }
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$1" bitsandbytes gguf
}

import_checks() {  # import_checks [--strict]
    local args="${1:-}" s n v
    for s in $STEPS; do
        n=${s%%:*}
        [ "$n" = preflight ] && continue
        v="NEEDS_$n"
        args="$args $n=$(echo ${!v} | tr ' ' ',')"
    done
    "$PY" "$HELP/imports.py" $args
}

step() {  # step NAME CMD...: run under its limit, log everything, append its figures to summary.txt
    local name=$1 limit t0 rc
    shift
    limit=$(limit_of "$name")
    if [ -n "${SKIP[$name]:-}" ]; then
        echo "=== $name: SKIPPED (${SKIP[$name]})" | tee -a "$LOG"
        printf '## %s: SKIPPED (%s)\n\n' "$name" "${SKIP[$name]}" >>"$OUT/summary.txt"
        return
    fi
    t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
    "$PY" "$HELP/summary.py" "$name" "$OUT" "$rc" "$((SECONDS - t0))" || true
}

declare -A SKIP

# ---- --dry-run (CPU): the plan, the limits, the helpers, the imports, the wheels, the importability approach -----------
if [ $DRY = 1 ]; then
    fail=0
    total=0
    echo "plan (step: limit s):"
    for s in $STEPS; do
        n=${s%%:*}; l=${s##*:}; total=$((total + l)); v="NEEDS_$n"
        printf '  %-14s %4ss  needs: %s\n' "$n" "$l" "${!v:-nvidia-smi, pip, the wheels}"
    done
    if [ $total -le $BUDGET ]; then
        echo "limits sum to ${total}s <= ${BUDGET}s: ok"
    else
        echo "limits sum to ${total}s > ${BUDGET}s: FAIL"; fail=1
    fi
    for f in "$HELP"/*.py; do
        if "$PY" -m py_compile "$f"; then echo "helper $(basename "$f") compiles: ok"; else fail=1; fi
    done
    for f in benchmarks/bench_kernels.py benchmarks/bench_train_step.py examples/fsdp_check.py; do
        "$PY" "$f" --help >/dev/null 2>&1 && echo "$f --help: ok" || { echo "$f --help: FAIL"; fail=1; }
    done
    "$PY" - <<'PYEOF' || fail=1
import subprocess, sys
h = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--help"], capture_output=True, text=True).stdout
t = subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--help"], capture_output=True, text=True).stdout
need = {"bench_kernels": (h, ["--quick", "--no-tune", "--no-bnb", "--out"]),
        "bench_train_step": (t, ["--gpu", "--frameworks", "--steps", "--out"])}
bad = [f"{k} {f}" for k, (txt, flags) in need.items() for f in flags if f not in txt]
print("flags used by the steps exist: " + ("ok" if not bad else f"FAIL, missing {bad}"))
sys.exit(1 if bad else 0)
PYEOF
    # the device machine gets a copy of what travels (tracked + untracked-not-ignored files + carry), not this checkout
    scratch=$(mktemp -d /tmp/gpu_check_copy.XXXXXX)
    git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$scratch" 2>/dev/null
    SHIM="$scratch.shim"; SITE="$scratch.site"
    bytes=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
    wbytes=$(cat "$WHEELS"/*.whl 2>/dev/null | wc -c)
    mib=$(( (bytes + wbytes) / 1048576 ))
    if [ $mib -lt 64 ]; then
        echo "travelling tree ${mib} MiB (wheels $((wbytes / 1048576)) MiB) < 64 MiB: ok"
    else
        echo "travelling tree ${mib} MiB >= 64 MiB: FAIL"; fail=1
    fi
    if install_wheels "$SITE"; then
        echo "offline wheel install (pip --no-index --find-links $WHEELS --target): ok"
    else
        echo "offline wheel install: FAIL"; fail=1
    fi
    # from the copy's root (python -m pytest: cwd first on sys.path) and from elsewhere (python benchmarks/x.py: the shim)
    for where in "$scratch" /; do
        ( set -o pipefail; cd "$scratch" && ensure_importable "$scratch" && cd "$where" && \
          TRITON_INTERPRET=1 "$PY" -c "import os, qlora70, qlora70.kernels.nf4_kernels as k, gguf, bitsandbytes; \
assert os.path.realpath(k.__file__).startswith('$scratch'), k.__file__; print('cwd $where: qlora70 from', \
qlora70.__file__, '| qlora70.kernels from', k.__file__, '| gguf from', os.path.dirname(gguf.__file__), '| bitsandbytes', \
bitsandbytes.__version__)" 2>&1 | grep -v "kernels-community\|get_kernel" ) || { echo "importability from $where: FAIL"; fail=1; }
    done
    echo "imports per step (this machine):"
    ( cd "$scratch" && ensure_importable "$scratch" && TRITON_INTERPRET=1 import_checks 2>&1 \
      | grep -v "kernels-community\|get_kernel" | sed 's/^/  /' )
    rm -rf "$scratch" "$SHIM" "$SITE"
    [ $fail = 0 ] && echo "dry run: ok" || echo "dry run: FAILED"
    exit $fail
fi

# ---- the run -----------------------------------------------------------------------------------------------------------
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET QLORA70_BACKEND

preflight() {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|peft|accelerate|bitsandbytes|gguf|numpy|\
safetensors|sentencepiece|tokenizers|pytest) "
    install_wheels "$SITE" && echo "wheels installed into $SITE"
    ensure_importable "$REPO"
    echo "PYTHONPATH=$PYTHONPATH"
    import_checks --strict | tee "$HELP/needs.txt"
}
t0=$SECONDS
echo "=== preflight (limit $(limit_of preflight)s)" | tee -a "$LOG"
ensure_importable "$REPO"  # in this shell too (preflight's exports stay in its subshell under timeout)
export -f preflight install_wheels ensure_importable import_checks
export PY REPO SITE SHIM WHEELS HELP STEPS $(compgen -v NEEDS_)
timeout --kill-after=5 "$(limit_of preflight)" bash -c preflight >>"$LOG" 2>&1
echo "=== preflight: rc=$? in $((SECONDS - t0))s" | tee -a "$LOG"
"$PY" "$HELP/summary.py" preflight "$OUT" 0 "$((SECONDS - t0))" >/dev/null || true
if [ -s "$HELP/needs.txt" ]; then
    while read -r name status; do
        [ "$status" = ok ] || [[ "$status" == ok\ * ]] || SKIP[$name]="$status"
    done <"$HELP/needs.txt"
else
    for s in $STEPS; do [ "${s%%:*}" = preflight ] || SKIP[${s%%:*}]="the preflight did not finish"; done
fi
cat "$HELP/needs.txt" 2>/dev/null

step kernel_tests "$PY" -m pytest -q -rs -p no:cacheprovider --maxfail=25 tests/test_kernels.py tests/test_optim.py \
    -k "not benchmark"
step fit_70b "$PY" "$HELP/fit70b.py" "$OUT/fit_70b.json"
BNB_FLAG=""
"$PY" -c "import bitsandbytes" >/dev/null 2>&1 || BNB_FLAG="--no-bnb"
step bench_kernels "$PY" benchmarks/bench_kernels.py --quick --no-tune $BNB_FLAG --out "$OUT/bench_kernels"
step train_step_7b "$PY" benchmarks/bench_train_step.py --gpu --frameworks ours,peers --steps 3 \
    --out "$OUT/train_step_7b.json"
step fsdp_nccl "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 examples/fsdp_check.py
echo "done in $((SECONDS))s; files in $OUT" | tee -a "$LOG"
echo
cat "$OUT/summary.txt"
