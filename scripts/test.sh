#!/usr/bin/env bash
# Install deltackpt with its test extras into .venv (CPU torch first) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# the framework and object-store extras too, so their tests run instead of skipping
VENV_EXTRAS=dev,report,lightning,hf,s3 . scripts/venv.sh
.venv/bin/python -m ruff check deltackpt tests benchmarks
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
