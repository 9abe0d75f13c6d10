#!/usr/bin/env bash
# Every GPU-only check of issues 4, 5, 7 and 8 in one run, sized for a 15-minute device lease (about 9 minutes of
# steps, each with its own time limit, so one hang cannot eat the lease). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh              # results in $OUT (the device tool's folder) or benchmarks/out/gpu
#
# Writes at most 8 files: gpu_check.log (everything, in order) and the JSON of each benchmark. Paste the figures into
# benchmarks/RESULTS.md (card, date, command, figure) and FUSED_MAX_M / configs into kernels/nf4_kernels.py.
# Needs the machine's own torch + triton (CUDA); installs qlora70 itself with --no-deps (nothing is downloaded).
set -u
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
: >"$LOG"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >>"$LOG" 2>&1

step install 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step kernel_tests 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_native.py
step bench_kernels 200 "$PY" benchmarks/bench_kernels.py --quick --no-bnb --out "$OUT/bench_kernels.json"
step bench_nf4 60 "$PY" benchmarks/bench_nf4.py --device cuda --quick --skip torchao --out "$OUT/bench_nf4.json"
step train_step_7b 150 "$PY" benchmarks/bench_train_step.py --gpu --frameworks ours,ours-keep --steps 3 \
    --out "$OUT/train_step_7b.json"
step fit_70b 150 "$PY" benchmarks/bench_train_step.py --70b-fit --out "$OUT/fit_70b.json"
step plan_70b 30 "$PY" -m qlora70.cli plan --model llama2-70b --gpu-memory 80GiB --seq-len 1024 --micro-batch-size 1
step fsdp_nccl 90 torchrun --nproc_per_node 1 examples/fsdp_check.py
echo "done; files in $OUT" | tee -a "$LOG"
