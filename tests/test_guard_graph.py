"""The guard's arithmetic in the ONNX graph (runtime/checks/graph.py) against the numpy reference.

Both paths must give the same scores (float32 graph vs float64 numpy, to PARITY_ATOL) and the same
verdicts on the demo bundle, in and off distribution, at the bundle's size and at another size.
"""

from __future__ import annotations

import numpy as np
import pytest

from gamguard.runtime import similarity as sim
from gamguard.runtime.bench.common import guard_at_size
from gamguard.runtime.checks import score_outputs
from gamguard.runtime.checks.graph import (
    GUARD_COLUMNS,
    PARITY_ATOL,
    attention_step_tolerance,
    guard_only_model,
    resolve_arithmetic,
    scores_from_graph,
)
from gamguard.runtime.demo.phantoms import HELD_OUT_KINDS, hand_phantom, ood_set
from gamguard.runtime.engines import session_options
from gamguard.runtime.guard import Guard
from gamguard.runtime.preprocess import preprocess_batch

M = len(sim.MEASURES)


@pytest.fixture(scope="module")
def guards(demo_bundle):
    host = Guard.from_bundle(demo_bundle, providers="cpu", threads=1, prefer="onnxruntime", arithmetic="host")
    graph = Guard.from_bundle(demo_bundle, providers="cpu", threads=1, prefer="onnxruntime", arithmetic="graph")
    assert host.engine.describe()["guard_arithmetic"] == "host"
    assert graph.engine.describe()["guard_arithmetic"] == "graph"
    return host, graph


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    inside = [hand_phantom(i % 4, rng, 256).image for i in range(24)]
    outside, _ = ood_set(list(HELD_OUT_KINDS) + ["noise", "knee"], 3, seed=11)
    return inside + list(outside)


@pytest.fixture(scope="module")
def guard_session(guards):
    import onnxruntime as ort

    cal = guards[0].calibration
    model = guard_only_model(cal, n_classes=len(cal.class_names), early_shape=cal.feature_ref.shape)
    return ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])


def _borderline(pv, guard) -> np.ndarray:
    """Images whose decision could flip within the float32 tolerance (a p-value next to its level)."""
    tol = PARITY_ATOL["pvalues"]
    level, mlevel = guard.level, guard.calibration.null.measure_level(guard.level)
    near = (np.abs(pv.measures - mlevel) < tol).any(axis=1)
    near |= np.abs(pv.attention - level) < attention_step_tolerance(guard.calibration)
    for p in (pv.feature, pv.garbage):
        near |= np.abs(p - level) < tol
    return near


def _assert_pvalues_close(pv_g, pv_h, calibration):
    for field in ("measures", "feature", "garbage"):
        np.testing.assert_allclose(getattr(pv_g, field), getattr(pv_h, field), atol=PARITY_ATOL["pvalues"], rtol=0)
    np.testing.assert_allclose(pv_g.attention, pv_h.attention, atol=attention_step_tolerance(calibration), rtol=0)


@pytest.mark.parametrize("size", [None, 224])
def test_graph_matches_numpy_scores_and_verdicts(guards, images, size):
    host, graph = guards
    if size is not None:  # the guards at another size (a dynamic-H/W model: engines fixed to that size)
        host, graph = guard_at_size(host, size), guard_at_size(graph, size)
    x = preprocess_batch(images, host.spec)
    out_h = host.engine.run(x)
    out_g = graph.engine.run(x)
    assert out_h.guard is None and out_g.guard.shape == (len(images), len(GUARD_COLUMNS))
    np.testing.assert_allclose(out_g.logits, out_h.logits, rtol=1e-5, atol=1e-5)  # same fused model

    s_h, pv_h, d_h = host.decide_outputs(out_h)
    s_g, pv_g, d_g = graph.decide_outputs(out_g)
    assert np.array_equal(s_g.pred_real, s_h.pred_real)
    assert np.array_equal(s_g.garbage_pred, s_h.garbage_pred)
    np.testing.assert_allclose(s_g.sims, s_h.sims, atol=PARITY_ATOL["scores"], rtol=0)
    np.testing.assert_allclose(s_g.feature, s_h.feature, rtol=PARITY_ATOL["scores"])
    np.testing.assert_allclose(s_g.garbage_prob, s_h.garbage_prob, atol=1e-6)
    np.testing.assert_allclose(s_g.garbage_margin, s_h.garbage_margin, atol=1e-5)
    _assert_pvalues_close(pv_g, pv_h, host.calibration)

    # identical decisions, except where a p-value sits within the tolerance of its level
    sure = ~_borderline(pv_h, host)
    assert sure.mean() > 0.9
    for field in ("reject", "garbage", "attention", "feature"):
        assert np.array_equal(getattr(d_g, field)[sure], getattr(d_h, field)[sure]), field
    if size is None:  # at the calibrated size: the decisions mean something, and the full verdicts
        assert (~d_g.reject[:24]).mean() > 0.7 and d_g.reject[24:].mean() > 0.7
        v_h, v_g = host.verify_tensor(x), graph.verify_tensor(x)
        for a, b, ok in zip(v_h, v_g, sure):
            if ok:
                assert (a.accepted, a.label, a.reasons) == (b.accepted, b.label, b.reasons)
            assert a.scores.keys() == b.scores.keys()


