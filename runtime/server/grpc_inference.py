"""Open Inference Protocol v2 (``inference.GRPCInferenceService``) over the data plane.

What ``tritonclient.grpc`` and KServe clients see:

* one model, named and versioned by the bundle manifest; ``RepositoryIndex`` lists it;
* inputs, one per form; a request carries exactly one of them (all are ``optional`` in the model
  config): ``image`` — ``BYTES`` with shape ``[N]`` or ``[N, 1]``, N encoded files (PNG, JPEG, 16-bit
  PNG, DICOM); ``image_uint8`` / ``image_uint16`` / ``image_fp32`` — pixels (FP32 in [0, 1]) with
  shape ``[N, H, W]`` (also ``[H, W]`` or ``[N, 1, H, W]``), any size (resized like decoded files).
  ``image`` also takes the numeric forms, told apart by datatype. Input parameter ``frame`` (int)
  picks the frame of multi-frame DICOM; input parameter ``content_type`` ``base64`` says each BYTES
  element is the file base64-encoded (MLServer's ``Base64Codec``; decoded strictly, line breaks
  allowed), any other value is ignored (e.g. MLServer's ``np``);
* outputs, one row per image: ``accepted`` (BOOL), ``reasons`` (BYTES, comma-separated),
  ``verdict`` (BYTES, the full verdict as JSON: scores, thresholds, failed measures, timings) and,
  when requested by name, ``heatmap`` (FP32 ``[N, H, W]`` Grad-CAM maps);
* class outputs ``label`` (BYTES), ``label_index`` (INT64) and ``probabilities`` (FP32 ``[N, C]``, real
  classes only) **only when every image of the request was accepted** — a rejected input never
  yields a label, even partially (send one image per request to get per-image labels);
* response ``parameters``: ``accepted`` (bool, all images), ``reasons`` (comma-separated union, in the checks' order),
  ``scores`` (JSON: an object for one image, a list for several), ``bundle_hash``;
* a rejected image's ``verdict`` carries nothing specific to the model's top class (no per-class
  thresholds), unless the server runs with ``--debug-rejected-details``.

Beyond the KServe core, the Triton extensions its clients call (``tritonclient.grpc``, perf_analyzer):

* ``ModelConfig`` — Triton's model configuration schema (:func:`model_config`): the inputs and
  outputs above with per-image ``dims`` (the batch dimension is implied by ``max_batch_size``, so
  ``ModelMetadata`` shapes are ``[-1] + dims``), ``max_batch_size`` and ``dynamic_batching`` from the
  data plane's micro-batcher, the instance kind (CPU / GPU) and the bundle hash as a parameter;
* ``ModelStatistics`` — counts and cumulative times per stage since the model was loaded (what each
  stage covers: :mod:`gamguard.runtime.server.statistics`);
* ``ModelStreamInfer`` — each request of the stream is answered as ``ModelInfer`` would, in
  completion order (requests of one stream share engine batches; match answers by ``id``); a failed
  request answers with ``error_message`` and the stream goes on, as Triton's does;
* ``RepositoryModelLoad`` / ``RepositoryModelUnload`` of the configured bundle, only when the server
  runs with ``--model-control explicit`` (otherwise FAILED_PRECONDITION, as Triton's default mode
  refuses them): unload stops serving (ModelReady false, health NOT_SERVING), load re-reads the bundle
  from disk, verifies and self-tests it, then swaps it in (a reload while serving keeps answering).

Beyond the input forms above (``image`` also taking the numeric forms, a numeric ``[H, W]`` being one
image), what Triton refuses is refused here too, never served or ignored: an input name the model does not
declare, more images in one request than the config's ``max_batch_size`` (or than the queue holds), a
requested output's ``class_count`` (Triton's classification extension, not offered). ``ModelReady`` of a
model or version this server does not have answers ``ready=false``, as Triton's does.

Bad input (also a malformed message) → INVALID_ARGUMENT; server busy → RESOURCE_EXHAUSTED; unknown
model → NOT_FOUND; not ready → UNAVAILABLE; anything unexpected → INTERNAL (never the exception's text).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math

import grpc
import numpy as np

from gamguard.proto import grpc_predict_v2_pb2 as pb
from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from gamguard.runtime import package_version

from .codecs import deserialize_bytes, little_endian_view, serialize_bytes
from .dataplane import new_request_id
from .errors import DataPlaneError, InvalidRequest
from .status import request_timeout, status_for
from .wire import Malformed, client_request_id, internal_error

log = logging.getLogger(__name__)

SERVER_NAME = "gamguard"
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
PLATFORM = "gamguard_guarded_onnx"
INPUT_NAME = "image"  # encoded files (BYTES); also takes the numeric forms, told apart by datatype
# One input per pixel datatype, so a client reading the model metadata or config sees every form.
TENSOR_INPUTS = {"image_uint8": "UINT8", "image_uint16": "UINT16", "image_fp32": "FP32"}
INPUT_NAMES = (INPUT_NAME, *TENSOR_INPUTS)
VERDICT_OUTPUTS = ("accepted", "reasons", "verdict")
CLASS_OUTPUTS = ("label", "label_index", "probabilities")
OPTIONAL_OUTPUTS = ("heatmap",)
ALL_OUTPUTS = VERDICT_OUTPUTS + CLASS_OUTPUTS + OPTIONAL_OUTPUTS

_NUMERIC = {"UINT8": np.uint8, "UINT16": np.uint16, "FP32": np.float32}
_CONTENTS_FIELD = {"UINT8": "uint_contents", "UINT16": "uint_contents", "FP32": "fp32_contents"}


# ------------------------------------------------------------------------------ request parsing


def _param_value(p: pb.InferParameter):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _frame_of(request, tensor) -> int | None:
    for params in (tensor.parameters, request.parameters):
        if "frame" in params:
            value = _param_value(params["frame"])
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                raise InvalidRequest(f"parameter 'frame' must be an integer, got {value!r}")
            try:
                frame = int(value)
            except (TypeError, ValueError, OverflowError):
                raise InvalidRequest(f"parameter 'frame' must be an integer, got {str(value)[:40]!r}") from None
            if frame < 0:
                raise InvalidRequest("parameter 'frame' must be >= 0")
            return frame
    return None


def _content_type(tensor) -> str | None:
    """The input's ``content_type`` parameter (MLServer's codecs set it; ``base64``: Base64Codec)."""
    if "content_type" not in tensor.parameters:
        return None
    value = _param_value(tensor.parameters["content_type"])
    if not isinstance(value, str):
        raise InvalidRequest(f"parameter 'content_type' must be a string, got {type(value).__name__}")
    return value.strip().lower()


def _unbase64(item: bytes, index: int) -> bytes:
    try:
        return base64.b64decode(b"".join(bytes(item).split()), validate=True)  # MIME line breaks allowed
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"image {index}: content_type is base64 but the element is not valid base64") from None


def request_inputs(request: pb.ModelInferRequest) -> list[dict]:
    """The OIP request's input tensor → data-plane inputs (one dict per image)."""
    if not request.inputs:
        raise InvalidRequest(f"no input tensor; send one of {list(INPUT_NAMES)}")
    unexpected = [t.name for t in request.inputs if t.name not in INPUT_NAMES]
    if unexpected:  # as Triton: an input the model does not declare is an error, not ignored
        raise InvalidRequest(f"unexpected inference input(s) {unexpected}; send one of {list(INPUT_NAMES)}")
    if len(request.inputs) != 1:
        raise InvalidRequest(f"send exactly one of {list(INPUT_NAMES)}, got {[t.name for t in request.inputs]}")
    tensor = request.inputs[0]
    expected_dtype = TENSOR_INPUTS.get(tensor.name)
    if expected_dtype and tensor.datatype.upper() != expected_dtype:
        raise InvalidRequest(f"input '{tensor.name}' must be {expected_dtype}, got {tensor.datatype!r}")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    shape = [int(s) for s in tensor.shape]
    if any(s < 0 for s in shape):
        raise InvalidRequest(f"negative dimension in shape {shape}")
    frame = _frame_of(request, tensor)
    dtype = tensor.datatype.upper()
    if dtype == "BYTES":
        items = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        count = math.prod(shape)  # Python ints: a forged shape cannot overflow
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidRequest(f"BYTES input must have shape [N] or [N, 1], got {shape}")
        if count != len(items):
            raise InvalidRequest(f"BYTES input: shape {shape} says {count} element(s), data has {len(items)}")
        if not items:
            raise InvalidRequest("empty input: no images")
        if _content_type(tensor) == "base64":
            items = [_unbase64(b, i) for i, b in enumerate(items)]
        return [{"data": bytes(b), "frame": frame} for b in items]
    if dtype not in _NUMERIC:
        raise InvalidRequest(
            f"unsupported datatype {tensor.datatype!r} for '{tensor.name}'; "
            "use BYTES (encoded PNG/JPEG/DICOM) or UINT8/UINT16/FP32 pixels"
        )
    if len(shape) == 2:
        shape_n = [1] + shape
    elif len(shape) == 3:
        shape_n = shape
    elif len(shape) == 4 and shape[1] == 1:
        shape_n = [shape[0], shape[2], shape[3]]
    else:
        raise InvalidRequest(f"numeric input must have shape [H, W], [N, H, W] or [N, 1, H, W], got {shape}")
    count = math.prod(shape_n)  # Python ints: a forged shape cannot overflow
    if count == 0:
        raise InvalidRequest(f"empty tensor (shape {shape})")
    if raw is not None:
        needed = count * np.dtype(_NUMERIC[dtype]).itemsize
        if len(raw) != needed:
            raise InvalidRequest(f"{dtype} input: shape {shape} needs {needed} bytes, got {len(raw)}")
        arr = little_endian_view(raw, _NUMERIC[dtype], shape_n)
    else:
        values = getattr(tensor.contents, _CONTENTS_FIELD[dtype])
        if len(values) != count:
            raise InvalidRequest(f"{dtype} input: shape {shape} needs {count} values, got {len(values)}")
        if dtype != "FP32" and len(values) and max(values) > np.iinfo(_NUMERIC[dtype]).max:
            raise InvalidRequest(f"{dtype} input has values out of range")
        arr = np.asarray(values, dtype=_NUMERIC[dtype]).reshape(shape_n)
    return [{"array": arr[i]} for i in range(arr.shape[0])]


