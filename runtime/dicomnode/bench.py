"""``dicom_efficiency`` of ``gamguard bench``: images per second over C-STORE vs the same images over gRPC.

The same DICOM files (phantoms, DX, 12 bits) go to

* a :class:`~gamguard.runtime.dicomnode.node.BackgroundNode` on loopback, sent by pynetdicom Storage
  SCUs — ``associations`` concurrent associations, one thread each;
* a :class:`~gamguard.runtime.server.background.BackgroundServer` (gRPC ``Verify``), sent by as many
  concurrent :class:`~gamguard.runtime.server.client.GuardClient` threads;

both with the same guard and data-plane settings, the clients in one spawned process (as real
consoles and clients are other processes). ``ratio`` = C-STORE images/s over gRPC images/s, one run.
A C-STORE is answered once the image is durable in the journal and its verdict written, so ``cstore_ips`` is the rate at
which a console gets its images acknowledged; the SR and overlay are built after the association
(``results_ms_per_image``, reported beside: it bounds the sustained rate of results, not the console).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

GOAL_MIN_RATIO = 0.7


def _cstore_round(port: int, paths: list[str], associations: int, per_association: int) -> tuple[float, list[float]]:
    """``associations`` threads, each with its own association, each storing ``per_association`` files.
    Returns (images per second, latencies in ms). Runs in the client process."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    # a lean SCU, as the gRPC clients are: each file's bytes sent as they are (not decoded and encoded
    # again), and no log lines formatted for every PDU
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"

    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assocs = [ae.associate("127.0.0.1", port, ae_title="GAMGUARD") for _ in range(associations)]
    if not all(a.is_established for a in assocs):
        raise RuntimeError("the DICOM node refused a benchmark association")
    for a in assocs:  # warm: one store each
        a.send_c_store(paths[0])
    latencies: list[list[float]] = [[] for _ in range(associations)]
    errors: list[str] = []
    barrier = threading.Barrier(associations + 1)

    def work(k: int) -> None:
        barrier.wait()
        for j in range(per_association):
            t0 = time.perf_counter()
            rsp = assocs[k].send_c_store(paths[(k * per_association + j) % len(paths)])
            latencies[k].append((time.perf_counter() - t0) * 1e3)
            if rsp is None or int(rsp.get("Status", -1)) != 0:
                errors.append(f"C-STORE status {rsp.get('Status') if rsp is not None else 'none'}")
                return

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(associations)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for a in assocs:
        a.release()
    if errors:
        raise RuntimeError(errors[0])
    return associations * per_association / wall, [v for lat in latencies for v in lat]


def _write_payloads(folder: Path, images) -> list[Path]:
    from gamguard.runtime.demo.synth import write_dicom

    paths = []
    for i, im in enumerate(images):
        p = write_dicom(folder / f"bench_{i:03d}.dcm", np.asarray(im, np.float32))
        paths.append(p)
    return paths


def durable_write_ms(folder: Path, size: int, n: int = 20) -> float:
    """Mean time of one crash-safe write (:func:`.durable.write_durably`) of ``size`` bytes: the floor the
    journal puts under every acknowledged C-STORE on this disk."""
    from .durable import write_durably

    folder.mkdir(parents=True, exist_ok=True)
    data = b"\0" * size
    t0 = time.perf_counter()
    for i in range(n):
        write_durably(folder / f"probe_{i}", data)
    return (time.perf_counter() - t0) * 1e3 / n


