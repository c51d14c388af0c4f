#!/usr/bin/env bash
# Set up the virtual environment (as scripts/test.sh does) and run the training command.
#   bash scripts/train.sh --preset smoke --kernels torch --train-text ../shared/data/corpus.en
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
if ! python -c "import torch, triton, numpy, regex, tqdm" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q torch      # a CUDA build on a GPU machine
    else
        python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    fi
    python -m pip install -q -e .
fi
exec python -m train "$@"
