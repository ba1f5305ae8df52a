"""TensorRT support: what runs without a GPU (profiles, plan tags and the refusal rules, engine
selection, the build-engine command's validation and its clear error without TensorRT, the drift and
false-rejection-rate arithmetic on real ONNX Runtime outputs), and — only where TensorRT and a CUDA
GPU are present — a real plan build with parity against ONNX Runtime on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math

import numpy as np
import pytest

from gamguard.runtime import bundle as bundle_mod
from gamguard.runtime.bundle import InputSpec
from gamguard.runtime.checks.graph import GUARD_COLUMNS
from gamguard.runtime.cli import CommandError
from gamguard.runtime.commands import build_engine as build_engine_cmd
from gamguard.runtime.engines import EngineError
from gamguard.runtime.engines.drift import (
    DriftAccumulator,
    OrtCpuReference,
    drift_report,
    frr_check,
    frr_tolerance,
    paired_frr_change,
)
from gamguard.runtime.engines.plan import (
    DeviceTag,
    PlanMismatch,
    ShapeProfile,
    TensorRTUnavailable,
    check_plan_compatibility,
    make_profile,
    parse_batch_range,
    parse_spatial_range,
)
from gamguard.runtime.engines.tensorrt import TensorRTEngine, plan_status, select_engine

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
SPEC = InputSpec(channels=1, height=64, width=48, mean=(0.5,), std=(0.25,))


# ----------------------------------------------------------------------------------- profiles


def test_parse_batch_range_accepts_triples_and_a_single_max():
    assert parse_batch_range("1:8:32") == (1, 8, 32)
    assert parse_batch_range("16") == (1, 16, 16)
    assert parse_batch_range(" 2 : 4 : 4 ") == (2, 4, 4)


@pytest.mark.parametrize("bad", ["0:1:2", "8:4:16", "1:8:4", "a:b:c", "1:2", "1:2:3:4", "1:8:100000"])
def test_parse_batch_range_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="batch range"):
        parse_batch_range(bad)


def test_parse_spatial_range():
    assert parse_spatial_range("128:512") == (128, 512)
    for bad in ("512:128", "4:64", "x:1", "64"):
        with pytest.raises(ValueError, match="spatial range"):
            parse_spatial_range(bad)


def test_profile_pins_spatial_axes_for_a_fixed_size_model():
    p = make_profile(SPEC, (1, 8, 32), network_input_shape=(-1, 1, 64, 48))
    assert p == ShapeProfile((1, 1, 64, 48), (8, 1, 64, 48), (32, 1, 64, 48))
    assert p.admits((5, 1, 64, 48)) and not p.admits((33, 1, 64, 48)) and not p.admits((5, 1, 64, 64))
    with pytest.raises(ValueError, match="dynamic height and width"):
        make_profile(SPEC, (1, 8, 32), spatial=(32, 128), network_input_shape=(-1, 1, 64, 48))


def test_profile_gives_a_spatial_range_only_when_the_graph_allows_it():
    p = make_profile(SPEC, (1, 4, 16), spatial=(32, 128), network_input_shape=(-1, 1, -1, -1))
    assert p.min == (1, 1, 32, 32) and p.opt == (4, 1, 64, 48) and p.max == (16, 1, 128, 128)
    with pytest.raises(ValueError, match="must contain"):
        make_profile(SPEC, (1, 4, 16), spatial=(96, 128), network_input_shape=(-1, 1, -1, -1))


def test_profile_refuses_a_graph_that_disagrees_with_the_manifest():
    with pytest.raises(bundle_mod.BundleError, match="3 channels"):
        make_profile(SPEC, network_input_shape=(-1, 3, 64, 48))
    with pytest.raises(bundle_mod.BundleError, match="axis 2 is 128"):
        make_profile(SPEC, network_input_shape=(-1, 1, 128, 48))


# ----------------------------------------------------------------------------------- plan tags

ORIN = DeviceTag("10.3.0", "Orin", "8.7")


def tag_section(device=ORIN, onnx="abc"):
    return {
        **device.to_manifest(),
        "precision": "fp16",
        "onnx_sha256": onnx,
        "profile": ShapeProfile((1, 1, 64, 48), (8, 1, 64, 48), (32, 1, 64, 48)).to_manifest(),
    }


def test_plan_built_here_is_accepted():
    check_plan_compatibility(tag_section(), ORIN, "abc")  # no exception


def test_plan_for_another_tensorrt_version_is_refused_with_both_versions_named():
    with pytest.raises(PlanMismatch, match=r"TensorRT 10\.3\.0 but this machine has TensorRT 10\.7\.0"):
        check_plan_compatibility(tag_section(), DeviceTag("10.7.0", "Orin", "8.7"), "abc")


def test_plan_for_another_gpu_architecture_is_refused():
    with pytest.raises(PlanMismatch, match=r"built for GPU Orin \(compute capability 8\.7\).*NVIDIA H100"):
        check_plan_compatibility(tag_section(), DeviceTag("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"), "abc")


def test_stale_plan_and_untagged_plan_are_refused():
    with pytest.raises(PlanMismatch, match="different model.onnx"):
        check_plan_compatibility(tag_section(onnx="old"), ORIN, "new")
    with pytest.raises(PlanMismatch, match="untagged"):
        check_plan_compatibility(None, ORIN, "abc")


def test_guard_graph_plan_is_stale_after_recalibration():
    section = dict(tag_section(), guard_graph=True, reference_sha256="ref-old", guard_columns=list(GUARD_COLUMNS))
    check_plan_compatibility(section, ORIN, "abc", "ref-old")  # same calibration: fine
    with pytest.raises(PlanMismatch, match="earlier calibration"):
        check_plan_compatibility(section, ORIN, "abc", "ref-new")
    check_plan_compatibility(tag_section(), ORIN, "abc", "ref-new")  # a plain plan does not depend on it


def test_guard_graph_plan_of_another_version_is_stale():
    """A plan whose guard subgraph computes other columns (an earlier gamguard's) would feed the decision
    the wrong numbers: refused, with the rebuild command (a plan from before the columns were recorded too)."""
    section = dict(tag_section(), guard_graph=True, reference_sha256="ref")
    for columns in (None, list(GUARD_COLUMNS)[:-1]):
        stale = dict(section) if columns is None else dict(section, guard_columns=columns)
        with pytest.raises(PlanMismatch, match="not recorded.*or differ.*--guard-graph"):
            check_plan_compatibility(stale, ORIN, "abc", "ref")


def test_same_architecture_other_board_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        check_plan_compatibility(
            tag_section(DeviceTag("10.3.0", "NVIDIA A10", "8.6")), DeviceTag("10.3.0", "NVIDIA RTX A6000", "8.6"), "abc"
        )
    assert "tuned for the other board" in caplog.text


# ----------------------------------------------------------------------------------- engine selection


def make_bundle(tmp_path, *, plan: bool, tag: bool, onnx_bytes=b"onnx-model"):
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "model.onnx").write_bytes(onnx_bytes)
    if plan:
        (d / "model.plan").write_bytes(b"serialized-engine")
    manifest = {"model": {"name": "t", "version": "1"}, "input": SPEC.to_manifest()}
    manifest = bundle_mod.write_manifest(d, manifest)
    if tag:
        manifest["tensorrt"] = tag_section(onnx=manifest["files"]["model.onnx"])
        manifest = bundle_mod.write_manifest(d, manifest)
    return d, bundle_mod.load_manifest(d, require_calibration=False)


class Opened:
    """Stands in for the GPU engine in selection tests: records that selection chose to open it."""

    def __init__(self, bundle_dir, manifest):
        self.bundle_dir = bundle_dir


def refuse_with(exc):
    def opener(bundle_dir, manifest):
        raise exc

    return opener


def test_plan_status_explains_why_a_plan_is_not_usable(tmp_path):
    d, m = make_bundle(tmp_path, plan=False, tag=False)
    assert plan_status(d, m) == (False, "the bundle has no model.plan")
    (tmp_path / "b").mkdir()
    d2, m2 = make_bundle(tmp_path / "b", plan=True, tag=False)
    ok, why = plan_status(d2, m2)
    assert not ok and "no 'tensorrt' tag" in why
    m2 = dict(m2, tensorrt=tag_section(onnx="stale"))
    assert plan_status(d2, m2) == (
        False,
        "model.plan was built from a different model.onnx than the one in this bundle (stale plan); "
        "rebuild it with `gamguard build-engine`",
    )
    m2 = dict(m2, files={**m2["files"], "reference.npz": "ref-now"})  # calibrated, as a guard-graph plan needs
    m3 = dict(m2, tensorrt=dict(tag_section(onnx=m2["files"]["model.onnx"]), guard_graph=True, reference_sha256="x"))
    assert plan_status(d2, m3) == (
        False,
        "model.plan carries the guard subgraph of an earlier calibration (reference.npz changed since); "
        "rebuild it with `gamguard build-engine --guard-graph`",
    )
    graph_tag = dict(tag_section(onnx=m2["files"]["model.onnx"]), guard_graph=True)
    m4 = dict(m2, tensorrt=dict(graph_tag, reference_sha256="ref-now"))  # no guard_columns
    assert plan_status(d2, m4) == (
        False,
        "model.plan carries a guard subgraph whose columns are not recorded (built by an earlier gamguard) "
        "or differ from the ones this version reads; rebuild it with `gamguard build-engine --guard-graph`",
    )


def test_selection_prefers_a_tagged_plan_and_falls_back_to_onnxruntime(tmp_path):
    d, m = make_bundle(tmp_path, plan=True, tag=True)
    assert plan_status(d, m)[0]
    assert isinstance(select_engine(d, m, "auto", open_tensorrt=Opened), Opened)
    assert select_engine(d, m, "onnx", open_tensorrt=refuse_with(AssertionError("must not open"))) is None
    # TensorRT missing on this box: auto falls back, an explicit request fails with the reason.
    missing = refuse_with(TensorRTUnavailable("TensorRT is not installed"))
    assert select_engine(d, m, "auto", open_tensorrt=missing) is None
    with pytest.raises(TensorRTUnavailable, match="not installed"):
        select_engine(d, m, "tensorrt", open_tensorrt=missing)
    # A plan for another GPU is a deployment mistake: never silently served through ONNX Runtime.
    with pytest.raises(PlanMismatch):
        select_engine(d, m, "auto", open_tensorrt=refuse_with(PlanMismatch("built for GPU X")))
    with pytest.raises(ValueError, match="prefer"):
        select_engine(d, m, "fastest")


def test_selection_without_a_plan(tmp_path, caplog):
    d, m = make_bundle(tmp_path, plan=False, tag=False)
    with caplog.at_level(logging.INFO, logger="gamguard.runtime.engines.tensorrt"):
        assert select_engine(d, m, "auto", open_tensorrt=refuse_with(AssertionError("no plan"))) is None
    assert "no native TensorRT plan" in caplog.text
    with pytest.raises(PlanMismatch, match="gamguard build-engine"):
        select_engine(d, m, "tensorrt")


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_native_engine_without_tensorrt_fails_with_install_hint(tmp_path):
    d, m = make_bundle(tmp_path, plan=True, tag=True)
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT is not installed.*gamguard\[gpu\]"):
        TensorRTEngine(d, m)


# ----------------------------------------------------------------------------------- build-engine CLI


def cli(argv):
    """Parse and run ``gamguard build-engine`` exactly as the dispatcher does."""
    parser = argparse.ArgumentParser(prog="gamguard build-engine")
    build_engine_cmd.add_arguments(parser)
    return build_engine_cmd.run(parser.parse_args(argv))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "8:4:2"], "batch range"),
        (["--spatial", "64"], "spatial range"),
        (["--workspace-mb", "1"], "workspace"),
        (["--no-build"], "--check-drift"),
        (["--no-build", "--check-drift", ".", "--out", "x"], "cannot be combined"),
    ],
)
def test_build_engine_validates_flags_before_touching_the_gpu(argv, message):
    with pytest.raises(CommandError, match=message):
        cli(argv)


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_is_a_clear_user_error(tmp_path):
    d, _ = make_bundle(tmp_path, plan=False, tag=False)
    before = (d / "bundle.json").read_text()
    with pytest.raises(CommandError, match=r"TensorRT is not installed.*pip install 'gamguard\[gpu\]'"):
        cli(["--bundle", str(d), "--fp16"])
    assert (d / "bundle.json").read_text() == before and not (d / "model.plan").exists()


def test_build_engine_refuses_a_tampered_bundle_first(tmp_path):
    d, _ = make_bundle(tmp_path, plan=False, tag=False)
    (d / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(CommandError, match="does not match its SHA-256"):
        cli(["--bundle", str(d)])


# ----------------------------------------------------------------------------------- drift arithmetic


def tiny_fused_onnx(path, *, classes=3, size=16):
    """A real (tiny) fused-model-shaped ONNX graph: image → logits, cam, early."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(1, classes)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Sigmoid", ["image"], ["sig"]),
        helper.make_node("Squeeze", ["sig", "axes"], ["cam"]),
        helper.make_node("AveragePool", ["image"], ["early"], kernel_shape=[4, 4], strides=[4, 4]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", size, size]),
            helper.make_tensor_value_info("early", TensorProto.FLOAT, ["N", 1, size // 4, size // 4]),
        ],
        initializer=[w, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class Perturbed:
    """An engine whose outputs differ from ONNX Runtime's by a known amount (as FP16 would)."""

    def __init__(self, inner, delta):
        self.inner, self.delta = inner, delta

    def run(self, batch):
        from gamguard.runtime.engines import EngineOutput

        o = self.inner.run(batch)
        return EngineOutput(logits=o.logits + self.delta, cam=o.cam - self.delta, early=o.early)


def test_drift_report_measures_real_onnxruntime_outputs(tmp_path):
    from gamguard.runtime.engines import OnnxEngine

    model = tiny_fused_onnx(tmp_path / "model.onnx")
    reference = OrtCpuReference(model, threads=1)
    candidate = OnnxEngine(model, providers="cpu", threads=1)
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(5, 1, 16, 16)).astype(np.float32) for _ in range(3)]
    same = drift_report(reference, candidate, batches)["drift"]
    assert same["n"] == 15 and same["top1_agreement"] == 1.0
    assert same["cam"]["max_abs"] < 1e-6 and same["cam"]["min_cosine"] > 0.999999

    shifted = drift_report(reference, Perturbed(candidate, 0.01), batches)["drift"]
    assert shifted["logits"]["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert shifted["cam"]["mean_abs"] == pytest.approx(0.01, rel=1e-3)
    assert shifted["early"]["max_abs"] < 1e-6

    # With a guard decision, the report re-measures the FRR on the candidate engine.
    decide = lambda batch, out: out.logits.max(axis=1) > 0.0  # noqa: E731 - accept confident inputs
    with_frr = drift_report(reference, candidate, batches, decide=decide, alpha=0.05)
    ref_rate = 1.0 - np.mean(np.concatenate([decide(b, reference.run(b)) for b in batches]))
    assert with_frr["frr"]["candidate"]["frr"] == pytest.approx(ref_rate)
    assert with_frr["frr"]["decision_agreement"] == 1.0


def test_frr_tolerance_is_the_binomial_upper_bound():
    assert frr_tolerance(0.05, 400) == pytest.approx(0.05 + 1.645 * math.sqrt(0.05 * 0.95 / 400))
    ok = frr_check(np.array([True] * 95 + [False] * 5), 0.05)
    assert ok["frr"] == pytest.approx(0.05) and ok["holds"]
    bad = frr_check(np.array([True] * 85 + [False] * 15), 0.05)
    assert bad["frr"] == pytest.approx(0.15) and not bad["holds"]


def test_paired_frr_change_blames_an_engine_only_for_rejections_beyond_chance():
    ref = np.array([True] * 230 + [False] * 26)  # FRR 0.10 on the reference already
    same = paired_frr_change(ref, ref.copy())
    assert same == {"more_rejected": 0, "fewer_rejected": 0, "p": 1.0, "worse": False}
    swapped = ref.copy()
    swapped[:3], swapped[-3:] = False, True  # 3 more rejected, 3 fewer: same FRR, no blame
    balanced = paired_frr_change(ref, swapped)
    assert (balanced["more_rejected"], balanced["fewer_rejected"]) == (3, 3) and not balanced["worse"]
    worse = ref.copy()
    worse[:12] = False  # 12 more rejected, none fewer: p = 0.5 ** 12
    out = paired_frr_change(ref, worse)
    assert out["more_rejected"] == 12 and out["p"] == pytest.approx(0.5**12) and out["worse"]
    with pytest.raises(ValueError, match="shape"):
        paired_frr_change(ref, ref[:-1])


def test_engine_verdict_when_the_reference_itself_misses_the_bound(tmp_path):
    """Images on which ONNX Runtime CPU already rejects more than alpha allows: an engine that decides
    the same keeps the promise (the images are to blame), one that rejects more on top does not."""
    from gamguard.runtime.engines import OnnxEngine

    model = tiny_fused_onnx(tmp_path / "model.onnx")
    reference = OrtCpuReference(model, threads=1)
    candidate = OnnxEngine(model, providers="cpu", threads=1)
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(40, 1, 16, 16)).astype(np.float32) for _ in range(4)]
    scores = np.concatenate([reference.run(b).logits.max(axis=1) for b in batches])
    cut = float(np.quantile(scores, 0.2))  # the reference rejects 20 %, alpha is 5 %

    def decide(batch, out):
        return out.logits.max(axis=1) > cut

    same = drift_report(reference, candidate, batches, decide=decide, alpha=0.05)["frr"]
    assert not same["reference"]["holds"] and not same["candidate"]["holds"]
    assert same["engine_keeps_promise"] and same["change"]["more_rejected"] == 0
    shifted = drift_report(reference, Perturbed(candidate, -0.5), batches, decide=decide, alpha=0.05)["frr"]
    assert shifted["change"]["more_rejected"] > 10 and shifted["change"]["fewer_rejected"] == 0
    assert not shifted["engine_keeps_promise"]


