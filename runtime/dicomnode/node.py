"""The DICOM node: the SCP, the results builder and the forwarders around one data plane.

Lifecycle of :class:`DicomNode`:

1. ``start()`` loads the bundle (hashes verified, self-test inference) — through a
   :class:`~gamguard.runtime.server.app.GuardServer` when ``--grpc-port`` asks for the gRPC API in the
   same process (one data plane, so DICOM and gRPC requests share micro-batches), else a data plane of
   its own; then opens the journal and outbox, starts one forwarder per destination and the results
   builder (which first builds whatever a previous run left in the journal), and only then listens
   for associations;
2. ``stop()`` stops listening, lets open associations finish (up to ``grace_s``), builds what is
   journaled if time allows (what is left is built at the next start), stops the forwarders and the
   data plane.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import ssl
import threading
import time
import uuid
from pathlib import Path

from gamguard.runtime.server.config import ServeConfig
from gamguard.runtime.server.quietlog import quiet_input_libraries, where_raised

from .config import DicomNodeConfig
from .durable import private_folder
from .forwarder import Forwarder
from .journal import Journal, entry_key, split_key
from .metrics import DicomMetrics
from .outbox import Outbox
from .peerlog import quiet_peer_closes
from .receiver import ReceiverHub, default_receivers
from .resultpool import (
    BrokenProcessPool,
    ResultMaker,
    ResultMakerClosed,
    default_workers,
)
from .results import ModelIdentity
from .scp import StorageSCP
from .sopclasses import decodable_transfer_syntaxes, storage_sop_classes

log = logging.getLogger(__name__)


def _forward_tls_context(cfg: DicomNodeConfig) -> ssl.SSLContext | None:
    """The client-side TLS context for the --forward destinations (certificate and host name verified
    against --forward-tls-ca; the node's own certificate when a destination asks for one), or None."""
    if not cfg.forward_tls_ca:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.forward_tls_ca)
        if cfg.forward_tls_cert:
            ctx.load_cert_chain(cfg.forward_tls_cert, cfg.forward_tls_key)
    except (ssl.SSLError, OSError) as exc:
        given = [f"--{k.replace('_', '-')} {v}" for k, v in vars(cfg).items() if k.startswith("forward_tls") and v]
        raise OSError(f"forward TLS files unusable ({', '.join(given)}): {exc}") from None
    return ctx


def _tls_context(cfg: DicomNodeConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cfg.tls_client_ca)
    except (ssl.SSLError, OSError) as exc:
        raise OSError(f"DICOM TLS files unusable (--tls-cert {cfg.tls_cert}, --tls-key {cfg.tls_key}): {exc}") from None
    return ctx


