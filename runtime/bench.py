"""``gamguard bench``: what the guard costs, measured as ratios within one run.

The machine this runs on is usually shared and noisy, so every figure that matters is a *ratio* of two
variants measured in the same run, interleaved (A B, B A, A B, ...) so that load drift hits both alike,
and summarised by medians. Absolute milliseconds are reported only as context.

Sections of the result (``run_bench`` returns one JSON-able dict, format :data:`BENCH_FORMAT`):

* ``guard_overhead`` — per batch (1, 8) and input size (224², 512²): the *full guarded call*
  (:meth:`Guard.verify_tensor` on a preprocessed batch: fused engine + every check + decision + verdicts,
  exactly what the server's worker runs per batch) over a *logits-only* ONNX Runtime session of the same
  model. The logits-only model is cut out of the bundle's fused ``model.onnx`` with
  :class:`onnx.utils.Extractor` (only the nodes ``logits`` depends on), and its session gets the same
  providers and thread settings as the guard's engine. Goal: ratio <= 1.10.
  ``Guard.verify_tensor`` checks the batch against the bundle's input size; at other sizes the guard
  runs as a shallow copy whose input spec says that size (same engine session, references, thresholds:
  Grad-CAM maps are resampled to the comparison grid and early features are pooled to a fixed grid in
  the graph, so every check runs unchanged). The *timing* is representative; the *decisions* at a size
  the bundle was not calibrated for are not, and are not reported. A bundle exported without dynamic
  height/width is measured at its own size only (``sizes_note`` says so).
* ``guard_overhead_large`` (only with ``BenchConfig.large``; needs torch) — the same measurement on a
  realistic-size classifier (:data:`LARGE_MODEL`: GuardNet at ResNet-18 widths, 2 blocks per stage)
  with *random* seeded weights, exported through :func:`gamguard.exporter.export_bundle` (dynamic
  H/W) and calibrated on phantoms here: timings are representative, verdicts are not.
  ``{"status": "skipped", "reason": ...}`` without torch. The demo model is tiny (about 0.1 GMAC at
  224²), so the guard's fixed costs (Python checks, small graph nodes) weigh far more on it.
* ``measures_cost`` — the seven similarity measures (:func:`similarity.batch_scores`) and the
  early-feature score per image, as a fraction of the fused engine's time per image.
* ``speedup_vs_pytorch_gradcam`` — PyTorch eager forward + backward Grad-CAM as pytorch-grad-cam's
  ``GradCAM`` computes it (CAM only, no checks) over gamguard's full guarded call; the smallest
  speedup over the cases (``pytorch_gradcam`` holds each case). pytorch-grad-cam is used when it
  imports; otherwise an equivalent autograd implementation (:func:`_autograd_gradcam`, same hooks,
  same numpy post-processing) and ``pytorch_gradcam.implementation`` says which. Needs torch and the
  bundle's torch checkpoint (``--checkpoint``; the demo bundle's is ``exporter/demo.ckpt``); ``null``
  when either is absent. The torch code lives in :mod:`gamguard.exporter.bench_torch` (the runtime
  never imports torch); it is called only when torch is installed.
* ``grpc_efficiency`` — throughput of a real gRPC server (:class:`BackgroundServer`, loopback,
  plaintext, default serving configuration) driven by 1, 4 and 16 concurrent :class:`GuardClient`
  threads (one channel each, in a separate spawned process, as real clients are) sending encoded PNGs.
  ``ratio`` = that throughput over *in-process guarded calls with the same batching*: the batches the
  server's micro-batcher actually formed in that round, replayed in-process (decode + preprocess +
  :func:`run_guard_batch` per batch, one thread) — what the same work costs without the server.
  ``ratio_vs_inprocess_dataplane`` compares with the same number of concurrent in-process
  :meth:`DataPlane.verify` calls instead (same guard object, same micro-batching configuration and
  decode pool, no metrics/audit): in-process callers wake in lock-step and so form fuller batches
  (``grpc_mean_batch`` / ``inprocess_mean_batch``). p50/p99 are client-side gRPC latencies; the client
  process's CPU per request is recorded too (it shares the machine's cores). Goal: ratio >= 0.85 at
  16 clients. Runs at the bundle's input size.
  Fairness notes: both sides decode the same PNGs with the same code (``decode_bytes`` +
  ``preprocess``) and run the same batches, but throughput on a shared machine still charges the
  server with the client process's CPU (same cores) and with other people's load (consecutive rounds
  differ by 30 % and more on a shared 2-core box), while the replay runs on one thread and the server
  may overlap decoding with the engine on a second core. ``cpu_ratio`` is the load-robust figure:
  CPU time per request of the replay over that of the server process during the gRPC rounds
  (``server_cpu_ms_per_request``: the server runs in this process, the clients in the other one, so
  client work is not included) — the server's own per-request overhead, independent of how many
  cores it managed to get.

GPU: ``providers`` (e.g. ``"cuda"``, ``"tensorrt,cuda"``) selects the ONNX Runtime provider chain for
the guard and the logits-only session alike; the providers actually used are recorded in ``machine``.
"""
from __future__ import annotations

