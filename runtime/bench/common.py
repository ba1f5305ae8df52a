"""Helpers shared by every part of ``gamguard bench``, the torch half
(:mod:`gamguard.exporter.bench_torch`) included: interleaved timing, machine facts, the logits-only
baseline model, phantom inputs, the guard at another input size.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np


class BenchError(RuntimeError):
    """A benchmark cannot run as configured (a missing package, an unusable bundle)."""


LARGE_MODEL = {"widths": (64, 128, 256), "blocks": 2, "input_norm": True}


LARGE_BUNDLE_SIZE = 128  # export/calibration size; timings are taken at the requested sizes


LARGE_CASES = ((224, 1), (224, 8), (512, 1))  # 512² batch 8 is ~10 s per call on one core


LARGE_CALIBRATION_PER_CLASS = 45


def median_ms(times: list[float]) -> float:
    return float(statistics.median(times)) * 1e3


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, interleaved; the order alternates every round
    (A B C, C B A, A B C, ...) so neither drift nor position favours one variant. Seconds per call."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(threads: int) -> dict:
    import onnxruntime as ort

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "onnxruntime_available_providers": list(ort.get_available_providers()),
        "threads": threads,
    }


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name (nvidia-smi), or None."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def logits_only_model(fused_model: Path, out_dir: Path) -> Path:
    """Cut the fused model down to what ``logits`` needs (graph surgery with ``onnx``), written to
    ``out_dir``. ONNX Runtime then runs exactly the plain classifier: the unguarded baseline."""
    try:
        import onnx
        import onnx.utils
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BenchError(
            "gamguard bench needs the 'onnx' package for the logits-only baseline: pip install 'onnx>=1.16'"
        ) from exc
    model = onnx.load(str(fused_model))
    extracted = onnx.utils.Extractor(model).extract_model(["image"], ["logits"])
    out = Path(out_dir) / "logits_only.onnx"
    onnx.save(extracted, str(out))
    return out


def ort_session(path: Path, providers: list[str], threads: int | None):
    """A session with the same options :class:`gamguard.runtime.engines.OnnxEngine` uses
    (:func:`gamguard.runtime.engines.session_options`)."""
    import onnxruntime as ort

    from gamguard.runtime.engines import provider_entries, session_options

    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=provider_entries(providers))


class LogitsOnly:
    """The unguarded baseline: the fused model's classifier (:func:`logits_only_model`), with one ONNX
    Runtime session per input size. A dynamic-H/W model is specialised to each size the way the
    guard's engine is (:mod:`gamguard.runtime.engines.specialize`), so both sides run static shapes.
    ``cuda_graphs``: replay captured CUDA graphs, as the guard's engine does under
    ``GAMGUARD_CUDA_GRAPHS=1`` (both sides alike, or the ratio would credit the guard with the capture)."""

    def __init__(self, fused_model: Path, providers: list[str], threads: int | None, *, cuda_graphs: bool = False):
        import tempfile

        import onnx

        from gamguard.runtime.engines.specialize import is_spatially_dynamic

        with tempfile.TemporaryDirectory(prefix="gamguard-bench-") as tmp:
            self.model = onnx.load(str(logits_only_model(fused_model, Path(tmp))))
        self.dynamic = is_spatially_dynamic(self.model)
        self.providers, self.threads = list(providers), threads
        self.cuda_graphs = bool(cuda_graphs)
        self._sessions: dict = {}

    @classmethod
    def for_engine(cls, engine, threads: int | None) -> "LogitsOnly":
        """The baseline of ``engine``: its model and providers, and captured CUDA graphs when it has them."""
        captured = bool(engine.describe().get("cuda_graphs"))
        return cls(engine.model_path, list(engine.providers), threads, cuda_graphs=captured)

    def session(self, size: int | None = None):
        """The session for ``size`` x ``size`` inputs (a static model: its own size, whatever ``size``)."""
        import onnxruntime as ort

        from gamguard.runtime.engines import provider_entries, session_options
        from gamguard.runtime.engines.specialize import specialize_spatial

        key = size if self.dynamic else None
        if key not in self._sessions:
            model = self.model if key is None else specialize_spatial(self.model, key, key)
            session = ort.InferenceSession(
                model.SerializeToString(),
                sess_options=session_options(self.threads),
                providers=provider_entries(self.providers),
            )
            self._sessions[key] = _CapturedLogits(session, model, self.threads) if self.cuda_graphs else session
        return self._sessions[key]


class _CapturedLogits:
    """A logits-only session replaying captured CUDA graphs (:mod:`gamguard.runtime.engines.cuda_graphs`),
    with the ``run(names, feed)`` / ``get_providers()`` of the plain session it stands for."""

    def __init__(self, plain, model, threads):
        from gamguard.runtime.engines.cuda_graphs import CapturedRuns

        self._plain = plain
        self._runs = CapturedRuns(model.SerializeToString(), plain=plain, outputs=["logits"], threads=threads)

    def run(self, names, feed):
        if list(names) != ["logits"]:
            raise ValueError(f"the captured logits-only session returns logits only, not {names}")
        return self._runs.run(feed["image"])

    def get_providers(self):
        return self._plain.get_providers()


def spatial_is_dynamic(session) -> bool:
    shape = session.get_inputs()[0].shape  # e.g. ['batch', 1, 's73', 's6'] or ['batch', 1, 128, 128]
    return len(shape) == 4 and not isinstance(shape[2], int) and not isinstance(shape[3], int)


def phantom_images(n: int, seed: int = 1234, size: int = 256) -> list[np.ndarray]:
    """``n`` in-distribution hand phantoms (all classes in turn), decoded form (HxW float32 in [0, 1])."""
    from gamguard.runtime.demo.phantoms import CLASS_NAMES, hand_phantom

    rng = np.random.default_rng(seed)
    return [hand_phantom(i % len(CLASS_NAMES), rng, size).image for i in range(n)]


def guard_at_size(guard, size: int):
    """The guard serving ``size`` x ``size`` inputs: a shallow copy whose input spec says that size and,
    when its ONNX Runtime engine is fixed to the bundle's size (a dynamic-H/W model, see
    :mod:`gamguard.runtime.engines.specialize`), with an engine fixed to ``size`` — what a bundle at
    that size would run."""
    if (guard.spec.height, guard.spec.width) == (size, size):
        return guard
    g = copy.copy(guard)
    g.spec = dataclasses.replace(guard.spec, height=size, width=size)
    if getattr(guard.engine, "input_hw", None) is not None:
        g.engine = guard.engine.at_size((size, size))
    return g


def batch_at(images: list[np.ndarray], spec, size: int, n: int) -> np.ndarray:
    from gamguard.runtime.preprocess import preprocess_batch

    return preprocess_batch(images[:n], dataclasses.replace(spec, height=size, width=size))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else math.nan


def concurrent_round(
    clients: int, per_client: int, call: Callable[[int, int], None]
) -> tuple[float, list[float], float]:
    """``clients`` threads released together, thread ``k`` making ``call(k, j)`` for ``j < per_client``
    in turn (a closed-loop load, as concurrent clients make). Returns (calls per second, every call's
    latency in ms, this process's CPU ms per call). A thread stops at its first error; the first error
    of any thread is raised once all have finished."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def work(k: int) -> None:
        try:
            barrier.wait()
            for j in range(per_client):
                t0 = time.perf_counter()
                call(k, j)
                latencies[k].append((time.perf_counter() - t0) * 1e3)
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if errors:
        raise errors[0]
    n = clients * per_client
    return n / wall, [v for lat in latencies for v in lat], cpu * 1e3 / n
