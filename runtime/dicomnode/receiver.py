"""Receiver processes: the node's DICOM associations handled in processes of their own.

pynetdicom is pure Python. Reading a C-STORE's PDUs, its DIMSE messages, the header checks and the
journal's durable write cost about as much CPU per image as verifying it, and in one process both share
one interpreter lock: the node could at best alternate between receiving and verifying (the bench's
``ratio_if_node_free``), and several associations' threads fought over that lock with the inference.

With ``--receivers N`` (default: 2 where two CPUs or more are usable, else 0), the node binds its
listening socket and starts N spawned processes that inherit it: the kernel hands each new connection
to a receiver waiting in ``accept``. Each runs the same Storage/Verification SCP
(:class:`~.scp.StorageSCP`: allow-list, called AE title, PDU limit, DICOM TLS, header checks, the
journal's durable write, the answer) on its associations. The node's process keeps the data plane
(decode, the micro-batched engine, verdicts), the association limit and the unjudged-image limit over
all receivers, the metrics, the audit log, the journal's bookkeeping, the results builder and the
forwarders. One pipe per receiver carries:

* receiver → node: an image to verify (its bytes, which the node decodes; or, for an image of
  :data:`DECODE_IN_RECEIVER_MIN_BYTES` or more, decoded by the receiver: the model input, the decoded
  image's facts without its pixels, and the overlay's thumbnail), cancellations, an answered
  image handed over (``finish``: its journal entry), association counts and slot requests, metric
  increments, audit events, log records (written by the node's handlers), CPU time when asked;
* node → receiver: admitted (and whether the answer waits for the verdict), refused (the data plane's
  error, raised again in the receiver so the SCP answers as it always does), verified, slots, drain,
  stop.

Only the image bytes (or its model input and thumbnail), UIDs in journal names, and AE titles and
addresses (in audit lines, as in one process) cross the pipe; every message goes out from a thread of
its own, so no thread ever waits on the pipe. A receiver that ends unexpectedly is started again (its associations are
lost, as with a crash; the journal keeps what was answered); a receiver whose node dies ends by itself
when its pipe closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path

from gamguard.runtime.server.dataplane import Prepared
from gamguard.runtime.server.errors import DeadlineExpired, InvalidRequest, NotReady, Overloaded

from .journal import thumbnail
from .scp import hand_over

log = logging.getLogger(__name__)

#: seconds a receiver has to start (import pynetdicom, open its server) and report ready
START_TIMEOUT_S = 60.0
#: Images of at least this many bytes are decoded by their receiver, smaller ones by the node. Measured
#: with ``gamguard bench --dicom-size`` (one and four associations): 256² phantoms (132 kB) went faster
#: decoded by the node (ratio 0.71–0.75 / 0.76–0.79 against 0.64–0.65 / 0.71–0.76), 512² (525 kB) and
#: larger faster decoded by the receiver (512²: 0.71–0.74 / 0.70–0.83 against 0.68 / 0.66; 2048²: 1.36 /
#: 0.72 against 0.92 / 0.56): a large image's pixels need not cross the pipe, and receivers decode side by
#: side, while a small image decodes sooner in the node than in a receiver busy with pynetdicom.
DECODE_IN_RECEIVER_MIN_BYTES = 256 << 10
#: seconds before a receiver that ended is started again, doubled for each one that ends soon after its
#: start (up to RESTART_MAX_INTERVAL_S): a receiver that cannot start (its TLS files gone, say) is not
#: respawned every second
RESTART_MIN_INTERVAL_S = 1.0
RESTART_MAX_INTERVAL_S = 60.0
#: a receiver that ran this long before it ended counts as having started fine
RESTART_STABLE_S = 60.0
#: seconds between a receiver's association reports when nothing happens (pynetdicom can close an
#: association without an event this SCP sees: see StorageSCP._forget_ended)
COUNTS_REFRESH_S = 0.5
#: how long a cancellation that came before its image is remembered
CANCELLED_MEMORY_S = 600.0


def default_receivers() -> int:
    """2 where two CPUs or more are usable (receiving then runs beside verifying), else 0 (in the node's
    process: on one CPU a second process only adds the hand-over)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 0


