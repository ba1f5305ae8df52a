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
# Needs: gamguard with onnxruntime-gpu, and TensorRT 10 with cuda-python for the TensorRT columns (pip install '.[gpu]' plus the
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
# onnxruntime-gpu is required; TensorRT and cuda-python are not: without them the TensorRT columns are
# left out (said on stderr and in the table) and ONNX Runtime CUDA is checked alone.
missing=$("$PY" - <<'PYEOF'
import importlib
def has(*mods):
    for mod in mods:
        try:
            importlib.import_module(mod)
            return True
        except Exception:  # ImportError, or a broken install's OSError: missing either way
            pass
    return False
def cuda_ort():
    try:
        import onnxruntime
        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except Exception:
        return False
print("onnxruntime-gpu" if not cuda_ort() else "", end=" ")
print(" ".join(d for d, m in (("tensorrt", ("tensorrt",)), ("cuda-python", ("cuda.bindings.runtime", "cuda.cudart"))) if not has(*m)))
PYEOF
)
extra=()
case " $missing " in
  *" onnxruntime-gpu "*)
    echo "gpu-check: onnxruntime for $PY has no CUDA execution provider: install onnxruntime-gpu in place of onnxruntime (deploy/README.md, 'GPU packages')" >&2
    exit 3 ;;
esac
if [ -n "${missing// /}" ]; then
  echo "gpu-check: no$missing for $PY: checking ONNX Runtime CUDA only, without TensorRT (deploy/README.md, 'GPU')" >&2
  extra=(--no-tensorrt)
fi
"$PY" -m gamguard.runtime.engines.packaging
exec timeout 540 "$PY" deploy/gpu_check.py ${extra[@]+"${extra[@]}"} "$@"
