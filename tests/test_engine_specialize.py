"""A dynamic-H/W fused model served at one size: the engine fixes the size and ONNX Runtime folds the
size-dependent matrices (runtime/engines/specialize.py) — same outputs, fewer nodes, other sizes refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gamguard.runtime.bench.common import phantom_images
from gamguard.runtime.bundle import MODEL_FILE, InputSpec, read_manifest
from gamguard.runtime.checks.graph import guarded_model_bytes
from gamguard.runtime.checks.reference import CalibrationData
from gamguard.runtime.engines import EngineError, OnnxEngine, create_engine, session_options
from gamguard.runtime.engines.specialize import is_spatially_dynamic, spatial_dims, specialize_spatial
from gamguard.runtime.preprocess import preprocess_batch


def _optimized_nodes(model_bytes: bytes, tmp_path) -> int:
    opts = session_options(1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # folding, no layout changes
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    return len(onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize("size", [128, 224])
def test_specialised_engine_matches_the_dynamic_model(demo_bundle, tmp_path, size):
    manifest = read_manifest(demo_bundle)
    guarded = guarded_model_bytes(demo_bundle, CalibrationData.load(demo_bundle, manifest))
    dynamic = OnnxEngine(demo_bundle / MODEL_FILE, providers="cpu", threads=1, guarded=guarded)
    fixed = dynamic.at_size((size, size))
    assert dynamic.input_hw is None and fixed.input_hw == (size, size)
    assert fixed.describe()["input_size"] == [size, size]
    served = create_engine(demo_bundle, manifest, prefer="onnxruntime", providers="cpu", threads=1)
    assert served.input_hw == (manifest["input"]["height"], manifest["input"]["width"])  # the bundle's own size

    spec_at_size = dataclasses.replace(InputSpec.from_manifest(manifest["input"]), height=size, width=size)
    x = preprocess_batch(phantom_images(3), spec_at_size)
    a, b = dynamic.run(x), fixed.run(x)
    for name in ("logits", "cam", "early", "guard"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-6, err_msg=name)

    # the shape arithmetic is folded away when the session is created
    model = onnx.load_from_string(guarded)
    fixed_model = specialize_spatial(model, size, size)
    assert not is_spatially_dynamic(fixed_model) and spatial_dims(fixed_model) == (size, size)
    left = [n for n in fixed_model.graph.node if n.op_type == "Shape" and n.input[0] == "image"]
    assert all(onnx.helper.get_attribute_value(a) <= 1 for n in left for a in n.attribute if a.name == "end")
    before = _optimized_nodes(guarded, tmp_path)
    after = _optimized_nodes(fixed_model.SerializeToString(), tmp_path)
    assert after < before - 30, (before, after)


def test_specialised_engine_refuses_other_sizes(demo_bundle):
    engine = OnnxEngine(demo_bundle / MODEL_FILE, providers="cpu", threads=1, input_hw=(128, 128))
    with pytest.raises(EngineError, match="serves 128x128 inputs, got 96x128"):
        engine.run(np.zeros((1, 1, 96, 128), np.float32))


def test_static_model_is_kept_or_refused(demo_bundle):
    static = specialize_spatial(onnx.load(str(demo_bundle / MODEL_FILE)), 128, 128)
    assert specialize_spatial(static, 128, 128) is static
    with pytest.raises(EngineError, match="is 128x128, not 64x64"):
        specialize_spatial(static, 64, 64)
