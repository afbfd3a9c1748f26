# Sourced by test.sh and demo.sh: create .venv and install torch's CPU wheel, then
# deltackpt with the extras given as "$VENV_EXTRAS" (e.g. "dev").
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the CPU wheel of torch first: a bare "torch" requirement may pull a multi-GB CUDA build.
# TORCH_INDEX_URL overrides where it comes from; otherwise PyTorch's CPU index when it is
# reachable, else whatever pip is configured with (a machine without internet access
# offers a local CPU wheel through its pip configuration).
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
if [ -z "$TORCH_INDEX_URL" ] && .venv/bin/python - <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=5)
except Exception:
    sys.exit(1)
PYEOF
then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
fi
if [ -n "$TORCH_INDEX_URL" ]; then
    .venv/bin/python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[$VENV_EXTRAS]"
