#!/usr/bin/env bash
# Create .venv and install gamguard with the exporter and test extras (idempotent).
# torch is installed first, pinned, so the [export] range is satisfied by the CPU build
# and pip never pulls a multi-GB CUDA build on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || {
  echo "bootstrap: installing torch==2.13.0 (CPU build)" >&2
  .venv/bin/python -m pip install -q torch==2.13.0
}
echo "bootstrap: installing gamguard[export,dev,interop,sign] (editable)" >&2
.venv/bin/python -m pip install -q -e '.[export,dev,interop,sign]'