def test_an_engine_missing_the_bound_fails_when_the_reference_meets_it(tmp_path):
    """A few extra rejections are no proof of a worse engine, but they are no excuse either: when ONNX
    Runtime CPU keeps the calibrated FRR on these images and the engine does not, the engine fails,
    significant or not."""
    from gamguard.runtime.engines import OnnxEngine

    model = tiny_fused_onnx(tmp_path / "model.onnx")
    reference = OrtCpuReference(model, threads=1)
    candidate = OnnxEngine(model, providers="cpu", threads=1)
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(20, 1, 16, 16)).astype(np.float32)]
    scores = reference.run(batches[0]).logits.max(axis=1)
    order = np.sort(scores)
    cut = float((order[0] + order[1]) / 2)  # the reference rejects 1 of 20 (0.05, within the bound)
    shift = float(order[4] - cut) + 1e-3  # the candidate rejects 4 more: FRR 0.25, above the bound 0.13

    def decide(batch, out):
        return out.logits.max(axis=1) > cut

    frr = drift_report(reference, Perturbed(candidate, -shift), batches, decide=decide, alpha=0.05)["frr"]
    assert frr["reference"]["holds"] and not frr["candidate"]["holds"]
    assert (frr["change"]["more_rejected"], frr["change"]["fewer_rejected"]) == (4, 0)
    assert not frr["change"]["worse"]  # p = 1/16: not significant on its own
    assert not frr["engine_keeps_promise"]


