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
from gamguard.runtime.engines.specialize import (
    CAM_MARGIN,
    _is_interpolation,
    cam_min_max_on_small_map,
    fold_constants,
    is_spatially_dynamic,
    pool_early_with_average_pool,
    spatial_dims,
    specialize_spatial,
)
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
    # the fixed engine's AveragePool sums the early windows in another order than the dynamic model's
    # matrices (float32 rounding, amplified in the feature score by the whitening)
    # and its CAM is normalised on the small map into [CAM_MARGIN, 1 - CAM_MARGIN / 2) before the resize
    # (cam_min_max_on_small_map): the same map within 3 * CAM_MARGIN
    for name in ("logits", "cam", "early", "guard"):
        atol = 3 * CAM_MARGIN if name == "cam" else 1e-6
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=atol, err_msg=name)
    assert 0.0 <= b.cam.min() and b.cam.max() <= 1.0

    # the shape arithmetic is folded away when the session is created
    model = onnx.load_from_string(guarded)
    fixed_model = specialize_spatial(model, size, size)
    assert not is_spatially_dynamic(fixed_model) and spatial_dims(fixed_model) == (size, size)
    left = [n for n in fixed_model.graph.node if n.op_type == "Shape" and n.input[0] == "image"]
    assert all(onnx.helper.get_attribute_value(a) <= 1 for n in left for a in n.attribute if a.name == "end")
    # the early features' averaging-matrix pair becomes one AveragePool, with the same numbers
    pooled, rewritten = pool_early_with_average_pool(fixed_model)
    assert rewritten
    early_producer = next(n for n in pooled.graph.node if "early" in n.output)
    assert early_producer.op_type == "AveragePool", early_producer
    before = _optimized_nodes(guarded, tmp_path)
    after = _optimized_nodes(fixed_model.SerializeToString(), tmp_path)
    assert after < before - 30, (before, after)
    # the CAM's min-max moves to the small map, and the guard subgraph resamples the small map: nothing
    # reads the full-size map any more (it is only the output)
    small, rewritten = cam_min_max_on_small_map(pooled)
    assert rewritten
    assert [n for n in small.graph.node if "cam" in n.input] == []
    assert next(n for n in small.graph.node if "cam" in n.output).op_type == "MatMul"


def test_interpolation_matrices_recognised():
    from gamguard.exporter.onnx_fuse import bilinear_matrix

    for n_in, n_out in ((7, 224), (28, 224), (64, 512), (9, 5), (5, 5)):
        assert _is_interpolation(bilinear_matrix(n_in, n_out)), (n_in, n_out)
    m = bilinear_matrix(7, 32)
    assert not _is_interpolation(m[::-1])  # positions decreasing
    assert not _is_interpolation(m * 1.01)  # rows not summing to 1
    spread = m.copy()
    spread[3] = 0.0
    spread[3, [0, 2]] = 0.5  # two taps that are not neighbours
    assert not _is_interpolation(spread)
    assert not _is_interpolation(np.full((4, 8), 1 / 8, np.float32))  # an average, not an interpolation


def test_cam_rewrite_keeps_a_model_whose_full_map_is_read_elsewhere(demo_bundle):
    """A full-size map consumed by anything besides its own min-max keeps the exported form."""
    from onnx import helper

    fixed = specialize_spatial(onnx.load(str(demo_bundle / MODEL_FILE)), 96, 96)
    folded = fold_constants(fixed)
    producer = {o: n for n in folded.graph.node for o in n.output}
    full = producer[producer["cam"].input[0]].input[0]  # cam = (full - lo) / (...)
    folded.graph.node.append(helper.make_node("Identity", [full], ["full_copy"]))
    folded.graph.output.append(helper.make_tensor_value_info("full_copy", onnx.TensorProto.FLOAT, None))
    same, rewritten = cam_min_max_on_small_map(folded, folded=True)
    assert not rewritten and same is folded


