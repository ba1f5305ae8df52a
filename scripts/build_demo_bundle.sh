#!/usr/bin/env bash
# Build the embedded demo bundle from scratch: train → export → calibrate.
#
#   scripts/build_demo_bundle.sh [OUT_DIR]        (default: runtime/demo/bundle, the embedded default)
#
# Environment: SEED (training seed, default 0), THREADS (torch/ONNX Runtime threads, default 2),
# CAL_PHANTOMS (calibration phantoms per class, default 500), ALPHA (default 0.05),
# CKPT (checkpoint path, default exporter/demo.ckpt — the committed demo weights; reused when it exists
# and REUSE_CKPT=1, which skips training).
# Deterministic for a given seed and thread count. Needs the [export] extra (torch) for the first two steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runtime/demo/bundle}
SEED=${SEED:-0}
THREADS=${THREADS:-2}
CAL_PHANTOMS=${CAL_PHANTOMS:-500}
ALPHA=${ALPHA:-0.05}
CKPT=${CKPT:-exporter/demo.ckpt}
GG=${GAMGUARD:-.venv/bin/gamguard}

mkdir -p "$(dirname "$CKPT")"
if [ "${REUSE_CKPT:-0}" = 1 ] && [ -f "$CKPT" ]; then
  echo "build_demo_bundle: reusing $CKPT" >&2
else
  echo "build_demo_bundle: training (seed $SEED, $THREADS threads) → $CKPT" >&2
  "$GG" train --out "$CKPT" --seed "$SEED" --threads "$THREADS"
fi

# Export into a fresh directory, then swap it in, so a failed run never leaves a half bundle.
TMP="$(dirname "$OUT")/.$(basename "$OUT").building"
rm -rf "$TMP"
echo "build_demo_bundle: exporting → $OUT" >&2
# --dynamic-spatial: the same fused graph also runs at other sizes (gamguard bench uses 224² and 512²).
"$GG" export --checkpoint "$CKPT" --out "$TMP" --name gamguard-demo-hand --dynamic-spatial
echo "build_demo_bundle: calibrating on $CAL_PHANTOMS phantoms per class (alpha $ALPHA)" >&2
"$GG" calibrate --bundle "$TMP" --phantoms "$CAL_PHANTOMS" --alpha "$ALPHA" --threads "$THREADS"
rm -rf "$OUT"
mv "$TMP" "$OUT"
echo "build_demo_bundle: done: $OUT" >&2