import importlib.util

import asyncio
import collections
import copy
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

BENCH_FORMAT = "gamguard-bench/1"
SIZES = (224, 512)
BATCHES = (1, 8)
CLIENT_LEVELS = (1, 4, 16)
GOALS = {"guard_overhead_max": 1.10, "speedup_vs_pytorch_gradcam_min": 4.0, "grpc_efficiency_min_at_16": 0.85}


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


@dataclass
class BenchConfig:
    bundle: Path | None = None  # None: the embedded demo bundle
    checkpoint: Path | None = None  # torch checkpoint of the same model (PyTorch comparison)
    threads: int = 1  # intra-op threads for ONNX Runtime and torch alike
    providers: str | None = None  # ONNX Runtime provider chain (None: "cpu")
    quick: bool = False
    large: bool = False  # also guard_overhead_large: a realistic-size model (needs torch; slow)
    sizes: tuple[int, ...] = SIZES
    batches: tuple[int, ...] = BATCHES
    clients: tuple[int, ...] = CLIENT_LEVELS
    repeats: int | None = None  # timed rounds per case (default: 5 quick, 30 full)
    grpc_rounds: int | None = None  # interleaved gRPC / in-process rounds per level (1 quick, 3 full)
    skip: tuple[str, ...] = ()  # sections to skip: "pytorch", "grpc"
    progress: Callable[[str], None] = field(default=_progress)

    @property
    def n_repeats(self) -> int:
        return self.repeats or (5 if self.quick else 30)

    @property
    def n_grpc_rounds(self) -> int:
        return self.grpc_rounds or (1 if self.quick else 3)


# ------------------------------------------------------------------------------------------ helpers


def _median_ms(times: list[float]) -> float:
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
        for n in (names if r % 2 == 0 else names[::-1]):
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
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
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
        from gamguard.runtime.cli import CommandError

        raise CommandError("gamguard bench needs the 'onnx' package for the logits-only baseline: "
                           "pip install 'onnx>=1.16'") from exc
    model = onnx.load(str(fused_model))
    extracted = onnx.utils.Extractor(model).extract_model(["image"], ["logits"])
    out = Path(out_dir) / "logits_only.onnx"
    onnx.save(extracted, str(out))
    return out


def ort_session(path: Path, providers: list[str], threads: int | None):
    """A session with the same options :class:`gamguard.runtime.engine.OnnxEngine` uses
    (:func:`gamguard.runtime.engine.session_options`)."""
    import onnxruntime as ort

    from gamguard.runtime.engine import session_options

    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)


def spatial_is_dynamic(session) -> bool:
    shape = session.get_inputs()[0].shape  # e.g. ['batch', 1, 's73', 's6'] or ['batch', 1, 128, 128]
    return len(shape) == 4 and not isinstance(shape[2], int) and not isinstance(shape[3], int)


def phantom_images(n: int, seed: int = 1234, size: int = 256) -> list[np.ndarray]:
    """``n`` in-distribution hand phantoms (all classes in turn), decoded form (HxW float32 in [0, 1])."""
    from gamguard.runtime.phantoms import CLASS_NAMES, hand_phantom

    rng = np.random.default_rng(seed)
    return [hand_phantom(i % len(CLASS_NAMES), rng, size).image for i in range(n)]


def guard_at_size(guard, size: int):
    """The guard as a shallow copy whose input spec says ``size`` x ``size`` (see module docstring)."""
    if (guard.spec.height, guard.spec.width) == (size, size):
        return guard
    g = copy.copy(guard)
    g.spec = dataclasses.replace(guard.spec, height=size, width=size)
    return g


