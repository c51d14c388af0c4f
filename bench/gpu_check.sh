#!/usr/bin/env bash
# The GPU check: on a lent H100/H200 (no network, torch and triton preinstalled), in under
# 8 minutes, run the GPU tests, the kernel and end-to-end benchmarks, and a short training run of
# each backend; write results and a report under $OUT (or the directory given as $1).
#
#   bash scripts/prepare_gpu_data.sh              # on the CPU machine first: token data, carried along
#   PYTHONPATH=. bash bench/gpu_check.sh [OUT_DIR]
#
# Each section has its own time limit (120 + 110 + 100 + 2 x 40 + 45 s, plus a few seconds for the
# device query and the report: under 8 minutes in the worst case; the first section's processes
# run side by side under one limit), and benchmark rows are written
# as they are measured, so a section cut short loses only its own remaining rows. At most 8 files
# come back from a device run: logs.txt, gpu_tests.txt (the GPU tests' full output),
# results/<one file>.json (BENCH_RESULTS_APPEND makes the three benchmark sessions share it),
# train_metrics.jsonl, report/REPORT.md and its 3 PNGs.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/gpu_out}}
mkdir -p "$OUT/results" "$OUT/report"
LOG="$OUT/logs.txt"
export PYTHONPATH=${PYTHONPATH:-.}:.
export PYTHONUNBUFFERED=1
export BENCH_RESULTS_DIR="$OUT/results"
export BENCH_RESULTS_APPEND=1  # the three benchmark sessions below fill one results file
export BENCH_QUICK=1
export BENCH_PRESETS=${BENCH_PRESETS:-tinystories,gpt2-small}
GPU_DATA=${GPU_DATA:-.gpu_data}
start=$(date +%s)
# Pure-Python wheels carried in $GPU_DATA/wheels (Liger-Kernel, for its numbers beside ours): a wheel
# is a zip, so unpacking it onto the path installs it without pip or network.
if compgen -G "$GPU_DATA/wheels/*.whl" > /dev/null; then
    for w in "$GPU_DATA"/wheels/*.whl; do
        python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" /tmp/fastlm_site
    done
    export PYTHONPATH=/tmp/fastlm_site:$PYTHONPATH
fi
section() { echo; echo "=== $1 ($(( $(date +%s) - start )) s) ==="; }
bench() {  # pytest-benchmark, quiet table
    python -m pytest -q -p no:cacheprovider bench --benchmark-only --benchmark-disable-gc --benchmark-columns=median "$@" 2>&1 \
        | grep -vE "^(test_|-{10,}|Name |Legend|  Outliers|  OPS)" | tail -40
}
{
section "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tail -1
git rev-parse HEAD 2>/dev/null || true

section "GPU tests (4 processes) beside the kernel warm-up (2 processes)"
# Compiling the kernels' autotuned configs is CPU work done one config at a time per process: the
# tests run as 4 round-robin shards and bench.warm compiles the benchmark shapes into Triton's disk
# cache meanwhile, so the benchmark sections below spend their time measuring.
shards=$(mktemp -d)
python -m pytest -q --collect-only -p no:cacheprovider -m gpu tests 2>/dev/null | grep '::' > "$shards/ids"
in_shard() { timeout 120 "$@"; }
for i in 0 1 2 3; do
    mapfile -t ids < <(awk -v i="$i" 'NR % 4 == i' "$shards/ids")
    # -v: each test's line is printed when it starts, so a shard cut off at its limit still shows
    # which tests finished and which one was running.
    [ "${#ids[@]}" -gt 0 ] && in_shard python -m pytest -v --tb=short -rfE -p no:cacheprovider "${ids[@]}" > "$shards/tests_$i.log" 2>&1 &
done
for i in 0 1; do
    in_shard python -m bench.warm --shard "$i" --shards 2 > "$shards/warm_$i.log" 2>&1 &
done
wait
echo "$(wc -l < "$shards/ids") GPU tests:"
for f in "$shards"/tests_*.log; do
    [ -e "$f" ] || continue
    grep -E " (PASSED|FAILED|ERROR|SKIPPED)" "$f" | sed -E 's/ +\[ *[0-9]+%\]$//'
    grep -qE "^=+ .* in [0-9.]+s" "$f" \
        || echo "$(basename "$f" .log): cut off at its limit while running: $(grep -E '^tests/.*::' "$f" | grep -vE ' (PASSED|FAILED|ERROR|SKIPPED)' | tail -1)"
done
grep -hE "^E  " "$shards"/tests_*.log 2>/dev/null | head -30
echo "warm-up:"; cat "$shards"/warm_*.log | tail -24
# The full logs (tracebacks) come back as one file beside logs.txt.
cat "$shards"/tests_*.log "$shards"/warm_*.log > "$OUT/gpu_tests.txt" 2>/dev/null

section "kernel benchmarks: ours, torch eager, PyTorch built-ins, Liger"
BENCH_BACKENDS=ours,torch,builtin,liger timeout 110 bash -c "$(declare -f bench); bench -k test_kernel"

section "end-to-end benchmarks"
export BENCH_E2E=${BENCH_E2E:-tinystories:torch:0,tinystories:triton:0,gpt2-small:triton:0,tinystories:torch:1,tinystories:triton:1,tinystories:triton:reduce-overhead}  # most important first
timeout 100 bash -c "$(declare -f bench); bench -k 'train_step or largest_batch'"

section "training runs"
if [ -f "$GPU_DATA/train.bin" ]; then
    for k in torch triton; do
        timeout -k 5 35 python -m train --preset tinystories --kernels "$k" --train-data "$GPU_DATA/train.bin" \
            --valid-data "$GPU_DATA/valid.bin" --tokenizer "$GPU_DATA/tokenizer" --max-steps 200 \
            --lr-decay-iters 200 --warmup-iters 20 --log-interval 50 --eval-interval 100 --eval-batches 5 \
            --out-dir /tmp/gpu_runs --run-name "ts-$k" --resume never --quiet --sample-tokens 48 --num-samples 1 2>&1 | tail -3
        [ -f "/tmp/gpu_runs/ts-$k/metrics.jsonl" ] && python -c "import json, sys
for line in open(sys.argv[2]): print(json.dumps({'run': sys.argv[1], **json.loads(line)}))" "ts-$k" "/tmp/gpu_runs/ts-$k/metrics.jsonl" >> "$OUT/train_metrics.jsonl"
        head -c 400 "/tmp/gpu_runs/ts-$k/samples.txt" 2>/dev/null; echo
    done
else
    echo "no token data at $GPU_DATA (run scripts/prepare_gpu_data.sh and carry it); training runs skipped"
fi

section "kernel benchmarks: torch.compile baselines"
BENCH_BACKENDS=compile timeout 45 bash -c "$(declare -f bench); bench -k test_kernel"

section "report"
python -m bench.report "$OUT/results" --out "$OUT/report" --runs /tmp/gpu_runs/ts-torch /tmp/gpu_runs/ts-triton 2>&1 | tail -3
section "done"
} 2>&1 | tee "$LOG"
