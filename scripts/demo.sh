#!/usr/bin/env bash
# Install deltackpt with the example extras into .venv (CPU torch first), fine-tune the
# pretrained all-MiniLM-L6-v2 checkpointing into ./demo-store, then show what it stored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the CPU wheel of torch first: a bare "torch" requirement may pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[bench]"
STORE=${STORE:-demo-store}
export HF_HUB_OFFLINE=1
.venv/bin/python examples/finetune_minilm.py --store "$STORE" --steps "${STEPS:-150}" --save-every "${SAVE_EVERY:-25}"
echo; echo "\$ deltackpt log $STORE";   .venv/bin/deltackpt log "$STORE"
echo; echo "\$ deltackpt stats $STORE"; .venv/bin/deltackpt stats "$STORE"
echo; echo "\$ deltackpt verify $STORE"; .venv/bin/deltackpt verify "$STORE"