def _error_kind(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _rebuilt_error(kind: str, message: str) -> Exception:
    """The data plane's error as the SCP handles it (its class by name), else a RuntimeError."""
    from gamguard.runtime.server import errors

    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:
            pass
    return RuntimeError(f"{kind}: {message}")


class _Link:
    """One end of a receiver's pipe. ``send`` from any thread never blocks: messages go out in order from a
    thread of their own. (A blocking send could deadlock: each side's reader thread sends too — the node's
    slot answers, the receiver's hand-overs — and with both directions of the pipe full, each would wait
    for the other to read.)"""

    def __init__(self, conn):
        import queue

        self.conn = conn
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._writer = threading.Thread(target=self._write, name="gamguard-receiver-pipe", daemon=True)
        self._writer.start()

    def send(self, message) -> bool:
        """Queue ``message``; False (and dropped) once the pipe is closed: the other side is gone."""
        if self._closed:
            return False
        self._out.put(message)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then close the pipe."""
        self._out.put(None)
        self._writer.join(timeout_s)

    def _write(self) -> None:
        while True:
            message = self._out.get()
            if message is None:
                break
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the other side is gone
                break
            except Exception:  # noqa: BLE001 - a message that cannot be pickled: a bug, but never a wedged link
                log.exception("receiver pipe: cannot send a %r message; closing the pipe", message[0])
                break
        self._closed = True
        try:
            self.conn.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------
# the node's side


@dataclasses.dataclass
class _Image:
    """An image a receiver sent for verification, until the receiver hands it over or drops it."""

    receiver: "_Receiver"
    future: concurrent.futures.Future | None = None
    admitted: bool = False
    verdict: object = None  # once verified
    pixels: object = None  # the decoded image, for the overlay's thumbnail (decoded here) ...
    thumbnail: object = None  # ... or the thumbnail itself (decoded by the receiver)
    error: BaseException | None = None


class _Receiver:
    def __init__(self, index: int, process, link: _Link, writer: str):
        self.index = index
        self.process = process
        self.link = link
        self.writer = writer  # its incoming images' tag in the journal (Journal.take_incoming)
        self.started = time.monotonic()
        self.ready = threading.Event()
        self.failure: str | None = None
        self.stopping = False
        self.cpu_replies: list = []


class ReceiverHub:
    """The node's end of its receiver processes. Stands in for the in-process :class:`~.scp.StorageSCP`
    where the node, the results builder and the bench look: :attr:`finishing`,
    :attr:`active_associations`, :attr:`draining`, :meth:`close`.

    ``plane``: returns the ready DataPlane; ``loop``: its event loop; ``keep_verdict(key, verdict,
    thumbnail)``: the results builder's; ``on_stored``: wakes the builder."""

    def __init__(
        self,
        count: int,
        config,
        *,
        sop_classes: dict,
        plane,
        loop: asyncio.AbstractEventLoop,
        journal,
        metrics=None,
        audit=None,
        on_stored=None,
        keep_verdict=None,
        verify_timeout_s: float = 120.0,
        max_unjudged: int = 16,
    ):
        if count < 1:
            raise ValueError("a receiver hub needs at least one receiver")
        self.count = count
        self.config = config
        self.sop_classes = dict(sop_classes)
        self.plane = plane
        self.loop = loop
        self.journal = journal
        self.metrics = metrics
        self.audit = audit
        self.on_stored = on_stored
        self.keep_verdict = keep_verdict
        self.verify_timeout_s = verify_timeout_s
        self.max_unjudged = max_unjudged
        self.port: int | None = None
        self._socket: socket.socket | None = None
        self._receivers: dict[int, _Receiver] = {}
        self._lock = threading.Lock()
        self._counts: dict[int, tuple[int, int]] = {}  # receiver -> (negotiating or established, established)
        self._granted: dict[int, set[int]] = {}  # receiver -> slots granted, not reported as settled yet
        self._images: dict[str, _Image] = {}
        self._cancelled: dict[str, float] = {}  # cancellations that came before their image: when
        self._handing: set[str] = set()  # incoming paths being handed over (a pool thread)
        self._finishing = 0
        self._draining = False
        self._closed = False
        self._generation = itertools.count()
        self._stopped = threading.Event()  # set by close(): a pending restart gives up
        self._quick_ends: dict[int, int] = {}  # receiver -> how many times in a row it ended soon after its start
        self._context = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="gamguard-receive")

    # -- what the node and the builder read --------------------------------------------------------

    @property
    def finishing(self) -> int:
        """Admitted images not yet handed over to the results builder."""
        with self._lock:
            return self._finishing

    @property
    def active_associations(self) -> int:
        with self._lock:
            return sum(established for _, established in self._counts.values())

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = bool(value)
        if value:
            self._broadcast(("drain",))

    def pids(self) -> list[int]:
        return [r.process.pid for r in self._receivers.values() if r.process.is_alive()]

    def cpu_seconds(self, timeout_s: float = 5.0) -> float:
        """CPU time used by the receiver processes so far (the bench's server-side CPU)."""
        receivers = list(self._receivers.values())
        for r in receivers:
            r.cpu_replies.clear()
            r.link.send(("cpu?",))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(not r.cpu_replies and r.process.is_alive() for r in receivers):
            time.sleep(0.001)
        return float(sum(r.cpu_replies[0] for r in receivers if r.cpu_replies))

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> int:
        """Bind the node's port, start the receivers and wait until each listens; returns the port."""
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self._socket = socket.create_server((cfg.host, cfg.port), family=family, backlog=128)
        self.port = int(self._socket.getsockname()[1])
        try:
            for i in range(self.count):
                self._spawn(i)
            deadline = time.monotonic() + START_TIMEOUT_S
            for r in list(self._receivers.values()):
                while not r.ready.wait(0.1):
                    if r.failure or not r.process.is_alive() or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"DICOM receiver {r.index} did not start: {r.failure or 'it ended'}"
                            if r.failure or not r.process.is_alive()
                            else f"DICOM receiver {r.index} did not start within {START_TIMEOUT_S:.0f} s"
                        )
                if r.failure:
                    raise RuntimeError(f"DICOM receiver {r.index} did not start: {r.failure}")
        except BaseException:
            self.close(grace_s=0)
            raise
        return self.port

    def _setup(self, writer: str) -> dict:
        gamguard_logger = logging.getLogger("gamguard")
        plane = self.plane()
        return {
            "writer": writer,
            "decoding": (plane.config, plane.guard.spec),  # the data plane's limits, the model's input
            "decode_here_min_bytes": DECODE_IN_RECEIVER_MIN_BYTES,
            "config": self.config,
            "sop_classes": self.sop_classes,
            "journal": str(self.journal.folder),
            "log_level": gamguard_logger.getEffectiveLevel(),
            "verify_timeout_s": self.verify_timeout_s,
        }

    def _spawn(self, index: int) -> _Receiver | None:
        """Start receiver ``index``; None when the hub closed meanwhile (the process is stopped again)."""
        writer = f"r{index}g{next(self._generation)}x"  # Journal writer tag: unique per process started
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=run_receiver,
            args=(child, self._socket, self._setup(writer), os.getpid()),
            name=f"gamguard-dicom-receiver-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        r = _Receiver(index, process, _Link(parent), writer)
        with self._lock:
            closed = self._closed
            if not closed:
                self._receivers[index] = r
                self._counts[index] = (0, 0)
                self._granted[index] = set()
        if closed:  # close() did not see this one: stop it here
            process.kill()
            process.join(5)
            r.link.close(timeout_s=1.0)
            return None
        threading.Thread(target=self._serve, args=(r,), name=f"gamguard-receiver-{index}", daemon=True).start()
        return r

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every receiver (open associations are aborted: the node waited for them before) and free
        the port."""
        with self._lock:
            self._closed = True
            receivers = list(self._receivers.values())
        self._stopped.set()
        for r in receivers:
            r.stopping = True
            r.link.send(("stop",))
        deadline = time.monotonic() + max(grace_s, 0.0) + 10.0
        for r in receivers:
            r.process.join(max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                log.warning("DICOM receiver %d did not stop in time: killed", r.index)
                r.process.kill()
                r.process.join(5)
            r.link.close(timeout_s=1.0)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._pool.shutdown(wait=True)

    def _broadcast(self, message) -> None:
        for r in list(self._receivers.values()):
            r.link.send(message)

    # -- messages from a receiver ------------------------------------------------------------------

    def _serve(self, r: _Receiver) -> None:
        while True:
            try:
                message = r.link.conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(r, message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the receiver's pipe
                log.exception("DICOM receiver %d: cannot handle %r", r.index, message[0] if message else message)
        self._gone(r)

    def _handle(self, r: _Receiver, message) -> None:
        kind = message[0]
        if kind == "verify":
            self._verify(r, *message[1:])
        elif kind == "verify_decoded":
            _, rid, x, facts, decode_ms, timeout_s = message
            self._queue(r, rid, self.plane(), Prepared(facts, x, decode_ms), timeout_s)
        elif kind == "thumbnail":
            with self._lock:
                image = self._images.get(message[1])
            if image is not None:
                image.thumbnail = message[2]
        elif kind == "finish":
            with self._lock:
                self._handing.add(message[2])
            self._pool.submit(self._finish, *message[1:])
        elif kind == "cancel":
            self._cancel(message[1])
        elif kind == "count":
            _, name, labels = message
            if self.metrics is not None:
                metric = getattr(self.metrics, name)
                (metric.labels(*labels) if labels else metric).inc()
        elif kind == "audit":
            _, event, fields = message
            if self.audit is not None:
                self.audit.record_event(event, **fields)
        elif kind == "log":
            _, level, name, text = message
            logging.getLogger(name).log(level, "%s", text)
        elif kind == "slot?":
            r.link.send(("slot", message[1], self._slot(r, message[1])))
        elif kind == "assocs":
            _, open_here, established_here, settled = message
            with self._lock:
                self._counts[r.index] = (open_here, established_here)
                self._granted[r.index] -= set(settled)
                established = sum(e for _, e in self._counts.values())
            if self.metrics is not None:
                self.metrics.active.set(established)
        elif kind == "invalid":
            plane = self.plane()
            if plane is not None:
                plane.record_invalid(message[1], "dicom", message[2])
        elif kind == "refused":
            plane = self.plane()
            if plane is not None:
                plane.record_refused(message[1], "dicom", _rebuilt_error(message[2], message[3]))
        elif kind == "stored":
            if self.on_stored is not None:
                self.on_stored()
        elif kind == "cpu":
            r.cpu_replies.append(message[1])
        elif kind == "ready":
            r.ready.set()
        elif kind == "failed_to_start":
            r.failure = message[1]
        else:
            log.warning("DICOM receiver %d sent an unknown message %r", r.index, kind)

    def _slot(self, r: _Receiver, token: int) -> str | None:
        """The association limit over every receiver: the associations each receiver last reported, plus
        the slots granted since that it has not reported as settled (taken or given up) yet."""
        limit = self.config.max_associations
        with self._lock:
            if self._draining:
                return "node shutting down"
            taken = sum(n for n, _ in self._counts.values()) + sum(len(g) for g in self._granted.values())
            if limit is not None and taken >= limit:
                return f"association limit reached ({limit})"
            self._granted[r.index].add(token)
        return None

    def _verify(self, r: _Receiver, rid: str, data: bytes, timeout_s: float) -> None:
        """Decode a received image smaller than :data:`DECODE_IN_RECEIVER_MIN_BYTES` and queue it for the
        engine, as the SCP does in one process: in the pipe's reader thread (a hand-over to another thread
        cost more than the decode of such an image holds up the receiver's next message).

        An image whose decode is known to succeed before its pixels are decoded (a grey uncompressed DICOM:
        ``on_decodable``) is admitted then, when the engine's queue has room (:meth:`DataPlane.has_room`):
        its receiver answers the console while this thread decodes it. Should the queue refuse it all the
        same (filled meanwhile by other clients, or the node stopping), the answered image's verification
        failed: the results builder derives its verdict again (it waits in the journal until it can)."""
        plane = self.plane()
        early: list[_Image | None] = []  # the image once admitted before its decode (None: cancelled)

        def decodable() -> None:
            if plane.has_room():  # else admitted once queued, as any other image (refused if still full)
                early.append(self._register(r, rid))
                if early[0] is not None:
                    self._admitted(rid, plane)

        try:
            if plane is None:
                raise NotReady("node not ready (loading the bundle); retry")
            try:
                prepared = plane.decode_here(data, on_decodable=decodable)
            except InvalidRequest as exc:
                plane.record_invalid(rid, "dicom", str(exc))
                raise
            except (Overloaded, DeadlineExpired) as exc:
                plane.record_refused(rid, "dicom", exc)
                raise
            if not early:
                self._queue(r, rid, plane, prepared, timeout_s, pixels=prepared.decoded.pixels)
            elif early[0] is not None:
                early[0].pixels = prepared.decoded.pixels
                self._queue(r, rid, plane, prepared, timeout_s, image=early[0])
        except Exception as exc:  # noqa: BLE001 - NotReady is recorded by the receiver, as in one process
            if not early:
                r.link.send(("failed", rid, *_error_kind(exc)))
            elif early[0] is not None:  # answered: its verification failed (e.g. the event loop closed)
                early[0].error = exc
                r.link.send(("done", rid, _error_kind(exc)))

    def _register(self, r: _Receiver, rid: str, pixels=None) -> _Image | None:
        """A new image in flight; None when its receiver cancelled it before it came."""
        image = _Image(r, pixels=pixels)
        with self._lock:
            if self._cancelled.pop(rid, None) is not None:
                return None
            self._images[rid] = image
        return image

    def _queue(self, r: _Receiver, rid: str, plane, prepared, timeout_s: float, pixels=None, image=None) -> None:
        """Queue a decoded image for the engine (``image``: registered already, admitted before its decode)."""
        if plane is None:  # NotReady is recorded by the receiver, as in one process
            r.link.send(("failed", rid, *_error_kind(NotReady("node not ready (loading the bundle); retry"))))
            return
        if image is None:
            image = self._register(r, rid, pixels)
            if image is None:
                return
        image.future = asyncio.run_coroutine_threadsafe(
            plane.verify(
                prepared=prepared,
                request_id=rid,
                protocol="dicom",
                timeout_s=timeout_s,
                on_admitted=lambda: self._admitted(rid, plane),
            ),
            self.loop,
        )
        image.future.add_done_callback(lambda done: self._verified(rid, done))

    def _admitted(self, rid: str, plane) -> None:
        """The image is queued (in the event loop), or known to decode (in its pipe's reader thread, before
        its decode: :meth:`_verify`); once only. Its answer waits for the verdict when more than
        ``max_unjudged`` (at most half the engine queue) answered images, over all receivers, wait for theirs."""
        with self._lock:
            image = self._images.get(rid)
            if image is None or image.admitted:  # (an image admitted before its decode is queued later)
                return
            image.admitted = True
            self._finishing += 1
            wait = self._finishing > min(self.max_unjudged, max(1, plane.config.max_queue_size // 2))
        image.receiver.link.send(("admitted", rid, wait))

    def _verified(self, rid: str, done: concurrent.futures.Future) -> None:
        if done.cancelled():
            return
        with self._lock:
            image = self._images.get(rid)
        if image is None:
            return
        exc = done.exception()
        if exc is None:
            image.verdict = done.result().verdict
            image.receiver.link.send(("done", rid, None))
            return
        image.error = exc
        if image.admitted:
            image.receiver.link.send(("done", rid, _error_kind(exc)))
            return
        with self._lock:  # refused before the queue (the data plane recorded why)
            self._images.pop(rid, None)
        image.receiver.link.send(("failed", rid, *_error_kind(exc)))

    def _finish(self, rid: str, incoming: str) -> None:
        """An answered image handed over (a pool thread), as the SCP does in one process (:func:`.scp.hand_over`)."""
        with self._lock:
            image = self._images.pop(rid, None)
        kept = None
        if image is not None and image.verdict is not None:
            thumb = image.thumbnail if image.pixels is None else thumbnail(image.pixels)
            kept = None if thumb is None else (image.verdict, thumb)
        try:
            hand_over(
                self.journal,
                Path(incoming),
                kept,
                None if image is None else image.error,
                keep_verdict=self.keep_verdict,
                metrics=self.metrics,
                label=f"request {rid}",
            )
        finally:
            with self._lock:
                self._handing.discard(incoming)
                if image is not None and image.admitted:
                    self._finishing -= 1
            if self.on_stored is not None:
                self.on_stored()

    def _cancel(self, rid: str) -> None:
        with self._lock:
            image = self._images.pop(rid, None)
            if image is None:  # not registered yet, or already finished: remembered for a while
                now = time.monotonic()
                if len(self._cancelled) > 256:
                    self._cancelled = {k: t for k, t in self._cancelled.items() if now - t < CANCELLED_MEMORY_S}
                self._cancelled[rid] = now
                return
            if image.admitted:
                self._finishing -= 1
        if image.future is not None:
            image.future.cancel()

    def _gone(self, r: _Receiver) -> None:
        """A receiver's pipe closed. Its images in flight are dropped here; unless the node is stopping (its
        next start takes them), the images the receiver wrote to the journal and did not hand over are taken
        as received (answered ones must get their results; unanswered ones are sent again by the console,
        with the same results) and the receiver is started again."""
        with self._lock:
            mine = [rid for rid, image in self._images.items() if image.receiver is r]
            for rid in mine:
                image = self._images.pop(rid)
                if image.admitted:
                    self._finishing -= 1
                if image.future is not None:
                    image.future.cancel()
            self._counts[r.index] = (0, 0)
            self._granted[r.index] = set()
            restart = not (self._closed or r.stopping)
        r.link.close(timeout_s=1.0)  # its writer thread and pipe
        if not restart:
            return
        r.process.join(5)  # it writes nothing more to the journal
        if r.process.is_alive():
            r.process.kill()
            r.process.join(5)
        with self._lock:
            handing = {Path(p) for p in self._handing}
        try:
            taken = self.journal.take_incoming(r.writer, skip=handing)
        except OSError as exc:
            taken = 0
            log.error(
                "DICOM receiver %d: cannot take its images from the journal (%s); the next start will", r.index, exc
            )
        log.error(
            "DICOM receiver %d ended unexpectedly (exit code %s%s); %d image(s) were in flight, %d taken from the "
            "journal for their results; starting it again",
            r.index,
            r.process.exitcode,
            f", {r.failure}" if r.failure else "",
            len(mine),
            taken,
        )
        if taken and self.on_stored is not None:
            self.on_stored()
        quick = self._quick_ends.get(r.index, 0) + 1 if time.monotonic() - r.started < RESTART_STABLE_S else 0
        self._quick_ends[r.index] = quick
        wait = min(RESTART_MAX_INTERVAL_S, RESTART_MIN_INTERVAL_S * 2 ** max(quick - 1, 0))
        with self._lock:
            if self._closed:
                return
        if self._stopped.wait(wait):  # close() ends the wait
            return
        try:
            self._spawn(r.index)
        except Exception as exc:  # noqa: BLE001 - logged: the other receivers carry on
            log.error("DICOM receiver %d could not be started again: %s", r.index, exc)


# ------------------------------------------------------------------------------------------------
# the receiver's side (a spawned process)


class _RemoteMetric:
    """A metric of the node's registry, incremented through the pipe (gauges are the node's own)."""

    def __init__(self, link: _Link, name: str, labels: tuple = ()):
        self._link, self._name, self._labels = link, name, labels

    def labels(self, *labels) -> "_RemoteMetric":
        return _RemoteMetric(self._link, self._name, tuple(str(v) for v in labels))

    def inc(self, amount: float = 1) -> None:
        self._link.send(("count", self._name, self._labels))

    def set(self, value) -> None:  # the node sets its gauges from every receiver's counts
        pass


class _RemoteMetrics:
    def __init__(self, link: _Link):
        self._link = link

    def __getattr__(self, name: str) -> _RemoteMetric:
        if name.startswith("_"):
            raise AttributeError(name)
        return _RemoteMetric(self._link, name)


class _RemoteAudit:
    def __init__(self, link: _Link):
        self._link = link

    def record_event(self, event: str, **fields) -> None:
        self._link.send(("audit", event, fields))


class _ForwardedLog(logging.Handler):
    """This process's log records, written by the node's handlers."""

    def __init__(self, link: _Link):
        super().__init__()
        self._link = link

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self._link.send(("log", record.levelno, record.name, text))
        except Exception:  # noqa: BLE001 - the pipe is gone: nobody to tell
            pass


class _RemotePlane:
    """What the SCP asks of the data plane, answered by the node (which decodes, queues and verifies)."""

    def __init__(self, link: _Link, decoder, decode_here_min_bytes: int):
        self._link = link
        self._decoder = decoder
        self._decode_here_min_bytes = decode_here_min_bytes
        self._waiting: dict[str, tuple[concurrent.futures.Future, object]] = {}
        self._must_wait: dict[str, bool] = {}
        self._lock = threading.Lock()

    def decode_here(self, data: bytes):
        """Large images are decoded here (their pixels need not cross the pipe, and receivers decode side by
        side); small ones by the node, which is faster for them (this process is busy with pynetdicom)."""
        if len(data) >= self._decode_here_min_bytes:
            return self._decoder.decode_here(data)
        return data

    def record_invalid(self, request_id: str, protocol: str, message: str) -> None:
        self._link.send(("invalid", request_id, message))

    def record_refused(self, request_id: str, protocol: str, exc: BaseException) -> None:
        self._link.send(("refused", request_id, *_error_kind(exc)))

    def submit(self, data: bytes, request_id: str, timeout_s: float, on_admitted) -> concurrent.futures.Future:
        """The node decodes, queues and verifies the image; the future's result is None (the verdict stays
        with the node)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiting[request_id] = (future, on_admitted)
        future.add_done_callback(lambda f: self._cancelled(request_id) if f.cancelled() else None)
        if isinstance(data, bytes):
            self._link.send(("verify", request_id, data, timeout_s))
            return future
        import numpy as np

        decoded = data.decoded  # a Prepared: the node gets the model input, the facts and the thumbnail
        facts = dataclasses.replace(decoded, pixels=np.zeros((0, 0), np.float32))
        self._link.send(("verify_decoded", request_id, data.x, facts, data.decode_ms, timeout_s))
        self._link.send(("thumbnail", request_id, thumbnail(decoded.pixels)))
        return future

    def _cancelled(self, request_id: str) -> None:
        with self._lock:
            self._waiting.pop(request_id, None)
        self._link.send(("cancel", request_id))

    def abandon(self, request_id: str, tell: bool = True) -> None:
        """The SCP gives an image up after its verification may have finished (the answer failed): forgotten
        here, and the node (``tell``) drops it whatever its state (a cancelled future tells it only while
        the verification runs)."""
        with self._lock:
            self._waiting.pop(request_id, None)
            self._must_wait.pop(request_id, None)
        if tell:
            self._link.send(("cancel", request_id))

    def must_wait(self, request_id: str) -> bool:
        with self._lock:
            return self._must_wait.pop(request_id, False)

    # from the pipe's reader thread
    def admitted(self, request_id: str, wait: bool) -> None:
        with self._lock:
            entry = self._waiting.get(request_id)
            if entry is None:  # given up meanwhile (a timeout): nothing waits for the answer
                return
            self._must_wait[request_id] = bool(wait)
        entry[1]()  # settles a concurrent future: any thread

    def finished(self, request_id: str, error) -> None:
        with self._lock:
            entry = self._waiting.pop(request_id, None)
            if error is not None:
                self._must_wait.pop(request_id, None)
        if entry is None:
            return
        try:
            if error is None:
                entry[0].set_result(None)
            else:
                entry[0].set_exception(_rebuilt_error(*error))
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass


