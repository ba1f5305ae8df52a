#!/usr/bin/env bash
# Fetch Triton's perf_analyzer, the tool people measure inference servers with, into DIR
# (default .cache/perf_analyzer) and write DIR/perf_analyzer, a wrapper that runs it.
#
# Why this way: the pip package `perf-analyzer` (2.60) is built for glibc 2.38 and does not install on
# Debian 12 (glibc 2.36). NVIDIA's tritonclient wheels up to 2.41 carried the perf_analyzer binary
# themselves (tritonclient-2.41.0.data/data/bin/perf_analyzer, manylinux1), and that binary runs here.
# It is linked against libcudart.so.12 (loaded, not used, for gRPC over the network): that comes from
# NVIDIA's nvidia-cuda-runtime-cu12 wheel. It also needs libb64 (Debian: apt-get install libb64-0d).
# Both wheels come from the package registry pip is configured with and are checked against the
# SHA-256 sums below; nothing is installed into any Python environment.
#
# Usage: bash scripts/get_perf_analyzer.sh [DIR]
#        DIR/perf_analyzer -m gamguard-demo-hand -i grpc -u 127.0.0.1:8001 --input-data data.json
# (README, "Measure with Triton's perf_analyzer", says how to make data.json with `gamguard data perf-input`.)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.cache/perf_analyzer}"
PIP="${PIP:-.venv/bin/pip}"
TRITONCLIENT_WHEEL=tritonclient-2.41.0-py3-none-manylinux1_x86_64.whl
TRITONCLIENT_SHA256=cf4ed5df836fa99937678a9fd852f86ba05c7b83656dd0a540e20afdb9ab4629
CUDART_WHEEL=nvidia_cuda_runtime_cu12-12.9.79-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
CUDART_SHA256=25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3

if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "get_perf_analyzer: these binaries are for Linux x86_64, not $(uname -sm)" >&2
  exit 2
fi
if [ -x "$DIR/perf_analyzer" ] && "$DIR/perf_analyzer" --version >/dev/null 2>&1; then
  echo "get_perf_analyzer: $DIR/perf_analyzer is ready"
  exit 0
fi
mkdir -p "$DIR/wheels" "$DIR/lib"
echo "get_perf_analyzer: downloading tritonclient 2.41.0 and nvidia-cuda-runtime-cu12 12.9.79 wheels (16 MB) ..."
"$PIP" download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 --platform manylinux_2_17_x86_64 \
  --python-version 3 -d "$DIR/wheels" tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.9.79
(
  cd "$DIR/wheels"
  printf '%s  %s\n%s  %s\n' "$TRITONCLIENT_SHA256" "$TRITONCLIENT_WHEEL" "$CUDART_SHA256" "$CUDART_WHEEL" | sha256sum --check --quiet
)
python3 - "$DIR" "$TRITONCLIENT_WHEEL" "$CUDART_WHEEL" <<'EOF'
import os, stat, sys, zipfile
folder, tritonclient, cudart = sys.argv[1:]
for wheel, member, target in (
    (tritonclient, "tritonclient-2.41.0.data/data/bin/perf_analyzer", "perf_analyzer.bin"),
    (cudart, "nvidia/cuda_runtime/lib/libcudart.so.12", "lib/libcudart.so.12"),
):
    with zipfile.ZipFile(os.path.join(folder, "wheels", wheel)) as z, z.open(member) as src:
        with open(os.path.join(folder, target), "wb") as out:
            out.write(src.read())
binary = os.path.join(folder, "perf_analyzer.bin")
os.chmod(binary, os.stat(binary).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
EOF
cat >"$DIR/perf_analyzer" <<'EOF'
#!/bin/sh
# Triton's perf_analyzer 2.41 (from NVIDIA's tritonclient 2.41.0 wheel), with its libcudart beside it.
here="$(cd "$(dirname "$0")" && pwd)"
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/perf_analyzer.bin" "$@"
EOF
chmod +x "$DIR/perf_analyzer"
rm -rf "$DIR/wheels"
if ! "$DIR/perf_analyzer" --version >/dev/null 2>&1; then
  echo "get_perf_analyzer: $DIR/perf_analyzer does not start:" >&2
  "$DIR/perf_analyzer" --version 2>&1 | head -3 >&2 || true
  echo "get_perf_analyzer: it needs libb64 (Debian/Ubuntu: apt-get install libb64-0d)" >&2
  exit 1
fi
echo "get_perf_analyzer: $DIR/perf_analyzer is ready ($("$DIR/perf_analyzer" --version 2>&1 | head -1))"
