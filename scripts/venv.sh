# Sourced by scripts/test.sh and scripts/train.sh: create (once) and activate .venv in the repo root.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
