"""Every architecture of the zoo exports, and its fused map is autograd Grad-CAM.

The zoo (``gamguard.exporter.zoo``) holds small but structurally faithful ResNet-18/50, DenseNet-121,
EfficientNet-B0, MobileNetV3-Small, ConvNeXt-T and VGG-11-BN classifiers. Each is trained for a few
steps on the blob task of ``test_export`` (so batch-norm statistics move off their initial values and
the maps have structure), exported, and compared with the autograd Grad-CAM reference (pytorch-grad-cam's
semantics): CAM max |diff| <= 1e-3, logits <= 1e-4 relative, early features equal.

The ONNX-only route is checked the same way: the torch model is first exported to a plain ONNX
classifier (no gamguard involved), then guarded from that file alone.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("cv2")

import torch.nn.functional as F  # noqa: E402
from test_export import blobs, early_reference, reference_gradcam  # noqa: E402

from gamguard.exporter.export import export_bundle  # noqa: E402
from gamguard.exporter.zoo import ZOO  # noqa: E402
from gamguard.runtime import bundle as bundle_mod  # noqa: E402

SIZE = 64
CLASSES = ["round", "bar", "garbage"]
# The 1-channel variant of every architecture runs by default, the 3-channel variant (an RGB backbone
# fed replicated grey) of two of them; GAMGUARD_ZOO_FULL=1 adds the other five 3-channel variants
# (about 5 more minutes on two cores).
FULL = os.environ.get("GAMGUARD_ZOO_FULL") == "1"
CASES = [pytest.param(name, 1, id=f"{name}-1ch") for name in ZOO] + [
    pytest.param(
        name,
        3,
        id=f"{name}-3ch",
        marks=()
        if FULL or name in ("resnet18", "efficientnet_b0")
        else pytest.mark.skip(reason="3-channel variant: set GAMGUARD_ZOO_FULL=1"),
    )
    for name in ZOO
]


def _data(n, channels, seed):
    x, y, _ = blobs(n, SIZE, SIZE, seed)
    return x.repeat(1, channels, 1, 1), y


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (timings and exports comparable with the bench), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def trained_zoo_model(name, channels, steps=40, seed=0):
    """A zoo model trained briefly on the blob task (eval mode; cached: callers must not modify it)."""
    torch.manual_seed(seed)
    model, target, early = ZOO[name](len(CLASSES), channels)
    x, y = _data(512, channels, seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), target, early


def _bn_moved(model) -> bool:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)


def _check_against_reference(model, target, early, run, channels):
    worst = {"cam": 0.0, "logits": 0.0, "early": 0.0}
    structured = 0
    for batch, seed in ((1, 7), (3, 8)):
        x, _ = _data(batch, channels, 1000 + seed)
        logits, cam, feats = run(x)
        cam_ref, logits_ref = reference_gradcam(model, target, x)
        assert cam.shape == (batch, SIZE, SIZE)
        # a static export writes the full-size map without a clamp (exporter.onnx_fuse.CAM_MARGIN): it must
        # still be inside [0, 1], as the fused-output contract says
        assert 0.0 <= cam.min() and cam.max() <= 1.0, (cam.min(), cam.max())
        structured += int(np.sum(cam_ref.max(axis=(1, 2)) - cam_ref.min(axis=(1, 2)) > 0.5))
        same = logits.argmax(1) == logits_ref.argmax(1)
        worst["cam"] = max(worst["cam"], float(np.abs(cam[same] - cam_ref[same]).max()) if same.any() else 0.0)
        worst["logits"] = max(worst["logits"], float(np.abs(logits - logits_ref).max() / np.abs(logits_ref).max()))
        feats_ref = early_reference(model, early, x)
        worst["early"] = max(worst["early"], float(np.abs(feats - feats_ref).max() / np.abs(feats_ref).max()))
    assert structured >= 2, "the reference maps are blank: the parity check would be vacuous"
    assert worst["cam"] <= 1e-3, worst
    assert worst["logits"] <= 1e-4, worst
    assert worst["early"] <= 1e-5, worst
    return worst


@pytest.mark.parametrize("name, channels", CASES)
def test_zoo_exports_with_gradcam_parity(name, channels, tmp_path, one_torch_thread):
    model, target, early = trained_zoo_model(name, channels)
    assert _bn_moved(model)
    norm = ([0.5] * channels, [0.25] * channels)
    manifest = export_bundle(
        model,
        tmp_path / "b",
        class_names=CLASSES,
        garbage_class="garbage",
        target_layer=target,
        early_layer=early,
        input_shape=(channels, SIZE, SIZE),
        normalization=norm,
        model_name=name,
    )
    assert manifest["input"]["channels"] == channels
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    worst = _check_against_reference(
        model, target, early, lambda x: sess.run(["logits", "cam", "early"], {"image": x.numpy()}), channels
    )
    print(f"\n{name} {channels}ch ({manifest['export']['head_kind']}): {worst}")
    _check_served_graph(tmp_path / "b" / "model.onnx", sess, channels)


def _check_served_graph(model_path, exported, channels):
    """The graph the engine serves (and ``gamguard bench --zoo`` times) stops at the small map, and the
    host's full-size heatmaps from it are the exported model's CAM."""
    from gamguard.exporter.bench_zoo import _served_session

    served, heatmaps = _served_session(model_path, ["CPUExecutionProvider"], 1)
    assert heatmaps is not None, "the exporter's resize to the input size should be left to the host"
    x = _data(3, channels, seed=7)[0].numpy()
    logits, cam, early = exported.run(["logits", "cam", "early"], {"image": x})
    outputs = served.run(None, {"image": x})
    names = [o.name for o in served.get_outputs()]
    assert "cam" not in names and outputs[names.index("logits")].shape == logits.shape
    np.testing.assert_allclose(outputs[names.index("logits")], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[names.index("early")], early, rtol=1e-5, atol=1e-6)
    maps = heatmaps(outputs)()
    assert maps.shape == cam.shape
    assert np.abs(maps - cam).max() <= 1e-5


class _Taps(torch.nn.Module):
    """The model, returning its target and early activations too (to learn their ONNX tensor names)."""

    def __init__(self, model, target, early):
        super().__init__()
        self.model, self.store = model, {}
        mods = dict(model.named_modules())
        mods[target].register_forward_hook(lambda m, i, o: self.store.__setitem__("target", o))
        mods[early].register_forward_hook(lambda m, i, o: self.store.__setitem__("early", o))

    def forward(self, x):
        return self.model(x), self.store["target"], self.store["early"]


def torch_to_plain_onnx(model, target, early, path, channels, legacy_opset: int | None = None):
    """A plain ONNX classifier (input ``input``, output ``output``) in which the target and early
    activations are the tensors ``tgt`` and ``erl``: what a user finds by name in Netron. With
    ``legacy_opset``: torch's TorchScript exporter (``dynamo=False``) at that (old) opset, as older torch
    versions and many vendors' files deliver it; else the dynamo exporter at opset 18."""
    if legacy_opset is None:
        how = {"dynamo": True, "opset_version": 18, "external_data": False}
        how["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    else:
        how = {"dynamo": False, "opset_version": legacy_opset}
        how["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            _Taps(model, target, early).eval(),
            (torch.randn(2, channels, SIZE, SIZE),),
            str(path),
            input_names=["input"],
            output_names=["output", "tgt", "erl"],
            **how,
        )
    proto = onnx.load(str(path))
    del proto.graph.output[1:]
    onnx.save(proto, str(path))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small"])
def test_onnx_only_export_parity(name, tmp_path, one_torch_thread):
    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    model, target, early = trained_zoo_model(name, 1)
    torch_to_plain_onnx(model, target, early, tmp_path / "plain.onnx", 1)
    manifest = export_onnx_bundle(
        tmp_path / "plain.onnx",
        tmp_path / "b",
        target_tensor="tgt",
        early_tensor="erl",
        class_names=CLASSES,
        garbage_class="garbage",
        normalization=(0.5, 0.25),
    )
    assert manifest["export"]["exporter"] == "onnx-fuse" and manifest["garbage_class"] == 2
    bundle_mod.verify_hashes(tmp_path / "b", bundle_mod.read_manifest(tmp_path / "b"))
    proto = onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "cam", "early"]
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    # the logits come from the last Linear's Gemm: the backward starts from its weight's argmax row
    ops = {n.op_type for n in proto.graph.node}
    assert "Gather" in ops and "Equal" not in ops
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    worst = _check_against_reference(
        model, target, early, lambda x: sess.run(["logits", "cam", "early"], {"image": x.numpy()}), 1
    )
    print(f"\nONNX-only {name}: {worst}")
    _check_served_graph(tmp_path / "b" / "model.onnx", sess, 1)  # its resize to the input size is deferred too


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch names its TorchScript exporter legacy
@pytest.mark.parametrize("name, opset", [("resnet18", 9), ("efficientnet_b0", 11)])
def test_onnx_only_export_of_an_old_opset_model(name, opset, tmp_path, one_torch_thread):
    """A model at opset 9-12 is converted to opset 13 with onnx.version_converter, checked against the
    unconverted original, and recorded as converted; its Grad-CAM is the torch model's."""
    from gamguard.exporter.onnx_fuse import MIN_OPSET, default_opset, export_onnx_bundle, fuse_onnx_model

    model, target, early = trained_zoo_model(name, 1)
    torch_to_plain_onnx(model, target, early, tmp_path / "old.onnx", 1, legacy_opset=opset)
    assert default_opset(onnx.load(str(tmp_path / "old.onnx"))) == opset
    with pytest.raises(ValueError, match=rf"opset is {opset}; opset {MIN_OPSET} or later is needed"):
        fuse_onnx_model(onnx.load(str(tmp_path / "old.onnx")), "tgt", "erl")  # the low-level fuser converts nothing
    manifest = export_onnx_bundle(
        tmp_path / "old.onnx",
        tmp_path / "b",
        target_tensor="tgt",
        early_tensor="erl",
        class_names=CLASSES,
        garbage_class="garbage",
        normalization=(0.5, 0.25),
    )
    facts = manifest["export"]
    assert facts["source_opset"] == opset and facts["opset"] == MIN_OPSET
    assert facts["opset_converted_by"] == "onnx.version_converter"
    assert default_opset(onnx.load(str(tmp_path / "b" / "model.onnx"))) == MIN_OPSET
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    worst = _check_against_reference(
        model, target, early, lambda x: sess.run(["logits", "cam", "early"], {"image": x.numpy()}), 1
    )
    print(f"\nopset {opset} {name}: {worst}")


