"""Build a native TensorRT engine (``model.plan``) from a bundle's fused ONNX, and tag it.

This module lives in the runtime, not the exporter, on purpose: a TensorRT plan is specific to the
TensorRT version and the GPU it was built on, so it has to be built *on the target device* (a Jetson,
a clinic workstation) where only the runtime is installed — no torch, no exporter extra. It needs
``tensorrt`` (the TensorRT Python API) and ``cuda-python`` (to ask which GPU this is), both imported
lazily inside functions; everything else here (profiles, tags, compatibility rules) is plain Python
and is tested without a GPU.

The plan's facts go into ``bundle.json`` under ``"tensorrt"``::

    "tensorrt": {
      "plan": "model.plan",
      "tensorrt_version": "10.3.0",          # must equal the serving TensorRT's version
      "gpu": "Orin", "compute_capability": "8.7",   # must equal the serving GPU's
      "precision": "fp16" | "fp32",
      "profile": {"input": "image", "min": [N,C,H,W], "opt": [...], "max": [...]},
      "onnx_sha256": "...",                  # the model.onnx it was built from (stale-plan check)
      "guard_graph": true,                   # built with the guard subgraph (build-engine --guard-graph):
      "reference_sha256": "...",             #   the reference.npz its constants came from (stale check)
      "guard_columns": ["attention.iou", ...],  #   the guard output's columns (checks/graph.py) it computes
      "built_at": "2026-11-27T12:00:00Z"
    }

``model.plan`` itself is covered by the manifest's file hashes like every other bundle file.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..bundle import (
    MODEL_FILE,
    PLAN_FILE,
    REFERENCE_FILE,
    BundleError,
    InputSpec,
    load_manifest,
    sha256_file,
    write_manifest,
)
from ..checks.graph import GUARD_COLUMNS, GUARD_OUTPUT
from .base import INPUT_NAME, OUTPUT_NAMES

log = logging.getLogger(__name__)

SECTION = "tensorrt"
PRECISIONS = ("fp32", "fp16")
DEFAULT_BATCH = (1, 8, 32)

INSTALL_HINT = (
    "install the GPU extra on the target device: pip install 'gamguard[gpu]' on x86-64 "
    "(TensorRT 10 + cuda-python), or use JetPack's TensorRT on a Jetson (see deploy/README.md)"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-python or a CUDA GPU is missing on this machine."""


class PlanMismatch(BundleError):
    """The bundle's plan was built for another TensorRT version, GPU or model: it must not be served."""


@dataclass(frozen=True)
class DeviceTag:
    """What a plan is tied to: the TensorRT version and the GPU architecture it was built for."""

    tensorrt_version: str
    gpu: str
    compute_capability: str  # "major.minor", e.g. "8.7" for Jetson Orin, "9.0" for H100

    def to_manifest(self) -> dict:
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
        }


