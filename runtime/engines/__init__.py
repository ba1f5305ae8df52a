"""Inference engines over the fused model, and the single factory that picks one.

* :mod:`.base` — tensor names, :class:`EngineOutput`, the :class:`Engine` protocol;
* :mod:`.onnx` — :class:`OnnxEngine`, ONNX Runtime with the TensorRT → CUDA → CPU provider chain;
* :mod:`.tensorrt` — :class:`TensorRTEngine`, a native TensorRT plan (``model.plan``), and the rule
  that selects it;
* :mod:`.plan` — building and tagging a plan on the target GPU (``gamguard build-engine``);
* :mod:`.drift` — how far a plan drifts from ONNX Runtime FP32, and whether the guard still holds;
* :mod:`.packaging` — checks that the GPU packages are installed the way the engines need.

Calibration and serving both go through :func:`create_engine`, so the references and thresholds are
computed with the very engine that serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..bundle import MODEL_FILE, PLAN_FILE, BundleError, read_manifest
from .base import INPUT_NAME, OUTPUT_NAMES, Engine, EngineError, EngineOutput
from .onnx import (
    PROVIDER_ALIASES,
    PROVIDER_CHAIN,
    PROVIDER_OPTIONS,
    OnnxEngine,
    provider_entries,
    resolve_providers,
    session_options,
)

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "PROVIDER_ALIASES",
    "PROVIDER_CHAIN",
    "PROVIDER_OPTIONS",
    "Engine",
    "EngineError",
    "EngineOutput",
    "OnnxEngine",
    "create_engine",
    "provider_entries",
    "resolve_providers",
    "session_options",
]


def create_engine(
    bundle_dir: str | Path,
    manifest: dict | None = None,
    *,
    prefer: str = "auto",
    providers: Sequence[str] | str | None = None,
    threads: int | None = None,
    guarded: bytes | None = None,
) -> Engine:
    """The single factory for engines.

    ``prefer``: ``"auto"`` (the native TensorRT plan when the bundle carries one that matches this
    device, otherwise ONNX Runtime with its TensorRT → CUDA → CPU chain), ``"onnxruntime"`` (alias
    ``"onnx"``) or ``"tensorrt"`` (fail unless the native plan can be used). The plan selection rule
    lives in :mod:`gamguard.runtime.engines.tensorrt`.
    An ONNX Runtime engine serves the manifest's input size (``input.height`` x ``input.width``): a
    model with dynamic H/W is specialised to it (:mod:`.specialize`).
    ``guarded``: the fused model with the guard subgraph (:func:`gamguard.runtime.checks.graph.guarded_model`)
    for ONNX Runtime to run instead of ``model.onnx``; a native TensorRT plan is the plain fused model
    (its engine returns no ``guard`` output and the host computes the checks).
    """
    bundle_dir = Path(bundle_dir)
    prefer = {"onnx": "onnxruntime", "ort": "onnxruntime", None: "auto"}.get(prefer, prefer)
    if prefer not in ("auto", "onnxruntime", "tensorrt"):
        raise EngineError(f"unknown engine preference {prefer!r} (auto, onnxruntime, tensorrt)")
    if prefer != "onnxruntime" and (prefer == "tensorrt" or (bundle_dir / PLAN_FILE).is_file()):
        from .tensorrt import select_engine  # imports tensorrt lazily itself; costs nothing on a CPU box

        engine = select_engine(bundle_dir, manifest if manifest is not None else read_manifest(bundle_dir), prefer)
        if engine is not None:
            return engine
    model = bundle_dir / MODEL_FILE
    if not model.is_file():
        raise BundleError(f"{bundle_dir}: no {MODEL_FILE}")
    manifest = manifest if manifest is not None else read_manifest(bundle_dir)
    spec = manifest.get("input") or {}
    # the guard serves the input spec's size only: a model exported with dynamic H/W is specialised to it
    # (a static model is left alone, without reading the file twice)
    dynamic = bool((manifest.get("export") or {}).get("dynamic_spatial"))
    input_hw = (
        (int(spec["height"]), int(spec["width"])) if dynamic and spec.get("height") and spec.get("width") else None
    )
    return OnnxEngine(model, providers=providers, threads=threads, guarded=guarded, input_hw=input_hw)
