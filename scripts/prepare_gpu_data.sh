#!/usr/bin/env bash
# Token data for the GPU check's training runs, made here (CPU) so the device's minutes are not
# spent on BPE: the first 20 MB of ../shared/data/novels100.txt (last 1 MB for validation), a
# 10,000-token BPE, uint16 token files. Also fetches the Liger-Kernel wheel (pure Python; the GPU box
# has no network) so the kernel benchmarks can put its numbers beside ours. Writes .gpu_data/
# (git-ignored; carry it to the device: `carry: [".gpu_data"]`, then `bash bench/gpu_check.sh $OUT`).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/novels100.txt}
mkdir -p .gpu_data
python3 - "$SRC" <<'PY'
import sys
data = open(sys.argv[1], "rb").read(21 * 2**20)
cut = data.rfind(b"<|endoftext|>", 0, 20 * 2**20)
open(".gpu_data/train.txt", "wb").write(data[:cut])
open(".gpu_data/valid.txt", "wb").write(data[cut:data.rfind(b"\n")])  # whole lines: valid UTF-8
PY
python3 -m tokenizer train --input .gpu_data/train.txt --vocab-size 10000 --special-token '<|endoftext|>' --out .gpu_data/tokenizer --quiet
python3 -m tokenizer encode --tokenizer .gpu_data/tokenizer --input .gpu_data/train.txt --out .gpu_data/train.bin --quiet
python3 -m tokenizer encode --tokenizer .gpu_data/tokenizer --input .gpu_data/valid.txt --out .gpu_data/valid.bin --quiet
rm .gpu_data/train.txt .gpu_data/valid.txt
mkdir -p .gpu_data/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d .gpu_data/wheels "liger-kernel==${LIGER_VERSION:-0.8.5}" \
    || echo "Liger-Kernel wheel not fetched (no network?): the benchmarks will run without it"
# The device gets the working tree without .git: the check stamps its results with this commit
# (GPU_CHECK_COMMIT on its command line overrides it, if commits were made since).
git rev-parse HEAD > .gpu_data/commit.txt 2>/dev/null || true
ls -la .gpu_data .gpu_data/wheels
