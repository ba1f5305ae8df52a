"""Native TensorRT engine: serves a bundle's ``model.plan`` through the runtime's Engine interface.

Memory goes through cuda-python's CUDA runtime bindings, which exist on x86-64 and on Jetson (unlike
pycuda wheels); see :class:`PlanRunner`. One execution context serves one call at a time (a lock),
which is what the gRPC server's micro-batching needs.

``tensorrt`` and ``cuda-python`` are imported inside :class:`TensorRTEngine` only, so importing this
module costs nothing on a CPU box; :func:`plan_status` tells without a GPU whether a bundle has a plan
worth trying, and :func:`select_engine` is the selection rule ``create_engine`` applies.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np

from ..bundle import MODEL_FILE, PLAN_FILE, REFERENCE_FILE, BundleError
from .base import INPUT_NAME, OUTPUT_NAMES, EngineOutput
from .plan import (
    GUARD_OUTPUT,
    SECTION,
    PlanMismatch,
    ShapeProfile,
    TensorRTUnavailable,
    check_plan_compatibility,
    cuda_check,
    current_device_tag,
    require_cudart,
    require_tensorrt,
    stale_plan_reason,
)

log = logging.getLogger(__name__)

PREFER_CHOICES = ("auto", "tensorrt", "onnx")  # the values engines.create_engine accepts


def plan_status(bundle_dir: str | Path, manifest: dict) -> tuple[bool, str]:
    """Does the bundle carry a tagged plan for the current model? (No GPU needed; device match is
    checked when the engine is created.)"""
    section = manifest.get(SECTION)
    files = manifest.get("files") or {}
    if PLAN_FILE not in files:
        return False, "the bundle has no model.plan"
    if not (Path(bundle_dir) / PLAN_FILE).is_file():
        return False, "model.plan is listed but missing"
    if not section:
        return False, "model.plan has no 'tensorrt' tag in bundle.json"
    stale = stale_plan_reason(section, files.get(MODEL_FILE), files.get(REFERENCE_FILE))  # as serving checks it
    if stale:
        return False, stale
    return True, (
        f"model.plan ({section.get('precision')}, TensorRT {section.get('tensorrt_version')}, "
        f"{section.get('gpu')} sm {section.get('compute_capability')})"
    )


def select_engine(bundle_dir: str | Path, manifest: dict, prefer: str = "auto", *, open_tensorrt=None):
    """The selection rule: the native TensorRT engine when the bundle has a plan that matches this
    device, else ``None`` (the caller falls back to ONNX Runtime's TensorRT → CUDA → CPU chain).

    ``prefer="tensorrt"`` makes any reason not to use the plan an error; ``"onnx"`` never
    opens it. ``open_tensorrt`` builds the engine (defaults to :class:`TensorRTEngine`). The choice
    and its reason are logged, so an operator can see why a GPU box fell back to ONNX Runtime.
    """
    if prefer not in PREFER_CHOICES:
        raise ValueError(f"prefer must be one of {PREFER_CHOICES}, got {prefer!r}")
    if prefer == "onnx":
        log.info("engine: ONNX Runtime requested; not using model.plan")
        return None
    ok, why = plan_status(bundle_dir, manifest)
    if not ok:
        if prefer == "tensorrt":
            raise PlanMismatch(f"native TensorRT engine requested but {why}; build it with `gamguard build-engine`")
        log.info("engine: no native TensorRT plan (%s); using ONNX Runtime", why)
        return None
    opener = open_tensorrt or TensorRTEngine
    try:
        engine = opener(bundle_dir, manifest)
    except TensorRTUnavailable as exc:
        if prefer == "tensorrt":
            raise
        log.info("engine: %s present but TensorRT is unusable here (%s); using ONNX Runtime", why, exc)
        return None
    # PlanMismatch (wrong TensorRT version / GPU) is not swallowed: the bundle was prepared for this
    # box and serving it anyway through ONNX Runtime would hide a deployment mistake.
    log.info("engine: native TensorRT, %s", why)
    return engine


class PlanRunner:
    """Runs a deserialized TensorRT plan: numpy in, numpy out, buffers sized once for the profile.

    Memory goes through cuda-python's CUDA runtime bindings: pinned host buffers (so the copies are
    truly asynchronous) and device buffers, one per I/O tensor, for the profile's largest batch.
    One execution context serves one call at a time (a lock); batches larger than the profile's
    maximum are split into chunks. Outputs are whatever the plan has (a subset of
    ``logits``/``cam``/``early``); :class:`TensorRTEngine` requires all three.
    """

    def __init__(self, plan: bytes, *, device: int = 0):
        self._lock = threading.Lock()
        self._device_ptrs: dict[str, int] = {}
        self._host_ptrs: dict[str, int] = {}
        self._stream = None
        trt = require_tensorrt()
        self._cudart = cudart = require_cudart()
        cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise PlanMismatch(
                "TensorRT could not deserialize the plan (built by another TensorRT version or for another GPU?)"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if INPUT_NAME not in names:
            raise BundleError(f"the plan has no input {INPUT_NAME!r} (tensors {names})")
        self.output_names = tuple(n for n in (*OUTPUT_NAMES, GUARD_OUTPUT) if n in names)
        lo, opt, hi = (tuple(int(v) for v in s) for s in self._engine.get_tensor_profile_shape(INPUT_NAME, 0))
        self.profile = ShapeProfile(lo, opt, hi)
        self.max_batch = hi[0]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._context.set_input_shape(INPUT_NAME, hi)
        self._stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        for n in (INPUT_NAME, *self.output_names):
            shape = tuple(self._context.get_tensor_shape(n))
            nbytes = int(np.prod(shape)) * self._dtypes[n].itemsize
            self._device_ptrs[n] = int(cuda_check(cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._host_ptrs[n] = int(cuda_check(cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
            self._context.set_tensor_address(n, self._device_ptrs[n])

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(batch)
        if x.dtype != np.float32 or x.ndim != 4:
            raise ValueError(f"expected a float32 [N,C,H,W] batch, got {x.dtype} {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        if not self.profile.admits((min(x.shape[0], self.max_batch), *x.shape[1:])):
            raise ValueError(
                f"input shape {x.shape} is outside the plan's profile {self.profile.min}..{self.profile.max}"
            )
        parts = [self._run_chunk(x[i : i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([p[n] for p in parts]) for n in self.output_names}

    def _host_view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype = self._dtypes[name]
        count = int(np.prod(shape))
        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self._host_ptrs[name])
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def _run_chunk(self, x: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            self._context.set_input_shape(INPUT_NAME, x.shape)
            host_in = self._host_view(INPUT_NAME, x.shape)
            host_in[...] = x.astype(self._dtypes[INPUT_NAME], copy=False)
            cuda_check(
                cudart.cudaMemcpyAsync(
                    self._device_ptrs[INPUT_NAME], self._host_ptrs[INPUT_NAME], host_in.nbytes, h2d, self._stream
                ),
                "cudaMemcpyAsync H2D",
            )
            if not self._context.execute_async_v3(int(self._stream)):  # the raw cudaStream_t handle
                raise RuntimeError("TensorRT execute_async_v3 failed")
            shapes = {n: tuple(self._context.get_tensor_shape(n)) for n in self.output_names}
            for n in self.output_names:
                nbytes = int(np.prod(shapes[n])) * self._dtypes[n].itemsize
                cuda_check(
                    cudart.cudaMemcpyAsync(self._host_ptrs[n], self._device_ptrs[n], nbytes, d2h, self._stream),
                    "cudaMemcpyAsync D2H",
                )
            cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            # Copy out of the pinned buffers before the lock is released: the next call reuses them.
            return {n: self._host_view(n, shapes[n]).astype(np.float32, copy=True) for n in self.output_names}

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr in self._device_ptrs.values():
            cudart.cudaFree(ptr)
        for ptr in self._host_ptrs.values():
            cudart.cudaFreeHost(ptr)
        self._device_ptrs.clear()
        self._host_ptrs.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):  # best effort; the process usually outlives the engine
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class TensorRTEngine:
    """Engine protocol over a bundle's ``model.plan``: ``run(batch [N,C,H,W] float32) -> EngineOutput``.

    Refuses (:class:`PlanMismatch`) a plan whose tag names another TensorRT version, another GPU
    architecture or another ``model.onnx`` than this machine and bundle have.
    """

    name = "tensorrt"

    def __init__(self, bundle_dir: str | Path, manifest: dict | None = None, *, device: int = 0):
        """``bundle_dir``: the bundle (or its ``model.plan``); ``manifest``: its checked manifest
        (read and hash-checked here when omitted)."""
        from ..bundle import load_manifest

        bundle_dir = Path(bundle_dir)
        if bundle_dir.name == PLAN_FILE:
            bundle_dir = bundle_dir.parent
        if manifest is None:
            manifest = load_manifest(bundle_dir, require_calibration=False)
        self._EngineOutput = EngineOutput
        self.bundle_dir = bundle_dir
        self.section = dict(manifest.get(SECTION) or {})
        self.device_tag = current_device_tag(device)
        files = manifest.get("files") or {}
        check_plan_compatibility(self.section, self.device_tag, files.get(MODEL_FILE), files.get(REFERENCE_FILE))
        self._runner = PlanRunner((bundle_dir / PLAN_FILE).read_bytes(), device=device)
        if self._runner.output_names[:3] != OUTPUT_NAMES:
            raise BundleError(f"model.plan has outputs {self._runner.output_names}, expected {OUTPUT_NAMES}")
        # a plan built with --guard-graph also computes the checks' arithmetic (checks/graph.py)
        self.guarded = GUARD_OUTPUT in self._runner.output_names
        self.profile = self._runner.profile
        self.max_batch = self._runner.max_batch
        self.providers = ["TensorRT (native plan)"]
        log.info(
            "TensorRT engine ready: %s on %s, profile %s..%s",
            self.section.get("precision"),
            self.device_tag.gpu,
            self.profile.min,
            self.profile.max,
        )

    def run(self, batch: np.ndarray):
        out = self._runner.run(batch)
        return self._EngineOutput(logits=out["logits"], cam=out["cam"], early=out["early"], guard=out.get(GUARD_OUTPUT))

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "providers": list(self.providers),
            "plan": PLAN_FILE,
            "precision": self.section.get("precision"),
            "tensorrt_version": self.device_tag.tensorrt_version,
            "gpu": self.device_tag.gpu,
            "compute_capability": self.device_tag.compute_capability,
            "profile": self.profile.to_manifest(),
            "built_at": self.section.get("built_at"),
            "guard_arithmetic": "graph" if self.guarded else "host",
        }

    def close(self) -> None:
        self._runner.close()