def test_drift_accumulator_rejects_mismatched_shapes():
    from gamguard.runtime.engines import EngineOutput

    a = EngineOutput(
        logits=np.zeros((2, 3), np.float32),
        cam=np.zeros((2, 4, 4), np.float32),
        early=np.zeros((2, 1, 2, 2), np.float32),
    )
    b = EngineOutput(
        logits=np.zeros((2, 3), np.float32),
        cam=np.zeros((2, 8, 8), np.float32),
        early=np.zeros((2, 1, 2, 2), np.float32),
    )
    with pytest.raises(ValueError, match="cam"):
        DriftAccumulator().add(a, b)


# ----------------------------------------------------------------------------------- on a GPU only


def _gpu_available() -> bool:
    if not HAVE_TENSORRT:
        return False
    try:
        from gamguard.runtime.engines.plan import current_device_tag

        current_device_tag()
        return True
    except Exception:  # noqa: BLE001 - any reason means: no usable GPU here
        return False


@pytest.mark.skipif(not _gpu_available(), reason="needs TensorRT 10, cuda-python and a CUDA GPU")
def test_plan_build_and_parity_on_gpu(tmp_path):
    from testlib import demo_bundle_path

    src = demo_bundle_path()
    out = tmp_path / "bundle"
    assert cli(["--bundle", str(src), "--out", str(out), "--batch", "1:4:8"]) == 0
    manifest = bundle_mod.load_manifest(out, require_calibration=False)
    section = manifest["tensorrt"]
    assert section["precision"] == "fp32" and manifest["files"]["model.plan"]
    engine = TensorRTEngine(out, manifest)
    spec = InputSpec.from_manifest(manifest["input"])
    x = np.random.default_rng(0).normal(size=(11, spec.channels, spec.height, spec.width)).astype(np.float32)
    report = drift_report(OrtCpuReference(out / "model.onnx"), engine, [x])["drift"]  # 11 > max batch 8
    assert report["n"] == 11
    assert report["logits"]["max_rel"] < 1e-2 and report["cam"]["max_abs"] < 2e-2
    assert json.dumps(engine.describe())


