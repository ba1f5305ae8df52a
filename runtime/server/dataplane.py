"""The transport-agnostic data plane: decode → preprocess → micro-batch → guard → verdict.

The gRPC servicers (``grpc_guard``, ``grpc_inference``) are thin adapters over :class:`DataPlane`;
nothing here knows about gRPC, so the same path serves any transport (and the tests can drive it
directly). Errors are typed (:mod:`~gamguard.runtime.server.errors`) and each adapter maps them to its
protocol's status codes.

Batching (:class:`~gamguard.runtime.server.batching.MicroBatcher`): the data plane only waits for
company while more requests are on their way: being decoded, or expected because that many were in
flight together recently (clients served by one batch come back at staggered times, so without this
gRPC batches stay much smaller than the concurrency); a lone request goes to the engine at once
instead of paying the delay for company that is not coming.

Admission before decoding (:mod:`.admission`): a request's encoded bytes and its decoder's working
memory (estimated from the image header) are claimed from one budget (``decode_memory_bytes``); at
most ``max_queue_size`` requests wait for or sit in the decode stage; one image may need at most
``max_decode_bytes``. Beyond: :class:`Overloaded` (retry later) or, for what can never fit,
:class:`InvalidRequest` naming the limit. Every request ends with one audit line, refused ones too.

Rejected verdicts leave the data plane without anything specific to the model's top class (the
per-class thresholds and the reference heatmap identify it) unless ``reveal_rejected_details``.

Fail closed: whatever goes wrong after decoding (an exception escaping the guard, a wrong number of
verdicts) turns into rejections with reason ``GUARD_ERROR`` — never into a label.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gamguard.runtime.decode import header_decode_cost, png_size

from .admission import BudgetExceeded, Claim, MemoryBudget
from .batching import MicroBatcher
from .errors import DataPlaneError, DeadlineExpired, InvalidRequest, NotReady, Overloaded
from .quietlog import log_limited
from .statistics import InferenceStatistics

# Triton's statistics count requests, not images: a request of several images (verify_many) counts once,
# so the verify calls of its images leave the statistics to it (metrics and audit stay per image).
_COUNTED_BY_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("counted_by_request", default=False)

log = logging.getLogger(__name__)

# the status name each refusal is audited with (status.py maps the same classes to gRPC codes)
REFUSAL_STATUS = {Overloaded: "RESOURCE_EXHAUSTED", DeadlineExpired: "DEADLINE_EXCEEDED", NotReady: "UNAVAILABLE"}


# ------------------------------------------------------------------------------------------ results


@dataclass
class Result:
    """One verdict plus what the transport needs around it (identity, input facts, timings)."""

    verdict: Any  # gamguard.runtime.guard.Verdict
    request_id: str
    input_format: str
    bit_depth: int
    sop_instance_uid: str | None
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 1
    decoded: Any = None  # the DecodedImage, for transports that render the input (the DICOM node's overlay)

    @functools.cached_property  # read by the metrics, the audit and the transports: built once
    def stages_ms(self) -> dict[str, float]:
        out = {k: float(v) for k, v in (self.verdict.timings_ms or {}).items()}
        out["decode"] = self.decode_ms
        out["queue"] = self.queue_ms
        return out


@dataclass(frozen=True)
class Prepared:
    """An input already decoded and preprocessed by :meth:`DataPlane.decode_here`, for ``verify(prepared=)``."""

    decoded: Any
    x: np.ndarray
    decode_ms: float


class Decoder:
    """The decode stage: an encoded image (or a tensor) to the model input, under the per-request limits
    (``max_pixels``, ``max_decode_bytes``) and a memory budget for what is being decoded at once
    (``decode_memory_bytes``). The data plane has one; a DICOM receiver process
    (:mod:`gamguard.runtime.dicomnode.receiver`) has its own, with the data plane's configuration and input
    spec."""

    def __init__(self, config: "DataPlaneConfig", spec):
        self.config = config
        self.spec = spec
        self.budget = MemoryBudget(config.decode_memory_bytes)

    def admit(self, data: bytes | None, array: np.ndarray | None, claim: Claim) -> None:
        """Before decoding: the input's size within the limits, its bytes in the budget."""
        cost = header_decode_cost(data) if data is not None else None
        if cost is not None and cost > self.config.max_decode_bytes:  # refused before it queues for a decoder
            raise InvalidRequest(
                f"the image needs about {-(-cost >> 20)} MiB to decode, above the per-request limit of "
                f"{self.config.max_decode_bytes >> 20} MiB (--max-decode-mb; refused before decoding)"
            )
        size = len(data) if data is not None else int(np.asarray(array).nbytes)
        if size + min(self.config.max_decode_bytes, self.budget.limit // 2) > self.budget.limit:
            raise InvalidRequest(
                f"the input is {size:,} bytes: too large to decode within the server's decode "
                f"memory limit of {self.budget.limit >> 20} MiB (--decode-memory-mb)"
            )
        try:
            claim.take(size, "the encoded input", wait=False)
        except BudgetExceeded as exc:
            raise Overloaded(str(exc)) from None

    def decode(
        self,
        data: bytes | None,
        array: np.ndarray | None,
        frame: int | None,
        claim: Claim,
        inline: bool = False,
        on_decodable: Callable[[], None] | None = None,
    ):
        """Decode + preprocess, claiming the decode's memory from the budget first (``inline``: the caller
        never waits for memory, e.g. the event loop). Returns (decoded, model_input, ms).
        ``on_decodable()``: called once this is known to succeed, before the pixels are decoded, where that
        can be known (:func:`gamguard.runtime.decode.decode_bytes`); it must not raise."""
        from gamguard.runtime.decode import decode_bytes, decode_tensor
        from gamguard.runtime.preprocess import InvalidInput, accepts_size, preprocess

        def reserve(nbytes: int) -> None:  # the event loop never waits for memory; a worker may, briefly
            claim.take(nbytes, wait=not inline)

        def decodable(height: int, width: int) -> None:  # ... and preprocess takes that size
            if accepts_size(height, width):
                on_decodable()

        t0 = time.perf_counter()
        limits = dict(max_pixels=self.config.max_pixels, max_decode_bytes=self.config.max_decode_bytes, reserve=reserve)
        try:
            if data is not None:
                decoded = decode_bytes(data, frame=frame, on_decodable=on_decodable and decodable, **limits)
            else:
                decoded = decode_tensor(array, **limits)
            x = preprocess(decoded.pixels, self.spec)
        except BudgetExceeded as exc:
            raise Overloaded(str(exc)) from None
        except InvalidInput as exc:
            raise InvalidRequest(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a decoder crash on hostile bytes is the caller's bad input
            # only the type: a library's message can quote the input (e.g. DICOM attribute values)
            log_limited(
                log, "decoder-raised", "decoder raised %s on a request; answering INVALID_ARGUMENT", type(exc).__name__
            )
            raise InvalidRequest(f"cannot decode the input ({type(exc).__name__})") from None
        return decoded, x, (time.perf_counter() - t0) * 1000.0

    def decode_here(self, data: bytes, *, frame: int | None = None, on_decodable=None) -> "Prepared":
        """:meth:`decode` in the calling thread, for ``DataPlane.verify(prepared=...)``."""
        claim = Claim(self.budget)
        try:
            self.admit(data, None, claim)
            decoded, x, decode_ms = self.decode(data, None, frame, claim, on_decodable=on_decodable)
        finally:
            claim.release()  # the decoded image is now a small model input
        return Prepared(decoded, x, decode_ms)


@dataclass
class DataPlaneConfig:
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 64
    max_pixels: int = 64_000_000
    decode_workers: int = 2
    max_decode_bytes: int = 768 << 20  # one image's decode (estimated from its header)
    decode_memory_bytes: int = 768 << 20  # all requests in the decode stage: encoded bytes + decode memory
    reveal_rejected_details: bool = False  # debug only: class-specific thresholds/reference map when rejected
    # A small image arriving while no other request is in the data plane is decoded on the event loop
    # itself: for it the two thread hops (to a decode worker and back) cost about as much as the
    # decode and add wake-up latency to the one request that is waiting. Under concurrency the pool
    # decodes (in parallel with the engine, the loop stays free to take requests in). Only inputs whose
    # size is known before decoding qualify (PNG by its IHDR, tensors by their shape); anything
    # larger, and every JPEG/DICOM, goes to the decode pool so a big file never stalls the loop.
    inline_decode_max_pixels: int = 512 * 512


def small_enough_to_decode_inline(data: bytes | None, array: np.ndarray | None, max_pixels: int) -> bool:
    """Whether an input is known, *before* decoding, to have at most ``max_pixels`` pixels: a PNG by
    the size in its IHDR chunk, a tensor by its shape. Everything else: False (decode in the pool)."""
    if max_pixels <= 0:
        return False
    if array is not None:
        return int(np.size(array)) <= max_pixels
    size = png_size(data) if data is not None else None
    return size is not None and size[0] * size[1] <= max_pixels


def new_request_id() -> str:
    return uuid.uuid4().hex


def guard_error_verdicts(n: int, detail: str) -> list:
    """``n`` fail-closed rejections (no label, no probabilities) with reason GUARD_ERROR."""
    from gamguard.runtime.guard import Verdict

    return [Verdict.rejected("GUARD_ERROR", detail) for _ in range(n)]


def _is_sane_verdict(v) -> bool:
    """A verdict we may serve: accepted ones must carry a label; rejected ones must not."""
    if getattr(v, "accepted", None) is True:
        return v.label is not None and not v.reasons
    if getattr(v, "accepted", None) is False:
        return bool(v.reasons)
    return False


def run_guard_batch(guard, batch: np.ndarray) -> list:
    """``guard.verify_tensor`` with the data plane's own fail-closed net around it.

    ``Guard.verify_tensor`` promises never to raise; this still turns any exception, a wrong verdict
    count or an inconsistent verdict into GUARD_ERROR rejections, so no code path of the server can
    hand out a label the guard did not approve.
    """
    n = int(batch.shape[0])
    try:
        verdicts = list(guard.verify_tensor(batch))
    except Exception as exc:  # noqa: BLE001 - fail closed on anything
        log.exception("guard.verify_tensor raised; rejecting the batch of %d", n)
        return guard_error_verdicts(n, f"guard failed: {type(exc).__name__}: {exc}")
    if len(verdicts) != n:
        log.error("guard returned %d verdicts for %d inputs; rejecting the batch", len(verdicts), n)
        return guard_error_verdicts(n, f"guard returned {len(verdicts)} verdicts for {n} inputs")
    return [
        v if _is_sane_verdict(v) else guard_error_verdicts(1, "inconsistent verdict from the guard")[0]
        for v in verdicts
    ]


# ------------------------------------------------------------------------------------- data plane


class DataPlane:
    """One loaded guard behind a micro-batcher, with decoding, metrics and audit around it.

    ``guard``: a :class:`gamguard.runtime.guard.Guard` (or anything with ``spec`` and
    ``verify_tensor``). ``metrics``: :class:`gamguard.runtime.server.metrics.Metrics` or None.
    ``audit``: :class:`gamguard.runtime.server.audit.AuditLog` or None. ``drift``:
    :class:`gamguard.runtime.drift_monitor.DriftMonitor` or None, fed every verdict.
    """

    COMPANY_MEMORY_S = 1.0

    def __init__(self, guard, config: DataPlaneConfig | None = None, *, metrics=None, audit=None, drift=None):
        self.guard = guard
        self.config = config or DataPlaneConfig()
        self.metrics = metrics
        self.audit = audit
        self.drift = drift
        # absolute, once: `gamguard drift` finds the bundle again from the audit log
        self._bundle_dir = str(Path(guard.bundle_dir).resolve()) if hasattr(guard, "bundle_dir") else None
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max(1, int(self.config.decode_workers)), thread_name_prefix="gamguard-decode"
        )
        self.statistics = InferenceStatistics()
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=self.config.max_batch_size,
            max_queue_delay_s=self.config.max_queue_delay_ms / 1000.0,
            max_queue_size=self.config.max_queue_size,
            on_batch=metrics.observe_batch if metrics else None,
            on_depth=metrics.set_queue_depth if metrics else None,
            arriving=lambda: self._decoding,
            expected=self._expected_company,
            on_stacked=self.statistics.observe_stacking,
        )
        self.decoder = Decoder(self.config, guard.spec)
        self.decode_budget = self.decoder.budget
        self._active = 0  # requests inside verify()
        self._peak_active = 0  # most of them at once since the batcher last asked ...
        self._peak_since = time.monotonic()  # ... which was then
        self._decoding = 0  # requests between arrival and the batcher (being decoded)
        self._stopped = False

    def _run_batch(self, xs: np.ndarray) -> list:
        """The batcher's engine call (in its worker thread): the fail-closed guard call, counted."""
        verdicts = run_guard_batch(self.guard, xs)
        timed = next((v.timings_ms for v in verdicts if v.timings_ms and "engine" in v.timings_ms), None)
        if timed is not None:  # a batch the guard failed on as a whole has no timings: not an execution
            self.statistics.observe_execution(len(verdicts), timed["engine"], timed.get("guard", 0.0))
        return verdicts

    # -- identity --------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return str(self.guard.manifest.get("model", {}).get("name", "gamguard"))

    @property
    def model_version(self) -> str:
        return str(self.guard.manifest.get("model", {}).get("version", "1"))

    @property
    def bundle_hash(self) -> str:
        return str(self.guard.bundle_hash)

    @property
    def class_names(self) -> list[str]:
        return list(self.guard.class_names)

    @property
    def real_class_names(self) -> list[str]:
        """Class names without the garbage class (the labels a caller can receive)."""
        garbage = int(self.guard.manifest.get("garbage_class", -1))
        return [n for i, n in enumerate(self.guard.class_names) if i != garbage]

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        self._stopped = True  # new requests: NotReady; the ones already inside finish
        await self.batcher.stop()
        self._decode_pool.shutdown(wait=True)

    async def self_test(self) -> None:
        """One real inference through the whole path (preprocess → engine → guard) before serving.

        The input is a smooth synthetic gradient; whether the guard accepts it does not matter, but it
        must produce a well-formed verdict with a Grad-CAM map and no GUARD_ERROR.
        """
        from gamguard.runtime.preprocess import preprocess

        spec = self.guard.spec
        yy, xx = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)
        image = (0.25 + 0.5 * (xx + yy) / float(spec.height + spec.width)).astype(np.float32)
        x = preprocess(image, spec)[None]
        loop = asyncio.get_running_loop()
        verdicts = await loop.run_in_executor(None, run_guard_batch, self.guard, x)
        v = verdicts[0]
        if "GUARD_ERROR" in v.reasons:
            raise RuntimeError(f"self-test inference failed: {v.detail or 'GUARD_ERROR'}")
        if v.cam is None or tuple(np.shape(v.cam)) != (spec.height, spec.width):
            raise RuntimeError(
                f"self-test: Grad-CAM map has shape {np.shape(v.cam)}, expected {(spec.height, spec.width)}"
            )
        log.info(
            "self-test passed (%s, %.1f ms)",
            "accepted" if v.accepted else "rejected: " + ",".join(v.reasons),
            sum((v.timings_ms or {}).values()),
        )

    # -- requests --------------------------------------------------------------------------------

    def decode_here(self, data: bytes, *, frame: int | None = None, on_decodable=None) -> Prepared:
        """Decode and preprocess ``data`` in the calling thread, under the same limits and memory budget as
        :meth:`verify`'s decode stage, for ``verify(prepared=...)``. For a caller that already has a thread
        of its own per request and would only wait in it (a DICOM association waits for its image to be
        admitted before it answers): no hop to the event loop and a decode worker and back. Raises
        :class:`InvalidRequest` or :class:`Overloaded`, which the caller records (``record_invalid``,
        ``record_refused``): nothing has reached the data plane yet. ``on_decodable()``: called once the
        decode is known to succeed, before it decodes the pixels, where that can be known
        (:meth:`Decoder.decode`): a DICOM node answers the C-STORE then."""
        if self._stopped:
            raise NotReady("the model is being unloaded or the server is draining")
        self._check_decode_room()
        return self.decoder.decode_here(data, frame=frame, on_decodable=on_decodable)

    def has_room(self) -> bool:
        """Whether an input admitted now, before its decode, will find room in the engine's queue once
        decoded: the plane is not stopping and at most half the queue is taken (the other half is the
        margin for what comes in meanwhile). A DICOM node answers a C-STORE before the decode only then."""
        return not self._stopped and self.batcher.depth <= self.config.max_queue_size // 2

    async def verify(
        self,
        *,
        data: bytes | None = None,
        array: np.ndarray | None = None,
        prepared: Prepared | None = None,
        frame: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        protocol: str = "guard",
        on_admitted: Callable[[], None] | None = None,
    ) -> Result:
        """Verify one input (encoded ``data``, a numeric ``array``, or one :meth:`decode_here` ``prepared``).
        Raises a :class:`~gamguard.runtime.server.errors.DataPlaneError`.

        ``on_admitted``: called (in the event loop) once the input is decoded and queued for the engine,
        i.e. once every refusal that does not depend on the model — undecodable, too large, queue full,
        not ready — is behind it. A caller that answers before the verdict (the DICOM node) waits for it."""
        if sum(v is not None for v in (data, array, prepared)) != 1:
            raise InvalidRequest("exactly one of an encoded image or a tensor is required")
        if self._stopped:
            raise NotReady("the model is being unloaded or the server is draining")
        request_id = request_id or new_request_id()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._active += 1
        if self._active > self._peak_active:
            self._peak_active = self._active
        try:
            return await self._verify(
                data, array, prepared, frame, request_id, timeout_s, protocol, loop, t0, on_admitted
            )
        except (Overloaded, DeadlineExpired, NotReady):  # invalid inputs are counted by record_invalid
            if not _COUNTED_BY_REQUEST.get():
                self.statistics.observe_failure((time.perf_counter() - t0) * 1000.0)
            raise
        finally:
            self._active -= 1

    def _expected_company(self) -> int:
        """The batcher's ``expected()``: the most requests that were inside :meth:`verify` at once since
        it last asked (clients served together tend to come back together), then a new window starts.
        A window older than ``COMPANY_MEMORY_S`` is stale (a burst long ago says nothing about now)."""
        now = time.monotonic()
        fresh = now - self._peak_since <= self.COMPANY_MEMORY_S
        peak = self._peak_active if fresh else self._active
        self._peak_active, self._peak_since = self._active, now
        return peak

    def _admit(self, data: bytes | None, array: np.ndarray | None, claim: Claim) -> None:
        """Before decoding: room in the decode stage, and the encoded input's bytes in the budget."""
        self._check_decode_room()
        self.decoder.admit(data, array, claim)

    def _check_decode_room(self) -> None:
        if self._decoding >= self.config.max_queue_size:
            raise Overloaded(
                f"decode queue full ({self._decoding} requests waiting to be decoded); retry later "
                "or raise --max-queue-size"
            )

    async def _admit_and_decode(self, data, array, frame, loop):
        """(decoded, model input, decode ms) of an encoded ``data`` or an ``array``, under the memory budget."""
        claim = Claim(self.decode_budget)
        try:
            self._admit(data, array, claim)
            # inline only for a request alone in the data plane: under concurrency the pool decodes
            # in parallel with the engine while the event loop keeps taking requests in
            if self._active <= 1 and small_enough_to_decode_inline(data, array, self.config.inline_decode_max_pixels):
                return self.decoder.decode(data, array, frame, claim, True)
            self._decoding += 1
            try:
                return await loop.run_in_executor(self._decode_pool, self.decoder.decode, data, array, frame, claim)
            finally:
                self._decoding -= 1
        finally:
            claim.release()  # the decoded image is now a small model input

    async def _verify(
        self, data, array, prepared, frame, request_id, timeout_s, protocol, loop, t0, on_admitted
    ) -> Result:
        deadline = loop.time() + timeout_s if timeout_s is not None else None
        try:
            if prepared is not None:
                decoded, x, decode_ms = prepared.decoded, prepared.x, prepared.decode_ms
            else:
                decoded, x, decode_ms = await self._admit_and_decode(data, array, frame, loop)
            queued = self.batcher.enqueue(x, deadline=deadline)
            if on_admitted is not None:
                on_admitted()
            verdict, batch_size, queued_s = await queued
        except InvalidRequest as exc:
            self.record_invalid(request_id, protocol, str(exc), elapsed_ms=(time.perf_counter() - t0) * 1000.0)
            raise
        except DataPlaneError as exc:
            self.record_refused(request_id, protocol, exc)
            raise
        except asyncio.CancelledError:  # the client went away (or its deadline passed) mid-request
            self._audit_refusal(
                request_id, protocol, "CANCELLED", "the call was cancelled by the client before its verdict"
            )
            raise
        if not verdict.accepted and not self.config.reveal_rejected_details:
            verdict = verdict.without_class_details()
        result = Result(
            verdict=verdict,
            request_id=request_id,
            input_format=decoded.format,
            bit_depth=int(decoded.bit_depth),
            sop_instance_uid=decoded.sop_instance_uid,
            decode_ms=decode_ms,
            queue_ms=queued_s * 1000.0,
            total_ms=(time.perf_counter() - t0) * 1000.0,
            batch_size=batch_size,
            decoded=decoded,
        )
        self._record(result, protocol)
        return result

    async def verify_many(
        self,
        inputs: Sequence[dict],
        *,
        timeout_s: float | None = None,
        protocol: str = "inference",
        request_id: str | None = None,
    ) -> list[Result]:
        """Several inputs of one request (e.g. an OIP batch), verified concurrently so they batch.

        Any invalid input fails the whole request (:class:`InvalidRequest` naming the item).
        """
        base = request_id or new_request_id()
        limit = self.max_images_per_request
        if len(inputs) > limit:
            message = (
                f"{len(inputs)} images in one request; at most {limit} fit in the server's queue "
                "(--max-queue-size): split the request"
            )
            self.record_invalid(base, protocol, message)
            raise InvalidRequest(message)

        async def one(i: int, inp: dict) -> Result:
            rid = base if len(inputs) == 1 else f"{base}/{i}"
            try:
                return await self.verify(**inp, timeout_s=timeout_s, protocol=protocol, request_id=rid)
            except InvalidRequest as exc:
                if len(inputs) == 1:
                    raise
                raise InvalidRequest(f"input {i}: {exc}") from None

        t0 = time.perf_counter()
        several = len(inputs) > 1
        token = _COUNTED_BY_REQUEST.set(several)  # the tasks below copy the context as it is now
        try:
            tasks = [asyncio.ensure_future(one(i, inp)) for i, inp in enumerate(inputs)]
        finally:
            _COUNTED_BY_REQUEST.reset(token)
        try:
            results = list(await asyncio.gather(*tasks))
        except DataPlaneError:
            if several:
                self.statistics.observe_failure((time.perf_counter() - t0) * 1000.0)
            raise
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
        if several:
            self._observe_request(results, (time.perf_counter() - t0) * 1000.0)
        return results

    def _observe_request(self, results: list[Result], total_ms: float) -> None:
        """One answered request in the Triton statistics. Its images may ride in different engine calls
        and their stages overlap, so the request's stage times are those of the image that finished last
        (the one its answer waited for): they add up to no more than the request's time, which is what
        perf_analyzer assumes when it reports the server's share of the latency."""
        last = max(results, key=lambda r: r.total_ms)
        timings = last.verdict.timings_ms or {}
        self.statistics.observe_request(
            images=len(results),
            total_ms=total_ms,
            queue_ms=last.queue_ms,
            input_ms=last.decode_ms,
            infer_ms=timings.get("engine", 0.0),
            output_ms=timings.get("guard", 0.0),
        )

    @property
    def max_images_per_request(self) -> int:
        """Most images one request may carry: all of them must fit in the queue at once."""
        return int(min(self.config.max_queue_size, self.batcher.max_queue_size))

    # -- bookkeeping -------------------------------------------------------------------------------

    def _record(self, result: Result, protocol: str) -> None:
        if not _COUNTED_BY_REQUEST.get():
            self._observe_request([result], result.total_ms)
        if self.metrics is not None:
            self.metrics.observe_result(result)
        if self.drift is not None:
            self.drift.observe(result.verdict.reasons, result.verdict.scores)
        if self.audit is not None:
            self.audit.record_verdict(
                result,
                protocol=protocol,
                model=self.model_name,
                version=self.model_version,
                bundle_hash=self.bundle_hash,
                policy=getattr(self.guard, "policy", None),
                checks=getattr(self.guard, "enforced_checks", None),
                bundle_dir=self._bundle_dir,
            )

    def _audit_refusal(self, request_id: str, protocol: str, status: str, detail: str) -> None:
        if self.audit is not None:
            self.audit.record_refused(
                request_id,
                protocol=protocol,
                model=self.model_name,
                version=self.model_version,
                bundle_hash=self.bundle_hash,
                status=status,
                detail=detail,
            )

    def record_refused(self, request_id: str, protocol: str, exc: DataPlaneError) -> None:
        """Audit one request refused for a reason other than its input (overload, deadline, draining)."""
        self._audit_refusal(request_id, protocol, REFUSAL_STATUS.get(type(exc), "INTERNAL"), str(exc))

    def record_error(self, request_id: str, protocol: str, detail: str) -> None:
        """Audit one request that ended in an internal error (status INTERNAL)."""
        self._audit_refusal(request_id, protocol, "INTERNAL", detail)

    def record_invalid(self, request_id: str, protocol: str, message: str, *, elapsed_ms: float = 0.0) -> None:
        """Count and audit one invalid input; also called by the protocol adapters for inputs they
        refuse while parsing the request, before :meth:`verify` sees them."""
        if not _COUNTED_BY_REQUEST.get():
            self.statistics.observe_failure(elapsed_ms)
        if self.metrics is not None:
            self.metrics.observe_invalid()
        if self.audit is not None:
            self.audit.record_invalid(
                request_id,
                protocol=protocol,
                model=self.model_name,
                version=self.model_version,
                bundle_hash=self.bundle_hash,
                detail=message,
            )
