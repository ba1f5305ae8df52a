"""The fused Grad-CAM ONNX export against an autograd Grad-CAM with pytorch-grad-cam semantics.

pytorch-grad-cam itself needs torchvision, so the reference below re-implements its ``GradCAM``
path (``BaseCAM.forward`` with ``targets=None`` and one target layer) with autograd hooks and
``cv2.resize``, step for step. The test models are trained for a few seconds on an easy task
(a bright blob on the left vs. on the right) so the maps are not blank.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from gamguard.exporter.export import ExportError, check_onnx_graph, export_bundle  # noqa: E402
from gamguard.exporter.gradcam import FusedGradCAM, UnsupportedHeadError, plan_head  # noqa: E402
from gamguard.runtime import bundle as bundle_mod  # noqa: E402

TRAIN_SIZE = 32
SIZES = [(32, 32), (48, 40)]  # (H, W): the training size and a non-square, non-multiple size
NORM = {"mean": [0.5], "std": [0.25]}
CLASSES = ["left", "right", "garbage"]


# ---------------------------------------------------------------------------------------------
# small test models: the three head forms
# ---------------------------------------------------------------------------------------------
def _conv_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class GapLinearNet(nn.Module):
    """features → GAP → Flatten → Linear: the closed-form head."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(1, 8, 2)
        self.features = nn.Sequential(_conv_bn(8, 16, 2), _conv_bn(16, 16, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(self.stem(x)))))


class SequentialHeadNet(nn.Module):
    """A multi-module nn.Sequential head: 1x1 conv, BatchNorm, ReLU, GAP, MLP with dropout."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(1, 8, 2)
        self.features = nn.Sequential(_conv_bn(8, 16, 2), _conv_bn(16, 16, 1))
        self.head = nn.Sequential(
            nn.Conv2d(16, 16, 1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(16, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(32, 3),
        )

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResNetStyle(nn.Module):
    """torchvision-ResNet-style forward: avgpool → torch.flatten → fc, functional ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


MODELS = {
    # name: (class, target_layer, early_layer, expected head kind)
    "gap_linear": (GapLinearNet, "features", "stem", "gap_linear"),
    "sequential_head": (SequentialHeadNet, "features", "stem", "generic"),
    "resnet_style": (ResNetStyle, "layer2", "layer1", "gap_linear"),
}


