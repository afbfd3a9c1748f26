#!/usr/bin/env bash
# Install deltackpt with its test extras into .venv (CPU torch first) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the CPU wheel of torch first: a bare "torch" requirement may pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m ruff check deltackpt tests benchmarks
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
