# Sourced by test.sh and demo.sh: create .venv and install torch's CPU wheel, then
# deltackpt with the extras given as "$VENV_EXTRAS" (e.g. "dev").
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the CPU wheel of torch first: a bare "torch" requirement may pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$VENV_EXTRAS]"