def test_drift_check_uses_the_serving_guards_decisions():
    """The FRR the drift check measures comes from the same decision the server makes."""
    from testlib import demo_bundle_path

    from gamguard.runtime.engines import OnnxEngine
    from gamguard.runtime.engines.drift import guard_decider
    from gamguard.runtime.guard import Guard
    from gamguard.runtime.preprocess import preprocess

    src = demo_bundle_path()
    manifest = bundle_mod.load_manifest(src)
    spec = InputSpec.from_manifest(manifest["input"])
    rng = np.random.default_rng(3)
    # Mixed inputs (smooth gradients and noise) so that both decisions occur.
    images = [
        np.clip(
            np.linspace(0, 1, spec.width)[None, :] * rng.uniform(0.5, 1.0)
            + rng.normal(0, s, (spec.height, spec.width)),
            0,
            1,
        ).astype(np.float32)
        for s in (0.0, 0.05, 0.3, 0.6)
        for _ in range(3)
    ]
    x = np.stack([preprocess(im, spec) for im in images])
    guard = Guard.from_bundle(src, prefer="onnx", threads=1)
    served = np.array([v.accepted for v in guard.verify_tensor(x)])
    decide, alpha = guard_decider(src, manifest)
    engine = OnnxEngine(src / "model.onnx", providers="cpu", threads=1)
    assert np.array_equal(decide(x, engine.run(x)), served)
    assert alpha == guard.alpha
    report = drift_report(OrtCpuReference(src / "model.onnx", threads=1), engine, [x], decide=decide, alpha=alpha)
    assert report["frr"]["candidate"]["frr"] == pytest.approx(1 - served.mean())
    assert report["frr"]["decision_agreement"] == 1.0


