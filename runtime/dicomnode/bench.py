"""``dicom_efficiency`` of ``gamguard bench``: images per second over C-STORE vs the same images over gRPC.

The same DICOM files (phantoms, DX, 12 bits) go to

* a :class:`~gamguard.runtime.dicomnode.node.BackgroundNode` on loopback, sent by Storage SCUs —
  ``associations`` concurrent associations, each storing its files one after the other;
* a :class:`~gamguard.runtime.server.background.BackgroundServer` (gRPC ``Verify``), sent by as many
  concurrent :class:`~gamguard.runtime.server.client.GuardClient` threads;
* a do-nothing pynetdicom Storage SCP (answers Success, looks at nothing), sent by the same SCUs: the
  cost of pynetdicom's transport alone, which no work in the node can remove;

both servers with the same guard and data-plane settings, the node with its defaults (no debug
logging), the clients in one spawned process (as real consoles and clients are other processes), the
three interleaved round by round so that drift in machine load hits all of them. ``ratio`` = C-STORE
images/s over gRPC images/s (medians of the rounds).

The SCU (``client``): dcmtk's ``storescu`` where it is installed — a native DICOM stack, as an X-ray
console has, one process per association sending its files over one association — else pynetdicom's
(one thread per association; a Python SCU whose reactor polls in 1 ms sleeps, so it slows the C-STORE
side by its own cost on the same CPUs). ``--dicom-client`` picks one. With ``storescu`` the per-image
latency is its association's time over its files (process start and association set-up included).

A C-STORE is answered once the image is durable in the journal and admitted for the engine (a grey
uncompressed image: once its header shows it decodable, before its pixels are decoded), before its
verdict; ``cstore_ips`` counts an image only when its verdict exists (a round ends when the last one
does), ``cstore_answered_ips`` is the rate at which the console gets its answers. The SR and overlay
are built after the association (``results_ms_per_image``, reported beside: it bounds the sustained rate of results,
not the console). ``ratio_if_node_free`` = ``1 / (1 + grpc_ips / null_scp_ips)`` estimates the ratio
if the node added nothing to pynetdicom's transport and the data plane's verification: one image's
time = the do-nothing SCP's time per image + gRPC ``Verify``'s (in turn at one association, on the same
CPUs at four). An estimate, not a bound: both times include the client and the loopback, so
on a loaded machine the measured ratio can come out above it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL_MIN_RATIO = 0.7
CLIENTS = ("auto", "storescu", "pynetdicom")


@functools.lru_cache(maxsize=1)
def dcmtk_storescu() -> str | None:
    """Absolute path of dcmtk's ``storescu`` on PATH, or None. pynetdicom installs a Python app of the same
    name (into the virtual environment, or ``/usr/local/bin``): it is skipped by its answer to
    ``--version``, which for dcmtk's names dcmtk."""
    import os
    import sys

    for folder in os.get_exec_path():
        candidate = Path(folder) / "storescu"
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if Path(sys.prefix).resolve() in candidate.resolve().parents:  # this environment's pynetdicom app
            continue
        try:
            done = subprocess.run([str(candidate), "--version"], capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if b"dcmtk" in done.stdout + done.stderr:
            return str(candidate.resolve())
    return None


def resolve_client(client: str = "auto") -> str:
    """``storescu`` (dcmtk's) when ``auto`` finds it on PATH, else ``pynetdicom``; an explicit choice is
    checked."""
    if client not in CLIENTS:
        raise ValueError(f"unknown DICOM benchmark client {client!r} (one of {', '.join(CLIENTS)})")
    if client == "auto":
        return "storescu" if dcmtk_storescu() else "pynetdicom"
    if client == "storescu" and not dcmtk_storescu():
        raise ValueError(
            "dcmtk's storescu not found on PATH (pynetdicom's app of that name does not count): install dcmtk "
            "(apt-get install dcmtk) or use --dicom-client pynetdicom"
        )
    return client


def _cstore_round(
    port: int, paths: list[str], associations: int, per_association: int
) -> tuple[float, list[float], float]:
    """``associations`` threads, each with its own association, each storing ``per_association`` files.
    Returns (images per second, latencies in ms, this process's CPU ms per image). Runs in the client
    process."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    from gamguard.runtime.bench.common import concurrent_round

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

    def call(k: int, j: int) -> None:
        rsp = assocs[k].send_c_store(paths[(k * per_association + j) % len(paths)])
        if rsp is None or int(rsp.get("Status", -1)) != 0:
            raise RuntimeError(f"C-STORE status {rsp.get('Status') if rsp is not None else 'none'}")

    try:
        return concurrent_round(associations, per_association, call)
    finally:
        for a in assocs:
            a.release()


def _storescu_round(
    port: int, paths: list[str], associations: int, per_association: int
) -> tuple[float, list[float], float]:
    """:func:`_cstore_round` with dcmtk's ``storescu``: ``associations`` processes at once, each sending
    ``per_association`` files over one association (it stops at the first failed store and exits
    non-zero). Latency per image: the process's time over its files — its start and the association's
    negotiation included (a few ms, against the other clients, which connect before the clock starts:
    it counts against the C-STORE side). Runs in the client process."""
    import resource

    storescu = dcmtk_storescu()
    if storescu is None:
        raise RuntimeError("dcmtk's storescu is not on PATH")

    def send(k: int) -> float:
        files = [paths[(k * per_association + j) % len(paths)] for j in range(per_association)]
        # -R: propose only the files' own SOP class (not every storage class), as a console would
        cmd = [storescu, "-R", "-aet", "BENCHSCU", "-aec", "GAMGUARD", "127.0.0.1", str(port), *files]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"storescu exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
        return (time.perf_counter() - t0) * 1e3 / per_association

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(associations) as pool:
        per_image_ms = list(pool.map(send, range(associations)))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = associations * per_association
    cpu_ms = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3 / n
    return n / wall, [ms for ms in per_image_ms for _ in range(per_association)], cpu_ms


def _write_payloads(folder: Path, images) -> list[Path]:
    from gamguard.runtime.demo.synth import write_dicom

    paths = []
    for i, im in enumerate(images):
        p = write_dicom(folder / f"bench_{i:03d}.dcm", np.asarray(im, np.float32))
        paths.append(p)
    return paths


def durable_write_ms(folder: Path, payloads: list[bytes], n: int = 20) -> float:
    """Mean time of one journal write (:meth:`.journal.Journal.put_source`, as a C-STORE does it) of the
    benchmark's images, one after the other: the disk's share of an acknowledged C-STORE (the node
    overlaps it with the verification)."""
    from .journal import Journal

    journal = Journal(folder)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            journal.put_source(f"1.2.{i + 1}", payloads[i % len(payloads)])
        return (time.perf_counter() - t0) * 1e3 / n
    finally:
        journal.close()


class NullStorageSCP:
    """A pynetdicom Storage SCP that answers Success to every C-STORE and does nothing else: the cost per
    image of the node's transport (pynetdicom, woken as the node's associations are: :mod:`.wakeup`), for
    ``ratio_if_node_free``."""

    def __init__(self, max_pdu: int):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

        from .sopclasses import decodable_transfer_syntaxes
        from .wakeup import wake_on_events

        ae = AE(ae_title="GAMGUARD")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(DigitalXRayImageStorageForPresentation, decodable_transfer_syntaxes())
        handlers = [(evt.EVT_C_STORE, lambda e: 0), (evt.EVT_CONN_OPEN, lambda e: wake_on_events(e.assoc))]
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()


def _server_cpu_s(node) -> float:
    """CPU seconds of this process (the servers, the node) and of the node's receiver processes."""
    receivers = getattr(node.scp, "cpu_seconds", None)
    return time.process_time() + (receivers() if receivers is not None else 0.0)