def _receiver_scp_class():
    from .scp import StorageSCP

    class ReceiverSCP(StorageSCP):
        """The SCP in a receiver process: the association limit, the unjudged limit and the hand-over of
        answered images are the node's."""

        def __init__(self, link: _Link, **kw):
            super().__init__(**kw)
            self._link = link
            self._tokens = itertools.count()
            self._slots: dict[int, concurrent.futures.Future] = {}
            self._settled: set[int] = set()  # slot tokens taken or given up since the last report
            self._reported = (0, 0)  # the counts last reported

        def _take_slot(self, event) -> str | None:
            """Asked of the node without holding the lock (the pipe's reader thread takes it); the node
            counts the slot as granted until a report says it is settled (:meth:`_associations_changed`)."""
            with self._lock:
                self._ae = event.assoc.ae
            token = next(self._tokens)
            answer: concurrent.futures.Future = concurrent.futures.Future()
            self._slots[token] = answer
            try:
                if self.draining or not self._link.send(("slot?", token)):
                    reason = "node shutting down"
                else:
                    reason = answer.result(30)
            except concurrent.futures.TimeoutError:
                reason = "the node did not answer"
            finally:
                self._slots.pop(token, None)
            with self._lock:
                if reason is None:
                    self._negotiating.add(id(event.assoc))
                self._settled.add(token)
            return reason

        def slot(self, token: int, reason) -> None:
            answer = self._slots.get(token)
            if answer is not None and not answer.done():
                try:
                    answer.set_result(reason)
                except concurrent.futures.InvalidStateError:  # answered by node_gone meanwhile
                    pass

        def node_gone(self) -> None:
            """The node is gone or stopping this receiver: associations waiting for a slot are refused."""
            for token in list(self._slots):
                self.slot(token, "node shutting down")

        def _associations_changed(self) -> None:
            self.report_associations(always=True)

        def report_associations(self, always: bool = False) -> None:
            """Tell the node this receiver's association counts and the slot tokens settled since the last
            report (``always`` False: only when something changed, for the periodic report)."""
            with self._lock:
                self._forget_ended()
                counts = (len(self._active | self._negotiating), len(self._active))
                if not always and counts == self._reported and not self._settled:
                    return
                settled, self._settled = self._settled, set()
                self._reported = counts
                # sent under the lock: reports leave in the order of the states they describe
                self._link.send(("assocs", *counts, tuple(settled)))

        def _abandon(self, plane, request_id: str, verifying) -> None:
            """The node forgets the image (also when its verification has finished: it holds the verdict)."""
            plane.abandon(request_id, tell=not verifying.cancel())  # (a cancel told the node already)

        def _submit_verify(self, plane, prepared, request_id: str, on_admitted) -> concurrent.futures.Future:
            return plane.submit(prepared, request_id, self.verify_timeout_s, on_admitted)

        def _must_wait(self, plane, request_id: str) -> bool:
            return plane.must_wait(request_id)

        def _after_verdict(self, sop_uid, incoming, request_id, done) -> None:
            """Hand the answered image over to the node (which keeps its verdict and readies it in the
            journal)."""
            # (the node gone: the image stays in the journal, taken at its next start)
            self._link.send(("finish", request_id, str(incoming)))
            with self._lock:
                self._finishing -= 1

    return ReceiverSCP


