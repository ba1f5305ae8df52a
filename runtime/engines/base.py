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
    separable resize until it is read (:class:`ComputedOnRead`)."""

    __slots__ = ("small", "rows", "cols")

    def __init__(self, small: np.ndarray, rows: np.ndarray, cols: np.ndarray):
        self.small, self.rows, self.cols = small, rows, cols

    def __call__(self) -> np.ndarray:
        return np.matmul(self.rows, np.matmul(self.small, self.cols))

    def __reduce__(self):  # a verdict handed to another process carries the small map, not the full one
        return type(self), (self.small, self.rows, self.cols)


class ResizedMaps(ResizedMap):
    """A batch of :class:`ResizedMap`: ``small`` ``[N, h, w]``, ``rows`` ``[H, h]``, ``cols`` ``[w, W]``.

    A guarded engine whose CAM ends in a constant separable resize (the exported bilinear resize to the
    input size) returns the small maps: the guard reads its grid from them inside the graph, and the
    full-size heatmap is computed only for the images whose map someone reads (an overlay, a response
    that asks for the heatmap). At 512² the resize was ~2 ms of a batch of eight on the demo model."""

    def __len__(self) -> int:
        return int(self.small.shape[0])

    def one(self, i: int) -> ResizedMap:
        return ResizedMap(self.small[i], self.rows, self.cols)


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
