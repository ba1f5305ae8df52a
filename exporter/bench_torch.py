"""The torch side of ``gamguard bench`` (the runtime never imports torch): the PyTorch Grad-CAM
baseline users run today, and the realistic-size random-weight model for ``guard_overhead_large``.
Called from :mod:`gamguard.runtime.bench.overhead` only when torch is installed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gamguard.runtime.bench.common import (
    LARGE_BUNDLE_SIZE,
    LARGE_CALIBRATION_PER_CLASS,
    LARGE_MODEL,
    batch_at,
    guard_at_size,
    interleaved,
    median_ms,
    phantom_images,
)


def build_large_bundle(out_dir: Path, threads: int, progress) -> Path:
    """Export and calibrate the ``LARGE_MODEL`` classifier with *random* weights (seeded) through the
    same :func:`gamguard.exporter.export_bundle` as any model (dynamic H/W, opset 18), calibrated on
    hand phantoms. Random weights: the timings are representative, the verdicts are not (the garbage
    logit is biased down so that calibration sees real-class predictions). Needs torch."""
    import torch

    from gamguard.exporter.data import class_names
    from gamguard.exporter.export import export_bundle
    from gamguard.exporter.model import GuardNet
    from gamguard.runtime.calibration import calibrate_bundle
    from gamguard.runtime.demo.phantoms import CLASS_NAMES

    torch.manual_seed(0)
    names = class_names()
    model = GuardNet(num_classes=len(names), **LARGE_MODEL).eval()
    with torch.no_grad():
        # GuardNet zero-initialises each block's last BN (every block starts as an identity);
        # random affine parameters instead, as a trained net has, so the CAMs are not degenerate
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        model.fc.bias[len(names) - 1] = -1e3
    bundle = Path(out_dir) / "large_bundle"
    t0 = time.perf_counter()
    export_bundle(
        model,
        bundle,
        class_names=names,
        garbage_class=len(names) - 1,
        target_layer="layer3",
        early_layer="layer1",
        input_shape=(1, LARGE_BUNDLE_SIZE, LARGE_BUNDLE_SIZE),
        normalization={"mean": [0.5], "std": [0.25]},
        model_name="bench-large-random",
        dynamic_spatial=True,
    )
    progress(
        f"large model exported in {time.perf_counter() - t0:.1f} s; calibrating on "
        f"{LARGE_CALIBRATION_PER_CLASS * len(CLASS_NAMES)} phantoms"
    )
    n = LARGE_CALIBRATION_PER_CLASS * len(CLASS_NAMES)
    images = phantom_images(n, seed=4321, size=LARGE_BUNDLE_SIZE)
    calibrate_bundle(
        bundle,
        images=images.__getitem__,
        labels=[i % len(CLASS_NAMES) for i in range(n)],
        dataset={"description": "hand phantoms (benchmark only; random-weight model)", "n": n},
        providers=["CPUExecutionProvider"],
        threads=threads,
        progress=None,
    )
    return bundle


def autograd_gradcam(model, layer, x):
    """pytorch-grad-cam's ``GradCAM(model, [layer])(x)`` (targets=None) with autograd and hooks:
    forward, backward of the argmax scores, channel weights = spatial mean of the gradient, ReLU of
    the weighted sum, ``scale_cam_image`` (min-max, cv2 bilinear resize), ReLU + min-max again —
    the same numpy/OpenCV post-processing pytorch-grad-cam runs."""
    import cv2

    store = {}

    def hook(_m, _i, output):
        store["act"] = output
        output.register_hook(lambda g: store.__setitem__("grad", g))

    handle = layer.register_forward_hook(hook)
    try:
        outputs = model(x)
        cats = np.argmax(outputs.detach().numpy(), axis=-1)
        model.zero_grad()
        loss = sum(outputs[i, c] for i, c in enumerate(cats))
        loss.backward()
    finally:
        handle.remove()
    acts, grads = store["act"].detach().numpy(), store["grad"].detach().numpy()
    weights = grads.mean(axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * acts).sum(axis=1), 0)

    def scale(maps, size=None):
        res = []
        for m in maps:
            m = m - m.min()
            m = m / (1e-7 + m.max())
            res.append(cv2.resize(m, size) if size is not None else m)
        return np.float32(res)

    per_layer = np.maximum(scale(cam, (x.shape[-1], x.shape[-2]))[:, None], 0)
    return scale(per_layer.mean(axis=1))


def measure_pytorch(guard, checkpoint: Path | None, images, sizes, batches, repeats, threads, progress) -> dict:
    """``pytorch_gradcam`` section: status, implementation and one row per case."""
    import torch

    from gamguard.exporter.train import load_checkpoint

    torch.set_num_threads(int(threads))
    model, ckpt = load_checkpoint(checkpoint)
    if list(ckpt["class_names"]) != list(guard.class_names):
        return {"status": "skipped", "reason": f"{checkpoint}: class names differ from the bundle's"}
    layer = dict(model.named_modules())[ckpt["target_layer"]]
    try:
        from pytorch_grad_cam import GradCAM  # noqa: F401 - the real library when it is installed

        implementation = "pytorch-grad-cam GradCAM"
    except Exception:  # ImportError, or a torchvision that does not match torch
        GradCAM = None
        implementation = (
            "autograd re-implementation of pytorch-grad-cam GradCAM (hooks, backward, "
            "numpy/OpenCV post-processing; pytorch-grad-cam not importable here)"
        )
    rows = []
    for size in sizes:
        g = guard_at_size(guard, size)
        for n in batches:
            x = batch_at(images, guard.spec, size, n)
            xt = torch.from_numpy(x)
            # same model: the checkpoint must give the bundle's logits
            with torch.no_grad():
                ref = model(xt).numpy()
            got = g.engine.run(x).logits
            if not np.allclose(ref, got, rtol=1e-3, atol=1e-3):
                return {
                    "status": "skipped",
                    "reason": f"{checkpoint} does not reproduce the bundle's logits "
                    f"(max diff {float(np.abs(ref - got).max()):.3g}): not the same model",
                }
            if GradCAM is not None:
                cam_obj = GradCAM(model=model, target_layers=[layer])
                torch_fn = lambda: cam_obj(input_tensor=xt)  # noqa: E731
            else:
                torch_fn = lambda: autograd_gradcam(model, layer, xt)  # noqa: E731
            try:
                t = interleaved({"pytorch": torch_fn, "gamguard": lambda: g.verify_tensor(x)}, repeats)
            finally:
                if GradCAM is not None:
                    cam_obj.activations_and_grads.release()  # remove its hooks from the model
            ms = {k: median_ms(v) for k, v in t.items()}
            rows.append(
                {
                    "batch": n,
                    "size": size,
                    "speedup": round(ms["pytorch"] / ms["gamguard"], 3),
                    "pytorch_ms": round(ms["pytorch"], 3),
                    "gamguard_ms": round(ms["gamguard"], 3),
                    "repeats": repeats,
                }
            )
            progress(
                f"pytorch Grad-CAM {size}x{size} batch {n}: {ms['pytorch']:.2f} ms vs gamguard "
                f"{ms['gamguard']:.2f} ms (x{ms['pytorch'] / ms['gamguard']:.2f})"
            )
    return {
        "status": "measured",
        "implementation": implementation,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "cases": rows,
    }