class _WithOutputActivation(torch.nn.Module):
    """A classifier whose forward returns probabilities, as Keras' Dense(K, activation="softmax") and many
    torch models do: ``activation`` is a module, a torch function or a Tensor method name."""

    def __init__(self, model, activation, reshape: bool = False):
        super().__init__()
        self.net, self.activation, self.reshape = model, activation, reshape

    def forward(self, x):
        z = self.net(x)
        if isinstance(self.activation, str):
            p = getattr(z, self.activation)(dim=1)
        else:
            p = self.activation(z) if isinstance(self.activation, torch.nn.Module) else self.activation(z, dim=1)
        return p.reshape(-1, z.shape[1]) if self.reshape else p  # as MONAI's Classifier ends: Reshape(K)


@pytest.mark.parametrize("activation", ["Softmax", "LogSoftmax"])
def test_onnx_only_a_final_softmax_is_taken_off(activation, tmp_path, one_torch_thread, caplog):
    """The bundle's logits are the input of a model's final Softmax / LogSoftmax: its Grad-CAM is the
    logits' (the paper's), and the guard's softmax of them gives the model's own probabilities back —
    not a softmax of probabilities. A final Sigmoid (multi-label) stays, with a warning."""
    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    model, target, early = trained_zoo_model("resnet18", 1)
    reshape = activation == "LogSoftmax"  # and a Reshape after it
    wrapped = _WithOutputActivation(model, getattr(torch.nn, activation)(dim=1), reshape=reshape).eval()
    torch_to_plain_onnx(wrapped, f"net.{target}", f"net.{early}", tmp_path / "probs.onnx", 1)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "probs.onnx")).graph.node]
    assert activation in ops and ("Reshape" in ops[ops.index(activation) :]) == reshape
    kw = dict(target_tensor="tgt", early_tensor="erl", class_names=CLASSES, garbage_class="garbage")
    manifest = export_onnx_bundle(tmp_path / "probs.onnx", tmp_path / "b", **kw)
    assert manifest["export"]["output_activation_removed"] == activation
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    run = lambda x: sess.run(["logits", "cam", "early"], {"image": x.numpy()})  # noqa: E731
    _check_against_reference(model, target, early, run, 1)  # the logits before the activation
    x, _ = _data(4, 1, 77)
    with torch.no_grad():
        served = torch.softmax(torch.from_numpy(run(x)[0]), 1)  # what the guard serves as probabilities
        np.testing.assert_allclose(served.numpy(), torch.softmax(model(x), 1).numpy(), rtol=1e-4, atol=1e-6)

    torch_to_plain_onnx(_WithOutputActivation(model, torch.nn.Sigmoid()).eval(), f"net.{target}", f"net.{early}",
                        tmp_path / "sigmoid.onnx", 1)  # fmt: skip
    with caplog.at_level("WARNING"):  # a final Sigmoid stays, with a warning that says what is served
        facts = export_onnx_bundle(tmp_path / "sigmoid.onnx", tmp_path / "s", **kw)["export"]
    assert facts["output_activation_removed"] is None and "Sigmoid" in facts["head"][-1]
    assert any("is a Sigmoid" in r.getMessage() and "not the model's own" in r.getMessage() for r in caplog.records)


