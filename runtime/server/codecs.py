"""Tensors on the wire, both ways, for both gRPC servicers: wire bytes → numpy arrays (every size
checked before reshaping) and Grad-CAM maps → PNG.

Numeric tensors arrive little-endian (both protocols say so); they stay read-only little-endian views
of the request's bytes here, because ``decode_tensor`` converts to native order and copies anyway.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import cv2
import numpy as np

from gamguard.runtime.overlays import jet_heatmap

from .errors import InvalidRequest

if TYPE_CHECKING:
    from gamguard.proto import guard_pb2

_TENSOR_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float32": np.float32}


def little_endian_view(raw: bytes, dtype, shape) -> np.ndarray:
    """``raw`` as a read-only little-endian array of ``dtype`` and ``shape``, without a copy. The caller
    has checked that ``raw`` holds exactly that many bytes."""
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def tensor_to_array(t: guard_pb2.Tensor) -> np.ndarray:
    """A ``gamguard.v1.Tensor`` → numpy array, with every size checked before reshaping."""
    dtype = _TENSOR_DTYPES.get(t.dtype.lower())
    if dtype is None:
        raise InvalidRequest(f"unsupported tensor dtype {t.dtype!r}; expected uint8, uint16 or float32")
    shape = tuple(int(s) for s in t.shape)
    if not shape or any(s <= 0 for s in shape):
        raise InvalidRequest(f"bad tensor shape {list(shape)}; expected [height, width]")
    itemsize = np.dtype(dtype).itemsize
    expected = math.prod(shape) * itemsize  # Python ints: a forged shape cannot overflow
    if expected != len(t.data):
        raise InvalidRequest(f"tensor data has {len(t.data)} bytes; shape {list(shape)} of {t.dtype} needs {expected}")
    return little_endian_view(t.data, dtype, shape)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element is a 4-byte little-endian length, then the bytes."""
    out, pos, n = [], 0, len(raw)
    while pos < n:
        if pos + 4 > n:
            raise InvalidRequest("malformed BYTES tensor: truncated element length")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > n:
            raise InvalidRequest("malformed BYTES tensor: element longer than the data")
        out.append(raw[pos : pos + length])
        pos += length
    return out


def serialize_bytes(items) -> bytes:
    """The inverse of :func:`deserialize_bytes`."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def heatmap_png(cam: np.ndarray) -> bytes:
    """A Grad-CAM map in [0, 1] as a colour (JET) PNG at the map's own size."""
    ok, buf = cv2.imencode(".png", jet_heatmap(cam))
    if not ok:  # pragma: no cover - OpenCV cannot fail on a uint8 image
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