def measure_dicom(guard, bundle_dir: Path, images, levels, quick: bool, progress) -> dict:
    """Rows ``{associations, ratio, cstore_ips, grpc_ips, cstore_p50_ms, grpc_p50_ms}`` and the results cost."""
    from gamguard.runtime.bench.serving import _grpc_round
    from gamguard.runtime.server.background import BackgroundServer
    from gamguard.runtime.server.config import ServeConfig

    from .config import DicomNodeConfig
    from .node import BackgroundNode

    tmp = tempfile.TemporaryDirectory(prefix="gamguard-bench-dicom-")
    folder = Path(tmp.name)
    paths = _write_payloads(folder, images)
    payloads = [p.read_bytes() for p in paths]
    threads = getattr(guard.engine, "threads", None)
    serve_cfg = ServeConfig(bundle=str(bundle_dir), insecure=True, port=0, threads=threads)
    node_cfg = DicomNodeConfig(
        host="127.0.0.1", port=0, allow_any_ae=True, queue_dir=str(folder / "queue"), build_backlog=10**6
    ).validate()
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    rows = []
    try:
        with (
            BackgroundServer(serve_cfg, guard_factory=lambda: guard) as server,
            BackgroundNode(node_cfg, serve_cfg, guard_factory=lambda: guard) as node,
        ):
            built_before = 0
            results_s, results_n = 0.0, 0
            for n in levels:
                per = max(6 if quick else 16, (24 if quick else 96) // n)
                pool.submit(_cstore_round, node.port, [str(p) for p in paths], n, 2).result(600)  # warm
                pool.submit(_grpc_round, server.target, payloads, n, 2).result(600)
                node.node.wait_results_built(600)
                cstore, grpc_ = [], []
                file_list = [str(p) for p in paths]
                for r in range(2):  # alternate the order so drift in machine load hits both
                    for which in ("dicom", "grpc") if r % 2 == 0 else ("grpc", "dicom"):
                        # this process hosts both servers, the clients are in the other one: its CPU time
                        # per image is the server side's own cost
                        c0 = time.process_time()
                        if which == "dicom":
                            ips, lat = pool.submit(_cstore_round, node.port, file_list, n, per).result(600)
                            cstore.append((ips, lat, (time.process_time() - c0) * 1e3 / (n * per)))
                            t0 = time.perf_counter()
                            node.node.wait_results_built(600)  # results are built after the associations
                            built = node.node.builder.built
                            results_s += time.perf_counter() - t0
                            results_n += built - built_before
                            built_before = built
                        else:
                            ips, lat, _ = pool.submit(_grpc_round, server.target, payloads, n, per).result(600)
                            grpc_.append((ips, lat, (time.process_time() - c0) * 1e3 / (n * per)))
                c_ips = float(np.median([c[0] for c in cstore]))
                g_ips = float(np.median([g[0] for g in grpc_]))
                row = {
                    "associations": n,
                    "ratio": round(c_ips / g_ips, 3),
                    "cstore_ips": round(c_ips, 1),
                    "grpc_ips": round(g_ips, 1),
                    "cstore_p50_ms": round(float(np.median([v for c in cstore for v in c[1]])), 2),
                    "grpc_p50_ms": round(float(np.median([v for g in grpc_ for v in g[1]])), 2),
                    # server-side CPU per image (the node vs the gRPC server, clients excluded)
                    "cstore_cpu_ms": round(float(np.median([c[2] for c in cstore])), 2),
                    "grpc_cpu_ms": round(float(np.median([g[2] for g in grpc_])), 2),
                }
                row["cpu_ratio"] = round(row["grpc_cpu_ms"] / row["cstore_cpu_ms"], 3)
                rows.append(row)
                progress(
                    f"dicom: {n} association(s): C-STORE {c_ips:.1f} img/s, gRPC Verify {g_ips:.1f} img/s, "
                    f"ratio {row['ratio']:.3f}"
                )
        fsync_ms = durable_write_ms(folder / "probe", len(payloads[0]))
    finally:
        pool.shutdown()
        tmp.cleanup()
    return {
        "rows": rows,
        "durable_write_ms": round(fsync_ms, 2),
        "goal_min_ratio": GOAL_MIN_RATIO,
        "results_ms_per_image": round(1e3 * results_s / results_n, 1) if results_n else None,
        "note": "C-STORE is acknowledged once the image is durable in the journal and its verdict written; "
        "the SR and overlay are built after the association (results_ms_per_image, wall time while idle)",
    }