def test_a_torch_forward_ending_in_softmax_exports_its_logits(tmp_path, one_torch_thread, caplog):
    """The same for a torch model: its forward's final softmax — a module, a Tensor method or a function —
    is left out of the fused graph and recorded; a final sigmoid stays in the head, with a warning."""
    from gamguard.exporter.gradcam import plan_head

    model, target, early = trained_zoo_model("efficientnet_b0", 1)
    kw = dict(class_names=CLASSES, garbage_class="garbage", target_layer=f"net.{target}",
              early_layer=f"net.{early}", input_shape=(1, SIZE, SIZE), normalization=([0.5], [0.25]))  # fmt: skip
    manifest = export_bundle(_WithOutputActivation(model, torch.nn.Softmax(dim=1)).eval(), tmp_path / "b", **kw)
    assert manifest["export"]["output_activation_removed"] == "Softmax"
    assert not any("softmax" in op.lower() for op in manifest["export"]["head"])
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    _check_against_reference(
        model, target, early, lambda x: sess.run(["logits", "cam", "early"], {"image": x.numpy()}), 1
    )
    example = torch.zeros(2, 1, SIZE, SIZE)
    plain = plan_head(model, target, early, example)
    for activation, kind in (("softmax", "Softmax"), (F.log_softmax, "LogSoftmax")):
        plan = plan_head(_WithOutputActivation(model, activation).eval(), f"net.{target}", f"net.{early}", example)
        origins = [o.replace("'net.", "'") for o in plan.origins]  # the wrapper's module names
        assert (plan.output_activation, origins) == (kind, plain.origins)
    with caplog.at_level("WARNING"):
        plan = plan_head(
            _WithOutputActivation(model, torch.nn.Sigmoid()).eval(), f"net.{target}", f"net.{early}", example
        )
    assert plan.output_activation is None and "Sigmoid" in plan.origins[-1]
    assert any("ends in a sigmoid" in r.getMessage() for r in caplog.records)