# ------------------------------------------------------------------------------ model description


def _tensor_descriptions(plane) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """``(inputs, outputs)`` as ``(name, OIP datatype, per-image dims)``: the one description that
    ``ModelMetadata`` (shape ``[-1] + dims``) and ``ModelConfig`` serve."""
    spec = plane.guard.spec
    inputs = [(INPUT_NAME, "BYTES", [1])] + [(name, dtype, [-1, -1]) for name, dtype in TENSOR_INPUTS.items()]
    outputs = [
        ("accepted", "BOOL", []),
        ("reasons", "BYTES", []),
        ("verdict", "BYTES", []),
        ("label", "BYTES", []),
        ("label_index", "INT64", []),
        ("probabilities", "FP32", [len(plane.real_class_names)]),
        ("heatmap", "FP32", [spec.height, spec.width]),
    ]
    return inputs, outputs


_CONFIG_TYPE = {
    "BYTES": pb.TYPE_STRING,
    "BOOL": pb.TYPE_BOOL,
    "UINT8": pb.TYPE_UINT8,
    "UINT16": pb.TYPE_UINT16,
    "INT64": pb.TYPE_INT64,
    "FP32": pb.TYPE_FP32,
}


def model_config(plane) -> pb.ModelConfig:
    """The model in Triton's ``ModelConfig`` schema: what perf_analyzer and model tooling read first."""
    inputs, outputs = _tensor_descriptions(plane)
    cfg = plane.config
    providers = [str(p).lower() for p in getattr(plane.guard.engine, "providers", ()) or ()]
    on_gpu = any("cuda" in p or "tensorrt" in p for p in providers)
    return pb.ModelConfig(
        name=plane.model_name,
        platform=PLATFORM,
        backend="gamguard",
        max_batch_size=cfg.max_batch_size,
        input=[pb.ModelInput(name=n, data_type=_CONFIG_TYPE[t], dims=d, optional=True) for n, t, d in inputs],
        # Triton's schema needs dims: a scalar per image is dims [1] reshaped to [] (as Triton writes it)
        output=[
            pb.ModelOutput(name=n, data_type=_CONFIG_TYPE[t], dims=d)
            if d
            else pb.ModelOutput(name=n, data_type=_CONFIG_TYPE[t], dims=[1], reshape=pb.ModelTensorReshape(shape=[]))
            for n, t, d in outputs
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            max_queue_delay_microseconds=int(round(cfg.max_queue_delay_ms * 1000)),
            # the client's gRPC deadline is honoured in the queue (expired requests are dropped)
            default_queue_policy=pb.ModelQueuePolicy(
                timeout_action=pb.ModelQueuePolicy.REJECT, max_queue_size=cfg.max_queue_size
            ),
        ),
        instance_group=[
            pb.ModelInstanceGroup(
                name=plane.model_name,
                count=1,
                kind=pb.ModelInstanceGroup.KIND_GPU if on_gpu else pb.ModelInstanceGroup.KIND_CPU,
            )
        ],
        parameters={
            "bundle_hash": pb.ModelParameter(string_value=plane.bundle_hash),
            "class_names": pb.ModelParameter(string_value=",".join(plane.real_class_names)),
            "input_size": pb.ModelParameter(string_value=f"{plane.guard.spec.height}x{plane.guard.spec.width}"),
        },
    )


