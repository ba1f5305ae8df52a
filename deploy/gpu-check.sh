#!/usr/bin/env bash
# One prepared GPU check for gamguard, for a machine with an NVIDIA GPU (x86-64 or Jetson):
# builds TensorRT plans for a calibrated bundle on this GPU, checks TensorRT FP32/FP16 and ONNX Runtime
# CUDA against ONNX Runtime FP32 on the CPU (logits, CAM, early features, and whether the calibrated
# false-rejection rate holds on each engine), measures guarded vs logits-only throughput with TensorRT
# FP16 and ONNX Runtime CUDA (checks on the host and in the graph), and prints one table. Finishes in a
# few minutes (hard limit 9 min).
#
#   deploy/gpu-check.sh [--bundle DIR] [--images DIR] [--n-images N] [--json FILE]
#
# Needs: gamguard with TensorRT 10, cuda-python and onnxruntime-gpu (pip install '.[gpu]' plus the
# onnxruntime swap of deploy/README.md, or the gamguard:cuda / gamguard:jetson image), a calibrated
# bundle (default: the embedded demo bundle). PYTHON selects the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /dev/nvhost-ctrl-gpu ]; then
  echo "gpu-check: no NVIDIA GPU visible (no nvidia-smi, not a Jetson)" >&2
  exit 3
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
missing=$("$PY" - <<'PYEOF'
import importlib
need = {"tensorrt": "tensorrt", "cuda-python": "cuda.bindings.runtime", "onnxruntime-gpu": "onnxruntime"}
miss = []
for dist, mod in need.items():
    try:
        importlib.import_module(mod)
    except ImportError:
        if dist == "cuda-python":
            try:
                importlib.import_module("cuda.cudart")
                continue
            except ImportError:
                pass
        miss.append(dist)
print(" ".join(miss))
PYEOF
)
if [ -n "$missing" ]; then
  echo "gpu-check: missing Python packages for $PY: $missing (see deploy/README.md, 'GPU')" >&2
  exit 3
fi
"$PY" -m gamguard.runtime.engines.packaging
exec timeout 540 "$PY" deploy/gpu_check.py "$@"