def _server_class(listening: socket.socket):
    from pynetdicom.transport import ThreadedAssociationServer

    class InheritedSocketServer(ThreadedAssociationServer):
        """pynetdicom's threaded server on the node's listening socket (bound and listening already)."""

        def server_bind(self) -> None:
            self.socket.close()
            # Non-blocking: every receiver's select wakes on a new connection and one accept wins; a
            # blocking accept would hold the others until the next connection (and through a stop).
            # (The flag is the socket's, shared by every process; only receivers accept on it.)
            listening.setblocking(False)
            self.socket = listening
            self.server_address = listening.getsockname()

        def server_activate(self) -> None:  # the node listens already
            pass

        def server_close(self) -> None:
            """Close this process's handle only: pynetdicom's ``shutdown(SHUT_RDWR)`` of the socket would stop
            it listening for the node and every other receiver too."""
            self.socket.close()

    return InheritedSocketServer


def _exit_with_node(node_pid: int, stop: threading.Event) -> None:
    """A safety net beside the pipe: end this process when the node's is gone (reparented)."""
    while not stop.wait(1.0):
        if os.getppid() != node_pid:
            os._exit(0)


def run_receiver(conn, listening: socket.socket, setup: dict, node_pid: int) -> None:
    """A receiver process's body (spawned by :class:`ReceiverHub`)."""
    import signal

    # a Ctrl-C in the node's terminal reaches every process of its group: the node's to handle, and it
    # stops its receivers (after letting their associations finish)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = _Link(conn)
    root = logging.getLogger()
    root.handlers[:] = [_ForwardedLog(link)]
    root.setLevel(logging.WARNING)
    logging.getLogger("gamguard").setLevel(setup["log_level"])
    stop = threading.Event()
    threading.Thread(target=_exit_with_node, args=(node_pid, stop), daemon=True).start()
    try:
        server, scp, plane = _start(link, listening, setup)
    except Exception as exc:  # noqa: BLE001 - told to the node, which refuses to start
        link.send(("failed_to_start", f"{type(exc).__name__}: {exc}"))
        return
    link.send(("ready",))
    node_gone = False
    try:
        while True:
            try:
                if not conn.poll(COUNTS_REFRESH_S):
                    scp.report_associations()  # an association pynetdicom closed unseen frees its slot
                    continue
                message = conn.recv()
            except (EOFError, OSError):
                node_gone = True
                break
            kind = message[0]
            if kind == "admitted":
                plane.admitted(message[1], message[2])
            elif kind in ("done", "failed"):
                error = message[2] if kind == "done" else (message[2], message[3])
                plane.finished(message[1], error)
            elif kind == "slot":
                scp.slot(message[1], message[2])
            elif kind == "drain":
                scp.draining = True
            elif kind == "cpu?":
                link.send(("cpu", time.process_time()))
            elif kind == "stop":
                break
    finally:
        stop.set()
        scp.draining = True  # an association that still comes in is turned away at once
        scp.node_gone()  # ... and one waiting for the node's slot answer is not kept waiting
        if node_gone:  # no node behind the port: stop it listening for every process that shares it
            try:
                listening.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.shutdown()  # aborts what is still open: the node waited for its associations first
        scp.close()
        link.close()