# ---------------------------------------------------------------------------------------------
# data and training: class 0 a bright round blob, 1 a bright horizontal bar, 2 (garbage) noise;
# objects at random positions
# ---------------------------------------------------------------------------------------------
def blobs(n, h, w, seed):
    """Returns (x [n,1,h,w] normalised, y [n], centres [n,2] as (row, col) in pixels)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    imgs = rng.normal(0.3, 0.05, (n, h, w)).astype(np.float32)
    centres = np.zeros((n, 2), np.float32)
    for i in range(n):
        if y[i] == 2:
            imgs[i] = rng.uniform(0, 1, (h, w))
            continue
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        centres[i] = cy, cx
        r = rng.uniform(0.08, 0.12) * min(h, w)
        sx = 3 * r if y[i] == 1 else r  # the bar is three times longer than high
        imgs[i] += 0.6 * np.exp(-((xx - cx) ** 2 / (2 * sx * sx) + (yy - cy) ** 2 / (2 * r * r)))
    x = (np.clip(imgs, 0, 1) - 0.5) / 0.25
    return torch.from_numpy(x[:, None].astype(np.float32)), torch.from_numpy(y), centres


def train_model(cls, seed=0, steps=80):
    torch.manual_seed(seed)
    model = cls()
    x, y, _ = blobs(768, TRAIN_SIZE, TRAIN_SIZE, seed=seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt, _ = blobs(96, TRAIN_SIZE, TRAIN_SIZE, seed=seed + 200)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return model, acc


# ---------------------------------------------------------------------------------------------
# reference: pytorch-grad-cam's GradCAM, re-implemented with autograd (torchvision not needed)
# ---------------------------------------------------------------------------------------------
def _scale_cam_image(cam, target_size=None):
    out = []
    for img in cam:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        if target_size is not None:
            img = cv2.resize(img, target_size)  # target_size = (width, height), INTER_LINEAR
        out.append(img)
    return np.float32(out)


def reference_gradcam(model, layer_name, x):
    layer = dict(model.named_modules())[layer_name]
    store = {}

    def hook(_module, _inp, output):
        store["act"] = output.detach().clone()
        output.register_hook(lambda grad: store.__setitem__("grad", grad.detach().clone()))

    handle = layer.register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_(True)
        outputs = model(x)
        cats = np.argmax(outputs.detach().numpy(), axis=-1)
        model.zero_grad()
        loss = sum(outputs[i, c] for i, c in enumerate(cats))
        loss.backward()
    finally:
        handle.remove()
    acts, grads = store["act"].numpy(), store["grad"].numpy()
    weights = np.mean(grads, axis=(2, 3))  # GradCAM.get_cam_weights
    cam = (weights[:, :, None, None] * acts).sum(axis=1)  # BaseCAM.get_cam_image
    cam = np.maximum(cam, 0)
    scaled = _scale_cam_image(cam, (x.shape[-1], x.shape[-2]))  # compute_cam_per_layer
    per_layer = np.maximum(scaled[:, None], 0)  # aggregate_multi_layers
    return _scale_cam_image(np.mean(per_layer, axis=1)), outputs.detach().numpy()


def early_reference(model, layer_name, x, pool=(8, 8)):
    layer = dict(model.named_modules())[layer_name]
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return F.adaptive_avg_pool2d(store["a"], pool).numpy()


# ---------------------------------------------------------------------------------------------
# fixtures: train each model once, export it once (dynamic H/W, opset 18)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    # One thread: on a shared, loaded CI machine more threads make these tiny models slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for i, (name, (cls, *_)) in enumerate(MODELS.items()):
        model, acc = train_model(cls, seed=i)
        assert acc > 0.8, f"{name} did not learn the blob task (accuracy {acc:.2f})"
        out[name] = model
    yield out
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = {}
    for name, (_, target, early, _) in MODELS.items():
        d = tmp_path_factory.mktemp(name)
        manifest = export_bundle(
            trained[name],
            d,
            class_names=CLASSES,
            garbage_class="garbage",
            target_layer=target,
            early_layer=early,
            input_shape=(1, TRAIN_SIZE, TRAIN_SIZE),
            normalization=NORM,
            model_name=name,
            dynamic_spatial=True,
        )
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        out[name] = (d, manifest, sess)
    return out


def _run(sess, x):
    return sess.run(["logits", "cam", "early"], {"image": x.numpy()})


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_cam_parity_with_autograd_gradcam(name, trained, exported):
    model = trained[name]
    _, target, early, kind = MODELS[name]
    _, manifest, sess = exported[name]
    assert manifest["export"]["head_kind"] == kind
    worst = {"cam": 0.0, "logits": 0.0, "early": 0.0}
    for h, w in SIZES:
        for batch in (1, 3):
            x, _, _ = blobs(batch, h, w, seed=1000 + h + batch)
            logits, cam, feats = _run(sess, x)
            cam_ref, logits_ref = reference_gradcam(model, target, x)
            assert cam.shape == (batch, h, w) and cam.dtype == np.float32
            # Trained weights: maps have structure, not a blank or constant image.
            assert np.all(cam_ref.max(axis=(1, 2)) - cam_ref.min(axis=(1, 2)) > 0.5)
            assert 0.0 <= cam.min() and cam.max() <= 1.0 + 1e-6
            worst["cam"] = max(worst["cam"], float(np.abs(cam - cam_ref).max()))
            worst["logits"] = max(worst["logits"], float(np.abs(logits - logits_ref).max() / np.abs(logits_ref).max()))
            feats_ref = early_reference(model, early, x)
            assert feats.shape == feats_ref.shape == (batch, 8, 8, 8)
            worst["early"] = max(worst["early"], float(np.abs(feats - feats_ref).max()))
    print(
        f"\n{name}: max |cam - ref| {worst['cam']:.2e}, logits rel {worst['logits']:.2e}, "
        f"early abs {worst['early']:.2e}"
    )
    assert worst["cam"] <= 1e-3
    assert worst["logits"] <= 1e-4
    assert worst["early"] <= 1e-5


def test_bundle_manifest_and_hashes(exported):
    d, manifest, _ = exported["resnet_style"]
    on_disk = bundle_mod.read_manifest(d)
    assert on_disk == json.loads(json.dumps(manifest))
    bundle_mod.verify_hashes(d, on_disk)  # model.onnx listed with its SHA-256
    assert on_disk["class_names"] == CLASSES and on_disk["garbage_class"] == 2
    assert on_disk["input"]["channels"] == 1 and on_disk["input"]["height"] == TRAIN_SIZE
    assert on_disk["input"]["mean"] == [0.5] and on_disk["input"]["std"] == [0.25]
    assert on_disk["layers"] == {"target": "layer2", "early": "layer1"}
    assert on_disk["outputs"] == {"cam": [TRAIN_SIZE, TRAIN_SIZE], "early": [8, 8, 8]}
    assert on_disk["calibration"] is None
    assert on_disk["guard"]["enforced_checks"] == ["garbage", "attention", "feature"]
    facts = on_disk["export"]
    assert facts["opset"] == 18 and facts["exporter"] == "dynamo" and facts["seconds"] > 0
    with pytest.raises(bundle_mod.BundleError, match="no calibration"):
        bundle_mod.load_manifest(d)


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_is_standard_onnx_with_dynamic_batch(name, exported):
    d, _, sess = exported[name]
    proto = onnx.load(str(d / "model.onnx"))
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    ops = {n.op_type for n in proto.graph.node}
    assert not any("Grad" in op or op in ("Gradient", "Momentum", "Adam") for op in ops), ops
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    for n in (1, 3, 5):
        x, _, _ = blobs(n, TRAIN_SIZE, TRAIN_SIZE, seed=n)
        logits, cam, early = _run(sess, x)
        assert logits.shape == (n, 3) and cam.shape == (n, TRAIN_SIZE, TRAIN_SIZE)
        assert early.shape == (n, 8, 8, 8)
        # Each row is computed independently of the rest of the batch.
        single = _run(sess, x[-1:])
        np.testing.assert_allclose(single[1][0], cam[-1], atol=1e-5)


def test_opset17_legacy_exporter_matches(trained, exported, tmp_path):
    name = "sequential_head"
    model = trained[name]
    _, target, early, _ = MODELS[name]
    # Re-exporting over an old bundle drops the files derived from the old model.
    (tmp_path / "reference.npz").write_bytes(b"old references")
    manifest = export_bundle(
        model,
        tmp_path,
        class_names=CLASSES,
        garbage_class=2,
        target_layer=target,
        early_layer=early,
        input_shape=(1, TRAIN_SIZE, TRAIN_SIZE),
        normalization=NORM,
        opset=17,
    )
    assert manifest["export"]["exporter"] == "torchscript"
    assert not (tmp_path / "reference.npz").exists() and list(manifest["files"]) == ["model.onnx"]
    proto = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    # Static input size: no control flow and no shape arithmetic for TensorRT 8.x to trip on.
    assert not {"If", "Loop", "Range", "Mod"} & {n.op_type for n in proto.graph.node}
    sess17 = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _, _ = blobs(3, TRAIN_SIZE, TRAIN_SIZE, seed=3)
    out17, out18 = _run(sess17, x), _run(exported[name][2], x)
    cam_ref, _ = reference_gradcam(model, target, x)
    assert np.abs(out17[1] - cam_ref).max() <= 1e-3
    for a, b in zip(out17, out18):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


# --- heads outside the hand-written rules: a traced backward, or a clear error -----------------
class SigmoidHead(GapLinearNet):
    def __init__(self):
        super().__init__()
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.act(super().forward(x))


class Conv3x3Head(SequentialHeadNet):
    def __init__(self):
        super().__init__()
        self.head[0] = nn.Conv2d(16, 16, 3, padding=1)


class GeluHead(ResNetStyle):
    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.gelu(torch.flatten(self.avgpool(x), 1)))


class SkipAroundTarget(GapLinearNet):
    def forward(self, x):
        s = self.stem(x)
        f = self.features(s) + F.avg_pool2d(s, 2).repeat(1, 2, 1, 1)
        return self.fc(self.flatten(self.pool(f)))


class MedianHead(GapLinearNet):
    """The spatial median: torch differentiates it, the ONNX exporter cannot translate it."""

    def forward(self, x):
        return self.fc(self.features(self.stem(x)).flatten(2).median(2).values)


@pytest.mark.parametrize("cls, target", [(SigmoidHead, "features"), (Conv3x3Head, "features"), (GeluHead, "layer2")])
def test_heads_outside_the_rules_get_a_traced_backward(cls, target, tmp_path):
    """Sigmoid, a 3x3 conv, GELU after the target: exported with a traced backward, autograd Grad-CAM."""
    model, acc = train_model(cls, steps=60)
    early = "stem" if hasattr(model, "stem") else "layer1"
    # outside the hand-written rules ...
    assert plan_head(model, target, early, torch.randn(2, 1, TRAIN_SIZE, TRAIN_SIZE)).kind == "traced"
    manifest = export_bundle(  # ... but exported all the same
        model,
        tmp_path / "b",
        class_names=CLASSES,
        garbage_class=2,
        target_layer=target,
        early_layer=early,
        input_shape=(1, TRAIN_SIZE, TRAIN_SIZE),
        normalization=NORM,
    )
    assert manifest["export"]["head_kind"] == "traced"
    assert not {"Gradient"} & set(manifest["export"]["op_types"])
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _, _ = blobs(4, TRAIN_SIZE, TRAIN_SIZE, seed=77)
    logits, cam, _ = _run(sess, x)
    cam_ref, logits_ref = reference_gradcam(model, target, x)
    assert np.all(cam_ref.max(axis=(1, 2)) - cam_ref.min(axis=(1, 2)) > 0.5)
    assert np.abs(cam - cam_ref).max() <= 1e-3
    assert np.abs(logits - logits_ref).max() <= 1e-4 * np.abs(logits_ref).max()


@pytest.mark.parametrize(
    "cls, target, early, opset, pattern",
    [
        (SkipAroundTarget, "features", "stem", 18, r"F\.avg_pool2d.*skip connection"),
        (
            MedianHead,
            "features",
            "stem",
            18,
            r"uses the operator aten\.median.*cannot translate.*Choose a later target_layer",
        ),
        # opset 17 (TorchScript exporter) would bake the example batch size into a traced backward
        (GeluHead, "layer2", "layer1", 17, r"opset 17.*traced backward.*Export with opset 18"),
    ],
)
def test_unexportable_head_is_a_clear_error(cls, target, early, opset, pattern, tmp_path):
    with pytest.raises(UnsupportedHeadError, match=pattern):
        export_bundle(
            cls().eval(),
            tmp_path / "b",
            class_names=CLASSES,
            garbage_class=2,
            target_layer=target,
            early_layer=early,
            input_shape=(1, TRAIN_SIZE, TRAIN_SIZE),
            normalization=NORM,
            opset=opset,
        )
    assert not (tmp_path / "b" / "model.onnx").exists()


class SharedRelu(nn.Module):
    """One ReLU module used twice, and an early layer inside the target Sequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_conv_bn(1, 8, 2), _conv_bn(8, 16, 2))
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu(self.conv(self.relu(self.features(x))))
        return self.fc(x.mean((2, 3)))


