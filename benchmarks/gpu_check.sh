#!/usr/bin/env bash
# GPU check (benchmarks/gpu_check.py): the gradient-engine benchmark (on a GPU its full
# mode, --full --batch 256: resnet50 at 224x224 added; GPU_CHECK_BATCH=512 and
# GPU_CHECK_PRECISION=tf32|bf16 change it; on the CPU --quick) and one
# resnet18 training epoch on synthetic data, once in one process and once under
# torch.distributed.run (DDP, NCCL), with the machine's own python3 and PYTHONPATH=src:
# no virtualenv, no dataset, no network; only torch, numpy, scipy, scikit-learn and
# safetensors. Falls back to the CPU (and a small epoch) without a GPU.
#
#   bash benchmarks/gpu_check.sh                # writes $OUT/gpu_check.json, else benchmarks/results/gpu_check.json
#   GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh   # 10 x 50 images instead of 10 x 1000
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch (set PYTHON=... to a python that can)" >&2
    exit 2
fi
exec "$PY" benchmarks/gpu_check.py "$@"
