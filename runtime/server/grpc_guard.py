"""``gamguard.v1.Guard``: a thin gRPC adapter over :class:`~gamguard.runtime.server.dataplane.DataPlane`.

Status codes: bad input (also a malformed message, see :mod:`.wire`) → INVALID_ARGUMENT; server busy
(queue or decode memory full) → RESOURCE_EXHAUSTED; not loaded yet or draining → UNAVAILABLE; deadline
passed while queued → DEADLINE_EXCEEDED; anything unexpected → INTERNAL (never the exception's text).
In ``VerifyStream`` one item never ends the stream: a bad image (or malformed item) gets a rejection
with reason INVALID_INPUT, an item the server could not take (busy, deadline) a rejection with reason
GUARD_ERROR whose ``detail`` starts with the status name (e.g. ``RESOURCE_EXHAUSTED: ...``).
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import numpy as np

from gamguard.proto import guard_pb2, guard_pb2_grpc

from .codecs import heatmap_png, tensor_to_array
from .dataplane import Result, new_request_id
from .errors import DataPlaneError, InvalidRequest
from .status import request_timeout, status_for
from .wire import Malformed, client_request_id, internal_error

log = logging.getLogger(__name__)


def request_input(req: guard_pb2.VerifyRequest) -> dict:
    which = req.WhichOneof("input")
    frame = int(req.frame) if req.HasField("frame") else None
    if which == "image":
        return {"data": bytes(req.image), "frame": frame}
    if which == "tensor":
        return {"array": tensor_to_array(req.tensor)}
    raise InvalidRequest("the request carries no input: set 'image' (encoded bytes) or 'tensor'")


def _model_ref(plane) -> guard_pb2.ModelRef:
    """The plane's ``ModelRef``, built once per plane (it is the same for every verdict it serves)."""
    ref = getattr(plane, "_grpc_model_ref", None)
    if ref is None:
        ref = guard_pb2.ModelRef(name=plane.model_name, version=plane.model_version, bundle_hash=plane.bundle_hash)
        try:
            plane._grpc_model_ref = ref
        except AttributeError:  # a plane-like object without a __dict__: build it every time
            pass
    return ref


def verdict_message(
    res: Result, plane, *, heatmap_png_wanted: bool = False, heatmap_values_wanted: bool = False
) -> guard_pb2.Verdict:
    # Built in one constructor call (maps from dicts, sub-messages from kwargs): field-by-field
    # assignment costs a Python -> upb round trip per field, on the event loop, for every request.
    v = res.verdict
    stages = res.stages_ms
    msg = guard_pb2.Verdict(
        request_id=res.request_id,
        decision=guard_pb2.ACCEPTED if v.accepted else guard_pb2.REJECTED,
        accepted=bool(v.accepted),
        reasons=list(v.reasons or []),
        failed_measures=list(v.failed_measures or []),
        detail=v.detail or "",
        input_format=res.input_format or "",
        bit_depth=int(res.bit_depth or 0),
        sop_instance_uid=res.sop_instance_uid or "",
        model=_model_ref(plane),
        scores={str(k): float(s) for k, s in (v.scores or {}).items()},
        thresholds={str(k): float(s) for k, s in (v.thresholds or {}).items()},
        timing=guard_pb2.Timing(
            decode_ms=res.decode_ms,
            queue_ms=res.queue_ms,
            engine_ms=float(stages.get("engine", 0.0)),
            guard_ms=float(stages.get("guard", 0.0)),
            total_ms=res.total_ms,
            batch_size=int(res.batch_size),
            stages_ms={k: float(ms) for k, ms in stages.items()},
        ),
    )
    # The label leaves the server only for accepted inputs (fail closed on anything else).
    if v.accepted and v.label is not None:
        msg.prediction.label = str(v.label)
        msg.prediction.index = int(v.label_index if v.label_index is not None else -1)
        for k, p in (v.probabilities or {}).items():
            msg.prediction.probabilities[str(k)] = float(p)
    # Heatmaps only when asked for: they are the largest part of a verdict by far, and a guarded engine
    # leaves them to be computed when read (Verdict.cam): asked first, so that nobody else pays for them.
    if (heatmap_png_wanted or heatmap_values_wanted) and v.cam is not None:
        cam = np.asarray(v.cam, np.float32)
        msg.heatmap.height, msg.heatmap.width = int(cam.shape[0]), int(cam.shape[1])
        if heatmap_values_wanted:
            msg.heatmap.values.extend(cam.ravel().tolist())
            ref = getattr(v, "reference_cam", None)
            if ref is not None:
                msg.heatmap.reference_values.extend(np.asarray(ref, np.float32).ravel().tolist())
        if heatmap_png_wanted:
            msg.heatmap.png = heatmap_png(cam)
    return msg


