"""gamguard exporter: the torch side (demo model, garbage class, fused Grad-CAM ONNX export).

Importing a name from this package requires the ``[export]`` extra (torch, onnx, onnxscript) —
except ``export_onnx_bundle`` (guard an ONNX-only classifier: numpy, onnx, onnxruntime); the package
itself imports lazily so ``gamguard --help`` works without torch.
"""

from importlib import import_module

_EXPORTS = {
    "export_bundle": "export",
    "export_onnx_bundle": "onnx_fuse",
    "ExportError": "export",
    "UnsupportedHeadError": "gradcam",
    "FusedGradCAM": "gradcam",
    "add_garbage_class": "garbage",
    "finetune_with_garbage": "garbage",
    "GuardNet": "model",
    "build_model": "model",
    "train": "train",
    "TrainConfig": "train",
    "load_checkpoint": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