@dataclass(frozen=True)
class ShapeProfile:
    """A TensorRT optimisation profile for the ``image`` input: min/opt/max ``[N, C, H, W]``."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def to_manifest(self) -> dict:
        return {"input": INPUT_NAME, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_manifest(cls, d: dict) -> "ShapeProfile":
        try:
            return cls(
                tuple(int(v) for v in d["min"]), tuple(int(v) for v in d["opt"]), tuple(int(v) for v in d["max"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bundle.json: bad tensorrt.profile: {exc}") from exc

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 4 and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


# --------------------------------------------------------------------------- pure helpers


def parse_batch_range(text: str) -> tuple[int, int, int]:
    """``"MIN:OPT:MAX"`` (or ``"MAX"``, meaning ``1:MAX:MAX``) → validated ``(min, opt, max)``."""
    parts = [p.strip() for p in str(text).split(":")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"batch range {text!r}: expected integers as MIN:OPT:MAX or MAX") from None
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3:
        raise ValueError(f"batch range {text!r}: expected MIN:OPT:MAX or MAX")
    lo, opt, hi = values
    if not (1 <= lo <= opt <= hi):
        raise ValueError(f"batch range {text!r}: need 1 <= MIN <= OPT <= MAX")
    if hi > 4096:
        raise ValueError(f"batch range {text!r}: MAX {hi} is unreasonably large (limit 4096)")
    return lo, opt, hi


def parse_spatial_range(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` side lengths in pixels for a spatially dynamic model."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"spatial range {text!r}: expected MIN:MAX in pixels") from None
    if not (8 <= lo <= hi <= 8192):
        raise ValueError(f"spatial range {text!r}: need 8 <= MIN <= MAX <= 8192")
    return lo, hi


def make_profile(
    spec: InputSpec,
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    *,
    spatial: tuple[int, int] | None = None,
    network_input_shape: tuple[int, ...] | None = None,
) -> ShapeProfile:
    """The optimisation profile for a bundle's input.

    The batch axis is always dynamic (the exporter keeps it so). H and W get a range only when the
    ONNX graph declares them dynamic (``-1`` in ``network_input_shape``) *and* ``spatial`` asks for
    one; otherwise they are pinned to the bundle's input size, which is what preprocessing produces.
    """
    lo, opt, hi = batch
    c, h, w = spec.channels, spec.height, spec.width
    if network_input_shape is not None:
        if len(network_input_shape) != 4:
            raise BundleError(f"model.onnx input {INPUT_NAME!r} has rank {len(network_input_shape)}, expected 4")
        nc = network_input_shape[1]
        if nc not in (-1, c):
            raise BundleError(f"model.onnx input has {nc} channels but bundle.json says {c}")
        for axis, want in ((2, h), (3, w)):
            got = network_input_shape[axis]
            if got not in (-1, want):
                raise BundleError(f"model.onnx input axis {axis} is {got} but bundle.json says {want}")
    spatial_dynamic = network_input_shape is not None and network_input_shape[2] == -1 and network_input_shape[3] == -1
    if spatial is not None:
        if not spatial_dynamic:
            raise ValueError(
                "--spatial needs a model exported with dynamic height and width; "
                f"this bundle's model is fixed at {h}x{w}"
            )
        s_lo, s_hi = spatial
        if not (s_lo <= min(h, w) and max(h, w) <= s_hi):
            raise ValueError(f"spatial range {s_lo}:{s_hi} must contain the bundle's input size {h}x{w}")
        return ShapeProfile((lo, c, s_lo, s_lo), (opt, c, h, w), (hi, c, s_hi, s_hi))
    return ShapeProfile((lo, c, h, w), (opt, c, h, w), (hi, c, h, w))


def stale_plan_reason(section: dict, onnx_sha256: str | None, reference_sha256: str | None) -> str | None:
    """Why a tagged plan no longer fits the bundle it sits in (None: it fits): built from another
    ``model.onnx``, or — with the guard subgraph — from another ``reference.npz`` or computing other
    ``guard`` columns than this gamguard reads. A digest given as None is not checked. The one rule for
    serving (:func:`check_plan_compatibility`) and for status (:func:`~.tensorrt.plan_status`)."""
    if onnx_sha256 is not None and section.get("onnx_sha256") != onnx_sha256:
        return (
            "model.plan was built from a different model.onnx than the one in this bundle "
            "(stale plan); rebuild it with `gamguard build-engine`"
        )
    if not section.get("guard_graph"):
        return None
    if reference_sha256 is not None and section.get("reference_sha256") != reference_sha256:
        return (
            "model.plan carries the guard subgraph of an earlier calibration (reference.npz changed since); "
            "rebuild it with `gamguard build-engine --guard-graph`"
        )
    if section.get("guard_columns") != list(GUARD_COLUMNS):
        return (
            "model.plan carries a guard subgraph whose columns are not recorded (built by an earlier gamguard) "
            "or differ from the ones this version reads; rebuild it with `gamguard build-engine --guard-graph`"
        )
    return None


def check_plan_compatibility(
    section: dict | None, device: DeviceTag, onnx_sha256: str | None, reference_sha256: str | None = None
) -> None:
    """Raise :class:`PlanMismatch` unless the plan tag matches this device and this model.

    TensorRT engines are not portable across TensorRT versions or GPU architectures (compute
    capability); TensorRT itself would either refuse to deserialize or, worse, run with tactics
    tuned for another GPU. A plan built from an older ``model.onnx`` would serve different numbers
    from the ones the guard was calibrated on. A different GPU *name* with the same compute
    capability (e.g. two Ampere boards) is allowed with a warning, as TensorRT allows it.
    """
    if not section:
        raise PlanMismatch(
            "bundle.json has no 'tensorrt' section: the plan is untagged; rebuild it "
            "with `gamguard build-engine` on this device"
        )
    built = DeviceTag(
        str(section.get("tensorrt_version")), str(section.get("gpu")), str(section.get("compute_capability"))
    )
    if built.tensorrt_version != device.tensorrt_version:
        raise PlanMismatch(
            f"model.plan was built with TensorRT {built.tensorrt_version} but this machine has "
            f"TensorRT {device.tensorrt_version}; rebuild it here with `gamguard build-engine`"
        )
    if built.compute_capability != device.compute_capability:
        raise PlanMismatch(
            f"model.plan was built for GPU {built.gpu} (compute capability {built.compute_capability}) "
            f"but this machine has {device.gpu} (compute capability {device.compute_capability}); "
            "rebuild it here with `gamguard build-engine`"
        )
    stale = stale_plan_reason(section, onnx_sha256, reference_sha256)
    if stale:
        raise PlanMismatch(stale)
    if built.gpu != device.gpu:
        log.warning(
            "model.plan was built on %s, serving on %s (same compute capability %s): "
            "allowed, but tactics were tuned for the other board",
            built.gpu,
            device.gpu,
            device.compute_capability,
        )


# --------------------------------------------------------------------------- GPU-side (lazy imports)


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise :class:`TensorRTUnavailable` with a hint."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, device-only dependency
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: gamguard needs TensorRT 10")
    return trt


def require_cudart():
    """The CUDA runtime bindings of cuda-python (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart  # noqa: PLC0415 - cuda-python < 12.6
        except ImportError as exc:
            raise TensorRTUnavailable(f"cuda-python is not installed ({exc}); {INSTALL_HINT}") from exc
    return cudart


def cuda_check(result, what: str):
    """Unwrap a cuda-python ``(error, *values)`` tuple, raising on any error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TensorRTUnavailable(f"CUDA call {what} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_device_tag(device: int = 0) -> DeviceTag:
    """This machine's TensorRT version and the name/compute capability of CUDA device ``device``."""
    trt = require_tensorrt()
    cudart = require_cudart()
    count = cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count < 1 or device >= count:
        raise TensorRTUnavailable(f"no CUDA device {device} (found {count})")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceTag(str(trt.__version__), name.strip("\x00 ").strip(), f"{props.major}.{props.minor}")


def pin_guard_layers_fp32(network, trt) -> int:
    """Ask TensorRT to run the guard subgraph's float arithmetic in float32 inside an FP16 plan; returns
    how many layers were pinned.

    The guard's layers are the ONNX nodes named under ``guard/`` (checks/graph.py), whose names the
    ONNX parser gives the layers it makes of them. In FP16 its row selections and gathers from the null
    tables would round the tables' knots to 11 significant bits and the whitened feature distance
    would lose most of its digits, so the p-values would drift from the calibrated ones. Every float32
    output of such a layer is kept float32, and the layer computes in float32 when all its float inputs
    are float32; integer and boolean inputs (gather indices, ``Where`` conditions) and outputs
    (comparisons, casts to integers) keep their own types."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not str(layer.name).startswith("guard/"):
            continue
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        float_outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype == trt.float32]
        if not float_outputs:
            continue
        if all(t.dtype == trt.float32 for t in inputs if t is not None and t.dtype in (trt.float32, trt.float16)):
            layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_plan_bytes(
    onnx_path: str | Path,
    spec: InputSpec,
    *,
    precision: str = "fp16",
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    spatial: tuple[int, int] | None = None,
    workspace_mb: int = 1024,
    outputs: tuple[str, ...] = OUTPUT_NAMES,
) -> tuple[bytes, ShapeProfile]:
    """Parse the fused ONNX with TensorRT's ONNX parser and build a serialized engine.

    ``outputs`` keeps only these graph outputs (TensorRT then prunes every layer they do not need):
    ``("logits",)`` gives the unguarded baseline plan that benchmarks compare against. Served plans
    always keep all three.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT could not parse {onnx_path}: {errors}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    net_outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    known = OUTPUT_NAMES + ((GUARD_OUTPUT,) if GUARD_OUTPUT in net_outputs else ())
    if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= net_outputs:
        raise BundleError(
            f"{onnx_path}: expected input {INPUT_NAME!r} and outputs {OUTPUT_NAMES}, "
            f"found inputs {sorted(inputs)} and outputs {sorted(net_outputs)}"
        )
    wanted = tuple(outputs)
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"outputs must be a non-empty subset of {known}, got {wanted}")
    for i in reversed(range(network.num_outputs)):  # e.g. a logits-only baseline plan
        tensor = network.get_output(i)
        if tensor.name not in wanted:
            network.unmark_output(tensor)
    profile = make_profile(spec, batch, spatial=spatial, network_input_shape=tuple(inputs[INPUT_NAME].shape))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    # float32 means float32: TensorRT lets float32 layers use TF32 on Ampere and later unless told
    # not to (see engines.onnx.PROVIDER_OPTIONS for what TF32 did to the in-graph guard on ONNX Runtime)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("this GPU has no fast FP16; building FP16 anyway (it will be slow)")
        config.set_flag(trt.BuilderFlag.FP16)
        if pin_guard_layers_fp32(network, trt):  # the model in FP16, the guard's arithmetic in float32
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError("TensorRT failed to build the engine (see the TensorRT log above)")
    log.info("built TensorRT %s engine in %.1f s", precision, time.perf_counter() - started)
    return bytes(serialized), profile


