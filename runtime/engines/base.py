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


@dataclass
class EngineOutput:
    """The fused model's outputs for one batch."""

    logits: np.ndarray  # [N, K] float32, raw class scores (garbage class included)
    cam: np.ndarray  # [N, H, W] float32 in [0, 1], Grad-CAM of the argmax class
    early: np.ndarray  # [N, C_e, h_e, w_e] float32, early-layer activations
    # [N, len(GUARD_COLUMNS)] float32: the checks' arithmetic computed in the graph (checks/graph.py),
    # None when the engine runs the plain fused model and the host computes it
    guard: np.ndarray | None = None


@runtime_checkable
class Engine(Protocol):
    name: str
    providers: list[str]

    def run(self, batch: np.ndarray) -> EngineOutput: ...

    def describe(self) -> dict: ...
