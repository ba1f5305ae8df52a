"""Open Inference Protocol v2 (``inference.GRPCInferenceService``) over the data plane.

What ``tritonclient.grpc`` and KServe clients see:

* one model, named and versioned by the bundle manifest; ``RepositoryIndex`` lists it;
* input ``image``: either ``BYTES`` with shape ``[N]`` or ``[N, 1]`` — N encoded files (PNG, JPEG,
  16-bit PNG, DICOM) — or a numeric tensor ``UINT8``/``UINT16``/``FP32`` (FP32 in [0, 1]) with
  shape ``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]``. Input parameter ``frame`` (int) picks the frame
  of multi-frame DICOM;
* outputs, one row per image: ``accepted`` (BOOL), ``reasons`` (BYTES, comma-separated),
  ``verdict`` (BYTES, the full verdict as JSON: scores, thresholds, failed measures, timings) and,
  when requested by name, ``heatmap`` (FP32 ``[N, H, W]`` Grad-CAM maps);
* class outputs ``label`` (BYTES), ``label_index`` (INT64) and ``probabilities`` (FP32 ``[N, C]``, real
  classes only) **only when every image of the request was accepted** — a rejected input never
  yields a label, even partially (send one image per request to get per-image labels);
* response ``parameters``: ``accepted`` (bool, all images), ``reasons`` (comma-separated union),
  ``scores`` (JSON: an object for one image, a list for several), ``bundle_hash``.

Bad input → INVALID_ARGUMENT; unknown model → NOT_FOUND; not ready → UNAVAILABLE.
"""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np

from gamguard.proto import grpc_predict_v2_pb2 as pb
from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from gamguard.runtime import package_version

from .codecs import deserialize_bytes, little_endian_view, serialize_bytes
from .dataplane import new_request_id
from .errors import DataPlaneError, InvalidRequest
from .status import request_timeout, status_for

log = logging.getLogger(__name__)

SERVER_NAME = "gamguard"
INPUT_NAME = "image"
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
            try:
                frame = int(value)
            except (TypeError, ValueError):
                raise InvalidRequest(f"parameter 'frame' must be an integer, got {value!r}") from None
            if frame < 0:
                raise InvalidRequest("parameter 'frame' must be >= 0")
            return frame
    return None


def request_inputs(request: pb.ModelInferRequest) -> list[dict]:
    """The OIP request's ``image`` tensor → data-plane inputs (one dict per image)."""
    if not request.inputs:
        raise InvalidRequest(f"no input tensor; send '{INPUT_NAME}' as BYTES (encoded images) or UINT8/UINT16/FP32")
    index = next((i for i, t in enumerate(request.inputs) if t.name == INPUT_NAME), None)
    if index is None:
        if len(request.inputs) != 1:
            raise InvalidRequest(f"expected one input named '{INPUT_NAME}', got {[t.name for t in request.inputs]}")
        index = 0
    tensor = request.inputs[index]
    raw = request.raw_input_contents[index] if index < len(request.raw_input_contents) else None
    shape = [int(s) for s in tensor.shape]
    if any(s < 0 for s in shape):
        raise InvalidRequest(f"negative dimension in shape {shape}")
    frame = _frame_of(request, tensor)
    dtype = tensor.datatype.upper()
    if dtype == "BYTES":
        items = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidRequest(f"BYTES input must have shape [N] or [N, 1], got {shape}")
        if count != len(items):
            raise InvalidRequest(f"BYTES input: shape {shape} says {count} element(s), data has {len(items)}")
        if not items:
            raise InvalidRequest("empty input: no images")
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
    count = int(np.prod(shape_n, dtype=np.int64))
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


# ---------------------------------------------------------------------------------------- servicer


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state):
        self.state = state

    # -- health / metadata --------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self.state.plane is not None and not self.state.draining

    async def _plane_for(self, name: str, version: str, context, *, need_ready: bool = True):
        plane = self.state.plane
        if plane is None:
            if need_ready:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not ready: the bundle is still loading")
            return None
        if name != plane.model_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {plane.model_name!r}"
            )
        if version and version != plane.model_version:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} has no version {version!r} (serving {plane.model_version!r})",
            )
        if need_ready and self.state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return plane

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context):
        plane = await self._plane_for(request.name, request.version, context, need_ready=False)
        return pb.ModelReadyResponse(ready=plane is not None and self._ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=package_version(), extensions=["model_repository"])

    async def ModelMetadata(self, request, context):
        plane = await self._plane_for(request.name, request.version, context)
        spec = plane.guard.spec
        n_real = len(plane.real_class_names)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=plane.model_name,
            versions=[plane.model_version],
            platform="gamguard_guarded_onnx",
            inputs=[T(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
            outputs=[
                T(name="accepted", datatype="BOOL", shape=[-1]),
                T(name="reasons", datatype="BYTES", shape=[-1]),
                T(name="verdict", datatype="BYTES", shape=[-1]),
                T(name="label", datatype="BYTES", shape=[-1]),
                T(name="label_index", datatype="INT64", shape=[-1]),
                T(name="probabilities", datatype="FP32", shape=[-1, n_real]),
                T(name="heatmap", datatype="FP32", shape=[-1, spec.height, spec.width]),
            ],
        )

    async def RepositoryIndex(self, request, context):
        plane = self.state.plane
        if plane is None:
            name, version = self.state.expected_model_name or "", ""
            state, reason = ("UNAVAILABLE", self.state.load_error) if self.state.load_error else ("LOADING", "")
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

    # -- inference ---------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        plane = await self._plane_for(request.model_name, request.model_version, context)
        wanted = [o.name for o in request.outputs]
        unknown = [n for n in wanted if n not in ALL_OUTPUTS]
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown output(s) {unknown}; available: {list(ALL_OUTPUTS)}"
            )
        try:
            try:
                inputs = request_inputs(request)
            except InvalidRequest as exc:  # refused before verify: count and audit it here
                plane.record_invalid(request.id or new_request_id(), "inference", str(exc))
                raise
            results = await plane.verify_many(
                inputs, timeout_s=request_timeout(context), protocol="inference", request_id=request.id or None
            )
        except DataPlaneError as exc:
            await context.abort(status_for(exc), str(exc))
        return self._response(request, plane, results, wanted)

    def _response(self, request, plane, results, wanted: list[str]) -> pb.ModelInferResponse:
        verdicts = [r.verdict for r in results]
        n = len(verdicts)
        all_accepted = all(v.accepted for v in verdicts)
        resp = pb.ModelInferResponse(model_name=plane.model_name, model_version=plane.model_version, id=request.id)
        reasons_union = sorted({r for v in verdicts for r in (v.reasons or [])})
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
