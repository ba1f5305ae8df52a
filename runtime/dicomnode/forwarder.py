"""Store-and-forward: one thread per destination sends its outbox folder by C-STORE, with retries.

Each pass opens one association for the objects that are due, proposing exactly the (SOP class,
transfer syntax) pairs of those files, sends them as stored (no re-encoding) and releases. An object
leaves the outbox only when the destination answered success or a warning (PS3.4 B.2.3: warnings are
stored). Otherwise it stays and is retried:

* destination unreachable / association rejected → the whole destination waits (backoff);
* an object answered with a failure status → that object waits (its own backoff), the others go on.

Backoff doubles from ``retry_initial_s`` up to ``retry_max_s`` and resets on success. Nothing is ever
dropped: an object a destination keeps refusing stays queued and is counted in
``gamguard_dicom_forward_failures_total``, for an operator to look at. New objects wake the thread at once.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from gamguard.runtime.server.quietlog import where_raised

from .config import Destination
from .outbox import Outbox

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association
PASS_SIZE = 256  # objects sent per association before the folder is listed again


def backoff_s(failures: int, initial_s: float, max_s: float) -> float:
    """Delay after ``failures`` consecutive failures (>= 1): ``initial_s`` doubled each time, at most ``max_s``."""
    return min(max_s, initial_s * 2.0 ** max(0, failures - 1))


def is_stored(status: int) -> bool:
    """Success (0x0000) or a warning (0xB000, 0xB006, 0xB007: stored with coercion/elements discarded)."""
    return status == 0x0000 or (status & 0xF000) == 0xB000


class Forwarder:
    def __init__(
        self,
        destination: Destination,
        outbox: Outbox,
        *,
        calling_ae: str,
        metrics=None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        timeout_s: float = 30.0,
        tls=None,
    ):
        self.destination = destination
        self.tls = tls  # ssl.SSLContext for DICOM TLS to the destination (host name checked), or None
        self.outbox = outbox
        self.calling_ae = calling_ae
        self.metrics = metrics
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.timeout_s = timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0  # consecutive association failures
        self._not_before = 0.0  # monotonic time before which the destination is not tried again
        self._object_failures: dict[str, int] = {}
        self._object_not_before: dict[str, float] = {}
        self.sent = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"gamguard-forward-{self.destination.name}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- work --------------------------------------------------------------------------------------

    def _report_depth(self) -> int:
        depth = self.outbox.depth(self.destination.name)
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.destination.name).set(depth)
        return depth

    def _due(self) -> tuple[list[Path], float | None]:
        """Objects due now (at most PASS_SIZE) and, when none is, the soonest time one will be."""
        now = time.monotonic()
        due, soonest = [], None
        for p in self.outbox.pending(self.destination.name):
            t = self._object_not_before.get(p.name, 0.0)
            if t <= now:
                due.append(p)
                if len(due) >= PASS_SIZE:
                    break
            else:
                soonest = t if soonest is None else min(soonest, t)
        return due, soonest

    def _run(self) -> None:
        while not self._stop.is_set():
            self._report_depth()
            wait = None
            now = time.monotonic()
            if now < self._not_before:
                wait = self._not_before - now
            else:
                due, soonest = self._due()
                if due:
                    try:
                        self._send_pass(due)
                    except Exception as exc:  # noqa: BLE001 - never let the forwarder thread die
                        log.error("forwarding to %s failed unexpectedly (%s)", self.destination, where_raised(exc))
                        self._destination_failed("error")
                    continue
                wait = None if soonest is None else max(0.0, soonest - now)
            self._wake.wait(timeout=5.0 if wait is None else min(wait, 5.0))
            self._wake.clear()

    def _destination_failed(self, kind: str) -> None:
        self._failures += 1
        delay = backoff_s(self._failures, self.retry_initial_s, self.retry_max_s)
        self._not_before = time.monotonic() + delay
        if self.metrics is not None:
            self.metrics.forward_failures.labels(self.destination.name, kind).inc()
        log.warning("destination %s: %s failure #%d; retrying in %.1f s", self.destination, kind, self._failures, delay)

    def _contexts(self, paths: list[Path]) -> tuple[list, list[Path]]:
        from pydicom.filereader import read_file_meta_info
        from pynetdicom.presentation import build_context

        pairs: dict[tuple[str, str], None] = {}
        sendable = []
        for p in paths:
            try:
                meta = read_file_meta_info(p)
                pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            except Exception:  # noqa: BLE001 - a file we cannot read is put aside for an operator
                aside = self.outbox.put_aside(self.destination.name, p)
                log.error("outbox entry %s is not a readable DICOM file; moved to %s", p.name, aside)
                continue
            if pair not in pairs and len(pairs) >= MAX_CONTEXTS:
                continue  # sent in a later pass
            pairs[pair] = None
            sendable.append(p)
        return [build_context(cls, [ts]) for cls, ts in pairs], sendable

    def _send_pass(self, paths: list[Path]) -> None:
        from pynetdicom import AE

        contexts, paths = self._contexts(paths)
        if not paths:
            return
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        d = self.destination
        tls_args = (self.tls, d.host) if self.tls is not None else None
        assoc = ae.associate(d.host, d.port, contexts=contexts, ae_title=d.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            self._destination_failed("connect")
            return
        if self._failures:
            log.info("destination %s reachable again after %d failed attempts; sending", d, self._failures)
        self._failures = 0
        try:
            for p in paths:
                if self._stop.is_set() or not assoc.is_established:
                    break
                try:
                    rsp = assoc.send_c_store(p)
                except Exception as exc:  # noqa: BLE001 - e.g. no accepted context for this object
                    log.warning("destination %s: cannot send %s (%s)", d, p.name, where_raised(exc))
                    self._object_failed(p, None)
                    continue
                status = int(rsp.get("Status", -1)) if rsp is not None and "Status" in rsp else None
                if status is not None and is_stored(status):
                    self.outbox.delivered(p)
                    self._object_failures.pop(p.name, None)
                    self._object_not_before.pop(p.name, None)
                    self.sent += 1
                    if self.metrics is not None:
                        self.metrics.forwarded.labels(d.name).inc()
                else:
                    self._object_failed(p, status)
                    if status is None:  # no answer: the association is gone (aborted, timed out)
                        # the destination, not this object, is failing: back off before the next association
                        self._destination_failed("aborted")
                        break
        finally:
            if assoc.is_established:
                assoc.release()
            if not assoc.is_released and not assoc.is_aborted:
                assoc.abort()

    def _object_failed(self, path: Path, status: int | None) -> None:
        n = self._object_failures.get(path.name, 0) + 1
        self._object_failures[path.name] = n
        delay = backoff_s(n, self.retry_initial_s, self.retry_max_s)
        self._object_not_before[path.name] = time.monotonic() + delay
        if self.metrics is not None:
            self.metrics.forward_failures.labels(self.destination.name, "status").inc()
        what = "no response: the association was aborted or timed out" if status is None else f"status 0x{status:04X}"
        log.warning(
            "destination %s refused %s (%s), attempt %d; retrying in %.1f s",
            self.destination,
            path.name,
            what,
            n,
            delay,
        )