def test_nested_layers_and_shared_modules():
    torch.manual_seed(0)
    model = SharedRelu().eval()
    x = torch.randn(3, 1, TRAIN_SIZE, TRAIN_SIZE)
    # early_layer inside target_layer's Sequential, and a target nested two levels deep
    for target, early in (("features", "features.0"), ("features.1.2", "features.0.0")):
        wrapper = FusedGradCAM(model, target, early, x[:2])
        with torch.no_grad():
            logits, cam, feats = wrapper(x)
        cam_ref, logits_ref = reference_gradcam(model, target, x)
        np.testing.assert_allclose(logits.numpy(), logits_ref, rtol=1e-5, atol=1e-6)
        assert np.abs(cam.numpy() - cam_ref).max() <= 1e-3
        np.testing.assert_allclose(feats.numpy(), early_reference(model, early, x), atol=1e-5)
    with pytest.raises(ValueError, match=r"target_layer 'relu' is called 2 times.*pick a layer called once"):
        plan_head(model, "relu", "features.0", x[:2])


def test_bad_arguments_are_refused(tmp_path):
    model = GapLinearNet().eval()
    kw = dict(
        class_names=CLASSES,
        garbage_class=2,
        target_layer="features",
        early_layer="stem",
        input_shape=(1, TRAIN_SIZE, TRAIN_SIZE),
        normalization=NORM,
    )
    with pytest.raises(ValueError, match="not a module"):
        export_bundle(model, tmp_path / "a", **{**kw, "target_layer": "nope"})
    with pytest.raises(ValueError, match="comes after"):
        export_bundle(model, tmp_path / "a", **{**kw, "target_layer": "stem", "early_layer": "features"})
    with pytest.raises(ValueError, match="3 outputs but 2 class names"):
        export_bundle(model, tmp_path / "a", **{**kw, "class_names": ["a", "garbage"], "garbage_class": 1})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        export_bundle(model, tmp_path / "c", **kw)
    assert not (tmp_path / "c" / "model.onnx").exists()