def _until_verdicts(scp, timeout_s: float = 600.0) -> float:
    """Seconds until every image the SCP answered has its verdict."""
    t0 = time.perf_counter()
    while scp.finishing and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.0005)
    return time.perf_counter() - t0


def measure_dicom(
    guard, bundle_dir: Path, images, levels, quick: bool, progress, client: str = "auto", side: int | None = None
) -> dict:
    """Rows ``{associations, ratio, cstore_ips, grpc_ips, null_scp_ips, ratio_if_node_free, ...}`` and the
    journal and results costs; ``client``: the SCU (:func:`resolve_client`); ``side``: the images resampled
    to ``side``² before they are written as DICOM (None: as they are)."""
    from gamguard.runtime.bench.serving import _grpc_round
    from gamguard.runtime.server.background import BackgroundServer
    from gamguard.runtime.server.config import ServeConfig

    from .config import DicomNodeConfig
    from .node import BackgroundNode

    client = resolve_client(client)
    scu_round = _storescu_round if client == "storescu" else _cstore_round
    progress(f"dicom: C-STORE client {client}")
    tmp = tempfile.TemporaryDirectory(prefix="gamguard-bench-dicom-")
    folder = Path(tmp.name)
    if side is not None:
        import cv2

        images = [cv2.resize(np.asarray(im, np.float32), (side, side), interpolation=cv2.INTER_LINEAR) for im in images]
    paths = _write_payloads(folder, images)
    file_list = [str(p) for p in paths]
    payloads = [p.read_bytes() for p in paths]
    shape = np.asarray(images[0]).shape
    progress(f"dicom: DX images {shape[0]}x{shape[1]}, 12 bits, {len(payloads[0]) / 1e3:.0f} kB each")
    threads = getattr(guard.engine, "threads", None)
    serve_cfg = ServeConfig(bundle=str(bundle_dir), insecure=True, port=0, threads=threads)
    node_cfg = DicomNodeConfig(
        host="127.0.0.1", port=0, allow_any_ae=True, queue_dir=str(folder / "queue"), build_backlog=10**6
    ).validate()
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    rounds = 2 if quick else 3
    rows = []
    null_scp = None
    try:
        with (
            BackgroundServer(serve_cfg, guard_factory=lambda: guard) as server,
            BackgroundNode(node_cfg, serve_cfg, guard_factory=lambda: guard) as node,
        ):
            null_scp = NullStorageSCP(node_cfg.max_pdu)
            built_before = 0
            results_s, results_n = 0.0, 0
            for n in levels:
                per = max(6 if quick else 16, (24 if quick else 96) // n)
                pool.submit(scu_round, node.port, file_list, n, 2).result(600)  # warm
                pool.submit(scu_round, null_scp.port, file_list, n, 2).result(600)
                pool.submit(_grpc_round, server.target, payloads, n, 2).result(600)
                node.node.wait_results_built(600)
                measured: dict[str, list] = {"dicom": [], "grpc": [], "null": []}
                for r in range(rounds):  # alternate the order so drift in machine load hits all three
                    order = ("dicom", "grpc", "null") if r % 2 == 0 else ("null", "grpc", "dicom")
                    for which in order:
                        # this process hosts the servers, the clients are in the other one: its CPU time
                        # per image is the server side's own cost
                        c0 = _server_cpu_s(node.node)
                        if which == "grpc":
                            ips, lat, client_cpu = pool.submit(_grpc_round, server.target, payloads, n, per).result(600)
                        else:
                            port = node.port if which == "dicom" else null_scp.port
                            ips, lat, client_cpu = pool.submit(scu_round, port, file_list, n, per).result(600)
                        acked_ips = ips
                        if which == "dicom":
                            # the node answers before the verdict: the round ends when every image
                            # stored has its verdict (time after the last answer, plus the result's
                            # way back from the client process: counted against the node)
                            ips = n * per / (n * per / acked_ips + _until_verdicts(node.node.scp))
                        cpu_ms = (_server_cpu_s(node.node) - c0) * 1e3 / (n * per)
                        measured[which].append((ips, lat, cpu_ms, client_cpu, acked_ips))
                        if which == "dicom":
                            t0 = time.perf_counter()
                            node.node.wait_results_built(600)  # results are built after the associations
                            built = node.node.builder.built
                            results_s += time.perf_counter() - t0
                            results_n += built - built_before
                            built_before = built

                def median(which: str, k: int) -> float:
                    return float(np.median([m[k] for m in measured[which]]))

                def p50(which: str) -> float:
                    return round(float(np.median([v for m in measured[which] for v in m[1]])), 2)

                c_ips, g_ips, null_ips = median("dicom", 0), median("grpc", 0), median("null", 0)
                row = {
                    "associations": n,
                    "ratio": round(c_ips / g_ips, 3),
                    "cstore_ips": round(c_ips, 1),
                    "cstore_answered_ips": round(median("dicom", 4), 1),
                    "grpc_ips": round(g_ips, 1),
                    "null_scp_ips": round(null_ips, 1),
                    "ratio_if_node_free": round(1.0 / (1.0 + g_ips / null_ips), 3),
                    "rounds_ratio": [round(d[0] / g[0], 3) for d, g in zip(measured["dicom"], measured["grpc"])],
                    "cstore_p50_ms": p50("dicom"),
                    "grpc_p50_ms": p50("grpc"),
                    "null_scp_p50_ms": p50("null"),
                    # server-side CPU per image (the node with its receiver processes vs the gRPC server,
                    # clients excluded)
                    "cstore_cpu_ms": round(median("dicom", 2), 2),
                    "grpc_cpu_ms": round(median("grpc", 2), 2),
                    # the clients' CPU per image (the SCU vs the gRPC client), on the same machine
                    "cstore_client_cpu_ms": round(median("dicom", 3), 2),
                    "grpc_client_cpu_ms": round(median("grpc", 3), 2),
                }
                row["cpu_ratio"] = round(row["grpc_cpu_ms"] / row["cstore_cpu_ms"], 3)
                rows.append(row)
                progress(
                    f"dicom: {n} association(s): C-STORE {c_ips:.1f} img/s, gRPC Verify {g_ips:.1f} img/s, "
                    f"ratio {row['ratio']:.3f} (pynetdicom alone {null_ips:.1f} img/s; "
                    f"ratio if the node added nothing {row['ratio_if_node_free']:.3f})"
                )
        fsync_ms = durable_write_ms(folder / "probe", payloads)
    finally:
        if null_scp is not None:
            null_scp.close()
        pool.shutdown()
        tmp.cleanup()
    return {
        "rows": rows,
        "client": client,
        "image": {"rows": int(shape[0]), "columns": int(shape[1]), "bits": 12, "bytes": len(payloads[0])},
        "rounds": rounds,
        "durable_write_ms": round(fsync_ms, 2),
        "goal_min_ratio": GOAL_MIN_RATIO,
        "results_ms_per_image": round(1e3 * results_s / results_n, 1) if results_n else None,
        "note": "C-STORE is answered once the image is durable in the journal and admitted for the engine "
        "(grey uncompressed images: before their pixels are decoded); "
        "cstore_ips counts an image when its verdict exists (cstore_answered_ips: when the console has its "
        "answer); the SR and overlay are built after the association (results_ms_per_image, wall time "
        "while idle). "
        "ratio_if_node_free: estimated ratio if the node added nothing to pynetdicom's transport "
        "(null_scp_ips) and the verification (grpc_ips)",
    }
