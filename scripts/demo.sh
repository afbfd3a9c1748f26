#!/usr/bin/env bash
# Install deltackpt with the example extras into .venv (CPU torch first), fine-tune the
# pretrained all-MiniLM-L6-v2 checkpointing into ./demo-store, then show what it stored.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_EXTRAS=bench . scripts/venv.sh
STORE=${STORE:-demo-store}
export HF_HUB_OFFLINE=1
.venv/bin/python examples/finetune_minilm.py --store "$STORE" --steps "${STEPS:-150}" --save-every "${SAVE_EVERY:-10}" --keep-last "${KEEP_LAST:-20}"
echo; echo "\$ deltackpt log $STORE";   .venv/bin/deltackpt log "$STORE"
echo; echo "\$ deltackpt stats $STORE"; .venv/bin/deltackpt stats "$STORE"
echo; echo "\$ deltackpt verify $STORE"; .venv/bin/deltackpt verify "$STORE"