@pytest.mark.parametrize("shape", [(128, 128), (100, 75), (20, 24), (32, 32)])
def test_guard_subgraph_edge_maps(guards, guard_session, shape):
    """Non-integer and enlarging resampling, constant and all-zero maps: same scores as numpy."""
    cal = guards[0].calibration
    rng = np.random.default_rng(3)
    n = 5
    logits = rng.normal(size=(n, len(cal.class_names))).astype(np.float32)
    early = rng.normal(size=(n, *cal.feature_ref.shape)).astype(np.float32)
    cam = rng.random((n, *shape)).astype(np.float32)
    cam[1] = 0.0  # all zero
    cam[2] = 0.37  # constant
    cam[3] = 0.0
    cam[3, : shape[0] // 3, : shape[1] // 2] = 1.0  # a hard-edged blob
    (guard,) = guard_session.run(None, {"logits": logits, "cam": cam, "early": early})
    assert (guard[:, GUARD_COLUMNS.index("finite")] == 1.0).all()
    s_g, pv_g = scores_from_graph(guard, logits, cal)
    s_h = score_outputs(
        logits, cam, early, garbage=cal.garbage, ref_cams=cal.ref_prepared, feature_ref=cal.feature_ref, grid=cal.grid
    )
    np.testing.assert_allclose(s_g.sims, s_h.sims, atol=PARITY_ATOL["scores"], rtol=0)
    np.testing.assert_allclose(s_g.feature, s_h.feature, rtol=PARITY_ATOL["scores"])
    np.testing.assert_allclose(s_g.garbage_margin, s_h.garbage_margin, atol=1e-5)
    _assert_pvalues_close(pv_g, cal.null.pvalues(s_h), cal)


def test_guard_subgraph_flags_non_finite_outputs_per_image(guards, guard_session):
    cal = guards[0].calibration
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, len(cal.class_names))).astype(np.float32)
    early = rng.normal(size=(4, *cal.feature_ref.shape)).astype(np.float32)
    cam = rng.random((4, 64, 64)).astype(np.float32)
    cam[1, 10, 20] = np.nan
    early[2, 0, 1, 1] = np.inf
    logits[3, 0] = -np.inf
    (guard,) = guard_session.run(None, {"logits": logits, "cam": cam, "early": early})
    assert guard[:, GUARD_COLUMNS.index("finite")].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_graph_guard_rejects_non_finite_engine_output_per_item(guards, images):
    """Fail closed on the serving path: a NaN from the engine rejects its own item with GUARD_ERROR."""
    _, graph = guards
    x = preprocess_batch(images[:3], graph.spec)

    class NanEngine:
        name, providers, guarded = "nan", ["CPUExecutionProvider"], True

        def run(self, batch):
            out = graph.engine.run(batch)
            out.guard[1, GUARD_COLUMNS.index("finite")] = 0.0
            return out

    g = Guard(
        graph.bundle_dir,
        graph.manifest,
        NanEngine(),
        graph.calibration,
        policy="calibrated",
        enforced_checks=graph.enforced_checks,
    )
    v = g.verify_tensor(x)
    assert v[1].reasons == ["GUARD_ERROR"] and v[1].label is None
    assert "GUARD_ERROR" not in v[0].reasons and "GUARD_ERROR" not in v[2].reasons


def test_resolve_arithmetic(monkeypatch):
    monkeypatch.delenv("GAMGUARD_GUARD_ARITHMETIC", raising=False)
    assert resolve_arithmetic(None) == "graph"
    assert resolve_arithmetic("host") == "host"
    monkeypatch.setenv("GAMGUARD_GUARD_ARITHMETIC", "host")
    assert resolve_arithmetic(None) == "host"
    assert resolve_arithmetic("graph") == "graph"  # an explicit choice beats the environment
    with pytest.raises(ValueError, match="guard arithmetic"):
        resolve_arithmetic("gpu")


