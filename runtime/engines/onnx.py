"""Inference engines over the fused model (``model.onnx``: logits + Grad-CAM + early features in one call).

An engine takes a preprocessed batch ``[N, C, H, W]`` float32 and returns an :class:`EngineOutput`
with the three graph outputs. Calibration and serving both go through :func:`create_engine`, so the
references and thresholds are computed with the very engine that serves.

* :class:`OnnxEngine` — ONNX Runtime with the provider chain TensorRT → CUDA → CPU, filtered by what
  the installed onnxruntime offers (``onnxruntime.get_available_providers()``); the chain actually
  used is logged when the session starts.
* A native TensorRT engine (``model.plan``) plugs in behind the same :class:`Engine` protocol;
  :func:`create_engine` is the single place that picks one.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..checks.graph import GUARD_OUTPUT
from .base import INPUT_NAME, OUTPUT_NAMES, EngineError, EngineOutput, ResizedMaps, is_opencv_bilinear

log = logging.getLogger(__name__)

#: Preference order of ONNX Runtime execution providers; only the available ones are used.
PROVIDER_CHAIN = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
#: Short names accepted wherever providers are configured (CLI flags, Guard.from_bundle).
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@functools.cache
def tensorrt_libraries_load() -> bool:
    """Whether TensorRT's runtime library (``libnvinfer``) can be loaded, as ONNX Runtime's TensorRT
    provider will try to: from the library path, or already loaded by the ``tensorrt`` Python package."""
    import ctypes

    try:
        import tensorrt  # noqa: F401, PLC0415 - the pip package loads its bundled libnvinfer
    except Exception:  # ImportError, or OSError from a broken install: then the library path decides
        pass
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def resolve_providers(requested: Sequence[str] | str | None = None) -> list[str]:
    """The provider chain to use: ``requested`` (names or aliases, comma-separated string or list)
    or the default chain, filtered by what onnxruntime offers. CPU is always the last resort."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if requested is None or requested == "" or requested == "auto":
        wanted = list(PROVIDER_CHAIN)
        if "TensorrtExecutionProvider" in available and not tensorrt_libraries_load():
            # onnxruntime-gpu lists the TensorRT provider whether or not TensorRT is installed; asked for
            # without it, every session prints an "EP Error" and retries on CUDA
            log.info("TensorRT libraries not found: the default provider chain starts at CUDA")
            wanted.remove("TensorrtExecutionProvider")
    else:
        if isinstance(requested, str):
            requested = [p for p in requested.split(",") if p.strip()]
        wanted = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in requested]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EngineError(
                f"execution provider(s) not available in this onnxruntime: {', '.join(missing)} "
                f"(available: {', '.join(sorted(available))})"
            )
    chain = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chain:
        chain.append("CPUExecutionProvider")
    return chain


#: Options gamguard gives an execution provider. TF32 off on CUDA: by default ONNX Runtime's CUDA
#: provider lets float32 convolutions and matrix products on Ampere and later GPUs round their inputs
#: to TF32 (a 10-bit mantissa). The guard's reference statistics and null tables were computed in full
#: float32, and the in-graph checks select table rows with one-hot matrix products that are exact only
#: in float32: on an H200 with TF32 the in-graph p-values moved by up to 0.32 (some became NaN) and 30 %
#: of the guard's decisions changed (deploy/gpu-check.sh; docs/architecture.md, "On a GPU"). TensorRT plans are built
#: without TF32 too (engines/plan.py).
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def provider_entries(chain: Sequence[str]) -> list:
    """``chain`` (provider names) as ONNX Runtime's ``providers=`` argument, with :data:`PROVIDER_OPTIONS`."""
    return [(name, dict(PROVIDER_OPTIONS[name])) if name in PROVIDER_OPTIONS else name for name in chain]