def invalid_verdict(request_id: str, plane, message: str, reason: str = "INVALID_INPUT") -> guard_pb2.Verdict:
    """The in-stream answer to an item without a verdict: a rejection with ``reason``, no scores."""
    return guard_pb2.Verdict(
        request_id=request_id,
        decision=guard_pb2.REJECTED,
        accepted=False,
        reasons=[reason],
        detail=message,
        model=_model_ref(plane),
    )


def model_info_message(plane) -> guard_pb2.ModelInfo:
    guard = plane.guard
    info = guard.info() if hasattr(guard, "info") else {}
    info = {k: v for k, v in info.items() if k != "bundle_dir"}  # the server's filesystem is nobody's business
    manifest = guard.manifest
    spec = guard.spec
    cal = manifest.get("calibration") or {}
    msg = guard_pb2.ModelInfo(
        model=_model_ref(plane),
        class_names=list(guard.class_names),
        garbage_class=int(manifest.get("garbage_class", -1)),
        input=guard_pb2.InputSpec(
            channels=spec.channels,
            height=spec.height,
            width=spec.width,
            mean=list(spec.mean),
            std=list(spec.std),
            resize=spec.resize,
            photometric=spec.photometric,
        ),
        policy=str(info.get("policy") or (manifest.get("guard") or {}).get("policy") or ""),
        enforced_checks=[
            str(c) for c in (info.get("enforced_checks") or (manifest.get("guard") or {}).get("enforced_checks") or [])
        ],
        info_json=json.dumps(info, default=str, sort_keys=True),
    )
    for name, digest in (manifest.get("files") or {}).items():
        msg.file_hashes[name] = str(digest)
    engine = info.get("engine")
    if isinstance(engine, dict):
        msg.engine = str(engine.get("engine") or engine.get("name") or "")
        msg.providers.extend(str(p) for p in engine.get("providers") or [])
    elif engine:
        msg.engine = str(engine)
        msg.providers.extend(str(p) for p in info.get("providers") or [])
    msg.calibration.facts_json = json.dumps(cal, default=str, sort_keys=True)
    for key, field_name, cast in (
        ("alpha", "alpha", float),
        ("n", "n", int),
        ("measured_false_rejection_rate", "measured_false_rejection_rate", float),
        ("dataset", "dataset", str),
    ):
        value = cal.get(key, info.get(key))
        if key == "dataset" and isinstance(value, dict):  # calibrate records the dataset as a dict
            value = json.dumps(value, sort_keys=True)
        if value is not None and not isinstance(value, (dict, list)):
            try:
                setattr(msg.calibration, field_name, cast(value))
            except (TypeError, ValueError):
                pass
    _fill_drift(msg.drift, getattr(plane, "drift", None))
    return msg