def test_a_softmax_then_a_reshape_is_still_the_models_softmax(one_torch_thread):
    """MONAI's Classifier ends in Linear → Softmax → Reshape(K): the reshape keeps the shape, so the logits
    are still the softmax's input."""
    from gamguard.exporter.gradcam import plan_head

    class SoftmaxThenReshape(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            p = torch.softmax(self.net(x), 1)
            return p.reshape(p.shape[0], -1).contiguous()

    model, target, early = trained_zoo_model("resnet18", 1)
    example = torch.zeros(2, 1, SIZE, SIZE)
    plan = plan_head(SoftmaxThenReshape(model).eval(), f"net.{target}", f"net.{early}", example)
    assert plan.output_activation == "Softmax" and plan.kind == plan_head(model, target, early, example).kind


def test_a_skip_connection_refusal_names_a_few_layers_not_the_plumbing():
    """A target inside a residual block (its output is added to the block's input): the refusal names
    the layers the logits also read, briefly — not every getattr / getitem of the traced forward."""
    from gamguard.exporter.gradcam import UnsupportedHeadError, plan_head

    model, _, early = ZOO["resnet50"](len(CLASSES), 1)  # untrained: only the trace matters
    with pytest.raises(UnsupportedHeadError, match="skip connection") as info:
        plan_head(model.eval(), "layer4.2.conv3", early, torch.zeros(2, 1, SIZE, SIZE))
    message = str(info.value)
    assert len(message) < 600 and "builtins" not in message and "getitem" not in message, message
    assert "module 'layer4." in message and "an enclosing block: 'layer4.2', 'layer4'" in message


class _PoolNet(torch.nn.Module):
    """stem → features (conv, BN, ReLU) → a global pool written as ``pool`` → Linear."""

    def __init__(self, pool):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = torch.nn.Sequential(conv(1, 8, 3, padding=1), torch.nn.ReLU())
        bn = torch.nn.BatchNorm2d(16)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        self.features = torch.nn.Sequential(conv(8, 16, 3, padding=1, stride=2), bn, torch.nn.ReLU())
        self.pool, self.fc = pool, torch.nn.Linear(16, len(CLASSES))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(self.stem(x))), 1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch names its TorchScript exporter legacy