def build_engine_for_bundle(
    bundle_dir: str | Path,
    *,
    precision: str = "fp16",
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    spatial: tuple[int, int] | None = None,
    workspace_mb: int = 1024,
    out_dir: str | Path | None = None,
    device: int = 0,
    guard_graph: bool = False,
) -> dict:
    """Build ``model.plan`` for a bundle on this device and record its tag in ``bundle.json``.

    With ``out_dir`` the bundle is copied there first and the source is left untouched (useful when
    the bundle is mounted read-only). ``guard_graph``: build from the fused model with the guard
    subgraph (:func:`gamguard.runtime.checks.graph.guarded_model`, constants from the calibrated
    ``reference.npz``), so the plan computes the checks' arithmetic on the GPU too; such a plan is
    stale once the bundle is recalibrated. Returns the ``tensorrt`` manifest section written.
    """
    src = Path(bundle_dir)
    manifest = load_manifest(src, require_calibration=False)
    tag = current_device_tag(device)  # fail before copying anything when there is no GPU
    target = Path(out_dir) if out_dir else src
    if out_dir:
        if target.exists() and any(target.iterdir()):
            raise BundleError(f"{target}: output directory exists and is not empty")
        shutil.copytree(src, target, dirs_exist_ok=True)
    spec = InputSpec.from_manifest(manifest["input"])
    with tempfile.TemporaryDirectory(prefix="gamguard-plan-") as tmpdir:  # never inside the bundle (hashed)
        source = target / MODEL_FILE
        outputs = OUTPUT_NAMES
        if guard_graph:
            source = Path(tmpdir) / "model.guarded.onnx"
            source.write_bytes(_guarded_model_bytes(target, manifest))
            outputs = (*OUTPUT_NAMES, GUARD_OUTPUT)
        plan, profile = build_plan_bytes(
            source, spec, precision=precision, batch=batch, spatial=spatial, workspace_mb=workspace_mb, outputs=outputs
        )
    tmp = target / (PLAN_FILE + ".tmp")
    tmp.write_bytes(plan)
    tmp.replace(target / PLAN_FILE)
    section = {
        "plan": PLAN_FILE,
        **tag.to_manifest(),
        "precision": precision,
        "profile": profile.to_manifest(),
        "onnx_sha256": sha256_file(target / MODEL_FILE),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if guard_graph:
        section.update(
            guard_graph=True,
            reference_sha256=sha256_file(target / REFERENCE_FILE),
            guard_columns=list(GUARD_COLUMNS),
        )
    calibration = manifest.get("calibration")
    if calibration:
        # The references are numbers of the engine that calibrated them; say which one that was so
        # the drift check (and the operator) can tell whether a re-calibration is due.
        section["calibrated_with"] = calibration.get("engine", "unknown")
        log.warning(
            "the bundle was calibrated with engine %r; recalibrate on the TensorRT engine "
            "(`gamguard calibrate`) or check the drift (`gamguard build-engine --check-drift`)",
            section["calibrated_with"],
        )
    manifest = dict(manifest)
    manifest[SECTION] = section
    write_manifest(target, manifest)
    return section


def _guarded_model_bytes(bundle_dir: Path, manifest: dict) -> bytes:
    """The fused model with the guard subgraph of this (calibrated) bundle."""
    from ..checks import CalibrationData
    from ..checks.graph import GuardGraphError, guarded_model_bytes

    if not manifest.get("calibration"):
        raise BundleError(f"{bundle_dir}: --guard-graph needs a calibrated bundle (the graph's constants come from it)")
    try:
        return guarded_model_bytes(bundle_dir, CalibrationData.load(bundle_dir, manifest))
    except GuardGraphError as exc:
        raise BundleError(f"{bundle_dir}: --guard-graph: {exc}; build the plan without it") from None
