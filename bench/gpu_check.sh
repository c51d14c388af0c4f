#!/usr/bin/env bash
# The GPU check: on a lent H100/H200 (no network, torch and triton preinstalled), in well under
# 8 minutes, run the GPU tests, the kernel and end-to-end benchmarks, and a short training run of
# each backend; write results and a report under $OUT (or the directory given as $1).
#
#   PYTHONPATH=. bash bench/gpu_check.sh [OUT_DIR]
#
# Token data for the training runs: $GPU_DATA (default .gpu_data, made by scripts/prepare_gpu_data.sh
# and carried to the device machine); without it the training runs are skipped.
# At most 8 files come back from a device run, so logs are concatenated into one file.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/gpu_out}}
mkdir -p "$OUT/results" "$OUT/report"
LOG="$OUT/logs.txt"
export PYTHONPATH=${PYTHONPATH:-.}:.
export PYTHONUNBUFFERED=1
export BENCH_RESULTS_DIR="$OUT/results"
export BENCH_QUICK=1
export BENCH_PRESETS=${BENCH_PRESETS:-tinystories,gpt2-small}
GPU_DATA=${GPU_DATA:-.gpu_data}
start=$(date +%s)
section() { echo; echo "=== $1 ($(( $(date +%s) - start )) s) ==="; }
{
section "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
git rev-parse HEAD 2>/dev/null || true

section "GPU tests"
timeout 150 python -m pytest -q -x -p no:cacheprovider -m gpu tests 2>&1 | tail -40

section "kernel and end-to-end benchmarks"
# End-to-end cases kept to the ones that answer the goals within the time limit.
export BENCH_E2E=${BENCH_E2E:-tinystories:torch:0,tinystories:torch:1,tinystories:triton:0,tinystories:triton:1,gpt2-small:triton:0}
timeout 270 python -m pytest -q -p no:cacheprovider bench --benchmark-only --benchmark-disable-gc \
    -k "not tokenizer" --benchmark-columns=median 2>&1 | grep -vE "^(test_|-{10,}|Name|Legend|  Outliers|  OPS)" | tail -60

section "training runs"
if [ -f "$GPU_DATA/train.bin" ]; then
    for k in torch triton; do
        timeout 60 python -m train --preset tinystories --kernels "$k" --train-data "$GPU_DATA/train.bin" \
            --valid-data "$GPU_DATA/valid.bin" --tokenizer "$GPU_DATA/tokenizer" --max-steps 300 \
            --lr-decay-iters 300 --log-interval 50 --eval-interval 150 --eval-batches 5 \
            --out-dir /tmp/gpu_runs --run-name "ts-$k" --resume never --quiet --sample-tokens 64 2>&1 | tail -5
        cat /tmp/gpu_runs/ts-$k/metrics.jsonl >> "$OUT/train_metrics.jsonl" 2>/dev/null
        head -c 600 /tmp/gpu_runs/ts-$k/samples.txt 2>/dev/null
    done
else
    echo "no token data at $GPU_DATA (run scripts/prepare_gpu_data.sh and carry it); training runs skipped"
fi

section "report"
python -m bench.report "$OUT/results" --out "$OUT/report" 2>&1 | tail -3
section "done"
} 2>&1 | tee "$LOG"