def _batch_at(images: list[np.ndarray], spec, size: int, n: int) -> np.ndarray:
    from gamguard.runtime.preprocess import preprocess_batch

    return preprocess_batch(images[:n], dataclasses.replace(spec, height=size, width=size))


# ----------------------------------------------------------------------------- overhead + measures


def measure_overhead(guard, logits_session, images, sizes, batches, repeats, progress) -> tuple[list, list]:
    """``guard_overhead`` and ``measures_cost`` rows, from one interleaved loop per case."""
    from gamguard.runtime.similarity import batch_scores

    cal = guard.calibration
    overhead, measures = [], []
    for size in sizes:
        g = guard_at_size(guard, size)
        for n in batches:
            x = _batch_at(images, guard.spec, size, n)
            out = guard.engine.run(x)
            real = cal.real
            pred_real_pos = np.asarray(out.logits, np.float64)[:, real].argmax(axis=1)
            refs = cal.ref_prepared[pred_real_pos]
            verdicts = g.verify_tensor(x)
            errors = [v.detail for v in verdicts if "GUARD_ERROR" in v.reasons or "INVALID_INPUT" in v.reasons]
            if errors:
                raise RuntimeError(f"guarded call failed at {size}x{size}, batch {n}: {errors[0]}")
            t = interleaved({
                "logits_only": lambda: logits_session.run(["logits"], {"image": x}),
                "guarded": lambda: g.verify_tensor(x),
                "engine": lambda: guard.engine.run(x),
                "measures": lambda: batch_scores(out.cam, refs, grid=cal.grid),
                "feature": lambda: cal.feature_ref.score(out.early),
            }, repeats)
            ms = {k: _median_ms(v) for k, v in t.items()}
            ratio = ms["guarded"] / ms["logits_only"]
            checks = ms["measures"] + ms["feature"]
            overhead.append({"batch": n, "size": size, "ratio": round(ratio, 4),
                             "guarded_ms": round(ms["guarded"], 3), "logits_only_ms": round(ms["logits_only"], 3),
                             "fused_engine_ms": round(ms["engine"], 3),
                             "fused_engine_ratio": round(ms["engine"] / ms["logits_only"], 4),
                             # the rest of the guarded call: p-values, decision, verdict objects
                             "checks_ms": round(checks, 3),
                             "decision_ms": round(ms["guarded"] - ms["engine"] - checks, 3),
                             "repeats": repeats})
            measures.append({"batch": n, "size": size,
                             "measures_ms_per_image": round(ms["measures"] / n, 4),
                             "feature_ms_per_image": round(ms["feature"] / n, 4),
                             "engine_ms_per_image": round(ms["engine"] / n, 4),
                             "fraction_of_engine": round(checks / ms["engine"], 4)})
            progress(f"{size}x{size} batch {n}: guarded {ms['guarded']:.2f} ms, logits-only "
                     f"{ms['logits_only']:.2f} ms (x{ratio:.3f}); measures+feature {checks:.3f} ms")
    return overhead, measures


#: The realistic-size classifier of ``guard_overhead_large``: GuardNet at ResNet-18 widths
#: (64, 128, 256) with 2 basic blocks per stage (12 3x3 convolutions after the stem; the stem has
#: stride 2 and no max-pool, so it costs about 2.7x ResNet-18's multiply-adds at the same input size).
LARGE_MODEL = {"widths": (64, 128, 256), "blocks": 2, "input_norm": True}
LARGE_BUNDLE_SIZE = 128  # export/calibration size; timings are taken at the requested sizes
LARGE_CASES = ((224, 1), (224, 8), (512, 1))  # 512² batch 8 is ~10 s per call on one core
LARGE_CALIBRATION_PER_CLASS = 45


