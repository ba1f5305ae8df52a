"""What every engine is: the fused model's tensor names, its output record and the Engine protocol.

The tensor names are part of the bundle format (``model.onnx`` and ``model.plan`` alike); the exporter
writes them and every engine reads them, so they are defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "cam", "early")


class EngineError(RuntimeError):
    """The engine could not be created or could not run a batch."""


class ResizedMap:
    """One map ``rows @ small @ cols`` (float32), kept as its small map and the two matrices of its
    separable resize until it is read (:class:`ComputedOnRead`). ``bilinear``: the matrices are OpenCV's
    bilinear resize (:func:`is_opencv_bilinear`), which computes the same map with two taps per axis
    instead of a dense product (at 64² → 512², 65 µs instead of 400)."""

    __slots__ = ("small", "rows", "cols", "bilinear")

    def __init__(self, small: np.ndarray, rows: np.ndarray, cols: np.ndarray, bilinear: bool = False):
        self.small, self.rows, self.cols, self.bilinear = small, rows, cols, bilinear

    @property
    def size(self) -> tuple[int, int]:
        return int(self.rows.shape[0]), int(self.cols.shape[1])

    def __call__(self) -> np.ndarray:
        if self.bilinear:
            import cv2

            h, w = self.size
            return cv2.resize(self.small, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.matmul(self.rows, np.matmul(self.small, self.cols))

    def __reduce__(self):  # a verdict handed to another process carries the small map, not the full one
        return type(self), (self.small, self.rows, self.cols, self.bilinear)


class ResizedMaps(ResizedMap):
    """A batch of :class:`ResizedMap`: ``small`` ``[N, h, w]``, ``rows`` ``[H, h]``, ``cols`` ``[w, W]``.

    A guarded engine whose CAM ends in a constant separable resize (the exported bilinear resize to the
    input size) returns the small maps: the guard reads its grid from them inside the graph, and the
    full-size heatmap is computed only for the images whose map someone reads (an overlay, a response
    that asks for the heatmap). At 512² the resize was ~2 ms of a batch of eight on the demo model."""

    def __len__(self) -> int:
        return int(self.small.shape[0])

    def one(self, i: int) -> ResizedMap:
        return ResizedMap(self.small[i], self.rows, self.cols, self.bilinear)

    def __call__(self) -> np.ndarray:
        if not self.bilinear:
            return super().__call__()
        out = np.empty((len(self), *self.size), np.float32)
        for i in range(len(self)):
            out[i] = self.one(i)()
        return out


def is_opencv_bilinear(rows: np.ndarray, cols: np.ndarray, atol: float = 5e-6) -> bool:
    """Whether ``rows @ s @ cols`` is OpenCV's ``INTER_LINEAR`` resize of ``s`` (half-pixel centres, as
    the exporter's bilinear matrices and ``F.interpolate(align_corners=False)``): OpenCV's own 1-D
    matrices are read off by resizing identities and compared with ``rows`` and ``cols``. ``atol``: the
    matrices ONNX Runtime folds from a dynamic export's resize differ from OpenCV's by up to ~4e-6 at
    sizes such as 250x333; a map in [0, 1] then differs by at most twice that (two taps per axis)."""
    import cv2

    rows, cols = np.asarray(rows, np.float32), np.asarray(cols, np.float32)
    if rows.ndim != 2 or cols.ndim != 2 or min(rows.shape + cols.shape) < 1:
        return False
    (big_h, h), (w, big_w) = rows.shape, cols.shape
    eye_h, eye_w = np.eye(h, dtype=np.float32), np.eye(w, dtype=np.float32)
    cv_rows = cv2.resize(eye_h, (h, big_h), interpolation=cv2.INTER_LINEAR).reshape(big_h, h)
    cv_cols = cv2.resize(eye_w, (big_w, w), interpolation=cv2.INTER_LINEAR).reshape(w, big_w)
    return bool(np.allclose(cv_rows, rows, rtol=0, atol=atol) and np.allclose(cv_cols, cols, rtol=0, atol=atol))


class ComputedOnRead:
    """A dataclass field that may be given as a :class:`ResizedMap`: computed the first time it is read,
    then kept. ``raw(obj)`` gives the stored value without computing it. ``default``: the field's
    default (none when omitted)."""

    _NO_DEFAULT = object()

    def __init__(self, default=_NO_DEFAULT):
        self._default = default

    def __set_name__(self, owner, name):
        self._key = f"_{name}_value"

    def __get__(self, obj, owner=None):
        if obj is None:
            if self._default is self._NO_DEFAULT:
                raise AttributeError(self._key)  # dataclasses: the field has no default
            return self._default
        value = obj.__dict__[self._key]
        if isinstance(value, ResizedMap):
            value = obj.__dict__[self._key] = value()
        return value

    def __set__(self, obj, value):
        obj.__dict__[self._key] = value

    def raw(self, obj):
        return obj.__dict__[self._key]


@dataclass
class EngineOutput:
    """The fused model's outputs for one batch."""

    logits: np.ndarray  # [N, K] float32, raw class scores (garbage class included)
    # [N, H, W] float32 in [0, 1], Grad-CAM of the argmax class (a ResizedMaps until read: :meth:`cam_of`)
    cam: np.ndarray = ComputedOnRead()
    early: np.ndarray  # [N, C_e, h_e, w_e] float32, early-layer activations
    # [N, len(GUARD_COLUMNS)] float32: the checks' arithmetic computed in the graph (checks/graph.py),
    # None when the engine runs the plain fused model and the host computes it
    guard: np.ndarray | None = None

    def cam_count(self) -> int:
        """The number of maps in ``cam``, without computing them."""
        raw = EngineOutput.__dict__["cam"].raw(self)
        return len(raw) if isinstance(raw, ResizedMaps) else int(np.shape(raw)[0])

    def cam_maps(self) -> "ResizedMaps | None":
        """``cam`` as the engine left it when the host still has to compute it (else None)."""
        raw = EngineOutput.__dict__["cam"].raw(self)
        return raw if isinstance(raw, ResizedMaps) else None

    def cam_of(self, i: int):
        """Image ``i``'s map, or a :class:`ResizedMap` computing it (for a verdict's ``cam``)."""
        raw = EngineOutput.__dict__["cam"].raw(self)
        return raw.one(i) if isinstance(raw, ResizedMaps) else raw[i]


@runtime_checkable
class Engine(Protocol):
    name: str
    providers: list[str]

    def run(self, batch: np.ndarray) -> EngineOutput: ...

    def describe(self) -> dict: ...
