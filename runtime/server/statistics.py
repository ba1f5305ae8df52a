"""Per-model inference statistics, counted the way Triton's ``ModelStatistics`` counts them.

The data plane feeds one :class:`InferenceStatistics` per loaded model; the Open Inference Protocol
adapter serves a :meth:`InferenceStatistics.snapshot` as ``ModelStatistics`` (what
``tritonclient.grpc`` ``get_inference_statistics`` and perf_analyzer read). As in Triton, the stage
counts are per request (an OIP request with N images counts once; ``inference_count`` counts its N
images), and cumulative times are nanoseconds of wall time:

* ``success`` — requests answered with verdicts (accepted or rejected by the guard), and their time
  from arrival in the data plane to the last verdict;
* ``fail`` — requests that got no verdict (invalid input, queue full, deadline passed), and the
  time spent on them;
* ``queue`` — time waiting in the micro-batcher for an engine call;
* ``compute_input`` — decoding and preprocessing the image;
* ``compute_infer`` — the fused engine call of the image's batch (each image of a batch counts the
  whole call, as in Triton);
* ``compute_output`` — the guard's checks and verdicts for that batch.

The images of one request may ride in different engine calls, and their stages overlap: a request's
stage times are those of its image that finished last (the one its answer waited for), so they add up
to no more than its ``success`` time (perf_analyzer subtracts them from the client's latency).
``inference_count`` counts images with a verdict, ``execution_count`` engine calls; ``batch_stats``
holds, per batch size, the engine calls of that size with the time spent stacking their inputs
(``compute_input``), in the engine (``compute_infer``) and in the guard (``compute_output``).
Updates come from the event loop and the engine thread, hence the lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """``count`` events that took ``ns`` nanoseconds in all (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, ms: float) -> None:
        self.count += 1
        self.ns += max(0, int(round(ms * 1e6)))


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class InferenceStatistics:
    def __init__(self):
        self._lock = threading.Lock()
        self.stages = {name: Duration() for name in STAGES}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0  # milliseconds since the epoch
        self.batches: dict[int, BatchDurations] = {}

    def observe_request(
        self, *, images: int, total_ms: float, queue_ms: float, input_ms: float, infer_ms: float, output_ms: float
    ) -> None:
        """One request of ``images`` images answered with their verdicts."""
        with self._lock:
            s = self.stages
            s["success"].add(total_ms)
            s["queue"].add(queue_ms)
            s["compute_input"].add(input_ms)
            s["compute_infer"].add(infer_ms)
            s["compute_output"].add(output_ms)
            self.inference_count += images
            self.last_inference_ms = int(time.time() * 1000)

    def observe_failure(self, elapsed_ms: float) -> None:
        """One request that got no verdict."""
        with self._lock:
            self.stages["fail"].add(elapsed_ms)

    def observe_stacking(self, batch_size: int, ms: float) -> None:
        """The inputs of one engine call of ``batch_size`` images were stacked in ``ms``."""
        with self._lock:
            self._batch(batch_size).compute_input.add(ms)

    def observe_execution(self, batch_size: int, infer_ms: float, output_ms: float) -> None:
        """One engine call of ``batch_size`` images: engine time, then the guard's time."""
        with self._lock:
            b = self._batch(batch_size)
            b.compute_infer.add(infer_ms)
            b.compute_output.add(output_ms)
            self.execution_count += 1

    def _batch(self, size: int) -> BatchDurations:
        b = self.batches.get(size)
        if b is None:
            b = self.batches[size] = BatchDurations()
        return b

    def snapshot(self) -> dict:
        """A consistent copy: ``{"stages": {name: (count, ns)}, "inference_count", "execution_count",
        "last_inference_ms", "batches": {size: {stage: (count, ns)}}}``."""
        with self._lock:
            return {
                "stages": {k: (d.count, d.ns) for k, d in self.stages.items()},
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "last_inference_ms": self.last_inference_ms,
                "batches": {
                    size: {
                        k: (getattr(b, k).count, getattr(b, k).ns)
                        for k in ("compute_input", "compute_infer", "compute_output")
                    }
                    for size, b in sorted(self.batches.items())
                },
            }