def test_plan_builder_keeps_only_the_requested_outputs(monkeypatch, tmp_path):
    """A logits-only baseline plan must really drop cam/early (else the TensorRT 'unguarded'
    baseline would contain the guard's work). No GPU here: TensorRT's network API is stood in for up
    to the point where outputs are chosen, and the build stops right after, at the profile."""
    from types import SimpleNamespace

    from gamguard.runtime.engines import plan as tensorrt_plan

    class Net:
        def __init__(self):
            self.outs = [SimpleNamespace(name=n) for n in ("logits", "cam", "early")]
            self.unmarked = []
            self.num_inputs = 1

        def get_input(self, i):
            return SimpleNamespace(name="image", shape=(-1, 1, 128, 128))

        @property
        def num_outputs(self):
            return len(self.outs)

        def get_output(self, i):
            return self.outs[i]

        def unmark_output(self, t):
            self.unmarked.append(t.name)
            self.outs.remove(t)

    nets = []

    class Stop(Exception):
        pass

    def new_network(flags):
        nets.append(Net())
        return nets[-1]

    fake = SimpleNamespace(
        Logger=lambda level: None,
        Builder=lambda logger: SimpleNamespace(create_network=new_network),
        OnnxParser=lambda network, logger: SimpleNamespace(parse_from_file=lambda p: True),
    )
    fake.Logger.WARNING = 0
    monkeypatch.setattr(tensorrt_plan, "require_tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_plan, "make_profile", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    spec = InputSpec(1, 128, 128, (0.5,), (0.25,))
    with pytest.raises(Stop):
        tensorrt_plan.build_plan_bytes(tmp_path / "m.onnx", spec, outputs=("logits",))
    assert sorted(nets[0].unmarked) == ["cam", "early"]
    with pytest.raises(ValueError, match="subset"):
        tensorrt_plan.build_plan_bytes(tmp_path / "m.onnx", spec, outputs=("bogus",))


def test_fp16_plans_pin_the_guard_subgraph_to_float32():
    """In an FP16 plan the guard's float arithmetic (ONNX nodes named guard/...) is asked to stay float32:
    every float output of a guard layer, and its computation when its float inputs are float32, index
    and condition inputs notwithstanding (the null-table gathers, Where). The model's layers and the
    guard's purely integer/boolean layers are left alone. No GPU here: TensorRT's layer API is stood in
    for by plain objects with the same attributes."""
    from types import SimpleNamespace

    from gamguard.runtime.engines.plan import pin_guard_layers_fp32

    f32, f16, i64, boolean = "float32", "float16", "int64", "bool"

    class Layer:
        def __init__(self, name, inputs, outputs):
            self.name, self.precision, self.types = name, None, {}
            self._in = [None if t is None else SimpleNamespace(dtype=t) for t in inputs]
            self._out = [SimpleNamespace(dtype=t) for t in outputs]
            self.num_inputs, self.num_outputs = len(self._in), len(self._out)

        def get_input(self, j):
            return self._in[j]

        def get_output(self, j):
            return self._out[j]

        def set_output_type(self, j, dtype):
            self.types[j] = dtype

    layers = [
        Layer("node_Conv_3", [f32, f32], [f32]),  # the model: FP16 is allowed there
        Layer("guard/MatMul_12", [f32, f32], [f32]),  # one-hot row selection of a null table
        Layer("guard/const_5", [], [f32]),
        Layer("guard/GatherElements_40", [f32, i64], [f32]),  # a knot lookup: index input
        Layer("guard/Where_41", [boolean, f32, f32], [f32]),  # interpolation: condition input
        Layer("guard/Slice_42", [f32, None, i64], [f32]),
        Layer("guard/GreaterOrEqual_7", [f32, f32], [boolean]),  # no float output: left alone
        Layer("guard/Cast_8", [boolean], [f32]),  # float output kept, no float input
        Layer("guard/Shape_9", [f32], [i64]),
        Layer("guard/Sub_10", [f16, f32], [f32]),  # a float16 input: output pinned, precision free
    ]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    trt = SimpleNamespace(float32=f32, float16=f16)
    assert pin_guard_layers_fp32(network, trt) == 7
    got = {layer.name: (layer.precision, layer.types) for layer in layers}
    for name in ("guard/MatMul_12", "guard/const_5", "guard/GatherElements_40", "guard/Where_41", "guard/Slice_42"):
        assert got[name] == (f32, {0: f32}), name
    assert got["guard/Cast_8"] == (f32, {0: f32})
    assert got["guard/Sub_10"] == (None, {0: f32})
    for name in ("node_Conv_3", "guard/GreaterOrEqual_7", "guard/Shape_9"):
        assert got[name] == (None, {}), name


def test_onnxruntime_cuda_sessions_run_in_full_float32():
    """TF32 stays off on ONNX Runtime CUDA: with it, the in-graph guard's p-values moved by up to 0.32
    on an H200 (one-hot table lookups are exact only in float32)."""
    from gamguard.runtime.engines import provider_entries

    entries = provider_entries(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert entries == [
        "TensorrtExecutionProvider",
        ("CUDAExecutionProvider", {"use_tf32": "0"}),
        "CPUExecutionProvider",
    ]
    assert provider_entries(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_default_providers_skip_tensorrt_when_its_libraries_are_missing(monkeypatch):
    """onnxruntime-gpu lists TensorrtExecutionProvider even without TensorRT installed; the default chain
    then starts at CUDA instead of making every session fail over with an "EP Error". A chain the user
    names is taken as given."""
    import onnxruntime as ort

    import gamguard.runtime.engines.onnx as onnx_engine
    from gamguard.runtime.engines import resolve_providers

    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(gpu_build))
    monkeypatch.setattr(onnx_engine, "tensorrt_libraries_load", lambda: False)
    assert resolve_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnx_engine, "tensorrt_libraries_load", lambda: True)
    assert resolve_providers(None) == gpu_build
    assert resolve_providers("tensorrt,cuda") == gpu_build


# ------------------------------------------------------------------------ captured CUDA graphs


def test_captured_runs_pad_and_slice_batches_exactly(tmp_path):
    """The binding, padding and slicing of engines/cuda_graphs.py, on ONNX Runtime CPU buffers (the
    capture itself needs a GPU: scripts/gpu_guard_probe.py checks it there): every batch size, below,
    at and above the captured ones, gives what a plain session gives, and a short batch never sees the
    rows an earlier, longer batch left in the buffers."""
    import onnxruntime as ort

    from gamguard.runtime.engines import session_options
    from gamguard.runtime.engines.cuda_graphs import CapturedRuns

    model = str(tiny_fused_onnx(tmp_path / "model.onnx"))
    outputs = ["logits", "cam", "early"]
    plain = ort.InferenceSession(model, sess_options=session_options(1), providers=["CPUExecutionProvider"])
    runs = CapturedRuns(model, plain=plain, outputs=outputs, threads=1, batches=(1, 2, 4), device="cpu")
    rng = np.random.default_rng(5)
    for n in (4, 3, 1, 2, 7, 9, 3):
        x = rng.normal(size=(n, 1, 16, 16)).astype(np.float32)
        got, want = runs.run(x), plain.run(outputs, {"image": x})
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    with pytest.raises(EngineError, match="shape"):
        runs.run(np.zeros((1, 1, 8, 8), np.float32))


def test_cuda_graphs_are_refused_without_cuda(tmp_path, monkeypatch):
    from gamguard.runtime.engines import OnnxEngine

    model = tiny_fused_onnx(tmp_path / "model.onnx", size=16)
    with pytest.raises(EngineError, match="CUDA graphs need the CUDA execution provider"):
        OnnxEngine(model, providers="cpu", threads=1, cuda_graphs=True)
    # the environment variable is for CUDA engines: a CPU reference beside them still works
    monkeypatch.setenv("GAMGUARD_CUDA_GRAPHS", "1")
    assert OnnxEngine(model, providers="cpu", threads=1).describe()["cuda_graphs"] is None
    assert OrtCpuReference(model, threads=1).describe()["cuda_graphs"] is None


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_captured_engine_matches_the_uncaptured_one_on_gpu(tmp_path):
    import concurrent.futures

    from gamguard.runtime.engines import OnnxEngine

    model = tiny_fused_onnx(tmp_path / "model.onnx", size=16)
    plain = OnnxEngine(model, providers="cuda", threads=1, input_hw=(16, 16), cuda_graphs=False)
    captured = OnnxEngine(model, providers="cuda", threads=1, input_hw=(16, 16), cuda_graphs=True)
    x = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    # made on this thread, served from another, as the server's engine thread does (ONNX Runtime keeps
    # captured graphs per thread: that thread captures again)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        runs = [pool.submit(captured.run, x).result() for _ in range(3)]
    a = plain.run(x)
    for b in runs:
        for field in ("logits", "cam", "early"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plan_builder_turns_tf32_off_and_pins_the_guard_in_fp16(monkeypatch, tmp_path, precision):
    """What build_plan_bytes asks of TensorRT's builder: TF32 cleared in every plan; in FP16 plans the
    FP16 flag, the guard's float layers pinned and precision constraints preferred. No GPU here:
    TensorRT's builder API is stood in for up to the build call, where the test stops."""
    from types import SimpleNamespace

    from gamguard.runtime.engines import plan as tensorrt_plan

    class Stop(Exception):
        pass

    class Config:
        def __init__(self):
            self.flags = {"TF32"}  # on by default, as in TensorRT

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            pass

    class Layer:
        def __init__(self, name):
            self.name, self.precision, self.num_inputs, self.num_outputs = name, None, 1, 1
            self.types = {}

        def get_input(self, j):
            return SimpleNamespace(dtype="float32")

        def get_output(self, j):
            return SimpleNamespace(dtype="float32")

        def set_output_type(self, j, dtype):
            self.types[j] = dtype

    layers = [Layer("node_Conv_1"), Layer("guard/MatMul_2")]
    network = SimpleNamespace(
        num_inputs=1,
        get_input=lambda i: SimpleNamespace(name="image", shape=(-1, 1, 128, 128)),
        num_outputs=3,
        get_output=lambda i: SimpleNamespace(name=("logits", "cam", "early")[i]),
        num_layers=len(layers),
        get_layer=lambda i: layers[i],
    )
    configs = []

    def create_config():
        configs.append(Config())
        return configs[-1]

    def build(net, config):
        raise Stop()

    builder = SimpleNamespace(
        create_network=lambda flags: network,
        create_builder_config=create_config,
        create_optimization_profile=lambda: SimpleNamespace(set_shape=lambda *a: None),
        build_serialized_network=build,
        platform_has_fast_fp16=True,
    )
    fake = SimpleNamespace(
        Logger=lambda level: None,
        Builder=lambda logger: builder,
        OnnxParser=lambda net, logger: SimpleNamespace(parse_from_file=lambda p: True),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=SimpleNamespace(TF32="TF32", FP16="FP16", PREFER_PRECISION_CONSTRAINTS="PREFER"),
        float32="float32",
        float16="float16",
    )
    fake.Logger.WARNING = 0
    monkeypatch.setattr(tensorrt_plan, "require_tensorrt", lambda: fake)
    profile = SimpleNamespace(min=(1, 1, 128, 128), opt=(8, 1, 128, 128), max=(32, 1, 128, 128))
    monkeypatch.setattr(tensorrt_plan, "make_profile", lambda *a, **k: profile)
    spec = InputSpec(1, 128, 128, (0.5,), (0.25,))
    with pytest.raises(Stop):
        tensorrt_plan.build_plan_bytes(tmp_path / "m.onnx", spec, precision=precision)
    if precision == "fp32":
        assert configs[0].flags == set()
        assert [layer.precision for layer in layers] == [None, None]
    else:
        assert configs[0].flags == {"FP16", "PREFER"}
        assert [layer.precision for layer in layers] == [None, "float32"]
