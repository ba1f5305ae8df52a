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
# The 1-channel variant of every architecture runs by default; 3-channel variants (RGB backbones fed
# replicated grey) for two of them, the rest with -m slow.
CASES = [pytest.param(name, 1, id=f"{name}-1ch") for name in ZOO] + [
    pytest.param(name, 3, id=f"{name}-3ch", marks=() if name in ("resnet18", "efficientnet_b0") else pytest.mark.slow)
    for name in ZOO
]


def _data(n, channels, seed):
    x, y, _ = blobs(n, SIZE, SIZE, seed)
    return x.repeat(1, channels, 1, 1), y


def trained_zoo_model(name, channels, steps=40, seed=0):
    """A zoo model trained briefly on the blob task (eval mode)."""
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
def test_zoo_exports_with_gradcam_parity(name, channels, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
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
    finally:
        torch.set_num_threads(threads)


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


def torch_to_plain_onnx(model, target, early, path, channels):
    """A plain ONNX classifier (input ``input``, output ``output``) in which the target and early
    activations are the tensors ``tgt`` and ``erl``: what a user finds by name in Netron."""
    with torch.no_grad():
        torch.onnx.export(
            _Taps(model, target, early).eval(),
            (torch.randn(2, channels, SIZE, SIZE),),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["output", "tgt", "erl"],
            opset_version=18,
            external_data=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}},
        )
    proto = onnx.load(str(path))
    del proto.graph.output[1:]
    onnx.save(proto, str(path))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small"])
def test_onnx_only_export_parity(name, tmp_path):
    from gamguard.exporter.onnx_fuse import export_onnx_bundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
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
        sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
        worst = _check_against_reference(
            model, target, early, lambda x: sess.run(["logits", "cam", "early"], {"image": x.numpy()}), 1
        )
        print(f"\nONNX-only {name}: {worst}")
    finally:
        torch.set_num_threads(threads)