def session_options(threads: int | None = None):
    """The ONNX Runtime session options of every gamguard session (the engine and the benchmark's
    logits-only baseline alike, so comparisons between them are fair).

    Spelled out rather than left to defaults: full graph optimisation (constant folding, node
    fusions, and on CPU the NCHWc layout transformer the convolutions depend on), memory-pattern
    planning and the CPU arena (buffers reused between calls of the same shape), sequential
    execution (the fused graph is a chain; parallel execution only adds scheduling overhead).
    ``threads``: intra-op threads (None/0: onnxruntime's default, all cores).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_mem_pattern = True
    opts.enable_cpu_mem_arena = True
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused TensorRT/CUDA paths are noise here
    return opts


class OnnxEngine:
    """ONNX Runtime session over ``model.onnx``.

    ``providers``: None for the default chain TensorRT → CUDA → CPU (whichever are available), or an
    explicit list/comma-separated string of provider names or aliases (``tensorrt``, ``cuda``, ``cpu``).
    ``threads``: intra-op threads (None: onnxruntime's default, all cores; env ``GAMGUARD_THREADS``
    overrides the default).
    ``guarded``: the serialized fused model with the guard subgraph appended
    (:func:`gamguard.runtime.checks.graph.guarded_model` of ``model_path``); the session then runs it
    and :meth:`run` also returns its ``guard`` output.
    ``input_hw``: the one input size this engine serves; a model with dynamic H/W is specialised to it
    (:mod:`.specialize`: ONNX Runtime then folds the size-dependent matrices into constants) and a
    batch of another size is refused. None: run the model as it is (any size a dynamic model takes).
    ``cuda_graphs``: replay captured CUDA graphs (:mod:`.cuda_graphs`) instead of launching each
    kernel; needs CUDA first in the provider chain and a fixed input size (True without them is an
    error). None: env ``GAMGUARD_CUDA_GRAPHS=1`` turns it on for engines whose chain starts at CUDA,
    and is ignored, with a log line, for the others (CPU references, TensorRT).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: Sequence[str] | str | None = None,
        threads: int | None = None,
        guarded: bytes | None = None,
        input_hw: tuple[int, int] | None = None,
        cuda_graphs: bool | None = None,
    ):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EngineError(f"{self.model_path}: model file not found")
        if threads is None and os.environ.get("GAMGUARD_THREADS"):
            threads = int(os.environ["GAMGUARD_THREADS"])
        opts = session_options(threads)
        chain = resolve_providers(providers)
        self._guarded_source = guarded
        self._requested_providers = providers
        self.input_hw = None
        source = guarded if guarded is not None else str(self.model_path)
        self._cam_resize = None
        if input_hw is not None or guarded is not None:
            source, self.input_hw, self._cam_resize = serving_graph(
                source, self.model_path, input_hw, defer_cam=guarded is not None
            )
        try:
            self.session = ort.InferenceSession(source, sess_options=opts, providers=provider_entries(chain))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{self.model_path}: cannot create an ONNX Runtime session: {exc}") from exc
        self.providers = list(self.session.get_providers())
        self.threads = threads
        self.guarded = guarded is not None
        self._outputs = [*OUTPUT_NAMES, GUARD_OUTPUT] if self.guarded else list(OUTPUT_NAMES)
        if self._cam_resize is not None:  # the small CAM in place of the full-size one (ResizedMaps)
            self._outputs[OUTPUT_NAMES.index("cam")] = self._cam_resize[0]
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in inputs or any(n not in outputs for n in self._outputs):
            raise EngineError(
                f"{self.model_path}: not a fused gamguard model (inputs {inputs}, outputs {outputs}; "
                f"expected input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)})"
            )
        if cuda_graphs is None and os.environ.get("GAMGUARD_CUDA_GRAPHS", "") == "1":
            cuda_graphs = self.providers[0] == "CUDAExecutionProvider"
            if not cuda_graphs:
                log.info(
                    "GAMGUARD_CUDA_GRAPHS ignored for this %s session (CUDA graphs are for CUDA)", self.providers[0]
                )
        self._captured = self._capture(source, threads) if cuda_graphs else None
        log.info(
            "engine: onnxruntime %s, providers %s (requested chain %s), threads %s, guard arithmetic %s%s%s",
            ort.__version__,
            self.providers,
            chain,
            threads or "default",
            "in the graph" if self.guarded else "on the host",
            f", dynamic H/W fixed to {self.input_hw[0]}x{self.input_hw[1]}" if self.input_hw else "",
            f", CUDA graphs captured at batch {', '.join(map(str, self._captured.batches))}" if self._captured else "",
        )

    def _capture(self, source, threads):
        from .cuda_graphs import CapturedRuns

        if self.providers[0] != "CUDAExecutionProvider":
            raise EngineError(
                f"{self.model_path}: CUDA graphs need the CUDA execution provider first, the session has "
                f"{self.providers} (pass --providers cuda on a GPU with onnxruntime-gpu, or unset GAMGUARD_CUDA_GRAPHS)"
            )
        try:
            return CapturedRuns(source, plain=self.session, outputs=self._outputs, threads=threads)
        except EngineError as exc:
            raise EngineError(f"{self.model_path}: {exc}") from exc

    def at_size(self, input_hw: tuple[int, int]) -> "OnnxEngine":
        """The same model, providers, threads and guard arithmetic, served at another input size
        (a dynamic-H/W model only; benchmarks at sizes other than the bundle's)."""
        return OnnxEngine(
            self.model_path,
            providers=self._requested_providers,
            threads=self.threads,
            guarded=self._guarded_source,
            input_hw=input_hw,
            cuda_graphs=self._captured is not None,
        )

    def run(self, batch: np.ndarray) -> EngineOutput:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise EngineError(f"engine input must be [N, C, H, W], got shape {batch.shape}")
        if self.input_hw is not None and tuple(batch.shape[2:]) != self.input_hw:
            raise EngineError(
                f"this engine serves {self.input_hw[0]}x{self.input_hw[1]} inputs, "
                f"got {batch.shape[2]}x{batch.shape[3]}"
            )
        if self._captured is not None:
            logits, cam, early, *guard = self._captured.run(batch)
        else:
            logits, cam, early, *guard = self.session.run(self._outputs, {INPUT_NAME: batch})
        if self._cam_resize is not None:
            cam = ResizedMaps(np.asarray(cam, np.float32), *self._cam_resize[1:])  # rows, cols, bilinear
        return EngineOutput(
            logits=np.asarray(logits, np.float32),
            cam=cam if self._cam_resize is not None else np.asarray(cam, np.float32),
            early=np.asarray(early, np.float32),
            guard=np.asarray(guard[0], np.float32) if guard else None,
        )

    def run_logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits only (for benchmarks: the unguarded baseline on the same session)."""
        return self.session.run(["logits"], {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})[0]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {
            "engine": self.name,
            "version": ort.__version__,
            "providers": list(self.providers),
            "threads": self.threads,
            "model": self.model_path.name,
            "guard_arithmetic": "graph" if self.guarded else "host",
            "input_size": list(self.input_hw) if self.input_hw else None,
            "cuda_graphs": list(self._captured.batches) if self._captured else None,
        }


def serving_graph(source, model_path: Path, input_hw, *, defer_cam: bool = False):
    """What an :class:`OnnxEngine` runs for ``source``, as ``(session source, fixed size, CAM resize)``
    (``gamguard bench --zoo`` times the same graph): ``source`` (a path or serialized model) specialised to
    ``input_hw`` when given and its input has dynamic H/W (see :mod:`.specialize`; fixed size None
    otherwise: a static model serves its own size, a mismatch surfaces as ONNX Runtime's shape error).
    ``defer_cam`` (a guarded model): the full-size CAM left to the host when the graph allows it
    (:func:`.specialize.defer_cam_resize`); the third item is then ``(small output, rows, cols, bilinear)``
    (``bilinear``: :func:`.base.is_opencv_bilinear`), else None."""
    import onnx

    from .specialize import (
        cam_min_max_on_small_map,
        defer_cam_resize,
        fold_constants,
        is_spatially_dynamic,
        pool_early_with_average_pool,
        specialize_spatial,
    )

    try:
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    except Exception as exc:  # onnx raises DecodeError and others
        raise EngineError(f"{model_path}: cannot read the ONNX model: {exc}") from exc
    fix = input_hw is not None and is_spatially_dynamic(model)
    if not fix and not defer_cam:
        return source, None, None
    h, w = (int(v) for v in input_hw) if fix else (None, None)
    pooled = cam_small = False
    resize = None
    try:
        if fix:
            model = fold_constants(specialize_spatial(model, h, w))  # once, for every rewrite below
            model, pooled = pool_early_with_average_pool(model, folded=True)
            model, cam_small = cam_min_max_on_small_map(model, folded=True)
        if defer_cam:
            model, resize = defer_cam_resize(model, folded=fix)
            if resize is not None:
                resize = (*resize, is_opencv_bilinear(*resize[1:]))
    except Exception as exc:  # onnxruntime raises its own exception types
        where = f" at {h}x{w}" if fix else ""
        raise EngineError(f"{model_path}: cannot create an ONNX Runtime session{where}: {exc}") from exc
    log.debug(
        "%s: early features %s, CAM min-max %s, full-size CAM %s",
        f"fixed to {h}x{w}" if fix else "static size",
        "by one AveragePool" if pooled else "as exported",
        "on the small map" if cam_small else "as exported",
        "computed when read" if resize else "in the graph",
    )
    if not fix and resize is None:  # nothing rewritten: the source as it came
        return source, None, None
    return model.SerializeToString(), ((h, w) if fix else None), resize