def measure_overhead_large(cfg: "BenchConfig", providers: list[str], progress) -> dict:
    """``guard_overhead_large``: the ``guard_overhead`` measurement on :data:`LARGE_MODEL` (random
    weights, see :func:`build_large_bundle`), at :data:`LARGE_CASES`. Skipped without torch."""
    if importlib.util.find_spec("torch") is None:
        return {"status": "skipped", "reason": "torch is not installed (the large model is exported here)"}
    from gamguard.exporter.bench_torch import build_large_bundle  # torch lives on the exporter side
    from gamguard.runtime.guard import Guard

    with tempfile.TemporaryDirectory(prefix="gamguard-bench-large-") as tmp:
        bundle = build_large_bundle(Path(tmp), cfg.threads, progress)
        guard = Guard.from_bundle(bundle, providers=providers, threads=cfg.threads, prefer="onnxruntime")
        logits_session = ort_session(logits_only_model(guard.engine.model_path, Path(tmp)),
                                     list(guard.engine.providers), cfg.threads)
        images = phantom_images(max(b for _, b in LARGE_CASES))
        rows = []
        for size, n in LARGE_CASES:
            if size not in cfg.sizes or n not in cfg.batches:
                continue
            part, _ = measure_overhead(guard, logits_session, images, (size,), (n,),
                                       min(cfg.n_repeats, 5), progress)
            rows += part
    return {"status": "measured", "weights": "random (seeded): timings only, verdicts meaningless",
            "model": {"class": "GuardNet", **{k: list(v) if isinstance(v, tuple) else v
                                              for k, v in LARGE_MODEL.items()},
                      "target_layer": "layer3", "early_layer": "layer1", "early_pool": [8, 8]},
            "rows": rows}


# ------------------------------------------------------------------------------ PyTorch Grad-CAM


def default_checkpoint(bundle_dir: Path) -> Path | None:
    """The demo bundle's torch checkpoint (``exporter/demo.ckpt``) when the bundle is the demo bundle."""
    from gamguard.runtime.bundle import default_bundle_dir

    if Path(bundle_dir).resolve() == default_bundle_dir().resolve():
        ckpt = Path(__file__).resolve().parents[1] / "exporter" / "demo.ckpt"
        return ckpt if ckpt.is_file() else None
    return None


def measure_pytorch(guard, checkpoint: Path | None, images, sizes, batches, repeats, threads, progress) -> dict:
    """``pytorch_gradcam`` section (see :func:`gamguard.exporter.bench_torch.measure_pytorch`); the
    runtime itself never imports torch, so the measurement lives on the exporter side."""
    if checkpoint is None:
        return {"status": "skipped", "reason": "no torch checkpoint for this bundle (--checkpoint)"}
    if importlib.util.find_spec("torch") is None:
        return {"status": "skipped", "reason": "torch is not installed"}
    from gamguard.exporter.bench_torch import measure_pytorch as measure

    return measure(guard, checkpoint, images, sizes, batches, repeats, threads, progress)


# ------------------------------------------------------------------------------------------- gRPC


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else math.nan


def _grpc_round(target: str, payloads: list[bytes], clients: int, per_client: int) -> tuple[float, list[float]]:
    """``clients`` threads, each with its own channel, each sending ``per_client`` requests in turn.
    Returns (requests per second, latencies in ms)."""
    from gamguard.runtime.server.client import GuardClient

    conns = [GuardClient(target, timeout=120) for _ in range(clients)]
    for c in conns:
        c.wait_ready(30)
        c.verify(payloads[0])  # connection warm
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)
    cpu0 = time.process_time()

    def work(k: int) -> None:
        try:
            barrier.wait()
            for j in range(per_client):
                t0 = time.perf_counter()
                v = conns[k].verify(payloads[(k * per_client + j) % len(payloads)])
                latencies[k].append((time.perf_counter() - t0) * 1e3)
                if "GUARD_ERROR" in list(v.reasons):
                    raise RuntimeError(f"server answered GUARD_ERROR: {v.detail}")
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for c in conns:
        c.close()
    if errors:
        raise RuntimeError(f"gRPC client failed: {errors[0]}")
    return clients * per_client / wall, [v for lat in latencies for v in lat], cpu * 1e3 / (clients * per_client)