def model_statistics(plane) -> pb.ModelStatistics:
    """The data plane's :class:`~gamguard.runtime.server.statistics.InferenceStatistics` as Triton's
    ``ModelStatistics``."""
    snap = plane.statistics.snapshot()
    D = pb.StatisticDuration
    return pb.ModelStatistics(
        name=plane.model_name,
        version=plane.model_version,
        last_inference=snap["last_inference_ms"],
        inference_count=snap["inference_count"],
        execution_count=snap["execution_count"],
        inference_stats=pb.InferStatistics(**{k: D(count=c, ns=ns) for k, (c, ns) in snap["stages"].items()}),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, **{k: D(count=c, ns=ns) for k, (c, ns) in b.items()})
            for size, b in snap["batches"].items()
        ],
    )


# ---------------------------------------------------------------------------------------- servicer


class RequestFailed(Exception):
    """A request refused with a gRPC status: unary calls abort with it, streams answer with its message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``state``: the server's :class:`~gamguard.runtime.server.app.ServerState` (``plane`` once a
    model is loaded; ``control`` loads and unloads it when model control is enabled)."""

    STREAM_IN_FLIGHT_PER_BATCH = 2  # what one stream may hold (in progress or answer unwritten), in batches

    def __init__(self, state):
        self.state = state

    # -- health / metadata --------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self.state.plane is not None and not self.state.draining

    def _resolve(self, name: str, version: str, *, need_ready: bool = True):
        """The data plane serving ``name`` (and ``version``, when given); raises :class:`RequestFailed`."""
        plane = self.state.plane
        if plane is None:
            if not need_ready:
                return None
            expected = self.state.expected_model_name
            if expected and name != expected:
                raise RequestFailed(
                    grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {expected!r}"
                )
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, self.state.not_ready_reason())
        if name != plane.model_name:
            raise RequestFailed(
                grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {plane.model_name!r}"
            )
        if version and version != plane.model_version:
            raise RequestFailed(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} has no version {version!r} (serving {plane.model_version!r})",
            )
        if need_ready and self.state.draining:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return plane

    async def _plane_for(self, name: str, version: str, context, *, need_ready: bool = True):
        try:
            return self._resolve(name, version, need_ready=need_ready)
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context):
        # as Triton: a model (or version) this server does not have is simply not ready
        try:
            plane = self._resolve(request.name, request.version, need_ready=False)
        except RequestFailed:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=plane is not None and self._ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=package_version(), extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request, context):
        plane = await self._plane_for(request.name, request.version, context)
        inputs, outputs = _tensor_descriptions(plane)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=plane.model_name,
            versions=[plane.model_version],
            platform=PLATFORM,
            inputs=[T(name=n, datatype=t, shape=[-1, *d]) for n, t, d in inputs],
            outputs=[T(name=n, datatype=t, shape=[-1, *d]) for n, t, d in outputs],
        )

    async def ModelConfig(self, request, context):
        plane = await self._plane_for(request.name, request.version, context)
        return pb.ModelConfigResponse(config=model_config(plane))

    async def ModelStatistics(self, request, context):
        if not request.name and self.state.plane is None:
            return pb.ModelStatisticsResponse()  # every model: none loaded
        plane = await self._plane_for(request.name or self.state.plane.model_name, request.version, context)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(plane)])

    # -- model repository ---------------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        plane = self.state.plane
        if plane is None:
            name, version = self.state.expected_model_name or "", self.state.expected_model_version
            state = "UNAVAILABLE" if (self.state.load_error or self.state.unloaded) else "LOADING"
            reason = self.state.load_error or ("unloaded" if self.state.unloaded else "")
        else:
            name, version = plane.model_name, plane.model_version
            state, reason = ("READY", "") if self._ready() else ("UNAVAILABLE", "draining")
        if request.ready and state != "READY":
            return pb.RepositoryIndexResponse()
        if not name:
            return pb.RepositoryIndexResponse()
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(name=name, version=version, state=state, reason=reason or "")]
        )

    async def _model_control(self, request, context, verb: str, allowed_params: tuple[str, ...]):
        control = self.state.control
        if control is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"explicit model {verb} is disabled; start the server with --model-control explicit",
            )
        expected = self.state.expected_model_name or (self.state.plane.model_name if self.state.plane else "")
        if request.model_name != expected:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"this server can {verb} only its configured bundle {expected!r}, not {request.model_name!r}",
            )
        unsupported = sorted(set(request.parameters) - set(allowed_params))
        if unsupported:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{verb} parameters {unsupported} are not supported (the configured bundle is loaded as it is on disk)",
            )
        if self.state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return control

    async def RepositoryModelLoad(self, request, context):
        control = await self._model_control(request, context, "load", ())
        try:
            await control.load_model()
        except Exception as exc:  # noqa: BLE001 - the bundle failed to load: say why; the old model keeps serving
            await context.abort(grpc.StatusCode.INTERNAL, f"failed to load {request.model_name!r}: {exc}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        # Triton's "unload_dependents" is meaningless here (no ensembles) and accepted
        control = await self._model_control(request, context, "unload", ("unload_dependents",))
        await control.unload_model()
        return pb.RepositoryModelUnloadResponse()

    # -- inference ---------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, request_timeout(context))
        except RequestFailed as exc:
            await context.abort(exc.code, exc.message)

    async def ModelStreamInfer(self, request_iterator, context):
        # Requests are read and verified concurrently (so they share engine batches) and answered as
        # they complete, like Triton's stream. The semaphore bounds what a stream holds (requests in
        # progress plus answers not yet written): a slot is freed only once its answer went out, so a
        # client that sends fast but reads slowly stops being read (gRPC flow control pushes back).
        answers: asyncio.Queue = asyncio.Queue()
        plane = self.state.plane
        slots = asyncio.Semaphore(self.STREAM_IN_FLIGHT_PER_BATCH * (plane.config.max_batch_size if plane else 8))
        tasks: set[asyncio.Task] = set()

        async def one(req) -> None:
            try:
                if isinstance(req, Malformed):  # answered in-stream like any failed request (see .wire)
                    self._refuse_malformed(req)
                answer = pb.ModelStreamInferResponse(infer_response=await self._infer(req, request_timeout(context)))
            except RequestFailed as exc:
                answer = _stream_error(pb.ModelInferRequest() if isinstance(req, Malformed) else req, exc.message)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not end the others' stream
                log.exception("stream request failed")
                answer = _stream_error(req, f"internal error: {type(exc).__name__}")
            await answers.put(answer)

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    await slots.acquire()
                    task = asyncio.ensure_future(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                await answers.put(None)

        reading = asyncio.ensure_future(reader())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                slots.release()
            await reading  # the client's half-close, or its error
        finally:
            reading.cancel()
            for task in list(tasks):
                task.cancel()

    def _refuse_malformed(self, bad: Malformed) -> None:
        if self.state.plane is not None:
            self.state.plane.record_invalid(new_request_id(), "inference-stream", bad.message())
        raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, bad.message())

    async def _infer(self, request, timeout_s: float | None) -> pb.ModelInferResponse:
        """One ``ModelInferRequest`` → its response; raises :class:`RequestFailed`."""
        plane = self._resolve(request.model_name, request.model_version)
        wanted = [o.name for o in request.outputs]
        unknown = [n for n in wanted if n not in ALL_OUTPUTS]
        rid = new_request_id()
        try:
            try:
                rid = client_request_id(request.id)
                if unknown:
                    raise InvalidRequest(f"unknown output(s) {unknown}; available: {list(ALL_OUTPUTS)}")
                classified = [o.name for o in request.outputs if "classification" in o.parameters]
                if classified:  # Triton's class_count: not offered, so refused rather than ignored
                    raise InvalidRequest(
                        f"class_count (the classification extension) is not supported, asked for {classified}; "
                        "request 'label' and 'probabilities' instead"
                    )
                inputs = request_inputs(request)
                if len(inputs) > plane.config.max_batch_size:  # the config's max_batch_size, as Triton
                    raise InvalidRequest(
                        f"inference request batch-size must be <= {plane.config.max_batch_size} for "
                        f"'{plane.model_name}', got {len(inputs)}"
                    )
            except InvalidRequest as exc:  # refused before verify: count and audit it here
                plane.record_invalid(rid, "inference", str(exc))
                raise
            results = await plane.verify_many(inputs, timeout_s=timeout_s, protocol="inference", request_id=rid)
            return self._response(request, plane, results, wanted)
        except DataPlaneError as exc:
            raise RequestFailed(status_for(exc), str(exc)) from None
        except RequestFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - last-resort net: a documented status, one audit line
            raise RequestFailed(*internal_error(plane, rid, "inference", exc)) from None

    def _response(self, request, plane, results, wanted: list[str]) -> pb.ModelInferResponse:
        verdicts = [r.verdict for r in results]
        n = len(verdicts)
        all_accepted = all(v.accepted for v in verdicts)
        resp = pb.ModelInferResponse(model_name=plane.model_name, model_version=plane.model_version, id=request.id)
        # in the order the verdicts give them (the checks' order), as each image's own `reasons` output
        reasons_union = list(dict.fromkeys(r for v in verdicts for r in (v.reasons or [])))
        resp.parameters["accepted"].bool_param = all_accepted
        resp.parameters["reasons"].string_param = ",".join(reasons_union)
        dicts = [v.to_dict() for v in verdicts]  # once per verdict: scores here, the verdict output below
        scores = [d["scores"] for d in dicts]  # non-finite → null: strict JSON
        resp.parameters["scores"].string_param = json.dumps(scores[0] if n == 1 else scores, allow_nan=False)
        resp.parameters["bundle_hash"].string_param = plane.bundle_hash

        def include(name: str) -> bool:
            if name in OPTIONAL_OUTPUTS:
                return name in wanted
            return not wanted or name in wanted

        def add(name: str, datatype: str, shape: list[int], raw: bytes) -> None:
            resp.outputs.add(name=name, datatype=datatype, shape=shape)
            resp.raw_output_contents.append(raw)

        if include("accepted"):
            add("accepted", "BOOL", [n], np.array([v.accepted for v in verdicts], np.bool_).tobytes())
        if include("reasons"):
            add("reasons", "BYTES", [n], serialize_bytes(",".join(v.reasons or []).encode() for v in verdicts))
        if include("verdict"):
            docs = [json.dumps(_verdict_json(r, d), allow_nan=False).encode() for r, d in zip(results, dicts)]
            add("verdict", "BYTES", [n], serialize_bytes(docs))
        # Class outputs only when every image passed the guard: a rejected input never yields a label.
        if all_accepted:
            if include("label"):
                add("label", "BYTES", [n], serialize_bytes(str(v.label).encode() for v in verdicts))
            if include("label_index"):
                add("label_index", "INT64", [n], np.array([int(v.label_index) for v in verdicts], "<i8").tobytes())
            if include("probabilities"):
                names = plane.real_class_names
                probs = np.array([[float((v.probabilities or {}).get(c, 0.0)) for c in names] for v in verdicts], "<f4")
                add("probabilities", "FP32", [n, len(names)], probs.tobytes())
        if include("heatmap") and all(v.cam is not None for v in verdicts):
            cams = np.stack([np.asarray(v.cam, "<f4") for v in verdicts])
            add("heatmap", "FP32", list(cams.shape), cams.tobytes())
        return resp


def _stream_error(request, message: str) -> pb.ModelStreamInferResponse:
    """A stream's answer to a failed request: the message, and the request's identity to match it by."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


def _verdict_json(r, d: dict | None = None) -> dict:
    """The verdict as JSON: ``Verdict.to_dict`` (no class for a rejected input; non-finite scores as
    null, so the document is strict JSON) plus what the data plane knows about the request. ``d``: the
    verdict's ``to_dict()`` when the caller already has it (it is completed in place)."""
    d = r.verdict.to_dict() if d is None else d
    d.update(
        request_id=r.request_id,
        input_format=r.input_format,
        sop_instance_uid=r.sop_instance_uid,
        timings_ms=r.stages_ms | {"total": r.total_ms},
        batch_size=r.batch_size,
    )
    return d
