#!/usr/bin/env bash
# The GPU check: on a lent H100/H200 (no network; the box's python3 with torch and triton), inside
# one hard total budget (GPU_CHECK_BUDGET seconds, default 420), measure the ceilings, the kernels,
# end-to-end tokens/s, run the GPU tests and two short training runs, then the compiled variants,
# and write at most 6 files under OUT (logs.txt with a timeline and one summary line per goal,
# summary.json, results/<one>.json, train_metrics.jsonl, REPORT.md, read_later.tar.gz).
#
#   bash scripts/prepare_gpu_data.sh        # on the CPU machine first: token data, carried as .gpu_data
#   bash bench/gpu_check.sh "$OUT"          # on the GPU box
#   python3 -m bench.ingest <fetched OUT>   # back here: bench/results/*.json and bench/NOTES.md
#
# The sections, their shares of the budget and the goals are in bench/gpu_check_sections.py; the
# runner (limits, killing, logs, the file limit) is bench/gpu_check.py.
set -u
cd "$(dirname "$0")/.."
exec python3 -m bench.gpu_check "${1:-${OUT:-bench/gpu_out}}"