def _start(link: _Link, listening: socket.socket, setup: dict):
    from gamguard.runtime.server.dataplane import Decoder
    from gamguard.runtime.server.quietlog import quiet_input_libraries

    from .journal import Journal
    from .node import _tls_context, configure_ae, quiet_dicom_logs

    cfg = setup["config"]
    quiet_input_libraries()
    quiet_dicom_logs(debugging=logging.getLogger("gamguard").isEnabledFor(logging.DEBUG))
    plane = _RemotePlane(link, Decoder(*setup["decoding"]), setup["decode_here_min_bytes"])
    scp = _receiver_scp_class()(
        link,
        ae_title=cfg.ae_title,
        allow_list=cfg.allow_list(),
        sop_classes=setup["sop_classes"],
        plane=lambda: plane,
        loop=None,  # the node's data plane runs in the node's process
        journal=Journal(setup["journal"], recover=False, writer=setup["writer"]),
        metrics=_RemoteMetrics(link),
        audit=_RemoteAudit(link),
        on_stored=lambda: link.send(("stored",)),
        on_verdict=None,
        verify_timeout_s=setup["verify_timeout_s"],
        max_associations=cfg.max_associations,
        max_pdu=cfg.max_pdu,
    )
    ae = configure_ae(cfg, setup["sop_classes"])
    server = ae.make_server(
        listening.getsockname(),
        evt_handlers=scp.handlers(),
        ssl_context=_tls_context(cfg),
        server_class=_server_class(listening),
    )
    ae._servers.append(server)  # as ae.start_server does: the AE knows its server's associations
    threading.Thread(target=server.serve_forever, daemon=True, name="gamguard-receiver-accept").start()
    return server, scp, plane