def _fill_drift(msg: guard_pb2.DriftStatus, monitor) -> None:
    """The drift monitor's state into ``ModelInfo.drift`` (``available`` false without a monitor)."""
    if monitor is None:
        return
    st = monitor.state()
    msg.available = True
    msg.drift = bool(st["drift"])
    msg.n = int(st["n"])
    msg.window = int(st["window"])
    msg.reference_rate = float(st["reference_rate"])
    msg.alpha = float(st["alpha"])
    msg.threshold = float(st["threshold"])
    for name, v in st["statistics"].items():
        msg.statistics[name] = float(v)
    if st["n"]:  # rates are undefined before the first verdict: left at their defaults
        msg.rejection_rate = float(st["rejection_rate"])
        msg.window_rejection_rate = float(st["window_rejection_rate"])
        for name, v in st["per_check"].items():
            msg.per_check[name] = float(v)
        for name, v in st["window_per_check"].items():
            msg.window_per_check[name] = float(v)
    if st["alarm"]:
        msg.alarm_at = int(st["alarm"]["at"])
        msg.alarm_by.extend(st["alarm"]["by"])
    msg.state_json = json.dumps(st, sort_keys=True)


class GuardServicer(guard_pb2_grpc.GuardServicer):
    """``state.plane`` is the :class:`DataPlane` once the bundle is loaded, else None."""

    def __init__(self, state):
        self.state = state

    async def _plane(self, context):
        plane = self.state.plane
        if plane is None or self.state.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "not serving: the bundle is still loading or the server is shutting down"
            )
        return plane

    async def Verify(self, request, context):
        plane = await self._plane(context)
        rid, error = new_request_id(), None
        try:
            try:
                rid = client_request_id(request.request_id)
                inp = request_input(request)
            except InvalidRequest as exc:
                plane.record_invalid(rid, "guard", str(exc))
                raise
            res = await plane.verify(**inp, request_id=rid, timeout_s=request_timeout(context), protocol="guard")
            return verdict_message(
                res, plane, heatmap_png_wanted=request.heatmap_png, heatmap_values_wanted=request.heatmap_values
            )
        except DataPlaneError as exc:
            error = status_for(exc), str(exc)
        except Exception as exc:  # noqa: BLE001 - last-resort net: a documented status, one audit line
            error = internal_error(plane, rid, "guard", exc)
        await context.abort(*error)

    async def VerifyStream(self, request_iterator, context):
        plane = await self._plane(context)
        # Pipelined: requests are read and verified concurrently (so a study's images can share
        # engine batches) while answers go out in request order. The bound keeps a fast sender
        # from queueing unbounded work.
        pending: asyncio.Queue = asyncio.Queue(maxsize=max(2, 2 * plane.config.max_batch_size))

        async def one(req):
            # every item ends with its own verdict (and one audit line): nothing here ends the stream
            rid = new_request_id()
            try:
                try:
                    if isinstance(req, Malformed):
                        raise InvalidRequest(req.message())
                    rid = client_request_id(req.request_id)
                    inp = request_input(req)
                except InvalidRequest as exc:  # refused before verify: count and audit it here
                    plane.record_invalid(rid, "guard-stream", str(exc))
                    raise
                res = await plane.verify(
                    **inp, request_id=rid, timeout_s=request_timeout(context), protocol="guard-stream"
                )
                return verdict_message(
                    res, plane, heatmap_png_wanted=req.heatmap_png, heatmap_values_wanted=req.heatmap_values
                )
            except InvalidRequest as exc:  # already counted and audited
                return invalid_verdict(rid, plane, str(exc))
            except DataPlaneError as exc:  # busy / deadline / draining: audited by the data plane
                return invalid_verdict(rid, plane, f"{status_for(exc).name}: {exc}", "GUARD_ERROR")
            except Exception as exc:  # noqa: BLE001 - last-resort net
                _, text = internal_error(plane, rid, "guard-stream", exc)
                return invalid_verdict(rid, plane, f"INTERNAL: {text}", "GUARD_ERROR")

        async def reader():
            try:
                async for req in request_iterator:
                    await pending.put(asyncio.ensure_future(one(req)))
            finally:
                await pending.put(None)

        reader_task = asyncio.ensure_future(reader())
        try:
            while True:
                task = await pending.get()
                if task is None:
                    break
                yield await task
            await reader_task
        finally:
            reader_task.cancel()
            while not pending.empty():
                t = pending.get_nowait()
                if t is not None:
                    t.cancel()

    async def GetModelInfo(self, request, context):
        plane = await self._plane(context)
        return model_info_message(plane)
