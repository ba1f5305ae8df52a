"""Replaying captured CUDA graphs instead of launching each kernel (ONNX Runtime CUDA, opt-in).

The guarded model is about 260 small kernels, and on a GPU their launches, not their arithmetic, set
the time of a call: on an H200 a batch-1 call at 224² took 1.9 to 2.7 ms launched kernel by kernel and
0.68 ms replayed as one captured graph (scripts/gpu_guard_probe.py; docs/architecture.md, "On a GPU").

ONNX Runtime captures a graph on a session's first runs with ``enable_cuda_graph`` and replays it on
every later run. A captured graph is fixed to its input and output shapes and their device addresses,
so :class:`CapturedRuns` keeps one session per batch size in :data:`CAPTURED_BATCHES`, each with its
own input and output buffers on the device, bound once by IO binding. A batch is copied into the
buffers of the smallest captured size that holds it (rows beyond it are zeros, their outputs dropped);
a batch above the largest is run in slices.

ONNX Runtime keeps captured graphs per calling thread. Every size is captured once when the engine is
made, so a model that cannot be captured fails then; a thread that serves later (the server's engine
thread) captures again on its first call of each size (that call is slower; not yet measured).
A capture must not overlap other CUDA work in the process, so every captured run in the process
holds one lock (:data:`_GPU_LOCK`); on one GPU the calls would mostly queue anyway.

Costs: one copy of the weights on the device per captured size, plus the engine's own session; the
model's input size must be fixed.
"""

from __future__ import annotations

import threading

import numpy as np

from .base import INPUT_NAME, EngineError

#: Batch sizes captured: powers of two up to 32 (the server batches up to 8 by default; a larger
#: ``--max-batch-size`` or an offline caller uses the rest).
CAPTURED_BATCHES = (1, 2, 4, 8, 16, 32)

#: Runs of each size when the engine is made: enough for ONNX Runtime's warm-up runs and the capture.
CAPTURE_RUNS = 3

#: Held by every captured run (and capture) in the process; see the module docstring.
_GPU_LOCK = threading.Lock()


class _Slot:
    """One captured session: its device input/output buffers, IO binding and a zeroed host staging array."""

    def __init__(self, ort, source, sess_options, providers, outputs, shapes, batch_shape, device):
        self.on_host = device == "cpu"
        self.session = ort.InferenceSession(source, sess_options=sess_options, providers=providers)
        self.staging = np.zeros(batch_shape, np.float32)
        self.input = ort.OrtValue.ortvalue_from_numpy(self.staging, device, 0)
        self.outputs = [ort.OrtValue.ortvalue_from_shape_and_type(s, np.float32, device, 0) for s in shapes]
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(INPUT_NAME, self.input)
        for name, value in zip(outputs, self.outputs):
            self.binding.bind_ortvalue_output(name, value)
        with _GPU_LOCK:  # ONNX Runtime may run a model normally a few times before it captures
            for _ in range(CAPTURE_RUNS):
                self.session.run_with_iobinding(self.binding)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        n = batch.shape[0]
        with _GPU_LOCK:  # the buffers are shared by every call of this size; captures must not overlap
            if n == self.staging.shape[0]:
                self.input.update_inplace(batch)
            else:
                self.staging[:n] = batch
                self.staging[n:] = 0.0
                self.input.update_inplace(self.staging)
            self.session.run_with_iobinding(self.binding)
            if self.on_host:  # numpy() of a host buffer is a view the next call overwrites
                return [value.numpy()[:n].copy() for value in self.outputs]
            return [value.numpy()[:n] for value in self.outputs]  # a copy from the device


class CapturedRuns:
    """``run(batch) -> [arrays in `outputs` order]`` by replaying CUDA graphs of ``source``.

    ``plain``: a session of the same model without capture: its input gives the fixed sample shape,
    and one run per size the output shapes. ``threads``: as for every gamguard session
    (:func:`~gamguard.runtime.engines.session_options`). ``device``: where the bound buffers live
    (``cuda``, captured with gamguard's CUDA options; ``cpu`` runs the same binding, padding and
    slicing on ONNX Runtime CPU without a graph, for tests on machines without a GPU). Raises
    :class:`EngineError` for a model without a fixed input size or one ONNX Runtime cannot capture.
    """

    def __init__(self, source, *, plain, outputs, threads=None, batches=None, device="cuda"):
        import onnxruntime as ort

        from .onnx import PROVIDER_OPTIONS, session_options

        shape = plain.get_inputs()[0].shape  # [N, C, H, W]; N dynamic
        if not all(isinstance(v, int) for v in shape[1:]):
            raise EngineError(
                f"CUDA graphs need a fixed input size, the model's input is {shape} "
                "(a bundle with dynamic H/W is fixed to its own size when it is served)"
            )
        if device == "cuda":
            options = {**PROVIDER_OPTIONS["CUDAExecutionProvider"], "enable_cuda_graph": "1"}
            providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.outputs = list(outputs)
        self.sample_shape = tuple(shape[1:])
        self.batches = tuple(sorted(batches or CAPTURED_BATCHES))
        self._slots = {}
        self._row_shapes = None
        for b in self.batches:
            shape = (b, *self.sample_shape)
            try:
                shapes = [a.shape for a in plain.run(self.outputs, {INPUT_NAME: np.zeros(shape, np.float32)})]
                self._row_shapes = [s[1:] for s in shapes]
                self._slots[b] = _Slot(
                    ort, source, session_options(threads), providers, self.outputs, shapes, shape, device
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise EngineError(
                    f"ONNX Runtime could not capture a CUDA graph of this model at batch {b}: {exc} "
                    "(unset GAMGUARD_CUDA_GRAPHS to launch kernels one by one)"
                ) from exc

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, np.float32)  # the buffer copy checks sizes, not types
        n, top = batch.shape[0], self.batches[-1]
        if tuple(batch.shape[1:]) != self.sample_shape:
            raise EngineError(f"captured for inputs of shape {self.sample_shape}, got {tuple(batch.shape[1:])}")
        if n == 0:
            return [np.zeros((0, *s), np.float32) for s in self._row_shapes]
        if n > top:  # slices of the largest captured size
            parts = [self.run(batch[i : i + top]) for i in range(0, n, top)]
            return [np.concatenate([p[j] for p in parts]) for j in range(len(self.outputs))]
        size = next(b for b in self.batches if b >= n)
        return self._slots[size].run(batch)