@pytest.mark.parametrize("n_in", [128, 100, 77, 33])
def test_area_matrix_is_opencv_inter_area_when_shrinking(n_in):
    import cv2

    rng = np.random.default_rng(n_in)
    m = rng.random((n_in, n_in + 9))
    want = cv2.resize(m, (32, 32), interpolation=cv2.INTER_AREA)
    got = sim.area_matrix(n_in, 32) @ m @ sim.area_matrix(n_in + 9, 32).T
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(sim.area_matrix(n_in, 32).sum(axis=1), 1.0)


@pytest.mark.parametrize("triangular", [True, False])
@pytest.mark.parametrize("polar", [True, False])
def test_feature_score_graph_matches_reference_for_any_whitener(guards, triangular, polar):
    """The graph splits a lower-triangular whitener into column blocks; any other whitener is used whole.
    Both give FeatureReference.score, on the polar form (what calibration fits) and on the raw features
    (bundles calibrated before it)."""
    import dataclasses

    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gamguard.runtime.checks.graph import _Builder, _feature_score

    ref = guards[0].calibration.feature_ref
    assert ref.normalize and ref.whitener.shape[0] == int(np.prod(ref.shape)) + 1
    if not polar:  # the raw kind: [D, D], no direction / log-norm in the graph
        d = int(np.prod(ref.shape))
        ref = dataclasses.replace(ref, whitener=ref.whitener[:d, :d], means=ref.means[:, :d], normalize=False)
    d = ref.whitener.shape[0]
    rng = np.random.default_rng(3)
    w = np.tril(ref.whitener) if triangular else ref.whitener + rng.normal(0, 1e-3, (d, d)).astype(np.float32)
    assert triangular == (not np.triu(w, 1).any())
    ref = dataclasses.replace(ref, whitener=w, means_white=(ref.means @ w).astype(np.float32))
    b = _Builder()
    out = _feature_score(b, "early", ref)
    graph = helper.make_graph(
        b.nodes,
        "feature",
        [helper.make_tensor_value_info("early", TensorProto.FLOAT, [None, *ref.shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, 1])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    early = rng.normal(0, 1, (5, *ref.shape)).astype(np.float32)
    got = session.run(None, {"early": early})[0][:, 0]
    want = ref.score(early)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert sum(n.op_type == "MatMul" for n in b.nodes) == (4 if triangular else 1)
    assert any(n.op_type == "ReduceL2" for n in b.nodes) == polar


def test_a_model_below_opset_18_gets_the_guard_subgraph_after_conversion(demo_bundle):
    """``export --opset 17`` (TensorRT 8.x) and ONNX-only models at opset 13-17: the subgraph's opset-18
    reductions need the model raised to opset 18 first; the guard output is the same."""
    import onnx
    import onnxruntime as ort
    from onnx import version_converter

    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.checks.graph import guarded_model
    from gamguard.runtime.guard import CalibrationData

    calibration = CalibrationData.load(demo_bundle, bundle_mod.load_manifest(demo_bundle, require_calibration=True))
    fused = onnx.load(str(demo_bundle / "model.onnx"))
    old = version_converter.convert_version(fused, 17)
    x = np.random.default_rng(0).random((2, 1, 128, 128), dtype=np.float32)
    outputs = [
        ort.InferenceSession(guarded_model(m, calibration).SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["logits", "guard"], {"image": x}
        )
        for m in (fused, old)
    ]
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_model_the_guard_subgraph_does_not_fit_is_served_with_host_arithmetic_or_refused(
    demo_bundle, monkeypatch, caplog
):
    """``auto``: a warning and the numpy reference on the host; ``graph`` asked for by name: a clear error."""
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.checks import graph

    def cannot(model, opset):
        raise graph.GuardGraphError("the model's opset 11 cannot be raised to 18 for the guard subgraph (test)")

    monkeypatch.setattr(graph, "_at_least_opset", cannot)
    monkeypatch.delenv(graph.ARITHMETIC_ENV, raising=False)
    with caplog.at_level("WARNING", logger="gamguard.runtime.guard"):
        guard = Guard.from_bundle(demo_bundle, providers="cpu", threads=1, prefer="onnxruntime")
    assert guard.engine.describe()["guard_arithmetic"] == "host"
    assert "opset 11 cannot be raised" in caplog.text and "runs on the host" in caplog.text
    with pytest.raises(bundle_mod.BundleError, match="arithmetic host"):
        Guard.from_bundle(demo_bundle, providers="cpu", threads=1, prefer="onnxruntime", arithmetic="graph")
