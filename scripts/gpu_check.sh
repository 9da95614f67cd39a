#!/usr/bin/env bash
# The GPU check of issue 33, as one device call (see docs/benchmarks.md, "The GPU check"):
#   here:   .venv/bin/python scripts/gpu_wheels.py         # wheels of what the card's machine lacks, into .whl/
#   device: run(carry=[".whl"], timeout_s=600, command="bash scripts/gpu_check.sh")
# Installs the carried wheels beside the machine's own PyTorch, then runs scripts/gpu_check.py within
# a 9-minute budget, writing gpu-check.json and the logs to $OUT (or to ./gpu-check-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
PY="${PYTHON:-python3}"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, diffusers, hydra, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" || exit 1
exec "$PY" scripts/gpu_check.py --out "$OUT" --work /tmp/gpu-check-work --budget-s "${BUDGET_S:-540}" "$@"