class ResultsBuilder:
    """Builds the SR and Secondary Capture of every journaled image into the outbox: a thread takes the
    jobs in order and hands them to ``workers`` result processes (:mod:`.resultpool`; 0: builds them
    itself), a few at a time so that the workers never wait.

    Building takes ~45 ms of CPU per image (highdicom), so it is done between associations — the
    verify path keeps the CPU while a console is sending — unless ``backlog`` images are waiting,
    then it runs regardless. A job whose results cannot be built (a dataset highdicom refuses) is
    moved to ``journal/failed/`` and counted, never retried forever or dropped.

    The verdicts of the C-STOREs (with the overlay's thumbnail, ~0.2 MB each) are kept in memory for
    the build, at most ``KEPT_VERDICTS``; an image without one (after a restart, beyond that many, or
    whose verification failed after its C-STORE was answered) gets its verdict derived again through
    the data plane: same bundle, same verdict. When the data plane cannot give it now (queue full,
    stopping, too slow) the job stays in the journal and the builder tries again after a backoff.
    """

    KEPT_VERDICTS = 256
    RETRY_INITIAL_S, RETRY_MAX_S = 0.5, 30.0  # a verdict that cannot be derived now: wait, doubling

    def __init__(
        self,
        journal: Journal,
        outbox: Outbox,
        model: ModelIdentity,
        *,
        reverify,
        forward_originals: str,
        is_busy,
        backlog: int,
        in_flight=lambda: 0,
        metrics=None,
        on_queued=None,
        workers: int = 0,
    ):
        self.journal = journal
        self.outbox = outbox
        self.reverify = reverify  # source bytes -> (verdict, thumbnail), through the data plane
        self.model = model
        self.forward_originals = forward_originals
        self.is_busy = is_busy
        self.backlog = backlog
        self.in_flight = in_flight  # acknowledged images not in the journal's ready list yet
        self.metrics = metrics
        self.on_queued = on_queued
        self.failed_dir = journal.folder / "failed"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_listing = 0.0
        # SOP Instance UID -> {journal entry key -> (verdict, thumbnail)}, oldest UID first (usually one
        # content per UID; more when a sender reuses a UID for other content)
        self._verdicts: dict[str, dict[str, tuple]] = {}
        self._verdicts_lock = threading.Lock()
        self.built = 0
        self._retry_s = self.RETRY_INITIAL_S
        self.maker = ResultMaker(workers)  # where the SR and overlay are built (worker processes)
        self.window = max(1, 2 * workers)  # jobs handed over at once: the workers never wait for this thread
        self._crashed: set[str] = set()  # journal entries being built when a worker died

    def keep_verdict(self, key: str, verdict, thumbnail_u8) -> None:
        """The verdict of a stored image under its journal entry's key (:func:`.journal.entry_key`: the SOP
        Instance UID and the digest of the bytes). The oldest UID's verdicts make room when verdicts of
        ``KEPT_VERDICTS`` UIDs are kept (they are derived again when their images are built)."""
        uid = split_key(key)[0]
        with self._verdicts_lock:
            contents = self._verdicts.pop(uid, {})  # inserted again below: now the newest
            if any(k != key for k in contents):
                log.warning(
                    "SOP Instance UID %s received with other content than before, before the results of the "
                    "first were built; each gets the results of its own content, under the same result UIDs",
                    uid,
                )
            contents[key] = (verdict, thumbnail_u8)
            while len(self._verdicts) >= self.KEPT_VERDICTS:
                self._verdicts.pop(next(iter(self._verdicts)))
            self._verdicts[uid] = contents

    def _take_verdict(self, job) -> tuple | None:
        """The kept (verdict, thumbnail) of ``job``'s entry, removed; None when none is kept."""
        with self._verdicts_lock:
            contents = self._verdicts.get(job.sop_instance_uid) or {}
            kept = contents.pop(job.key, None)
            if not contents:
                self._verdicts.pop(job.sop_instance_uid, None)
            return kept

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gamguard-results", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._idle.clear()  # news (an image stored, an association closed): idle again only after a pass
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.maker.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until the journal is empty (tests, demo, bench)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._pass()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the builder thread must outlive any one failure
                failures += 1  # e.g. a full disk: back off (1, 2, 4 ... 30 s), not once a second forever
                delay = min(30.0, 2.0 ** (failures - 1))
                log.error("results builder: error (%s); retrying in %.0f s", where_raised(exc), delay)
                self._stop.wait(delay)

    def _pass(self) -> None:
        """Build what is due, or wait (at most 1 s) for news: a stored image, an association closing.

        While associations are open the journal is listed once a second (for the backlog), not at every
        stored image: listing a growing folder costs CPU that the consoles' C-STOREs are waiting for."""
        now = time.monotonic()
        if self.is_busy() and now < self._next_listing:
            self._wake.wait(self._next_listing - now)
            self._wake.clear()
            return
        self._next_listing = now + 1.0
        in_flight = self.in_flight()  # before listing: an image handed over in between is then listed
        pending = self.journal.pending()
        if self.metrics is not None:
            self.metrics.results_pending.set(len(pending))
        if not pending:
            if not in_flight:
                self._idle.set()
        else:
            self._idle.clear()
            if not self.is_busy() or len(pending) >= self.backlog:
                self._build_all(pending)
                return
        self._wake.wait(1.0)
        self._wake.clear()

    def _build_all(self, pending: list[Path]) -> None:
        """Build ``pending`` in order, keeping the result workers busy: while up to :attr:`window` jobs
        are being built, this thread loads the next ones and queues the finished ones' results."""
        building: collections.deque = collections.deque()
        try:
            for path in pending:
                if self._stop.is_set() or (self.is_busy() and len(pending) < self.backlog):
                    break
                job = self._prepare(path)
                if job is None:  # the data plane cannot judge it now: later, with backoff
                    self._backoff()
                    return
                self._retry_s = self.RETRY_INITIAL_S
                if job is _FAILED:
                    continue
                # a job that was being built when a worker died is built alone: if a worker dies again
                # then, it is this job's doing, not one of the others'
                alone = path.name in self._crashed
                while building and (alone or len(building) >= self.window):
                    if not self._queue_results(*building.popleft()):
                        self._backoff()
                        return
                building.append((path, job, self._hand_over(job)))
                if alone and not self._queue_results(*building.popleft(), alone=True):
                    self._backoff()
                    return
        finally:
            while building:  # what was handed to the workers is finished and queued (or left for later)
                self._queue_results(*building.popleft())

    def _backoff(self) -> None:
        self._stop.wait(self._retry_s)
        self._retry_s = min(2 * self._retry_s, self.RETRY_MAX_S)

    def build(self, path: Path) -> bool:
        """Build and queue one job's results; False when its verdict cannot be derived now (the data
        plane busy, stopping or too slow) or its worker died: the job stays in the journal for a later
        pass."""
        job = self._prepare(path)
        if job is None:
            return False
        return job is _FAILED or self._queue_results(path, job, self._hand_over(job), alone=True)

    def _prepare(self, path: Path):
        """The job of ``path`` with its verdict and thumbnail (kept, or derived again through the data
        plane); None when the verdict cannot be derived now; :data:`_FAILED` when the job was moved to
        ``failed/``."""
        from gamguard.runtime.server.errors import DataPlaneError, InvalidRequest

        try:
            job = self.journal.load(path)
            kept = self._take_verdict(job)
            if kept is not None and entry_key(job.sop_instance_uid, job.source) != job.key:
                # the bytes are not the ones the key names (an entry edited on disk): never use a verdict
                # on other bytes than it was computed on
                log.warning(
                    "results of %s: the journal entry does not match its name; deriving its verdict again", path.stem
                )
                kept = None
            if kept is not None:
                job.verdict, job.thumbnail = kept
            else:  # received before a restart, more were waiting than kept, or its verification failed
                try:
                    job.verdict, job.thumbnail = self.reverify(job.source)
                except (DataPlaneError, concurrent.futures.TimeoutError) as exc:
                    if isinstance(exc, InvalidRequest):
                        raise
                    log.warning(
                        "results of %s wait: its verdict cannot be derived now (%s); retrying",
                        path.stem,
                        type(exc).__name__,
                    )
                    return None
            return job
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the others
            self._fail(path, exc)
            return _FAILED

    def _hand_over(self, job) -> concurrent.futures.Future:
        """The job's results, being built by the workers."""
        return self.maker.submit(job.source, job.verdict, job.thumbnail, self.model)

    def _queue_results(self, path: Path, job, building, *, alone: bool = False) -> bool:
        """Queue the results ``building`` gives for ``job`` (and the original, if configured) and take the
        job out of the journal. False when a worker died while it was being built: the job stays in the
        journal; when that happens again with the job built ``alone``, it is moved to ``failed/`` (one
        poisonous image cannot hold up the others, nor take them along)."""
        try:
            objects = building.result()
        except (ResultMakerClosed, concurrent.futures.CancelledError):  # the node is stopping: left for later
            return False
        except BrokenProcessPool as exc:
            if alone and path.name in self._crashed:
                self._crashed.discard(path.name)
                self._fail(path, exc)
                return True
            self._crashed.add(path.name)
            log.error("results of %s: a results worker died while they were built; trying again", path.stem)
            return False
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the others
            self._fail(path, exc)
            return True
        self._crashed.discard(path.name)
        forward_original = self.forward_originals == "all" or (
            self.forward_originals == "accepted" and job.verdict.accepted
        )
        if forward_original:
            objects.append(("original", job.sop_instance_uid, job.source))
        for kind, uid, data in objects:
            self.outbox.put(str(uid), data)
            if self.metrics is not None:
                self.metrics.results_built.labels(kind).inc()
        self.journal.done(path)
        self.built += 1
        if self.on_queued is not None:
            self.on_queued()
        return True

    def _fail(self, path: Path, exc: BaseException) -> None:
        """A job whose results cannot be built (a dataset highdicom refuses): moved to ``failed/``, counted."""
        private_folder(self.failed_dir)
        if path.exists():
            path.replace(self.failed_dir / path.name)
        # the exception's type only: its text can quote the header value it choked on (a birth date)
        log.error(
            "cannot build the results of %s (%s); job moved to %s",
            path.stem,
            where_raised(exc),
            self.failed_dir,
        )
        if self.metrics is not None:
            self.metrics.results_built.labels("failed").inc()