def test_wrapper_matches_model_in_torch():
    """Before any export: the wrapper's logits are the model's, its CAM the autograd reference."""
    torch.manual_seed(0)
    model = SequentialHeadNet().eval()
    x = torch.randn(3, 1, TRAIN_SIZE, TRAIN_SIZE)
    wrapper = FusedGradCAM(model, "features", "stem", x)
    with torch.no_grad():
        logits, cam, _ = wrapper(x)
        np.testing.assert_allclose(logits.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    cam_ref, _ = reference_gradcam(model, "features", x)
    assert np.abs(cam.numpy() - cam_ref).max() <= 1e-3


def test_check_rejects_nonstandard_domain(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ExportError, match="com.microsoft"):
        check_onnx_graph(path)


def test_cli_export_from_checkpoint(tmp_path, capsys):
    train = pytest.importorskip("gamguard.exporter.train")
    from gamguard.runtime import cli

    torch.manual_seed(0)
    config = {"num_classes": 3, "widths": [8, 8, 8]}
    from gamguard.exporter.model import build_model

    model = build_model(config)
    ckpt = {
        "format": train.CHECKPOINT_FORMAT,
        "arch": "guardnet",
        "config": config,
        "state_dict": model.state_dict(),
        "class_names": CLASSES,
        "garbage_class": 2,
        "input": {
            "channels": 1,
            "height": 32,
            "width": 32,
            "mean": [0.5],
            "std": [0.25],
            "resize": "stretch",
            "photometric": "MONOCHROME2",
        },
        "target_layer": "layer3",
        "early_layer": "layer1",
        "train_report": {},
    }
    train.save_checkpoint(ckpt, tmp_path / "model.pt")
    rc = cli.main(
        [
            "export",
            "--checkpoint",
            str(tmp_path / "model.pt"),
            "--out",
            str(tmp_path / "bundle"),
            "--name",
            "demo",
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    manifest = json.loads(out.out)  # stdout is only the JSON manifest
    assert manifest["model"] == {"name": "demo", "version": "1"}
    facts = manifest["export"]
    assert facts["opset"] == 18 and facts["exporter"] == "dynamo" and facts["head_kind"] == "gap_linear"
    assert not {"If", "Loop", "Range", "Mod"} & set(facts["op_types"])
    assert "ONNX op types" in out.err and "Conv" in out.err
    bundle_mod.verify_hashes(tmp_path / "bundle", bundle_mod.read_manifest(tmp_path / "bundle"))
    rc = cli.main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


class FunctionalForms(ResNetStyle):
    """The head written with functional/method forms: x.mean((2, 3)), view(size(0), -1), F.relu."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
        return self.fc(x)


class MeanHead(ResNetStyle):
    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("cls, kind", [(FunctionalForms, "generic"), (MeanHead, "gap_linear")])
def test_functional_head_forms_in_torch(cls, kind):
    """Functional and method spellings of the whitelisted ops give the autograd Grad-CAM."""
    torch.manual_seed(1)
    model = cls().eval()
    x, _, _ = blobs(3, 40, 48, seed=5)
    wrapper = FusedGradCAM(model, "layer2", "layer1", x)
    assert wrapper.head_kind == kind
    with torch.no_grad():
        logits, cam, early = wrapper(x)
    cam_ref, logits_ref = reference_gradcam(model, "layer2", x)
    np.testing.assert_allclose(logits.numpy(), logits_ref, rtol=1e-5, atol=1e-6)
    assert np.abs(cam.numpy() - cam_ref).max() <= 1e-3
    np.testing.assert_allclose(early.numpy(), early_reference(model, "layer1", x), atol=1e-5)


class _FixedReshape(nn.Module):
    """A head that hard-codes the number of classes (MONAI's Classifier ends in Reshape(K))."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x.reshape(x.shape[0], self.k)


def test_a_forward_that_fails_on_the_example_is_a_clear_error():
    """After add_garbage_class a final Reshape(K) no longer fits K + 1 outputs: the export says that the
    forward failed, with the cause, instead of torch.fx's ShapeProp dump."""
    from gamguard.exporter.garbage import add_garbage_class

    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3), _FixedReshape(3),
    ).eval()  # fmt: skip
    add_garbage_class(model)
    with pytest.raises(ValueError, match=r"forward fails on a \(2, 1, 32, 32\) input: RuntimeError: shape .*K \+ 1"):
        plan_head(model, "3", "1", torch.zeros(2, 1, 32, 32))


class _Output:
    """What Hugging Face models return: an object with ``.logits``."""

    def __init__(self, logits):
        self.logits = logits


class UntraceableNet(GapLinearNet):
    """A forward torch.fx cannot trace — Python control flow on the input, as Hugging Face models check
    ``pixel_values`` — returning the logits, or (``wrapped``) an object holding them."""

    def __init__(self, wrapped: bool = False):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, x):
        if x.shape[1] != 1:
            raise ValueError("one channel expected")
        logits = super().forward(x)
        return _Output(logits) if self.wrapped else logits


def test_a_forward_torch_fx_cannot_trace_is_exported_through_torch_onnx(tmp_path):
    """Such a model is exported with torch.onnx (which follows the control flow) and fused in ONNX: the
    same Grad-CAM as autograd's, the layers recorded by their module names; a forward returning an
    object with ``.logits`` (Hugging Face's ImageClassifierOutput) works the same."""
    torch.manual_seed(0)
    model = UntraceableNet().eval()
    with pytest.raises(ValueError, match="cannot trace the model's forward with torch.fx"):
        plan_head(model, "features", "stem", torch.zeros(2, 1, TRAIN_SIZE, TRAIN_SIZE))
    kw = dict(class_names=CLASSES, garbage_class=2, target_layer="features", early_layer="stem",
              input_shape=(1, TRAIN_SIZE, TRAIN_SIZE), normalization=NORM)  # fmt: skip
    manifest = export_bundle(model, tmp_path / "b", **kw)
    assert manifest["export"]["exporter"] == "onnx-fuse"
    assert manifest["layers"] == {"target": "features", "early": "stem"}
    bundle_mod.verify_hashes(tmp_path / "b", bundle_mod.read_manifest(tmp_path / "b"))
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _, _ = blobs(4, TRAIN_SIZE, TRAIN_SIZE, seed=78)
    logits, cam, _ = _run(sess, x)
    cam_ref, logits_ref = reference_gradcam(model, "features", x)
    assert np.abs(cam - cam_ref).max() <= 1e-3
    assert np.abs(logits - logits_ref).max() <= 1e-4 * np.abs(logits_ref).max()

    wrapped = UntraceableNet(wrapped=True).eval()
    wrapped.load_state_dict(model.state_dict())
    export_bundle(wrapped, tmp_path / "w", **kw)
    sess = ort.InferenceSession(str(tmp_path / "w" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(_run(sess, x)[0], logits, rtol=1e-5, atol=1e-6)


class LargeWindowPoolNet(nn.Module):
    """Hugging Face EfficientNet's pooler: an AvgPool2d whose ceil-mode window is larger than the map (a
    global mean) — torch cannot differentiate it symbolically for the traced backward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU())
        self.pool, self.fc = nn.AvgPool2d(640, ceil_mode=True), nn.Linear(16, 3)

    def forward(self, x):
        p = self.pool(self.features(self.stem(x)))
        return self.fc(p.reshape(p.shape[:2]))


def test_a_head_torch_cannot_trace_symbolically_goes_through_torch_onnx(tmp_path):
    torch.manual_seed(0)
    model = LargeWindowPoolNet().eval()
    manifest = export_bundle(
        model, tmp_path / "b", class_names=CLASSES, garbage_class=2, target_layer="features", early_layer="stem",
        input_shape=(1, TRAIN_SIZE, TRAIN_SIZE), normalization=NORM,
    )  # fmt: skip
    assert manifest["export"]["exporter"] == "onnx-fuse"
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _, _ = blobs(4, TRAIN_SIZE, TRAIN_SIZE, seed=79)
    logits, cam, _ = _run(sess, x)
    cam_ref, logits_ref = reference_gradcam(model, "features", x)
    assert np.ptp(cam_ref) > 0.5 and np.abs(cam - cam_ref).max() <= 1e-3
    assert np.abs(logits - logits_ref).max() <= 1e-4 * np.abs(logits_ref).max()