def test_specialised_engine_refuses_other_sizes(demo_bundle):
    engine = OnnxEngine(demo_bundle / MODEL_FILE, providers="cpu", threads=1, input_hw=(128, 128))
    with pytest.raises(EngineError, match="serves 128x128 inputs, got 96x128"):
        engine.run(np.zeros((1, 1, 96, 128), np.float32))


def test_static_model_is_kept_or_refused(demo_bundle):
    static = specialize_spatial(onnx.load(str(demo_bundle / MODEL_FILE)), 128, 128)
    assert specialize_spatial(static, 128, 128) is static
    with pytest.raises(EngineError, match="is 128x128, not 64x64"):
        specialize_spatial(static, 64, 64)


def _pool_model(channels: int, size: int, bins: int):
    """``early = rows @ (x @ cols)``: the exporter's dynamic-size pooling, with adaptive-pool matrices."""
    from onnx import TensorProto, helper, numpy_helper

    def adaptive(n_in, n_out):  # torch's adaptive_avg_pool bins: [floor(i n/o), ceil((i+1) n/o))
        m = np.zeros((n_out, n_in), np.float32)
        for i in range(n_out):
            a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, a:b] = 1.0 / (b - a)
        return m

    rows = adaptive(size, bins)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "cols"], ["t"]),
            helper.make_node("MatMul", ["rows", "t"], ["early"]),
        ],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("early", TensorProto.FLOAT, ["batch", channels, bins, bins])],
        [numpy_helper.from_array(rows, "rows"), numpy_helper.from_array(np.ascontiguousarray(rows.T), "cols")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "channels, size, bins, expect",
    [(16, 12, 4, True), (32, 24, 8, True), (16, 12, 5, False), (8, 12, 4, False)],  # unequal bins; 8 channels
)
def test_early_average_pool_only_for_equal_windows(channels, size, bins, expect):
    model = _pool_model(channels, size, bins)
    rewritten_model, rewritten = pool_early_with_average_pool(model)
    assert rewritten is expect
    ops = [n.op_type for n in rewritten_model.graph.node]
    assert ops == (["AveragePool"] if expect else ["MatMul", "MatMul"])
    x = np.random.default_rng(0).random((2, channels, size, size), dtype=np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(rewritten_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hw", [(33, 47), (96, 160), (16, 16)])
def test_cam_rewrite_matches_the_exported_cam_at_odd_sizes(demo_bundle, hw):
    """Non-square and small sizes: the small-map normalisation gives the exported full-map one within
    3 * CAM_MARGIN, inside [0, 1], and leaves the caller's model as it was."""
    folded = fold_constants(specialize_spatial(onnx.load(str(demo_bundle / MODEL_FILE)), *hw))
    before = folded.SerializeToString()
    small, rewritten = cam_min_max_on_small_map(folded, folded=True)
    assert rewritten and folded.SerializeToString() == before
    rng = np.random.default_rng(sum(hw))
    x = ((rng.random((3, 1, *hw)) - 0.5) * 4).astype(np.float32)
    ref = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(["cam"], {"image": x})[0]
    got = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["cam"], {"image": x}
    )[0]
    assert np.ptp(ref, axis=(1, 2)).min() > 0.5  # structured maps, not a constant one
    np.testing.assert_allclose(got, ref, rtol=0, atol=3 * CAM_MARGIN)
    assert 0.0 <= got.min() and got.max() <= 1.0


def _static_export_form(demo_bundle, size: int):
    """The demo model at a fixed size in the form a static-size export writes: ``cam = R @ (s @ C)``."""
    fixed = fold_constants(specialize_spatial(onnx.load(str(demo_bundle / MODEL_FILE)), size, size))
    model, rewritten = cam_min_max_on_small_map(fixed, folded=True)
    assert rewritten
    return model


def test_guarded_engine_leaves_the_full_size_cam_to_the_host(demo_bundle, tmp_path):
    """A guarded engine outputs the small CAM; the host resizes it only when a map is read, to the map
    the fused model writes, and the guard's numbers are those of the graph that resamples the full map."""
    import pickle

    from gamguard.runtime.checks.graph import GUARD_OUTPUT, PARITY_ATOL, guarded_model
    from gamguard.runtime.engines.base import ResizedMap

    size = 96
    manifest = read_manifest(demo_bundle)
    cal = CalibrationData.load(demo_bundle, manifest)
    static = _static_export_form(demo_bundle, size)
    path = tmp_path / MODEL_FILE
    onnx.save(static, str(path))
    guarded = guarded_model(static, cal)
    # the guard subgraph of a static model resamples the full-size map (constant matrices)
    assert [n.op_type for n in guarded.graph.node if "cam" in n.input] == ["MatMul"]
    engine = OnnxEngine(path, providers="cpu", threads=1, guarded=guarded.SerializeToString())
    plain = OnnxEngine(path, providers="cpu", threads=1)
    assert "cam" not in [o.name for o in engine.session.get_outputs()]
    spec = dataclasses.replace(InputSpec.from_manifest(manifest["input"]), height=size, width=size)
    x = preprocess_batch(phantom_images(4), spec)
    out, ref = engine.run(x), plain.run(x)
    maps = out.cam_maps()
    assert maps is not None and len(maps) == out.cam_count() == 4
    assert maps.bilinear  # the exporter's resize is OpenCV's INTER_LINEAR: computed by cv2.resize
    one = out.cam_of(2)
    assert isinstance(one, ResizedMap) and out.cam_maps() is maps  # nothing computed yet
    np.testing.assert_allclose(one(), ref.cam[2], atol=1e-6)
    np.testing.assert_allclose(out.cam, ref.cam, atol=1e-6)  # reading .cam computes the batch
    assert out.cam.dtype == np.float32 and out.cam_maps() is None and out.cam.shape == (4, size, size)
    # the guard columns as the graph computes them from the full-size map
    full = ort.InferenceSession(guarded.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = full.run([GUARD_OUTPUT], {"image": x})[0]
    np.testing.assert_allclose(out.guard, expected, atol=PARITY_ATOL["scores"], rtol=1e-4)
    # a verdict travels to another process (the DICOM node's result workers) with the small map
    again = pickle.loads(pickle.dumps(engine.run(x).cam_of(1)))
    np.testing.assert_allclose(again(), ref.cam[1], atol=1e-6)


def test_resized_maps_by_opencv_or_by_the_matrices():
    """A heatmap is ``rows @ small @ cols`` whichever way it is computed: by OpenCV's bilinear resize
    only when the matrices are OpenCV's (read off by resizing identities), else by the products."""
    from gamguard.exporter.onnx_fuse import bilinear_matrix
    from gamguard.runtime.engines.base import ResizedMaps, is_opencv_bilinear

    rng = np.random.default_rng(3)
    for (h, big_h), (w, big_w) in (
        ((7, 224), (7, 224)),
        ((13, 100), (9, 50)),
        ((12, 8), (3, 1)),
        ((64, 512), (32, 96)),
    ):
        rows = np.asarray(bilinear_matrix(h, big_h), np.float32)
        cols = np.asarray(bilinear_matrix(w, big_w), np.float32).T
        small = rng.random((3, h, w), dtype=np.float32)
        exact = np.matmul(rows, np.matmul(small, cols))
        assert is_opencv_bilinear(rows, cols)
        fast = ResizedMaps(small, rows, cols, bilinear=True)
        np.testing.assert_allclose(fast(), exact, atol=1e-6)
        np.testing.assert_allclose(fast.one(2)(), exact[2], atol=1e-6)
        # anything else: the products themselves
        other = rows.copy()
        other[[0, -1]] = other[[-1, 0]]
        assert not is_opencv_bilinear(other, cols) and not is_opencv_bilinear(rows, np.full_like(cols, 1 / w))
        np.testing.assert_allclose(ResizedMaps(small, other, cols)(), np.matmul(other, small @ cols), atol=1e-6)


def test_cam_resize_stays_in_a_graph_that_reads_the_full_map(demo_bundle):
    from gamguard.runtime.engines.specialize import defer_cam_resize

    static = _static_export_form(demo_bundle, 64)
    static.graph.node.append(onnx.helper.make_node("ReduceMax", ["cam"], ["cam_max"], keepdims=0))
    static.graph.output.append(onnx.helper.make_tensor_value_info("cam_max", onnx.TensorProto.FLOAT, None))
    same, resize = defer_cam_resize(static, folded=True)
    assert resize is None and same is static
    plain = onnx.load(str(demo_bundle / MODEL_FILE))  # dynamic: the full map is normalised in the graph
    assert defer_cam_resize(plain) == (plain, None)


def test_verdicts_compute_their_heatmap_when_read(demo_bundle):
    """Serving does not pay for heatmaps nobody asked for: a verdict's map is computed on first read
    (equal to the host-arithmetic guard's, which computes it in the engine), also after the server
    strips a rejected verdict's class details."""
    from gamguard.runtime.engines.base import ResizedMap
    from gamguard.runtime.guard import Guard, Verdict

    graph = Guard.from_bundle(demo_bundle, providers="cpu", threads=1, arithmetic="graph")
    host = Guard.from_bundle(demo_bundle, providers="cpu", threads=1, arithmetic="host")
    x = preprocess_batch(phantom_images(6), graph.spec)
    lazy, eager = graph.verify_tensor(x), host.verify_tensor(x)
    assert [v.accepted for v in lazy] == [v.accepted for v in eager]
    raw = Verdict.__dict__["cam"].raw
    assert all(isinstance(raw(v), ResizedMap) for v in lazy)
    assert all(isinstance(raw(v), np.ndarray) for v in eager)
    stripped = [v.without_class_details() for v in lazy]
    assert all(isinstance(raw(v), ResizedMap) for v in stripped)
    for a, b, c in zip(lazy, eager, stripped):
        assert a.cam.dtype == np.float32 and a.cam.shape == (graph.spec.height, graph.spec.width)
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-6)
        np.testing.assert_allclose(c.cam, b.cam, atol=1e-6)
    assert Verdict.rejected("INVALID_INPUT", "x").cam is None


def test_grpc_verdict_computes_the_heatmap_only_when_asked(demo_bundle):
    import types

    from gamguard.runtime.engines.base import ResizedMap
    from gamguard.runtime.guard import Guard, Verdict
    from gamguard.runtime.server.dataplane import Result
    from gamguard.runtime.server.grpc_guard import verdict_message

    guard = Guard.from_bundle(demo_bundle, providers="cpu", threads=1, arithmetic="graph")
    plane = types.SimpleNamespace(model_name="demo", model_version="1", bundle_hash="h")  # the ModelRef's source
    (v,) = guard.verify_tensor(preprocess_batch(phantom_images(1), guard.spec))
    res = Result(verdict=v, request_id="r", input_format="tensor", bit_depth=0, sop_instance_uid=None)
    plain = verdict_message(res, plane)
    assert not plain.HasField("heatmap") and isinstance(Verdict.__dict__["cam"].raw(v), ResizedMap)
    with_values = verdict_message(res, plane, heatmap_values_wanted=True)
    h, w = guard.spec.height, guard.spec.width
    assert (with_values.heatmap.height, with_values.heatmap.width) == (h, w)
    np.testing.assert_array_equal(np.asarray(with_values.heatmap.values, np.float32).reshape(h, w), v.cam)


def test_a_half_static_input_is_served_only_at_its_static_size(demo_bundle):
    """An input with a static height and a dynamic width is specialised to other widths, never to
    another height (its static dim is not overwritten)."""
    model = onnx.load(str(demo_bundle / MODEL_FILE))
    inp = next(i for i in model.graph.input if i.name == "image")
    height = inp.type.tensor_type.shape.dim[2]
    height.Clear()
    height.dim_value = 128
    fixed = specialize_spatial(model, 128, 96)
    dims = [d.dim_value for d in next(i for i in fixed.graph.input if i.name == "image").type.tensor_type.shape.dim[2:]]
    assert dims == [128, 96]
    with pytest.raises(EngineError, match="cannot serve 96x96"):
        specialize_spatial(model, 96, 96)
