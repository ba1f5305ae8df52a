"""gRPC serving efficiency (``grpc_efficiency``): a real server on a loopback port driven by concurrent
clients in another process, against the same batches replayed in-process.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from .common import concurrent_round, percentile


def _grpc_round(
    target: str, payloads: list[bytes], clients: int, per_client: int, warm=None, go=None
) -> tuple[float, list[float], float]:
    """``clients`` threads, each with its own channel, each sending ``per_client`` requests in turn.
    Returns (requests per second, latencies in ms, this process's CPU ms per request).

    ``warm`` / ``go`` (multiprocessing events, optional): once every channel is connected and has made
    one call, set ``warm`` and wait for ``go``, so that the server starts counting (its CPU time, the
    batches it forms) at the timed requests, without the connection set-up and warm-up calls."""
    from gamguard.runtime.server.client import GuardClient

    conns = [GuardClient(target, timeout=120) for _ in range(clients)]
    for c in conns:
        c.wait_ready(30)
        c.verify(payloads[0])  # connection warm
    if warm is not None:
        warm.set()
        if not go.wait(120):
            raise RuntimeError("the benchmark never started the timed round")

    def call(k: int, j: int) -> None:
        v = conns[k].verify(payloads[(k * per_client + j) % len(payloads)])
        if "GUARD_ERROR" in list(v.reasons):
            raise RuntimeError(f"server answered GUARD_ERROR: {v.detail}")

    try:
        return concurrent_round(clients, per_client, call)
    except Exception as exc:
        raise RuntimeError(f"gRPC client failed: {exc}") from exc
    finally:
        for c in conns:
            c.close()


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
        xs = np.stack(
            [preprocess(decode_bytes(payloads[(k + j) % len(payloads)]).pixels, guard.spec) for j in range(n)]
        )
        k += n
        verdicts = run_guard_batch(guard, xs)
        if any("GUARD_ERROR" in v.reasons for v in verdicts):
            raise RuntimeError("in-process replay: GUARD_ERROR")
    return k / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / max(1, k)


def measure_grpc(guard, bundle_dir: Path, images, levels, rounds: int, quick: bool, progress) -> dict:
    import concurrent.futures
    import multiprocessing

    import cv2

    from gamguard.runtime.server.app import plane_config
    from gamguard.runtime.server.background import BackgroundServer
    from gamguard.runtime.server.config import ServeConfig
    from gamguard.runtime.server.dataplane import DataPlane

    payloads = []
    for im in images:
        ok, buf = cv2.imencode(".png", np.round(np.clip(im, 0, 1) * 255).astype(np.uint8))
        if not ok:  # pragma: no cover
            raise RuntimeError("cannot encode a benchmark PNG")
        payloads.append(buf.tobytes())
    cfg = ServeConfig(bundle=str(bundle_dir), insecure=True, port=0, threads=getattr(guard.engine, "threads", None))
    plane_cfg = plane_config(cfg)  # the very settings the server below runs with
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

    events = multiprocessing.get_context("spawn").Manager()

    def grpc_round(target, clients, per_client, on_start=None):
        """One round; ``on_start()`` runs once the clients are connected and warm, just before the timed
        requests; returns (the round's result, what ``on_start`` returned)."""
        warm, go = events.Event(), events.Event()
        round_ = client_pool.submit(_grpc_round, target, payloads, clients, per_client, warm, go)
        while not warm.wait(1.0):
            if round_.done():
                round_.result()  # the client failed while connecting: raise its error
                raise RuntimeError("the gRPC client round ended before it was warm")
        started = on_start() if on_start is not None else None
        go.set()
        return round_.result(600), started

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
                formed_all: collections.Counter = collections.Counter()  # the timed gRPC batches, by size
                i0 = (plane.batcher.stats.batches, plane.batcher.stats.items)
                for r in range(rounds):
                    order = ("inproc", "grpc") if r % 2 == 0 else ("grpc", "inproc")
                    for which in order:
                        if which == "grpc":
                            # the server runs in this process (the in-process data plane is idle
                            # meanwhile), the clients in another: this process's CPU time is the server's.
                            # It and the batches formed are counted from the timed requests on.
                            (tp, lat, cpu_ms), (before, c0) = grpc_round(
                                server.target,
                                clients,
                                per_client,
                                on_start=lambda: (collections.Counter(server_stats.sizes), time.process_time()),
                            )
                            server_cpu.append((time.process_time() - c0) * 1e3 / (clients * per_client))
                            client_cpu.append(cpu_ms)
                            grpc_tp.append(tp)
                            grpc_lat += lat
                            formed = server_stats.sizes - before  # this round's batches, by size
                            formed_all.update(formed)
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
                g_batch = sum(k * v for k, v in formed_all.items()) / max(1, sum(formed_all.values()))
                i_batch = (plane.batcher.stats.items - i0[1]) / max(1, plane.batcher.stats.batches - i0[0])
                rows.append(
                    {
                        "clients": clients,
                        "ratio": round(g_tp / r_tp, 4),
                        "ratio_vs_inprocess_dataplane": round(g_tp / i_tp, 4),
                        "same_batches_rps": round(r_tp, 2),
                        "p50_ms": round(percentile(grpc_lat, 50), 3),
                        "p99_ms": round(percentile(grpc_lat, 99), 3),
                        "grpc_rps": round(g_tp, 2),
                        "inprocess_rps": round(i_tp, 2),
                        "inprocess_p50_ms": round(percentile(inproc_lat, 50), 3),
                        "inprocess_p99_ms": round(percentile(inproc_lat, 99), 3),
                        "grpc_mean_batch": round(g_batch, 2),
                        "inprocess_mean_batch": round(i_batch, 2),
                        # CPU the client process spent per request (it shares this machine's cores)
                        "client_cpu_ms_per_request": round(statistics.median(client_cpu), 3),
                        # CPU per request, server process vs the same-batch replay: what the server
                        # adds per request, not charged with the clients (other process) and far
                        # less sensitive than throughput to other load on a shared machine
                        "server_cpu_ms_per_request": round(s_cpu, 3),
                        "same_batches_cpu_ms_per_request": round(r_cpu, 3),
                        "cpu_ratio": round(r_cpu / s_cpu, 4) if s_cpu > 0 else None,
                        "requests_per_round": clients * per_client,
                        "rounds": rounds,
                    }
                )
                progress(
                    f"gRPC {clients} client(s): {g_tp:.1f} req/s vs in-process same batches {r_tp:.1f} "
                    f"req/s (x{g_tp / r_tp:.3f}), in-process data plane {i_tp:.1f} req/s (x{g_tp / i_tp:.3f}), "
                    f"p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms, CPU/request server "
                    f"{s_cpu:.2f} ms vs same batches {r_cpu:.2f} ms (x{rows[-1]['cpu_ratio']}), "
                    f"mean batch {g_batch:.1f}/{i_batch:.1f}"
                )
    finally:
        client_pool.shutdown(wait=True)
        events.shutdown()
        on_loop(plane.stop())
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
    return {
        "rows": rows,
        "input": f"8-bit PNG {images[0].shape[1]}x{images[0].shape[0]}",
        "size": guard.spec.height,
        "max_batch_size": cfg.max_batch_size,
        "max_queue_delay_ms": cfg.max_queue_delay_ms,
        "decode_workers": cfg.decode_workers,
        "clients_process": "separate spawned process, one channel per client thread",
    }
