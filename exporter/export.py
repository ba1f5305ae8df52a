"""Export a classifier as a gamguard bundle: the fused Grad-CAM ONNX model plus ``bundle.json``.

:func:`export_bundle` wraps the model in :class:`~gamguard.exporter.gradcam.FusedGradCAM`, exports
it to ONNX (opset 18 with the ``torch.export``-based "dynamo" exporter by default; opset 17 with the
legacy TorchScript exporter for TensorRT 8.x), checks the file with ``onnx.checker``, refuses any
non-standard domain or gradient/training op, runs it with ONNX Runtime (CPU) at the example batch and
at other batch sizes and compares every output with the torch wrapper — a mismatch is an
:class:`ExportError`, never a silently wrong bundle. The manifest is written with
:func:`gamguard.runtime.bundle.write_manifest`; calibration is left empty (``gamguard calibrate``
fills it), so the runtime refuses to serve the bundle until it is calibrated.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gamguard.runtime import bundle as bundle_mod
from gamguard.runtime.bundle import InputSpec
from gamguard.runtime.engines.base import INPUT_NAME, OUTPUT_NAMES

from .gradcam import FX_TRACE_FAILED, NOT_A_TENSOR, FusedGradCAM, UnsupportedHeadError, unexportable_head_error
from .onnx_checks import (  # noqa: F401  (ExportError, check_onnx_graph, onnx_op_types: public here too)
    CAM_ATOL,
    EARLY_RTOL,
    LOGITS_RTOL,
    ExportError,
    as_mean_std,
    check_onnx_graph,
    check_out_dir,
    chw,
    max_rel,
    onnx_op_types,
    ort_session,
    prepare_out_dir,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporters log every optimisation pass at INFO and warn about torchvision being absent;
    keep that out of the user's stderr unless debug logging is on."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    names = ("onnxscript", "onnx_ir", "torch.onnx._internal.exporter._registration")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def export_onnx(
    module: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    output_names,
    opset: int = 18,
    dynamic_spatial: bool = False,
) -> str:
    """Export ``module(example)`` to ``path`` with a dynamic batch axis; returns the exporter used.

    Opset ≥ 18 uses the ``torch.export``-based exporter (``dynamo=True``); lower opsets use the
    legacy TorchScript exporter (``dynamo=False``), which still emits opset 17 for TensorRT 8.x.
    """
    if example.shape[0] < 2:
        raise ValueError("export with an example batch of at least 2 so the batch axis stays dynamic")
    common = dict(input_names=[INPUT_NAME], output_names=list(output_names), opset_version=opset)
    # The exporters print progress on stdout; keep stdout clean for --json output.
    with contextlib.redirect_stdout(sys.stderr), _quiet_exporter_logs():
        if opset >= 18:
            batch = torch.export.Dim("batch", min=1, max=65536)
            dims = {0: batch}
            if dynamic_spatial:
                dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes={INPUT_NAME: dims},
                verbose=False,
                **common,
            )
            return "dynamo"
        axes = {INPUT_NAME: {0: "batch", **({2: "height", 3: "width"} if dynamic_spatial else {})}}
        for name in output_names:
            axes[name] = {0: "batch"}
        with warnings.catch_warnings():
            # Choosing the legacy exporter for opset 17 is deliberate (TensorRT 8.x).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, dynamic_axes=axes, do_constant_folding=True, **common
            )
        return "torchscript"


def compare_fused(session, wrapper: nn.Module, x: torch.Tensor) -> dict:
    """Run ONNX Runtime and the torch wrapper on ``x``; return the worst differences per output.

    CAM rows whose predicted class differs between the two (an exact logit tie, possible only
    when the logits agree within tolerance anyway) are left out of the CAM comparison and counted.
    """
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(x)]
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    same_class = got[0].argmax(1) == ref[0].argmax(1)
    cam_diff = float(np.max(np.abs(got[1][same_class] - ref[1][same_class]))) if same_class.any() else 0.0
    return {
        "batch": int(x.shape[0]),
        "logits_max_rel": max_rel(got[0], ref[0]),
        "cam_max_abs": cam_diff,
        "cam_range": [float(got[1].min()), float(got[1].max())],
        "early_max_rel": max_rel(got[2], ref[2]),
        "argmax_ties": int((~same_class).sum()),
        "shapes": [list(a.shape) for a in got],
    }


def _check_parity(result: dict) -> None:
    problems = []
    if result["logits_max_rel"] > LOGITS_RTOL:
        problems.append(f"logits differ by {result['logits_max_rel']:.2e} (relative)")
    if result["cam_max_abs"] > CAM_ATOL:
        problems.append(f"cam differs by {result['cam_max_abs']:.2e}")
    if result["early_max_rel"] > EARLY_RTOL:
        problems.append(f"early features differ by {result['early_max_rel']:.2e} (relative)")
    lo, hi = result["cam_range"]
    if lo < -1e-6 or hi > 1 + 1e-6:
        problems.append(f"cam outside [0, 1]: [{lo}, {hi}]")
    if problems:
        raise ExportError(
            f"ONNX Runtime does not reproduce the torch outputs at batch {result['batch']}: " + "; ".join(problems)
        )


class _Taps(nn.Module):
    """The model's logits (a tensor, or the ``.logits`` of an output object as Hugging Face models return)
    and the outputs of its target and early layers, as three outputs, for torch.onnx."""

    def __init__(self, model: nn.Module, target_layer: str, early_layer: str):
        super().__init__()
        self.model, self._seen = model, {}
        modules = dict(model.named_modules())
        self._names = {"target": target_layer, "early": early_layer}
        self._hooks = [
            modules[name].register_forward_hook(lambda m, i, o, role=role: self._seen.setdefault(role, []).append(o))
            for role, name in self._names.items()
        ]

    def forward(self, image):
        self._seen.clear()
        out = self.model(image)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(
                f"the model returned {type(out).__name__}, neither a logits tensor nor an object with .logits"
            )
        for role, name in self._names.items():
            calls = self._seen.get(role, [])
            if len(calls) != 1:
                raise ValueError(
                    f"{role}_layer {name!r} is called {len(calls)} times in forward; pick a layer called once"
                )
            if not isinstance(calls[0], torch.Tensor):
                raise ValueError(f"{role}_layer {name!r} does not output a single tensor")
        return logits, self._seen["target"][0], self._seen["early"][0]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _export_through_onnx(model, out_dir, example, fx_error, *, target_layer, early_layer, **bundle_args) -> dict:
    """The torch route for a forward torch.fx cannot trace: export the model with torch.onnx (the
    ``torch.export`` exporter follows Python control flow) with its target and early layers' outputs
    exposed, then fuse that graph as ``gamguard export --onnx`` does (:func:`export_onnx_bundle`); the
    plain graph is first checked against the torch model."""
    import onnx
    import onnxruntime as ort

    from .onnx_fuse import export_onnx_bundle

    log.info("%s; exporting with torch.onnx and fusing in ONNX instead", fx_error)
    taps = _Taps(model, target_layer, early_layer).eval()
    try:
        with tempfile.TemporaryDirectory(prefix="gamguard-export-") as tmp:
            plain = Path(tmp) / "plain.onnx"
            try:
                with torch.no_grad():
                    export_onnx(taps, plain, example, output_names=["logits_", "target_", "early_"], opset=18)
                    want = taps(example)[0].numpy()
            except ValueError:  # _Taps: not a logits tensor, a layer without a tensor output
                raise
            except Exception as exc:  # the exporters raise many types
                raise ExportError(
                    f"{fx_error}; exporting it with torch.onnx failed too: {type(exc).__name__}: {exc}"
                ) from exc
            proto = onnx.load(str(plain))
            del proto.graph.output[1:]  # the layers' tensors stay in the graph, named for the fuse
            onnx.save(proto, str(plain))
            got = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(
                None, {INPUT_NAME: example.numpy()}
            )[0]
            if max_rel(got, want) > LOGITS_RTOL:
                raise ExportError(f"torch.onnx's graph of the model differs from torch by {max_rel(got, want):.2e}")
            c, h, w = example.shape[1:]
            manifest = export_onnx_bundle(
                plain, out_dir, target_tensor="target_", early_tensor="early_", input_shape=(c, h, w), **bundle_args
            )
    finally:
        taps.remove()
    manifest["layers"] = {"target": target_layer, "early": early_layer}
    manifest["export"]["source"] = f"torch module, exported with torch.onnx: {str(fx_error)[:200]}"
    return bundle_mod.write_manifest(out_dir, manifest)


def export_bundle(
    model: nn.Module,
    out_dir: str | Path,
    *,
    class_names,
    garbage_class,
    target_layer: str,
    early_layer: str,
    input_shape,
    normalization,
    model_name: str = "model",
    model_version: str = "1",
    early_pool: tuple[int, int] | None = (8, 8),
    opset: int = 18,
    dynamic_spatial: bool = False,
    resize: str = "stretch",
    photometric: str = "MONOCHROME2",
    sample=None,
) -> dict:
    """Write ``out_dir/model.onnx`` (fused logits + Grad-CAM + early features) and ``bundle.json``.

    Args:
        model: the trained classifier (``torch.nn.Module``, K outputs incl. the garbage class).
            Exported in eval mode; its training flag is restored afterwards.
        class_names: K names; ``garbage_class``: index (or name) of the garbage class.
        target_layer / early_layer: module names (``dict(model.named_modules())`` keys).
        input_shape: ``(C, H, W)`` of the preprocessed input (a leading batch entry is ignored).
        normalization: ``{"mean": [...], "std": [...]}`` or ``(mean, std)``, per channel, applied to
            pixels in [0, 1] (recorded in the manifest's input spec; the graph takes normalised input).
        early_pool: pool the early activations to this grid in-graph; ``None`` keeps full size.
        opset: 18 (torch.export exporter) or 17 (legacy TorchScript exporter, for TensorRT 8.x).
        dynamic_spatial: also make H and W dynamic (the manifest still records ``input_shape``).
        sample: optional batch ``[N, C, H, W]`` (N ≥ 2) of real preprocessed inputs used for the
            export trace and the ONNX Runtime parity check; random inputs otherwise.

    Returns the manifest written to ``bundle.json``. Raises ``ValueError`` for bad arguments,
    :class:`~gamguard.exporter.gradcam.UnsupportedHeadError` for a head without an exportable
    backward and :class:`ExportError` when the exported graph is invalid or disagrees with torch.
    """
    import onnx
    import onnxruntime as ort

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    c, h, w = chw(input_shape)
    mean, std = as_mean_std(normalization, c)
    spec = InputSpec(channels=c, height=h, width=w, mean=mean, std=std, resize=resize, photometric=photometric)
    class_names = [str(n) for n in class_names]
    if isinstance(garbage_class, str):
        if garbage_class not in class_names:
            raise ValueError(f"garbage class {garbage_class!r} is not one of {class_names}")
        garbage_class = class_names.index(garbage_class)
    garbage_class = int(garbage_class)
    if not 0 <= garbage_class < len(class_names):
        raise ValueError(f"garbage_class {garbage_class} is out of range for {len(class_names)} classes")
    check_out_dir(out_dir)
    if int(opset) < 13:
        raise ValueError(f"unsupported opset {opset}: use 18 (default) or 17 (TensorRT 8.x)")
    opset = int(opset)

    if sample is not None:
        example = torch.as_tensor(np.asarray(sample, np.float32))
        if example.dim() != 4 or tuple(example.shape[1:]) != (c, h, w) or example.shape[0] < 2:
            raise ValueError(f"sample must be [N>=2, {c}, {h}, {w}], got {tuple(example.shape)}")
    else:
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(2, c, h, w, generator=gen)

    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        # Export and the ONNX Runtime check run on CPU; leave the caller's model where it is.
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                wrapper = FusedGradCAM(
                    model, target_layer, early_layer, example, early_pool, dynamic_spatial=dynamic_spatial
                ).eval()
            except (ValueError, UnsupportedHeadError) as exc:
                fallback = isinstance(exc, UnsupportedHeadError) or str(exc).startswith((FX_TRACE_FAILED, NOT_A_TENSOR))
                if not fallback or opset < 18 or dynamic_spatial:
                    raise
                # a forward torch.fx cannot trace (control flow on the input, Hugging Face models), one that
                # returns an output object, or a head torch cannot differentiate symbolically: the ONNX route
                try:
                    return _export_through_onnx(
                        model, out_dir, example, exc, target_layer=target_layer, early_layer=early_layer,
                        class_names=class_names, garbage_class=garbage_class, normalization=(mean, std),
                        model_name=model_name, model_version=model_version, early_pool=early_pool, resize=resize,
                        photometric=photometric,
                    )  # fmt: skip
                except (ValueError, ExportError) as onnx_exc:  # UnsupportedOnnxOpError is a ValueError
                    log.info("the ONNX route failed too: %s", onnx_exc)
                    if isinstance(exc, UnsupportedHeadError) or not str(exc).startswith(FX_TRACE_FAILED):
                        raise exc from None  # the torch route's own reason, as before
                    raise ValueError(f"{exc}; exporting it through torch.onnx failed too: {onnx_exc}") from None
            logits, cam, early = wrapper(example)
            if wrapper.plan.output_activation:  # the forward's own output, from the logits it was left out of
                from .onnx_fuse import apply_output_activation

                gap = max_rel(
                    apply_output_activation(logits.numpy(), wrapper.plan.output_activation), model(example).numpy()
                )
                if gap > LOGITS_RTOL:
                    raise ExportError(
                        f"the model's output differs from the {wrapper.plan.output_activation} of the logits before "
                        f"it by {gap:.2e}"
                    )
        if logits.shape[1] != len(class_names):
            raise ValueError(
                f"the model has {logits.shape[1]} outputs but {len(class_names)} class names were given: {class_names}"
            )
        log.info("head after %r: %s (%s)", target_layer, wrapper.head_kind, " → ".join(wrapper.plan.origins))
        if wrapper.head_kind == "traced" and opset < 18:
            # The legacy exporter re-traces the make_fx graph at the example's batch size and bakes
            # it into the backward's reshapes: a graph that fails at any other batch size.
            raise UnsupportedHeadError(
                f"cannot export Grad-CAM with opset {opset}: the head after {target_layer!r} "
                f"({' → '.join(wrapper.plan.origins)}) needs a traced backward, which only the opset-18 exporter "
                "keeps batch-independent. Export with opset 18, or pick a target layer whose head has a "
                "hand-written backward (GAP → Linear, ReLU, BatchNorm, 1×1 Conv, Flatten, Dropout)."
            )

        with tempfile.TemporaryDirectory(prefix="gamguard-export-") as tmp:
            tmp_model = Path(tmp) / bundle_mod.MODEL_FILE
            log.info("exporting ONNX opset %d ...", opset)
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    exporter = export_onnx(
                        wrapper,
                        tmp_model,
                        example,
                        output_names=OUTPUT_NAMES,
                        opset=opset,
                        dynamic_spatial=dynamic_spatial,
                    )
            except Exception as exc:  # the exporters raise many types
                if wrapper.head_kind != "traced":
                    raise
                raise unexportable_head_error(model, wrapper, target_layer, early_layer, example, exc) from exc
            export_seconds = time.perf_counter() - t0
            op_types = check_onnx_graph(tmp_model)
            session = ort_session(tmp_model)
            parity = []
            gen = torch.Generator().manual_seed(1)
            checks = [example, torch.randn(3, c, h, w, generator=gen), torch.randn(1, c, h, w, generator=gen)]
            if dynamic_spatial:
                checks.append(torch.randn(2, c, h + 16, w + 32, generator=gen))
            for x in checks:
                result = compare_fused(session, wrapper, x)
                _check_parity(result)
                parity.append(result)
            del session
            prepare_out_dir(out_dir)
            shutil.copyfile(tmp_model, out_dir / bundle_mod.MODEL_FILE)
    finally:
        model.train(was_training)

    manifest = {
        "model": {"name": str(model_name), "version": str(model_version)},
        "class_names": class_names,
        "garbage_class": garbage_class,
        "input": spec.to_manifest(),
        "layers": {"target": target_layer, "early": early_layer},
        "outputs": {"cam": [h, w], "early": list(early.shape[1:])},
        "export": {
            "opset": int(opset),
            "exporter": exporter,
            "head_kind": wrapper.head_kind,
            "head": list(wrapper.plan.origins),
            # the forward's last op, left out: the bundle's logits are its input
            "output_activation_removed": wrapper.plan.output_activation,
            "early_pool": list(wrapper.early_pool) if wrapper.early_pool else None,
            "dynamic_batch": True,
            "dynamic_spatial": bool(dynamic_spatial),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "seconds": round(export_seconds, 3),
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "op_types": op_types,
            "parity": {
                "logits_max_rel": max(p["logits_max_rel"] for p in parity),
                "cam_max_abs": max(p["cam_max_abs"] for p in parity),
                "early_max_rel": max(p["early_max_rel"] for p in parity),
                "batches": [p["batch"] for p in parity],
            },
        },
        "calibration": None,
        "guard": {"policy": "calibrated", "enforced_checks": ["garbage", "attention", "feature"]},
    }
    return bundle_mod.write_manifest(out_dir, manifest)