#: :meth:`ResultsBuilder._prepare`'s answer for a job moved to ``failed/``
_FAILED = object()


#: TCP connections pynetdicom accepts: per allowed association, and at least (connections that have not
#: associated yet, or whose peer is gone until pynetdicom notices, count there, not against
#: --max-associations)
CONNECTIONS_PER_ASSOCIATION, MIN_CONNECTIONS = 8, 64
#: seconds a new connection has to send its A-ASSOCIATE-RQ (consoles send it at once)
NEGOTIATION_TIMEOUT_S = 10.0


def quiet_dicom_logs(*, debugging: bool) -> None:
    """pynetdicom and highdicom log every PDU / copied module at INFO: a line or ten per image, and the log
    costs CPU on the C-STORE path. Our own log says what happened; theirs only on -v debug. pynetdicom's
    "standard" handlers format those lines for every PDU and DIMSE message whatever the log level
    (copying each received dataset once more): off too, unless debugging."""
    quiet_peer_closes(rate_limit=not debugging)  # a reset after a released association is a normal end
    if not debugging:
        from pynetdicom import _config as pynetdicom_config

        for name in ("pynetdicom", "highdicom"):
            logging.getLogger(name).setLevel(logging.WARNING)
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def configure_ae(cfg: DicomNodeConfig, sop_classes):
    """The node's pynetdicom AE: its AE title, limits, timeouts and the presentation contexts it accepts."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=cfg.ae_title)
    # the limit itself is the SCP's (associations, not connections); pynetdicom's counts connections
    ae.maximum_associations = max(MIN_CONNECTIONS, CONNECTIONS_PER_ASSOCIATION * cfg.max_associations)
    ae.maximum_pdu_size = cfg.max_pdu
    ae.dimse_timeout = ae.network_timeout = cfg.timeout_s
    # ARTIM: how long a connection may take to associate (or to finish a release); a connection that
    # says nothing is dropped after this, not after --timeout-s
    ae.acse_timeout = min(cfg.timeout_s, NEGOTIATION_TIMEOUT_S)
    syntaxes = decodable_transfer_syntaxes()
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, syntaxes)
    ae.add_supported_context(Verification)
    return ae


class DicomNode:
    def __init__(self, config: DicomNodeConfig, serve_config: ServeConfig, *, guard_factory=None):
        self.config = config
        self.serve_config = serve_config
        self.guard_factory = guard_factory
        self.grpc_server = None
        self.plane = None
        self.metrics = None
        self.audit = None
        self.dicom_metrics: DicomMetrics | None = None
        self.scp: StorageSCP | None = None
        self.builder: ResultsBuilder | None = None
        self.journal: Journal | None = None
        self.forwarders: list[Forwarder] = []
        self._server = None  # pynetdicom ThreadedAssociationServer
        self._own_plane = False
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def _load_plane(self):
        from gamguard.runtime.drift_monitor import DriftMonitor
        from gamguard.runtime.server.app import GuardServer, default_guard_factory, plane_config
        from gamguard.runtime.server.audit import AuditLog
        from gamguard.runtime.server.dataplane import DataPlane
        from gamguard.runtime.server.metrics import Metrics

        cfg = self.serve_config
        if self.config.grpc_port is not None:
            self.grpc_server = GuardServer(cfg, guard_factory=self.guard_factory)
            await self.grpc_server.start()
            await self.grpc_server.wait_ready()
            self.metrics, self.audit = self.grpc_server.metrics, self.grpc_server.audit
            self.metrics_port = self.grpc_server.metrics_port
            return self.grpc_server.state.plane
        self.metrics = Metrics()
        self.audit = AuditLog(cfg.audit_log) if cfg.audit_log else None
        factory = self.guard_factory or default_guard_factory(cfg)
        guard = await asyncio.get_running_loop().run_in_executor(None, factory)
        plane = DataPlane(
            guard,
            plane_config(cfg),
            metrics=self.metrics,
            audit=self.audit,
            drift=DriftMonitor.for_guard(guard),
        )
        self.metrics.watch_drift(plane.drift)
        await plane.start()
        try:
            await plane.self_test()
        except Exception:
            await plane.stop()
            raise
        self._own_plane = True
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host or "127.0.0.1")
        self.metrics.ready.set(1)
        return plane

    async def start(self) -> int:
        quiet_input_libraries()  # also without --grpc-port: pydicom's warnings would quote header values
        cfg = self.config
        allow = cfg.allow_list()
        tls = _tls_context(cfg)
        quiet_dicom_logs(debugging=logging.getLogger("gamguard").isEnabledFor(logging.DEBUG))
        self.plane = await self._load_plane()
        self.dicom_metrics = DicomMetrics(self.metrics.registry)
        guard = self.plane.guard
        model = ModelIdentity(
            self.plane.model_name, self.plane.model_version, self.plane.bundle_hash, tuple(self.plane.class_names)
        )
        queue = private_folder(Path(cfg.queue_dir))  # received images and results: patient data
        journal = self.journal = Journal(queue / "journal")
        destinations = cfg.destinations
        outbox = Outbox(queue / "outbox", [d.name for d in destinations])
        if not destinations:
            log.warning("no --forward destination: results are kept in %s", queue / "outbox" / "kept")
        forward_tls = _forward_tls_context(cfg)
        self.forwarders = [
            Forwarder(
                d,
                outbox,
                calling_ae=cfg.ae_title,
                tls=forward_tls,
                metrics=self.dicom_metrics,
                retry_initial_s=cfg.retry_initial_s,
                retry_max_s=cfg.retry_max_s,
                timeout_s=cfg.timeout_s,
            )
            for d in destinations
        ]
        for f in self.forwarders:
            f.start()
        sop_classes = storage_sop_classes(guard.manifest)
        loop = self._loop = asyncio.get_running_loop()
        receivers = default_receivers() if cfg.receivers is None else cfg.receivers
        shared = dict(
            sop_classes=sop_classes,
            plane=lambda: self.plane,
            loop=loop,
            journal=journal,
            metrics=self.dicom_metrics,
            audit=self.audit,
            on_stored=self._on_stored,
        )
        keep_verdict = lambda *kept: self.builder.keep_verdict(*kept)  # noqa: E731 - the builder comes next
        if receivers:  # associations in processes of their own (.receiver); started once the builder runs
            self.scp = ReceiverHub(receivers, cfg, keep_verdict=keep_verdict, **shared)
        else:
            self.scp = StorageSCP(
                ae_title=cfg.ae_title,
                allow_list=allow,
                on_verdict=keep_verdict,
                max_associations=cfg.max_associations,
                max_pdu=cfg.max_pdu,
                **shared,
            )
        self.builder = ResultsBuilder(
            journal,
            outbox,
            model,
            reverify=self._reverify,
            forward_originals=cfg.forward_originals,
            is_busy=lambda: self.scp.active_associations > 0,
            backlog=cfg.build_backlog,
            in_flight=lambda: self.scp.finishing,
            metrics=self.dicom_metrics,
            on_queued=self._on_queued,
            workers=default_workers() if cfg.result_workers is None else cfg.result_workers,
        )
        leftover = len(journal)
        if leftover:
            log.info("journal holds %d image(s) from a previous run: building their results", leftover)
        self.builder.start()

        if receivers:
            self.port = await asyncio.get_running_loop().run_in_executor(None, self.scp.start)
        else:
            ae = self._ae = configure_ae(cfg, sop_classes)
            self._server = ae.start_server(
                (cfg.host, cfg.port), block=False, evt_handlers=self.scp.handlers(), ssl_context=tls
            )
            self.port = int(self._server.server_address[1])
        log.info(
            "DICOM node %s listening on %s:%d (%s, %s); allowed: %s; storage: %s; forwarding to: %s",
            cfg.ae_title,
            cfg.host,
            self.port,
            "TLS" if tls else "plaintext",
            f"{receivers} receiver processes" if receivers else "associations in the node's process",
            allow.describe(),
            ", ".join(sorted(sop_classes.values())),
            (", ".join(map(str, destinations)) + (" over DICOM TLS" if cfg.forward_tls_ca else " in plaintext"))
            if destinations
            else "nobody (kept)",
        )
        return self.port

    def _reverify(self, data: bytes):
        from .journal import thumbnail

        result = asyncio.run_coroutine_threadsafe(
            self.plane.verify(data=data, protocol="dicom", request_id=f"journal-{uuid.uuid4().hex}"), self._loop
        ).result(300)
        return result.verdict, thumbnail(result.decoded.pixels)

    def _on_stored(self) -> None:
        if self.builder is not None:
            self.builder.wake()

    def _on_queued(self) -> None:
        for f in self.forwarders:
            f.wake()

    def wait_results_built(self, timeout: float | None = None) -> bool:
        return self.builder.wait_idle(timeout) if self.builder else True

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._server is not None or isinstance(self.scp, ReceiverHub):
            # turn new associations away, let open ones finish (the console gets its answers), then close
            self.scp.draining = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace_s
            while (self.scp.active_associations or self.scp.finishing) and loop.time() < deadline:
                await asyncio.sleep(0.05)  # answered images still waiting for their verdicts included
            if self._server is not None:
                self._server.shutdown()  # aborts what is still open after the grace period
                self._server = None
                self.scp.close()
            else:  # the receivers abort what is still open, and end
                await loop.run_in_executor(None, self.scp.close)
        if self.builder is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.builder.stop, grace_s)
        if self.journal is not None:
            self.journal.close()
        for f in self.forwarders:
            await asyncio.get_running_loop().run_in_executor(None, f.stop, grace_s)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=grace_s)
        elif self._own_plane and self.plane is not None:
            await self.plane.stop()
            self.metrics.close()
            if self.audit is not None:
                self.audit.close()


class BackgroundNode:
    """A :class:`DicomNode` on a background thread's event loop, for synchronous code (demo, bench, tests)::

    with BackgroundNode(DicomNodeConfig(port=0, allow_any_ae=True), ServeConfig(insecure=True)) as node:
        node.port   # listening; send with storescu / pynetdicom
    """

    def __init__(self, config: DicomNodeConfig, serve_config: ServeConfig, *, guard_factory=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="gamguard-dicom-loop")
        self.thread.start()
        self.node = DicomNode(config, serve_config, guard_factory=guard_factory)

    def call(self, coro, timeout: float | None = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return int(self.node.port)

    def start(self) -> "BackgroundNode":
        try:
            self.call(self.node.start())
        except BaseException:
            self.stop(grace_s=0)
            raise
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        try:
            self.call(self.node.stop(grace_s), timeout=grace_s + 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def __enter__(self) -> "BackgroundNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