async def _inprocess_round(plane, payloads: list[bytes], clients: int, per_client: int) -> tuple[float, list[float]]:
    """The same load as :func:`_grpc_round` as concurrent in-process ``DataPlane.verify`` calls."""
    latencies: list[float] = []

    async def client(k: int) -> None:
        for j in range(per_client):
            t0 = time.perf_counter()
            r = await plane.verify(data=payloads[(k * per_client + j) % len(payloads)])
            latencies.append((time.perf_counter() - t0) * 1e3)
            if "GUARD_ERROR" in r.verdict.reasons:
                raise RuntimeError(f"in-process guard error: {r.verdict.detail}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return clients * per_client / (time.perf_counter() - t0), latencies


def _replay_batches(guard, payloads: list[bytes], sizes: list[int]) -> tuple[float, float]:
    """In-process guarded calls with exactly the batches the server formed: decode + preprocess each
    request, then :func:`run_guard_batch` per batch, in one thread. Returns (requests per second,
    CPU ms per request of this process)."""
    from gamguard.runtime.decode import decode_bytes
    from gamguard.runtime.preprocess import preprocess
    from gamguard.runtime.server.dataplane import run_guard_batch

    t0, c0 = time.perf_counter(), time.process_time()
    k = 0
    for n in sizes:
        xs = np.stack([preprocess(decode_bytes(payloads[(k + j) % len(payloads)]).pixels, guard.spec)
                       for j in range(n)])
        k += n
        verdicts = run_guard_batch(guard, xs)
        if any("GUARD_ERROR" in v.reasons for v in verdicts):
            raise RuntimeError("in-process replay: GUARD_ERROR")
    return k / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / max(1, k)


def measure_grpc(guard, bundle_dir: Path, images, levels, rounds: int, quick: bool, progress) -> dict:
    import cv2

    import concurrent.futures
    import multiprocessing

    from gamguard.runtime.server.background import BackgroundServer
    from gamguard.runtime.server.config import ServeConfig
    from gamguard.runtime.server.dataplane import DataPlane, DataPlaneConfig

    payloads = []
    for im in images:
        ok, buf = cv2.imencode(".png", np.round(np.clip(im, 0, 1) * 255).astype(np.uint8))
        if not ok:  # pragma: no cover
            raise RuntimeError("cannot encode a benchmark PNG")
        payloads.append(buf.tobytes())
    cfg = ServeConfig(bundle=str(bundle_dir), insecure=True, port=0, threads=getattr(guard.engine, "threads", None))
    plane_cfg = DataPlaneConfig(max_batch_size=cfg.max_batch_size, max_queue_delay_ms=cfg.max_queue_delay_ms,
                                max_queue_size=cfg.max_queue_size, max_pixels=cfg.max_pixels,
                                decode_workers=cfg.decode_workers)
    # The in-process data plane lives on its own event loop thread, like the server's.
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True, name="gamguard-bench-inproc")
    loop_thread.start()

    def on_loop(coro, timeout=600):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def make_plane():
        p = DataPlane(guard, plane_cfg)
        await p.start()
        return p

    plane = on_loop(make_plane())
    # The gRPC clients run in a separate (spawned) process, as real clients do: client threads in the
    # server's own process would fight its event loop for the GIL and understate the transport.
    client_pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def grpc_round(target, clients, per_client):
        return client_pool.submit(_grpc_round, target, payloads, clients, per_client).result(600)

    rows = []
    try:
        with BackgroundServer(cfg, guard_factory=lambda: guard) as server:
            for clients in levels:
                per_client = max(4 if quick else 12, (24 if quick else 96) // clients)
                on_loop(_inprocess_round(plane, payloads, clients, 2))  # warm
                grpc_round(server.target, clients, 2)
                grpc_tp, inproc_tp, grpc_lat, inproc_lat, client_cpu, replay_tp = [], [], [], [], [], []
                server_cpu, replay_cpu = [], []
                server_stats = server.server.state.plane.batcher.stats
                s0 = (server_stats.batches, server_stats.items)
                i0 = (plane.batcher.stats.batches, plane.batcher.stats.items)
                for r in range(rounds):
                    order = ("inproc", "grpc") if r % 2 == 0 else ("grpc", "inproc")
                    for which in order:
                        if which == "grpc":
                            before = collections.Counter(server_stats.sizes)
                            # the server runs in this process (the in-process data plane is idle
                            # meanwhile), the clients in another: this process's CPU time is the server's
                            c0 = time.process_time()
                            tp, lat, cpu_ms = grpc_round(server.target, clients, per_client)
                            server_cpu.append((time.process_time() - c0) * 1e3 / (clients * per_client))
                            client_cpu.append(cpu_ms)
                            grpc_tp.append(tp)
                            grpc_lat += lat
                            formed = server_stats.sizes - before  # this round's batches, by size
                            r_tp_round, r_cpu_round = _replay_batches(guard, payloads, sorted(formed.elements()))
                            replay_tp.append(r_tp_round)
                            replay_cpu.append(r_cpu_round)
                        else:
                            tp, lat = on_loop(_inprocess_round(plane, payloads, clients, per_client))
                            inproc_tp.append(tp)
                            inproc_lat += lat
                g_tp, i_tp = statistics.median(grpc_tp), statistics.median(inproc_tp)
                r_tp = statistics.median(replay_tp)
                s_cpu, r_cpu = statistics.median(server_cpu), statistics.median(replay_cpu)
                # "same batching": the mean batch the micro-batcher formed on each side
                g_batch = (server_stats.items - s0[1]) / max(1, server_stats.batches - s0[0])
                i_batch = (plane.batcher.stats.items - i0[1]) / max(1, plane.batcher.stats.batches - i0[0])
                rows.append({"clients": clients, "ratio": round(g_tp / r_tp, 4),
                             "ratio_vs_inprocess_dataplane": round(g_tp / i_tp, 4),
                             "same_batches_rps": round(r_tp, 2),
                             "p50_ms": round(_percentile(grpc_lat, 50), 3),
                             "p99_ms": round(_percentile(grpc_lat, 99), 3),
                             "grpc_rps": round(g_tp, 2), "inprocess_rps": round(i_tp, 2),
                             "inprocess_p50_ms": round(_percentile(inproc_lat, 50), 3),
                             "inprocess_p99_ms": round(_percentile(inproc_lat, 99), 3),
                             "grpc_mean_batch": round(g_batch, 2), "inprocess_mean_batch": round(i_batch, 2),
                             # CPU the client process spent per request (it shares this machine's cores)
                             "client_cpu_ms_per_request": round(statistics.median(client_cpu), 3),
                             # CPU per request, server process vs the same-batch replay: what the server
                             # adds per request, not charged with the clients (other process) and far
                             # less sensitive than throughput to other load on a shared machine
                             "server_cpu_ms_per_request": round(s_cpu, 3),
                             "same_batches_cpu_ms_per_request": round(r_cpu, 3),
                             "cpu_ratio": round(r_cpu / s_cpu, 4) if s_cpu > 0 else None,
                             "requests_per_round": clients * per_client, "rounds": rounds})
                progress(f"gRPC {clients} client(s): {g_tp:.1f} req/s vs in-process same batches {r_tp:.1f} "
                         f"req/s (x{g_tp / r_tp:.3f}), in-process data plane {i_tp:.1f} req/s (x{g_tp / i_tp:.3f}), "
                         f"p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms, CPU/request server "
                         f"{s_cpu:.2f} ms vs same batches {r_cpu:.2f} ms (x{rows[-1]['cpu_ratio']}), "
                         f"mean batch {g_batch:.1f}/{i_batch:.1f}")
    finally:
        client_pool.shutdown(wait=True)
        on_loop(plane.stop())
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
    return {"rows": rows, "input": f"8-bit PNG {images[0].shape[1]}x{images[0].shape[0]}",
            "size": guard.spec.height, "max_batch_size": cfg.max_batch_size,
            "max_queue_delay_ms": cfg.max_queue_delay_ms, "decode_workers": cfg.decode_workers,
            "clients_process": "separate spawned process, one channel per client thread"}


# ------------------------------------------------------------------------------------------- main


def run_bench(cfg: BenchConfig) -> dict:
    """Every measurement of ``gamguard bench``; returns the JSON-able result (see module docstring)."""
    from gamguard.runtime.bundle import resolve_bundle
    from gamguard.runtime.engine import resolve_providers
    from gamguard.runtime.guard import Guard

    progress = cfg.progress
    started = time.perf_counter()
    bundle_dir = resolve_bundle(cfg.bundle)
    providers = resolve_providers(cfg.providers or "cpu")
    facts = machine_facts(cfg.threads)
    progress(f"bundle {bundle_dir}, providers {providers}, threads {cfg.threads}, "
             f"{'quick' if cfg.quick else 'full'} run")
    guard = Guard.from_bundle(bundle_dir, providers=providers, threads=cfg.threads, prefer="onnxruntime")
    facts["providers_used"] = list(guard.engine.providers)
    if any(p != "CPUExecutionProvider" for p in guard.engine.providers):
        facts["gpu"] = gpu_name()
    with tempfile.TemporaryDirectory(prefix="gamguard-bench-") as tmp:
        logits_path = logits_only_model(guard.engine.model_path, Path(tmp))
        logits_session = ort_session(logits_path, list(guard.engine.providers), cfg.threads)
    facts["logits_only_providers"] = list(logits_session.get_providers())

    bundle_size = guard.spec.height
    if spatial_is_dynamic(guard.engine.session):
        sizes, sizes_note = tuple(cfg.sizes), "input height/width are dynamic: measured at the requested sizes"
    else:
        sizes = (bundle_size,)
        sizes_note = (f"the bundle's model.onnx has a static {guard.spec.height}x{guard.spec.width} input "
                      f"(exported without --dynamic-spatial): measured at that size only, not at "
                      f"{', '.join(f'{s}x{s}' for s in cfg.sizes)}")
        progress(sizes_note)
    images = phantom_images(max(max(cfg.batches), 16))
    # the logits-only model must be the fused model's classifier, exactly
    x = _batch_at(images, guard.spec, sizes[0], 2)
    diff = float(np.abs(logits_session.run(["logits"], {"image": x})[0] - guard.engine.run(x).logits).max())
    if diff > 1e-4:
        raise RuntimeError(f"the logits-only model disagrees with the fused model (max diff {diff:.3g})")

    overhead, measures = measure_overhead(guard, logits_session, images, sizes, cfg.batches, cfg.n_repeats,
                                          progress)
    result = {
        "format": BENCH_FORMAT,
        "quick": cfg.quick,
        "bundle": str(bundle_dir),
        "bundle_input_size": [guard.spec.height, guard.spec.width],
        "sizes": list(sizes),
        "sizes_note": sizes_note,
        "machine": facts,
        "goals": dict(GOALS),
        "guard_overhead": overhead,
        "measures_cost": measures,
    }
    if cfg.large:
        result["guard_overhead_large"] = measure_overhead_large(cfg, list(guard.engine.providers), progress)
    if "pytorch" in cfg.skip:
        pt = {"status": "skipped", "reason": "--skip pytorch"}
    else:
        ckpt = cfg.checkpoint or default_checkpoint(bundle_dir)
        pt = measure_pytorch(guard, ckpt, images, sizes, cfg.batches, max(3, cfg.n_repeats // 2), cfg.threads,
                             progress)
    result["pytorch_gradcam"] = pt
    result["speedup_vs_pytorch_gradcam"] = (min(r["speedup"] for r in pt["cases"])
                                            if pt.get("status") == "measured" else None)
    if "grpc" in cfg.skip:
        result["grpc_efficiency"] = []
        result["grpc"] = {"status": "skipped"}
    else:
        grpc = measure_grpc(guard, bundle_dir, images, cfg.clients, cfg.n_grpc_rounds, cfg.quick, progress)
        result["grpc_efficiency"] = grpc.pop("rows")
        result["grpc"] = grpc
    facts["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def format_tables(result: dict) -> str:
    """Human-readable tables of a :func:`run_bench` result."""
    def overhead_row(r: dict) -> str:  # a guard_overhead / guard_overhead_large row
        return (f"{r['size']:>6} {r['batch']:>5} {r['ratio']:>7.3f} {r['guarded_ms']:>11.2f} "
                f"{r['logits_only_ms']:>10.2f} {r['fused_engine_ms']:>9.2f} {r['checks_ms']:>10.2f} "
                f"{r['decision_ms']:>12.2f}")

    m = result["machine"]
    lines = [f"gamguard bench ({'quick' if result['quick'] else 'full'}) — {m['cpu_model']}, "
             f"{m['cpus_usable']} CPU(s), onnxruntime {m['onnxruntime']} {m['providers_used']}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f", threads {m['threads']}, "
             f"load {m['load_avg_start'][0]} → {m.get('load_avg_end', ['?'])[0]}",
             f"bundle {result['bundle']} (input {result['bundle_input_size'][0]}²); {result['sizes_note']}", "",
             f"Guard overhead (goal ≤ {GOALS['guard_overhead_max']:.2f}×): full guarded call / logits-only ORT",
             "  (fused = the fused engine alone; checks = 7 measures + feature score; decision = the rest: "
             "p-values, decision, verdicts)",
             f"{'size':>6} {'batch':>5} {'ratio':>7} {'guarded ms':>11} {'logits ms':>10} {'fused ms':>9} "
             f"{'checks ms':>10} {'decision ms':>12}"]
    lines += [overhead_row(r) for r in result["guard_overhead"]]
    large = result.get("guard_overhead_large")
    if large is not None:
        lines += ["", "Guard overhead, realistic-size model (GuardNet widths "
                  f"{large.get('model', {}).get('widths')}, {large.get('model', {}).get('blocks')} blocks/stage; "
                  f"{large.get('weights', '')})" if large.get("status") == "measured"
                  else f"Guard overhead, realistic-size model: not measured: {large.get('reason')}"]
        lines += [overhead_row(r) for r in large.get("rows", [])]
    lines += ["", "Measures cost per image (7 similarity measures + early-feature check) / fused engine time",
              f"{'size':>6} {'batch':>5} {'measures ms':>12} {'feature ms':>11} {'engine ms':>10} {'fraction':>9}"]
    for r in result["measures_cost"]:
        lines.append(f"{r['size']:>6} {r['batch']:>5} {r['measures_ms_per_image']:>12.3f} "
                     f"{r['feature_ms_per_image']:>11.3f} {r['engine_ms_per_image']:>10.3f} "
                     f"{r['fraction_of_engine']:>9.3f}")
    pt = result["pytorch_gradcam"]
    lines += ["", f"PyTorch eager Grad-CAM vs gamguard full guarded call (goal ≥ "
              f"{GOALS['speedup_vs_pytorch_gradcam_min']:.0f}×)"]
    if pt.get("status") == "measured":
        lines.append(f"  {pt['implementation']}; torch {pt['torch']}, {pt['torch_threads']} thread(s)")
        lines.append(f"{'size':>6} {'batch':>5} {'speedup':>8} {'pytorch ms':>11} {'gamguard ms':>12}")
        for r in pt["cases"]:
            lines.append(f"{r['size']:>6} {r['batch']:>5} {r['speedup']:>8.2f} {r['pytorch_ms']:>11.2f} "
                         f"{r['gamguard_ms']:>12.2f}")
    else:
        lines.append(f"  not measured: {pt.get('reason')}")
    lines += ["", f"gRPC serving efficiency (goal ≥ {GOALS['grpc_efficiency_min_at_16']:.2f} at 16 clients): "
              "gRPC server throughput / in-process throughput"]
    if result["grpc_efficiency"]:
        g = result["grpc"]
        lines.append(f"  {g['input']} → {g['size']}², max batch {g['max_batch_size']}, "
                     f"queue delay {g['max_queue_delay_ms']} ms")
        lines.append("  ratio = gRPC / in-process guarded calls on the server's own batches; "
                     "ratio DP = gRPC / in-process DataPlane, same concurrency;")
        lines.append("  CPU ratio = same-batch replay CPU per request / server process CPU per request "
                     "(clients excluded)")
        lines.append(f"{'clients':>7} {'ratio':>7} {'ratio DP':>8} {'CPU ratio':>9} {'gRPC req/s':>11} "
                     f"{'same-batch':>11} {'DP req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch g/DP':>10} "
                     f"{'CPU ms/req srv/replay/client':>29}")
        for r in result["grpc_efficiency"]:
            cpu_ratio = r.get("cpu_ratio")
            lines.append(f"{r['clients']:>7} {r['ratio']:>7.3f} {r['ratio_vs_inprocess_dataplane']:>8.3f} "
                         f"{cpu_ratio if cpu_ratio is not None else float('nan'):>9.3f} "
                         f"{r['grpc_rps']:>11.1f} {r['same_batches_rps']:>11.1f} {r['inprocess_rps']:>9.1f} "
                         f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                         f"{r['grpc_mean_batch']:>4.1f}/{r['inprocess_mean_batch']:<4.1f} "
                         f"{r.get('server_cpu_ms_per_request', float('nan')):>11.2f}/"
                         f"{r.get('same_batches_cpu_ms_per_request', float('nan')):.2f}/"
                         f"{r['client_cpu_ms_per_request']:.2f}")
    else:
        lines.append("  skipped")
    lines.append(f"\n({result['seconds']} s)")
    return "\n".join(lines)
