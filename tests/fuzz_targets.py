"""Fuzz targets for the decoders and the request parsers (hypothesis strategies + the properties).

Used twice: ``tests/test_fuzz.py`` runs each target briefly in CI (a few hundred cases, in-process),
and ``scripts/fuzz.py`` runs them for long against a real ``gamguard serve`` (>= 50,000 requests,
statuses and peak RSS checked). The properties:

* :func:`check_decode` — ``decode_bytes`` either returns a finite 2-D image in [0, 1] or raises
  ``DecodeError``; nothing else escapes;
* :func:`check_oip_request` / :func:`check_guard_request` — the protocol parsers either return inputs
  or raise ``InvalidRequest``;
* inputs are mutated seeds (valid PNG 8/16-bit and colour, baseline and progressive JPEG, DICOM
  uncompressed, deflated and RLE) — truncated, bit-flipped, spliced, with forged headers — plus raw
  bytes, and requests with random shapes (up to 2**63), datatypes, parameters (±inf, NaN, strings),
  request ids and contents.
"""

from __future__ import annotations

import functools
import io
import math
import struct

import cv2
import numpy as np
from hypothesis import strategies as st

from gamguard.proto import grpc_predict_v2_pb2 as pb
from gamguard.proto import guard_pb2

FUZZ_MAX_PIXELS = 4_000_000  # keeps every case cheap; the limits themselves are under test elsewhere


# ---------------------------------------------------------------------------------------- seeds


@functools.lru_cache(maxsize=None)
def seeds() -> tuple[bytes, ...]:
    """Small valid files of every decoder path (built once)."""
    import pydicom

    from gamguard.runtime.demo.synth import write_dicom

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:56]
    gray = ((xx * 4 + yy * 2) % 256).astype(np.uint8)
    colour = np.dstack([gray, gray[::-1], rng.integers(0, 255, gray.shape, np.uint8)])
    out = [
        cv2.imencode(".png", gray)[1].tobytes(),
        cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(),
        cv2.imencode(".png", colour)[1].tobytes(),
        cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
        cv2.imencode(".jpg", colour, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
    ]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = write_dicom(Path(tmp) / "s.dcm", gray.astype(np.float32) / 255)
        out.append(path.read_bytes())
        for syntax in (pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.RLELossless):
            ds = pydicom.dcmread(path)
            if syntax == pydicom.uid.RLELossless:
                ds.compress(syntax)
            else:
                ds.file_meta.TransferSyntaxUID = syntax
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out.append(buf.getvalue())
    return tuple(out)


# ------------------------------------------------------------------------------------ strategies


@st.composite
def mutated_file(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "eoi", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "eoi":  # a truncated JPEG made to look complete
            del data[pos:]
            data += b"\xff\xd9"
        elif op == "header" and len(data) >= 32:  # forge a size field of the header
            at = draw(st.integers(0, 31))
            data[at : at + 4] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


@st.composite
def raw_with_magic(draw) -> bytes:
    magic = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x00" * 128 + b"DICM", b"\x08\x00"]))
    return magic + draw(st.binary(max_size=512))


image_bytes = st.one_of(mutated_file(), raw_with_magic())

_big_dims = st.one_of(st.integers(-2, 70), st.integers(0, 2**63 - 1), st.sampled_from([2**31, 2**32, 2**62]))
_param_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.booleans(),
)


def _set_param(params, key: str, value) -> None:
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value
    else:
        params[key].string_param = value


@st.composite
def oip_request(draw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="gamguard-demo-hand", id=draw(st.text(max_size=12)))
    for _ in range(draw(st.integers(0, 2))):
        datatype = draw(st.sampled_from(["BYTES", "UINT8", "UINT16", "FP32", "INT64", "FP16", "bytes", ""]))
        tensor = req.inputs.add(
            name=draw(st.sampled_from(["image", "input", ""])),
            datatype=datatype,
            shape=draw(st.lists(_big_dims, max_size=5)),
        )
        if draw(st.booleans()):
            _set_param(tensor.parameters, draw(st.sampled_from(["frame", "other"])), draw(_param_values))
        if draw(st.booleans()):
            if datatype == "BYTES" and draw(st.booleans()):
                items = draw(st.lists(image_bytes, max_size=3))
                req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in items))
            else:
                req.raw_input_contents.append(draw(st.binary(max_size=256)))
        elif datatype == "FP32":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
        elif datatype in ("UINT8", "UINT16"):
            tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=64)))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(draw(st.lists(image_bytes, max_size=2)))
    if draw(st.booleans()):
        _set_param(req.parameters, "frame", draw(_param_values))
    for name in draw(st.lists(st.sampled_from(["accepted", "verdict", "label", "heatmap", "nope"]), max_size=3)):
        req.outputs.add(name=name)
    return req


@st.composite
def guard_request(draw) -> guard_pb2.VerifyRequest:
    req = guard_pb2.VerifyRequest(request_id=draw(st.text(max_size=12)))
    kind = draw(st.sampled_from(["image", "tensor", "none"]))
    if kind == "image":
        req.image = draw(image_bytes)
    elif kind == "tensor":
        dtype = draw(st.sampled_from(["uint8", "uint16", "float32", "FLOAT32", "int8", ""]))
        shape = draw(st.lists(_big_dims, max_size=4))
        size = math.prod(shape) * 4 if shape and all(0 < s < 200 for s in shape) else draw(st.integers(0, 64))
        req.tensor.CopyFrom(guard_pb2.Tensor(dtype=dtype, shape=[max(0, s) for s in shape], data=bytes(size)))
    if draw(st.booleans()):
        req.frame = draw(st.integers(0, 2**32 - 1))
    req.heatmap_png = draw(st.booleans())
    return req


protobuf_bytes = st.one_of(
    st.binary(max_size=256),
    guard_request()
    .map(lambda r: r.SerializeToString())
    .flatmap(lambda b: st.integers(0, max(0, len(b))).map(lambda cut: b[:cut])),
)


# ------------------------------------------------------------------------------------ properties


def check_decode(data: bytes) -> str:
    """``decode_bytes`` returns a sane image or raises DecodeError; returns "ok" or "invalid"."""
    from gamguard.runtime.decode import DecodeError, decode_bytes

    try:
        image = decode_bytes(data, max_pixels=FUZZ_MAX_PIXELS)
    except DecodeError:
        return "invalid"
    px = image.pixels
    assert px.ndim == 2 and px.dtype == np.float32 and px.size > 0
    assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0
    return "ok"


def check_oip_request(req: pb.ModelInferRequest) -> str:
    from gamguard.runtime.server.errors import InvalidRequest
    from gamguard.runtime.server.grpc_inference import request_inputs

    try:
        inputs = request_inputs(req)
    except InvalidRequest:
        return "invalid"
    assert inputs and all(("data" in i) != ("array" in i) for i in inputs)
    return "ok"


def check_guard_request(req: guard_pb2.VerifyRequest) -> str:
    from gamguard.runtime.server.errors import InvalidRequest
    from gamguard.runtime.server.grpc_guard import request_input

    try:
        request_input(req)
    except InvalidRequest:
        return "invalid"
    return "ok"
