"""The Storage and Verification SCP: pynetdicom handlers over the data plane and the journal.

Association (PS3.8): the calling AE title (and, if pinned, the peer address) must be on the allow-list
and the called AE title must be the node's, otherwise the association is rejected ("calling/called AE
title not recognized"); beyond ``max_associations`` (associations being negotiated or established, not bare
TCP connections) it is rejected as "local limit exceeded". Presentation
contexts are accepted only for Verification and the storage classes of :mod:`.sopclasses`.

C-STORE, in the association's own thread:

1. the dataset arrives as sent (pynetdicom's ``event.encoded_dataset()`` bytes, never re-encoded;
   :mod:`.filemeta` writes its File Meta Information from a template);
2. its header must name the SOP class of the context and the SOP Instance UID of the request and carry
   the UIDs a result needs — else ``0xA900`` (does not match SOP class) / ``0xC000`` (cannot understand);
3. the data plane decodes it and queues it for the engine (micro-batched with every other association
   and with gRPC requests) — undecodable pixel data is ``0xC000`` with the reason in Error Comment, a
   full queue or a node not ready ``0xA700`` (out of resources: retry later);
4. meanwhile the received dataset is written durably to the journal (:mod:`.journal`);
5. once the image is durable and queued, ``0x0000`` Success — before its verdict, so that the console
   sends the next image while this one is inferred (while ``max_unjudged`` answered images, at most
   half the engine queue, wait for their verdicts, the next answer waits for its own: one console
   cannot fill the queue that gRPC clients share). When the verdict comes it goes, with the overlay's
   inputs, to the results builder (in memory: derived data) and the image becomes ready in the
   journal; the SR and Secondary Capture are built from there. An answered image whose verification
   fails (or whose node stops first) keeps no verdict: the builder derives it again from the journal,
   as it does for an image received before a restart, and retries while the data plane is busy.

No handler raises into pynetdicom: anything unexpected is ``0x0110`` (processing failure) and the
association, and the node, carry on. Logs and error comments name UIDs and pixel-module facts only,
never patient attributes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import threading
import uuid

from gamguard.runtime.server.quietlog import where_raised

from .durable import safe_name
from .filemeta import encoded_dataset
from .journal import thumbnail
from .pdulimit import limit_pdu_lengths
from .results import ResultError, check_source, is_own_result
from .wakeup import wake_on_events

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE title not recognized
REJECT_BUSY = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit exceeded


def _shown(ae_title: str) -> str:
    """An AE title as logs and audit lines show it: as sent when printable, else quoted with escapes (a
    peer's title with a newline must not forge a log line)."""
    return ae_title if ae_title.isprintable() else ascii(ae_title)


def _settle(future: concurrent.futures.Future, value) -> None:
    """Set ``future``'s result unless it has one (the admission signal is settled by whichever comes first)."""
    try:
        future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


def hand_over(journal, incoming, kept, error, *, keep_verdict, metrics, label: str) -> None:
    """An answered image to the results builder: its ``kept`` ``(verdict, thumbnail)`` under its journal
    entry's key (which names the bytes it was computed on), then the image ready in the journal. Without
    a verdict (``kept`` None: its verification failed after the answer with ``error``) the builder derives
    it again from the journal."""
    from gamguard.runtime.server.errors import DataPlaneError

    if kept is not None and keep_verdict is not None:
        try:
            keep_verdict(journal.incoming_key(incoming), *kept)
        except Exception as exc:  # noqa: BLE001 - derived data only; the image is durable
            kept, error = None, exc
    if kept is None:
        if metrics is not None:
            metrics.verdicts_deferred.inc()
        log.warning(
            "%s: answered, but its verification failed (%s); the results builder derives the verdict again "
            "from the journal",
            label,
            f"{type(error).__name__}: {error}" if isinstance(error, DataPlaneError) else type(error).__name__,
            exc_info=None
            if isinstance(error, (DataPlaneError, concurrent.futures.CancelledError)) or error is None
            else error,
        )
    try:
        journal.release_source(incoming)
    except OSError as exc:
        log.error("cannot release %s in the journal (%s); it is taken at the next start", label, exc)


def status_dataset(status: int, comment: str = ""):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")[:64]  # LO: 64 characters
    return ds


class StorageSCP:
    """The handlers of one node. ``plane()`` returns the ready DataPlane or None; ``loop`` is its event loop."""

    def __init__(
        self,
        *,
        ae_title: str,
        allow_list,
        sop_classes: dict,
        plane,
        loop: asyncio.AbstractEventLoop,
        journal,
        metrics=None,
        audit=None,
        on_stored=None,
        on_verdict=None,
        verify_timeout_s: float = 120.0,
        max_unjudged: int = 16,
        max_associations: int | None = None,
        max_pdu: int = 0,
    ):
        self.ae_title = ae_title
        self.allow_list = allow_list
        self.sop_classes = sop_classes
        self.plane = plane
        self.loop = loop
        self.journal = journal
        self.metrics = metrics
        self.audit = audit
        self.on_stored = on_stored
        # (journal entry key, verdict, thumbnail): the verdict for the results builder
        self.on_verdict = on_verdict
        self.verify_timeout_s = verify_timeout_s
        # answered images whose verdict may be outstanding at once; beyond, an answer waits for its
        # verdict (as it did before answering first): one fast console cannot fill the engine's queue
        # (which gRPC clients share) or hold more decoded images in memory than this
        self.max_unjudged = max_unjudged
        self._active: set[int] = set()
        # The association limit counts associations being negotiated (past the allow-list) or established,
        # not TCP connections: a port scan or a peer that connects and says nothing must not hold a
        # console's slot (pynetdicom's own limit, which counts connections, is set higher, as a backstop).
        self.max_associations = max_associations
        self.max_pdu = max_pdu  # P-DATA PDUs announcing more are not read (.pdulimit)
        self._negotiating: set[int] = set()
        self._ae = None  # pynetdicom's AE, known from the first request: which associations still run
        self._lock = threading.Lock()
        self.draining = False  # set on shutdown: new associations are turned away
        # durable writes of received images, overlapping their verification (one per association at most)
        self._writer = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="gamguard-journal")
        self._finishing = 0  # images answered whose verdict is not handed over yet

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    @property
    def finishing(self) -> int:
        """Acknowledged images not yet ready for their results."""
        return self._finishing

    @property
    def active_associations(self) -> int:
        with self._lock:
            self._forget_ended()
            return len(self._active)

    def _forget_ended(self) -> None:
        """Drop associations whose thread has ended (under the lock). pynetdicom signals the connection's
        close from another thread than the request: a peer that sends its request and closes at once can be
        closed before it is counted, and would otherwise hold its slot for good."""
        if self._ae is None:
            return
        live = {id(a) for a in self._ae.active_associations}
        self._active &= live
        self._negotiating &= live

    # -- events ------------------------------------------------------------------------------------

    def handlers(self) -> list:
        from pynetdicom import evt

        return [
            (evt.EVT_CONN_OPEN, self.on_connected),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]

    @staticmethod
    def _peer(event) -> tuple[str, str]:
        rq = event.assoc.requestor
        return _shown(str(rq.ae_title or "").strip()), str(rq.address or "")

    def _count(self, metric_name: str, *labels: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric_name).labels(*labels).inc()

    def _audit(self, event: str, **fields) -> None:
        if self.audit is not None:
            self.audit.record_event(event, protocol="dicom", **fields)

    def on_connected(self, event) -> None:
        limit_pdu_lengths(event.assoc, self.max_pdu)
        wake_on_events(event.assoc)

    def on_requested(self, event) -> None:
        """Allow-list check before negotiation (pynetdicom's own check cannot pin peer addresses)."""
        primitive = event.assoc.requestor.primitive
        calling = _shown(str(primitive.calling_ae_title or "").strip())
        called = _shown(str(primitive.called_ae_title or "").strip())
        address = str(event.assoc.requestor.address or "")
        reason = None
        if self.draining:
            reason, rsd = "node shutting down", REJECT_BUSY
        elif not self.allow_list.admits(calling, address):
            reason, rsd = "calling AE title not allowed", REJECT_CALLING_AE
        elif called != self.ae_title:
            reason, rsd = f"called AE title {called!r} is not this node's ({self.ae_title!r})", REJECT_CALLED_AE
        else:
            reason, rsd = self._take_slot(event), REJECT_BUSY
            self._associations_changed()
        if reason is not None:
            log.warning("association from %s@%s rejected: %s", calling, address, reason)
            self._audit("association_rejected", calling_ae=calling, peer=address, reason=reason)
            event.assoc.acse.send_reject(*rsd)
            event.assoc.kill()  # as pynetdicom does after its own rejections: waits until the A-ASSOCIATE-RJ is out
            self._count("associations", "rejected")

    def _take_slot(self, event) -> str | None:
        """A slot for an allowed association (counted as negotiating), or why there is none. (A receiver
        process asks the node, which counts every receiver's: :mod:`.receiver`.)"""
        with self._lock:
            self._ae = event.assoc.ae
            self._forget_ended()
            if self.max_associations is not None and len(self._active | self._negotiating) >= self.max_associations:
                return f"association limit reached ({self.max_associations})"
            self._negotiating.add(id(event.assoc))
        return None

    def _associations_changed(self) -> None:
        """Associations were counted, established or closed (a receiver process tells the node)."""

    def on_accepted(self, event) -> None:
        calling, address = self._peer(event)
        with self._lock:
            self._negotiating.discard(id(event.assoc))
            self._active.add(id(event.assoc))
        self._associations_changed()
        if self.metrics is not None:
            self.metrics.active.set(len(self._active))
        self._count("associations", "accepted")
        self._audit("association_accepted", calling_ae=calling, peer=address)
        log.info("association from %s@%s accepted", calling, address)

    def on_rejected(self, event) -> None:  # rejections by pynetdicom itself (e.g. too many associations)
        calling, address = self._peer(event)
        self._count("associations", "rejected")
        self._audit("association_rejected", calling_ae=calling, peer=address, reason="association limit reached")
        log.warning("association from %s@%s rejected: association limit reached", calling, address)

    def on_released(self, event) -> None:
        self._count("associations", "released")

    def on_aborted(self, event) -> None:
        self._count("associations", "aborted")

    def on_closed(self, event) -> None:
        with self._lock:
            was_active = id(event.assoc) in self._active
            self._active.discard(id(event.assoc))
            self._negotiating.discard(id(event.assoc))
        self._associations_changed()
        if self.metrics is not None:
            self.metrics.active.set(len(self._active))
        if was_active and self.on_stored is not None:
            self.on_stored()  # an idle node builds results

    # -- services ----------------------------------------------------------------------------------

    def on_echo(self, event) -> int:
        self._count("requests", "echo", "success")
        return SUCCESS

    def on_store(self, event):
        try:
            status, comment, outcome = self._store(event)
        except Exception as exc:  # noqa: BLE001 - never into pynetdicom, never down the node
            log.error("C-STORE failed unexpectedly (%s)", where_raised(exc))  # no text: it may quote the header
            status, comment, outcome = PROCESSING_FAILURE, f"internal error: {type(exc).__name__}", "error"
        self._count("requests", "store", outcome)
        return status if not comment else status_dataset(status, comment)

    def _store(self, event) -> tuple[int, str, str]:
        import pydicom

        from gamguard.runtime.server.errors import DeadlineExpired, InvalidRequest, NotReady, Overloaded

        context_class = str(event.context.abstract_syntax)
        if context_class not in self.sop_classes:  # cannot happen through negotiation; kept as a guard
            return SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted by this node", "refused"
        data = encoded_dataset(event)
        request_id = uuid.uuid4().hex
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            check_source(header)
            sop_class, sop_uid = str(header.SOPClassUID), str(header.SOPInstanceUID)
        except ResultError as exc:
            return self._invalid(request_id, CANNOT_UNDERSTAND, str(exc))
        except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot parse
            return self._invalid(request_id, CANNOT_UNDERSTAND, f"cannot parse the dataset ({type(exc).__name__})")
        if is_own_result(header):
            return self._invalid(request_id, CANNOT_UNDERSTAND, "a gamguard result (verdict or overlay): not judged")
        try:
            safe_name(sop_uid)  # the journal names files after it: digits and dots only
        except ValueError:
            return self._invalid(request_id, CANNOT_UNDERSTAND, "the SOP Instance UID is not a valid UID")
        if sop_class != context_class:
            return self._invalid(
                request_id,
                DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class UID of the dataset differs from the presentation context",
            )
        if sop_uid != str(event.request.AffectedSOPInstanceUID or "").strip():
            return self._invalid(
                request_id, DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID of the dataset differs from the request"
            )
        plane = self.plane()
        if plane is None:
            return OUT_OF_RESOURCES, "node not ready (loading the bundle); retry", "not_ready"
        # The image goes to disk (writer thread) while this association's thread decodes it and the data
        # plane queues it for the engine; the console is answered once the image is durable and admitted
        # (decodable, room in the queue), and the verdict follows after the answer: the console sends its
        # next image while this one is inferred (micro-batched with it), instead of waiting for the engine
        # image by image. Decoding here, not in the data plane's pool: this thread would only wait, and
        # the hops to the event loop, a decode worker and back cost more than the decode's share of a
        # C-STORE (gamguard bench, dicom_efficiency).
        written = self._writer.submit(self.journal.put_source, sop_uid, data)
        admitted = concurrent.futures.Future()
        admitted.set_running_or_notify_cancel()
        verifying = None
        try:
            try:
                prepared = plane.decode_here(data)
            except InvalidRequest as exc:
                plane.record_invalid(request_id, "dicom", str(exc))
                raise
            except (Overloaded, DeadlineExpired) as exc:
                plane.record_refused(request_id, "dicom", exc)
                raise
            verifying = self._submit_verify(plane, prepared, request_id, lambda: _settle(admitted, True))
            verifying.add_done_callback(lambda _: _settle(admitted, False))
            if not admitted.result(self.verify_timeout_s + 10):
                verifying.result(0)  # refused before the queue: raises why
                raise RuntimeError("the data plane finished without admitting the image")
        except InvalidRequest as exc:  # counted and audited (above, or by the data plane)
            self._discard(written)
            message = str(exc)
            if "choose a frame" in message:  # the gRPC API's wording; a console cannot choose a frame
                message = "multi-frame images are not accepted by this node"
            log.warning("C-STORE %s refused (0x%04X): %s", sop_uid, CANNOT_UNDERSTAND, message)
            return CANNOT_UNDERSTAND, message, "invalid"
        except (Overloaded, DeadlineExpired) as exc:  # audited (above, or by the data plane)
            self._discard(written)
            log.warning("C-STORE %s refused (0x%04X): busy: %s", sop_uid, OUT_OF_RESOURCES, exc)
            return OUT_OF_RESOURCES, f"busy: {exc}", "overloaded"
        except NotReady as exc:  # raised before the data plane records anything
            self._discard(written)
            plane.record_refused(request_id, "dicom", exc)
            log.warning("C-STORE %s refused (0x%04X): node stopping or not ready", sop_uid, OUT_OF_RESOURCES)
            return OUT_OF_RESOURCES, "node is stopping or not ready; retry", "not_ready"
        except BaseException:
            if verifying is not None:
                self._abandon(plane, request_id, verifying)
            self._discard(written)
            raise
        try:
            incoming = written.result()
        except OSError as exc:
            self._abandon(plane, request_id, verifying)
            self._discard(written)
            log.error("cannot write the journal (%s): answering out of resources", exc.strerror or exc)
            return OUT_OF_RESOURCES, "cannot store the image on disk", "error"
        # Durable and admitted: the console may hear "success" now; its verdict and the rest follow
        with self._lock:
            self._finishing += 1
        if self._must_wait(plane, request_id):  # enough verdicts outstanding: this answer waits for its own
            concurrent.futures.wait([verifying], timeout=self.verify_timeout_s + 10)
        verifying.add_done_callback(lambda done: self._after_verdict(sop_uid, incoming, request_id, done))
        if self.on_stored is not None:
            self.on_stored()  # before the answer: whoever waits for the results after it waits for this one
        return SUCCESS, "", "success"

    def _submit_verify(self, plane, prepared, request_id: str, on_admitted) -> concurrent.futures.Future:
        """The verification of a decoded image, as a future of its Result (``on_admitted``: called once it
        is queued for the engine)."""
        return asyncio.run_coroutine_threadsafe(
            plane.verify(
                prepared=prepared,
                request_id=request_id,
                protocol="dicom",
                timeout_s=self.verify_timeout_s,
                on_admitted=on_admitted,
            ),
            self.loop,
        )

    def _abandon(self, plane, request_id: str, verifying: concurrent.futures.Future) -> None:
        """An image admitted for verification is refused after all (its answer is a failure): no verdict
        of it is handed over. (In one process the cancelled future is all; a receiver tells the node.)"""
        verifying.cancel()

    def _must_wait(self, plane, request_id: str) -> bool:
        """Whether this answer waits for its verdict: more than ``max_unjudged`` answered images wait for
        theirs (at most half the engine queue, whatever --max-queue-size says)."""
        with self._lock:
            return self._finishing > min(self.max_unjudged, max(1, plane.config.max_queue_size // 2))

    def _after_verdict(self, sop_uid: str, incoming, request_id: str, done: concurrent.futures.Future) -> None:
        """The verification of an answered image finished: hand over on the writer threads (not in the
        event loop, which ran this callback)."""
        try:
            self._writer.submit(self._finish, sop_uid, incoming, request_id, done)
        except RuntimeError:  # the node is closing: the image stays in the journal, taken at the next start
            with self._lock:
                self._finishing -= 1

    def _finish(self, sop_uid: str, incoming, request_id: str, done: concurrent.futures.Future) -> None:
        """The verdict to the results builder, then the image ready in the journal (:func:`hand_over`)."""
        kept, error = None, None
        try:
            result = done.result(0)
            kept = (result.verdict, thumbnail(result.decoded.pixels))
        except (Exception, concurrent.futures.CancelledError) as exc:  # noqa: BLE001 - derived data only
            error = exc
        try:
            hand_over(
                self.journal,
                incoming,
                kept,
                error,
                keep_verdict=self.on_verdict,
                metrics=self.metrics,
                label=f"request {request_id} ({sop_uid})",
            )
        finally:
            with self._lock:
                self._finishing -= 1
            if self.on_stored is not None:
                self.on_stored()

    def _discard(self, written) -> None:
        """A refused image leaves no trace in the journal (after its write finished, whatever its outcome)."""
        try:
            self.journal.discard_source(written.result())
        except Exception:  # noqa: BLE001 - the write failing is fine here: the image is refused anyway
            pass

    def _invalid(self, request_id: str, status: int, message: str) -> tuple[int, str, str]:
        plane = self.plane()
        if plane is not None:
            plane.record_invalid(request_id, "dicom", message)
        log.warning("C-STORE refused (0x%04X): %s", status, message)
        return status, message, "invalid"
