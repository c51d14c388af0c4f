#!/usr/bin/env bash
# Token data for the GPU check's training runs, made here (CPU) so the device's minutes are not
# spent on BPE: the first 20 MB of ../shared/data/novels100.txt (last 1 MB for validation), a
# 10,000-token BPE, uint16 token files. Writes .gpu_data/ (git-ignored; carry it to the device).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/novels100.txt}
mkdir -p .gpu_data
python - "$SRC" <<'PY'
import sys
data = open(sys.argv[1], "rb").read(21 * 2**20)
cut = data.rfind(b"<|endoftext|>", 0, 20 * 2**20)
open(".gpu_data/train.txt", "wb").write(data[:cut])
open(".gpu_data/valid.txt", "wb").write(data[cut:data.rfind(b"\n")])  # whole lines: valid UTF-8
PY
python -m tokenizer train --input .gpu_data/train.txt --vocab-size 10000 --special-token '<|endoftext|>' --out .gpu_data/tokenizer --quiet
python -m tokenizer encode --tokenizer .gpu_data/tokenizer --input .gpu_data/train.txt --out .gpu_data/train.bin --quiet
python -m tokenizer encode --tokenizer .gpu_data/tokenizer --input .gpu_data/valid.txt --out .gpu_data/valid.bin --quiet
rm .gpu_data/train.txt .gpu_data/valid.txt
ls -la .gpu_data
