"""The SR and overlay of each image, built in worker processes.

Building one image's results takes highdicom and pydicom ~45 ms of CPU on the 2-core development
machine (the SR's construction ~29 ms, its encoding ~10 ms, the overlay Secondary Capture ~6 ms), nearly
all of it holding Python's GIL. In the node's own process that time is taken from the associations and
gRPC calls it serves, and results are built one at a time whatever the number of cores. In worker
processes (``--result-workers``, default :func:`default_workers`) they are built beside the serving
threads and on as many cores as there are workers; the node's process only hands over the received
bytes and the verdict and queues what comes back (~1 ms of CPU per image). ``workers=0`` builds in
the calling thread, as the node did before.

Workers are started with ``spawn`` (never ``fork``: the node's process runs threads and ONNX Runtime)
when the first job comes, quiet the input libraries as the node does (pydicom's warnings would quote
header values) and ignore Ctrl-C (the node stops them). A worker that dies (killed, out of memory)
breaks the pool: the jobs it held fail with :class:`BrokenProcessPool` and the next job starts a new one.
Workers whose node was killed outright end by themselves within :data:`ORPHAN_CHECK_S`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

log = logging.getLogger(__name__)

#: the default number of worker processes, at most the CPUs this process may use
DEFAULT_WORKERS = 2

__all__ = ["BrokenProcessPool", "ResultMaker", "ResultMakerClosed", "default_workers", "result_objects"]


def default_workers() -> int:
    """:data:`DEFAULT_WORKERS`, or fewer when fewer CPUs are usable."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(DEFAULT_WORKERS, cpus))


def result_objects(source: bytes, verdict, thumbnail_u8, model) -> list[tuple[str, str, bytes]]:
    """``[(kind, SOP Instance UID, Part 10 bytes)]`` of the SR and the overlay of one received image
    (``source``: its bytes as journaled; ``thumbnail_u8``: the overlay's grey image). A pure function of
    its arguments, run in a worker process or in the caller."""
    import io

    import numpy as np
    import pydicom

    from .results import encode, overlay_sc, verdict_sr

    header = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True)
    sr = verdict_sr(header, verdict, model)
    sc = overlay_sc(header, np.asarray(thumbnail_u8, np.float32) / 255.0, verdict, model)
    return [("sr", str(sr.SOPInstanceUID), encode(sr)), ("sc", str(sc.SOPInstanceUID), encode(sc))]


#: how often a worker checks that the node that started it is still there (:func:`_exit_when_orphaned`)
ORPHAN_CHECK_S = 1.0


def _init_worker(node_pid: int) -> None:
    import signal

    from gamguard.runtime.server.quietlog import quiet_input_libraries

    # a Ctrl-C in the node's terminal reaches every process of its group: the node's to handle, and it
    # stops its workers (SIGTERM stays: concurrent.futures ends the workers of a broken pool with it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(node_pid,), name="orphan-check", daemon=True).start()
    quiet_input_libraries()
    for name in ("pynetdicom", "highdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import highdicom  # noqa: F401

    from . import results  # noqa: F401 - imported once here, not in the first job


def _exit_when_orphaned(node_pid: int) -> None:
    """End this worker once the node that started it is gone. A node killed outright (SIGKILL, the out-of-
    memory killer) cannot stop its workers, and nothing else would: each waits for jobs on a pipe whose
    writing end its sibling workers hold open too, so it never sees the end of it."""
    while os.getppid() == node_pid:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(0)


class ResultMakerClosed(RuntimeError):
    """A job handed over after :meth:`ResultMaker.close` (the node is stopping): it is not built now."""


class ResultMaker:
    """Runs :func:`result_objects` in ``workers`` processes (0: in the calling thread)."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError("result workers must be >= 0")
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, source: bytes, verdict, thumbnail_u8, model) -> concurrent.futures.Future:
        """The future of :func:`result_objects`; whatever goes wrong (the workers stopped or unable to
        start, the build itself) is raised by its ``result()``."""
        args = (source, verdict, thumbnail_u8, model)
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            if self.workers:
                try:
                    return self._executor().submit(result_objects, *args)
                except BrokenProcessPool:  # a worker died since the last job: new workers for this one
                    log.error("a results worker process died; starting new ones")
                    self._drop_pool(wait=False)
                    return self._executor().submit(result_objects, *args)
            if self._closed:
                raise ResultMakerClosed("the results workers are stopped")
            done.set_result(result_objects(*args))
        except Exception as exc:  # noqa: BLE001 - delivered through the future (e.g. no process can start)
            done.set_exception(exc)
        return done

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise ResultMakerClosed("the results workers are stopped")
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def _drop_pool(self, *, wait: bool, close: bool = False) -> None:
        with self._lock:
            self._closed = self._closed or close
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers (after the jobs they are building); later jobs fail with :class:`ResultMakerClosed`."""
        self._drop_pool(wait=True, close=True)