@pytest.mark.parametrize(
    "pool, op",
    [
        (torch.nn.AvgPool2d(SIZE // 2), "AveragePool"),  # older torchvision ResNets: AvgPool2d(7)
        (torch.nn.MaxPool2d(SIZE // 2), "MaxPool"),
        (torch.nn.AdaptiveMaxPool2d(1), "MaxPool"),  # the TorchScript exporter writes a whole-map MaxPool
        (torch.nn.AvgPool2d(1280, ceil_mode=True), "AveragePool"),  # Hugging Face's EfficientNet pooler
    ],
    ids=["avgpool-whole-map", "maxpool-whole-map", "adaptive-max", "avgpool-larger-window"],
)
def test_onnx_only_global_pools_written_as_window_pools(pool, op, tmp_path, one_torch_thread):
    """A global pool written as an AveragePool / MaxPool whose window is the whole map (older torchvision
    ResNets, Caffe and PaddlePaddle conversions, global max pooling) exports, with autograd's Grad-CAM."""
    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    torch.manual_seed(0)
    model = _PoolNet(pool).eval()
    torch_to_plain_onnx(model, "features", "stem", tmp_path / "m.onnx", 1, legacy_opset=17)
    assert op in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    export_onnx_bundle(
        tmp_path / "m.onnx", tmp_path / "b", target_tensor="tgt", early_tensor="erl", class_names=CLASSES,
        garbage_class="garbage",
    )  # fmt: skip
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _ = _data(4, 1, 91)
    logits, cam, _ = sess.run(["logits", "cam", "early"], {"image": x.numpy()})
    cam_ref, logits_ref = reference_gradcam(model, "features", x)
    assert np.abs(cam - cam_ref).max() <= 1e-3 and np.abs(logits - logits_ref).max() <= 1e-4 * np.abs(logits_ref).max()


def _paddle_style_classifier(flatten: str):
    """A small ONNX classifier as paddle2onnx writes it: the flatten after the global pool is a Reshape to
    Concat(Slice(Shape(x), 0, 1), [-1]) — a shape ONNX shape inference leaves unknown, and with it every
    head tensor after it — then MatMul + Add + Softmax. ``flatten="Flatten"`` writes the same model with a
    plain Flatten."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((4, 1, 3, 3)), "w2": rng.standard_normal((8, 4, 3, 3)) * 0.5,
        "wf": rng.standard_normal((8, len(CLASSES))), "bf": rng.standard_normal(len(CLASSES)),
        "zero": [0], "one": [1], "minus1": [-1],
    }  # fmt: skip
    inits = [
        numpy_helper.from_array(np.asarray(v, np.int64 if k in ("zero", "one", "minus1") else np.float32), k)
        for k, v in weights.items()
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["feat_early"]),
        helper.make_node("Conv", ["feat_early", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["feat_target"]),
        helper.make_node("GlobalAveragePool", ["feat_target"], ["pooled"]),
    ]
    if flatten == "Flatten":
        nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
    else:
        nodes += [
            helper.make_node("Shape", ["pooled"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
            helper.make_node("Concat", ["n", "minus1"], ["new_shape"], axis=0),
            helper.make_node("Reshape", ["pooled", "new_shape"], ["flat"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["flat", "wf"], ["mm"]),
        helper.make_node("Add", ["mm", "bf"], ["logits_"]),
        helper.make_node("Softmax", ["logits_"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(CLASSES)])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_onnx_only_head_shapes_that_shape_inference_cannot_derive_are_measured(tmp_path):
    """paddle2onnx's flatten leaves the head's shapes unknown to ONNX shape inference (the export said
    "give --input-shape", which changed nothing): they are measured with ONNX Runtime instead, and the
    bundle is the same as that of the model written with a plain Flatten."""
    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    outputs = {}
    for flatten in ("paddle", "Flatten"):
        onnx.save(_paddle_style_classifier(flatten), str(tmp_path / f"{flatten}.onnx"))
        kw = dict(target_tensor="feat_target", early_tensor="feat_early", class_names=CLASSES, garbage_class="garbage")
        facts = export_onnx_bundle(tmp_path / f"{flatten}.onnx", tmp_path / flatten, **kw)["export"]
        assert facts["output_activation_removed"] == "Softmax"
        sess = ort.InferenceSession(str(tmp_path / flatten / "model.onnx"), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(5).standard_normal((3, 1, 16, 16)).astype(np.float32)
        outputs[flatten] = sess.run(["logits", "cam", "early"], {"image": x})
    for a, b in zip(outputs["paddle"], outputs["Flatten"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.ptp(outputs["paddle"][1]) > 0.5  # the maps have structure: the comparison is not vacuous


def test_onnx_only_refuses_an_old_model_that_cannot_be_converted(tmp_path):
    """An opset-9 model using an experimental op ONNX has since removed (ImageScaler) is refused by name,
    with the way out, and no bundle is written."""
    from onnx import helper

    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    graph = helper.make_graph(
        [
            helper.make_node("ImageScaler", ["input"], ["scaled"], scale=2.0, bias=[0.0]),
            helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["output"]),
        ],
        "old",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 1])],
    )
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    old.ir_version = 4
    onnx.save(old, str(tmp_path / "old.onnx"))
    with pytest.raises(ValueError, match=r"opset 9 and uses ImageScaler, which ONNX no longer defines.*re-export"):
        export_onnx_bundle(
            tmp_path / "old.onnx",
            tmp_path / "b",
            target_tensor="scaled",
            early_tensor="scaled",
            class_names=["a"],
            garbage_class=0,
        )
    assert not (tmp_path / "b").exists()


def tf2onnx_style(path, out_path, channels):
    """The plain ONNX classifier of :func:`torch_to_plain_onnx` rewritten the way tf2onnx delivers a Keras
    model: a channels-last input ``input_1`` [N, H, W, C] transposed to NCHW in the graph, the final
    Dense as MatMul + Add with its weight an initializer that is not a graph input, an ``ai.onnx.ml``
    opset import no node uses, and TensorFlow-style tensor names."""
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    (inp,) = g.input
    g.node.insert(0, helper.make_node("Transpose", ["input_1"], [inp.name], name="input_1_nchw", perm=[0, 3, 1, 2]))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("input_1", onnx.TensorProto.FLOAT, ["unk__41", SIZE, SIZE, channels]))
    (gemm,) = [n for n in g.node if n.op_type == "Gemm"]
    inits = {i.name: i for i in g.initializer}
    weight = numpy_helper.to_array(inits[gemm.input[1]])
    transposed = any(a.name == "transB" and a.i for a in gemm.attribute)
    g.initializer.append(
        numpy_helper.from_array((weight.T if transposed else weight).copy(), "model/logits/MatMul/ReadVariableOp:0")
    )
    i = list(g.node).index(gemm)
    g.node.remove(gemm)
    g.node.insert(
        i,
        helper.make_node(
            "MatMul",
            [gemm.input[0], "model/logits/MatMul/ReadVariableOp:0"],
            ["model/logits/MatMul:0"],
            name="model/logits/MatMul",
        ),
    )
    g.node.insert(
        i + 1,
        helper.make_node(
            "Add", ["model/logits/MatMul:0", gemm.input[2]], [gemm.output[0]], name="model/logits/BiasAdd"
        ),
    )
    del g.value_info[:]
    proto.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))
    onnx.save(proto, str(out_path))


def test_onnx_only_export_of_a_tf2onnx_style_model(tmp_path, one_torch_thread):
    """A Keras classifier as tf2onnx converts it (channels-last input, Dense as MatMul with an initializer
    that is no graph input, an unused ai.onnx.ml import): guarded as it comes, with an NCHW bundle input
    and the same Grad-CAM as the equivalent torch model's autograd reference."""
    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    model, target, early = trained_zoo_model("resnet18", 1)
    torch_to_plain_onnx(model, target, early, tmp_path / "plain.onnx", 1)
    tf2onnx_style(tmp_path / "plain.onnx", tmp_path / "keras.onnx", 1)
    manifest = export_onnx_bundle(
        tmp_path / "keras.onnx",
        tmp_path / "b",
        target_tensor="tgt",
        early_tensor="erl",
        class_names=CLASSES,
        garbage_class="garbage",
    )
    assert manifest["export"]["source_input_layout"] == "nhwc"
    assert (manifest["input"]["channels"], manifest["input"]["height"], manifest["input"]["width"]) == (
        1,
        SIZE,
        SIZE,
    )
    assert any(h.startswith("MatMul model/logits/MatMul") for h in manifest["export"]["head"])
    proto = onnx.load(str(tmp_path / "b" / "model.onnx"))
    (inp,) = proto.graph.input
    assert inp.name == "image" and [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [1, SIZE, SIZE]
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    _check_against_reference(
        model, target, early, lambda x: sess.run(["logits", "cam", "early"], {"image": x.numpy()}), 1
    )


def test_onnx_only_channels_last_tensors_are_refused_with_the_way_out(tmp_path):
    """tf2onnx without its transpose optimizer leaves Conv (NCHW) → Transpose → Relu (NHWC) →
    ReduceMean over axes 1, 2: naming the NHWC activation is refused, naming the Conv output works."""
    from onnx import helper, numpy_helper

    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Transpose", ["input_1"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["conv1"], ["conv1_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["conv1_nhwc"], ["relu1_nhwc"]),
        helper.make_node("Transpose", ["relu1_nhwc"], ["relu1"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Transpose", ["conv2"], ["conv2_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["conv2_nhwc"], ["relu2_nhwc"]),
        helper.make_node("ReduceMean", ["relu2_nhwc", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "wd"], ["mm"]),
        helper.make_node("Add", ["mm", "bd"], ["logits_tf"]),
    ]
    graph = helper.make_graph(
        nodes,
        "keras",
        [helper.make_tensor_value_info("input_1", onnx.TensorProto.FLOAT, ["n", 32, 32, 1])],
        [helper.make_tensor_value_info("logits_tf", onnx.TensorProto.FLOAT, ["n", 3])],
        [
            init("w1", (8, 1, 3, 3)), init("b1", (8,)), init("w2", (16, 8, 3, 3)), init("b2", (16,)),
            init("wd", (16, 3)), init("bd", (3,)), numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        ],
    )  # fmt: skip
    path = tmp_path / "nhwc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    common = dict(class_names=CLASSES, garbage_class=2)
    with pytest.raises(
        ValueError, match="target tensor 'relu2_nhwc' .* is channels-last .* other side of that Transpose"
    ):
        export_onnx_bundle(path, tmp_path / "b1", target_tensor="relu2_nhwc", early_tensor="conv1", **common)
    with pytest.raises(ValueError, match="early tensor 'relu1_nhwc' .* is channels-last"):
        export_onnx_bundle(path, tmp_path / "b2", target_tensor="conv2", early_tensor="relu1_nhwc", **common)
    manifest = export_onnx_bundle(path, tmp_path / "b3", target_tensor="conv2", early_tensor="conv1", **common)
    assert manifest["export"]["source_input_layout"] == "nhwc" and manifest["outputs"]["cam"] == [32, 32]
    assert [h.split()[0] for h in manifest["export"]["head"]] == ["Transpose", "Relu", "ReduceMean", "MatMul", "Add"]
    # the map is Grad-CAM of that head: the gradient of the top logit reaches conv2 through the
    # Transpose, the Relu and the mean, so the map varies with the input
    sess = ort.InferenceSession(str(tmp_path / "b3" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((4, 1, 32, 32)).astype(np.float32)
    _, cam, _ = sess.run(["logits", "cam", "early"], {"image": x})
    assert cam.shape == (4, 32, 32) and float(np.abs(cam - cam[:1]).max()) > 0.1


def test_onnx_only_refuses_a_blank_map_and_an_invalid_source(tmp_path):
    """A 1x1 target (InceptionV3 at 96x96) would give a blank Grad-CAM for every input; a converter's
    invalid output (tf2onnx leaves PartitionedCall nodes for ConvNeXt) is named as the source's fault."""
    from onnx import helper, numpy_helper

    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "wd"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["early_act"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["last"]),  # [n, 4, 1, 1]
        helper.make_node("Flatten", ["last"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wd"], ["logits_out"]),
    ]
    io = (
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits_out", onnx.TensorProto.FLOAT, ["n", 3])],
    )
    path = tmp_path / "one.onnx"
    onnx.save(
        helper.make_model(helper.make_graph(nodes, "g", *io, inits), opset_imports=[helper.make_opsetid("", 18)]),
        str(path),
    )
    common = dict(target_tensor="last", early_tensor="early_act", class_names=CLASSES, garbage_class=2)
    with pytest.raises(ValueError, match=r"target tensor 'last' .* has a 1x1 map: its Grad-CAM is blank"):
        export_onnx_bundle(path, tmp_path / "b1", **common)
    bad = helper.make_node("PartitionedCall", ["flat"], ["pc"])
    broken = helper.make_graph([*nodes, bad], "g", *io, inits)
    onnx.save(helper.make_model(broken, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "broken.onnx"))
    with pytest.raises(ValueError, match=r"broken.onnx: the model itself is not valid ONNX .*PartitionedCall"):
        export_onnx_bundle(tmp_path / "broken.onnx", tmp_path / "b2", **common)
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_cli_export_onnx_without_torch(tmp_path):
    """`gamguard export --onnx` in a process where torch cannot be imported; a 3-channel model with
    per-channel normalisation, served from grey images replicated to its channels."""
    model, target, early = trained_zoo_model("resnet18", 3)
    torch_to_plain_onnx(model, target, early, tmp_path / "rgb.onnx", 3)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from gamguard.runtime.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    args = [
        "export",
        "--onnx",
        str(tmp_path / "rgb.onnx"),
        "--target-tensor",
        "tgt",
        "--early-tensor",
        "erl",
        "--out",
        str(tmp_path / "b"),
        "--class-names",
        ",".join(CLASSES),
        "--garbage-class",
        "garbage",
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
        "--json",
    ]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["input"]["channels"] == 3 and manifest["input"]["channel_source"] == "grey-replicated"
    assert manifest["input"]["mean"] == [0.485, 0.456, 0.406] and manifest["garbage_class"] == 2
    assert manifest["export"]["exporter"] == "onnx-fuse" and "ONNX Runtime vs the original" in done.stderr

    # the runtime's preprocessing feeds the grey image to every channel, normalised per channel
    from gamguard.runtime.bundle import InputSpec
    from gamguard.runtime.preprocess import preprocess

    spec = InputSpec.from_manifest(manifest["input"])
    grey = np.random.default_rng(0).uniform(0, 1, (80, 70)).astype(np.float32)
    x = preprocess(grey, spec)
    assert x.shape == (3, SIZE, SIZE)
    back = x * np.asarray(spec.std, np.float32)[:, None, None] + np.asarray(spec.mean, np.float32)[:, None, None]
    np.testing.assert_allclose(back[0], back[1], atol=1e-5)
    np.testing.assert_allclose(back[1], back[2], atol=1e-5)
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, cam, _ = sess.run(["logits", "cam", "early"], {"image": x[None]})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(x[None])).numpy(), rtol=1e-4, atol=1e-4)

    bad = subprocess.run([sys.executable, "-c", code, *args[:6], "nope", *args[7:-1]], capture_output=True, text=True)
    assert bad.returncode == 2 and "early tensor 'nope' is not produced in the graph" in bad.stderr


def test_onnx_only_unsupported_op_is_named(tmp_path):
    """A head op without a backward rule (ConvNeXt's LayerNorm2d exported through a Gather) is refused
    by name, with a hint."""
    from gamguard.exporter.onnx_fuse import UnsupportedOnnxOpError, export_onnx_bundle

    model, target, early = ZOO["convnext_tiny"](len(CLASSES), 1)
    torch_to_plain_onnx(model.eval(), target, early, tmp_path / "m.onnx", 1)
    with pytest.raises(
        UnsupportedOnnxOpError, match=r"\((Gather|Slice)\) in the head after 'tgt' has no backward rule"
    ):
        export_onnx_bundle(
            tmp_path / "m.onnx",
            tmp_path / "b",
            target_tensor="tgt",
            early_tensor="erl",
            class_names=CLASSES,
            garbage_class=2,
        )
    assert not (tmp_path / "b").exists()


def test_garbage_class_for_zoo_heads():
    """add_garbage_class widens MobileNetV3's last Linear and a SqueezeNet-style final 1x1 conv;
    finetune_with_garbage trains the new class; the first N logits are unchanged."""
    from torch import nn

    from gamguard.exporter.garbage import add_garbage_class, finetune_with_garbage

    torch.manual_seed(0)
    mobilenet, _, _ = ZOO["mobilenet_v3_small"](2, 1)
    squeeze = nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    x, y = _data(48, 1, 5)
    keep = y < 2
    x_id, y_id, x_garbage = x[keep], y[keep], x[~keep]
    for model, layer in ((mobilenet.eval(), "classifier.3"), (squeeze.eval(), "2")):
        with torch.no_grad():
            before = model(x_id)
        add_garbage_class(model)
        widened = dict(model.named_modules())[layer]
        assert (widened.out_features if isinstance(widened, nn.Linear) else widened.out_channels) == 3
        with torch.no_grad():
            torch.testing.assert_close(model(x_id)[:, :2], before, rtol=1e-5, atol=1e-5)
        finetune_with_garbage(model, x_id, y_id, x_garbage, epochs=40, lr=3e-2)
        with torch.no_grad():
            assert (model(x_garbage).argmax(1) == 2).float().mean() > 0.5
