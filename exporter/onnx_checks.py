"""Torch-free parts of the export: argument parsing, the ONNX graph rules, the bundle directory.

Shared by the torch export (:mod:`~gamguard.exporter.export`) and the ONNX-only route
(:mod:`~gamguard.exporter.onnx_fuse`), which must run where torch is not installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gamguard.runtime import bundle as bundle_mod

log = logging.getLogger("gamguard.exporter.export")


#: Files a previous export or calibration may have left; they belong to the old model.
_DERIVED_FILES = (bundle_mod.PLAN_FILE, bundle_mod.REFERENCE_FILE)
_OWN_FILES = (bundle_mod.MANIFEST, bundle_mod.MODEL_FILE, bundle_mod.MANIFEST + ".tmp") + _DERIVED_FILES


#: Parity between ONNX Runtime and the reference (torch wrapper or original ONNX model) checked at export time.
LOGITS_RTOL = 1e-4  # max |diff| relative to max |logit|
CAM_ATOL = 1e-3
EARLY_RTOL = 1e-4  # max |diff| relative to max |feature|


class ExportError(RuntimeError):
    """The export produced a model that is invalid or does not reproduce the torch outputs."""


def as_mean_std(normalization, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``{"mean": .., "std": ..}`` or ``(mean, std)``; scalars broadcast to every channel."""
    if isinstance(normalization, dict):
        mean, std = normalization.get("mean"), normalization.get("std")
    else:
        mean, std = normalization
    mean = np.atleast_1d(np.asarray(mean, np.float64)).tolist()
    std = np.atleast_1d(np.asarray(std, np.float64)).tolist()
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(
            f"normalization needs {channels} means and {channels} positive stds, got mean={mean} std={std}"
        )
    return tuple(mean), tuple(std)


def chw(input_shape) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def onnx_op_types(model_path: str | Path) -> list[str]:
    """Sorted ``domain::OpType`` names (plain ``OpType`` for the default domain) used in the graph."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    types = set()

    def visit(graph):
        for node in graph.node:
            types.add(f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            types.add(node.op_type)
    return sorted(types)


def check_onnx_graph(model_path: str | Path) -> list[str]:
    """``onnx.checker`` plus gamguard's rules: standard domain only, no gradient/training ops.

    Returns the op types. Raises :class:`ExportError` when a rule is broken.
    """
    import onnx

    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{model_path}: onnx.checker rejected the model: {exc}") from exc
    proto = onnx.load(str(model_path), load_external_data=False)
    domains = {o.domain for o in proto.opset_import} - {"", "ai.onnx"}
    if domains:
        raise ExportError(
            f"{model_path}: non-standard operator domains {sorted(domains)} (only the default ONNX domain is allowed)"
        )
    ops = onnx_op_types(model_path)
    bad = [op for op in ops if "::" in op or op in ("Gradient", "Momentum", "Adagrad", "Adam") or op.endswith("Grad")]
    if bad:
        raise ExportError(f"{model_path}: training/gradient or custom ops in the graph: {bad}")
    return ops


def ort_session(path: str | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12)) if b.size else 0.0


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    foreign = [p.name for p in out_dir.iterdir() if p.name not in _OWN_FILES] if out_dir.is_dir() else []
    if foreign:
        # write_manifest hashes every file in the directory into the bundle; refuse to adopt them.
        raise ValueError(
            f"{out_dir} contains files that are not part of a gamguard bundle "
            f"({', '.join(sorted(foreign))}); export into an empty directory"
        )


def prepare_out_dir(out_dir: Path) -> None:
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _DERIVED_FILES:
        stale = out_dir / name
        if stale.exists():
            log.warning("removing %s: it was built for the previous model", stale)
            stale.unlink()
