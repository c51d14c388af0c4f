#!/usr/bin/env bash
# Set up a virtual environment with every dependency and run the whole test suite.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install -q --upgrade pip
# The CPU wheel first, pinned: an unpinned torch would resolve to a multi-GB CUDA build.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
python -m pytest -q -p no:cacheprovider "$@"
