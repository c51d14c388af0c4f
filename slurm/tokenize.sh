#!/usr/bin/env bash
# BPE training and corpus encoding as a CPU job: trains a tokenizer on TRAIN and encodes each file.
#
#   sbatch --cpus-per-task=32 --mem=64G slurm/tokenize.sh OUT_DIR VOCAB_SIZE TRAIN.txt [VALID.txt ...]
#
# Writes OUT_DIR/tokenizer/ and OUT_DIR/<name>.bin (+ .json sidecars) for python -m train --train-data.
#
#SBATCH --job-name=fastlm-tokenize
#SBATCH --output=logs/%x_%j.out
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
OUT=${1:?usage: tokenize.sh OUT_DIR VOCAB_SIZE TRAIN.txt [MORE.txt ...]}
VOCAB=${2:?vocab size}
TRAIN=${3:?training text}
shift 3
. slurm/lib.sh
WORKERS=$(threads_per_process 1)  # the allocation's CPUs
mkdir -p "$OUT"
"$PY" -m tokenizer train --input "$TRAIN" --vocab-size "$VOCAB" --special-token '<|endoftext|>' \
    --out "$OUT/tokenizer" --workers "$WORKERS"
for f in "$TRAIN" "$@"; do
    name=$(basename "${f%.*}")
    "$PY" -m tokenizer encode --tokenizer "$OUT/tokenizer" --input "$f" --out "$OUT/$name.bin" --workers "$WORKERS"
done
