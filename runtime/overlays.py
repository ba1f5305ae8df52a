"""Heatmap overlays: the X-ray with its Grad-CAM blended in colour, the class reference beside it.

Used by ``gamguard verify --overlays DIR`` and by the suitability report. OpenCV only (a runtime
dependency already), so overlays work without matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

PANEL = 256  # side of each of the two panels, pixels
BLEND = 0.45  # weight of the colour map over the grey X-ray


def _gray_u8(image: np.ndarray, side: int) -> np.ndarray:
    img = np.nan_to_num(np.asarray(image, np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    img = cv2.resize(np.clip(img, 0, 1), (side, side), interpolation=cv2.INTER_AREA)
    return (img * 255 + 0.5).astype(np.uint8)


def jet_heatmap(cam: np.ndarray) -> np.ndarray:
    """A map with values in [0, 1] in OpenCV's JET colour map (0 blue, 1 red): BGR uint8 at the map's
    own size. NaN counts as 0; values outside [0, 1] are clipped. The one colour map of gamguard:
    overlays and the Guard service's heatmap PNG both use it."""
    u8 = np.clip(np.nan_to_num(np.asarray(cam, np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_JET)


def _heat(cam: np.ndarray, side: int) -> np.ndarray:
    """The map stretched to its own [min, max] (a flat map is all 0), resized to ``side``, in colour."""
    c = np.nan_to_num(np.asarray(cam, np.float32))
    lo, hi = float(c.min()), float(c.max())
    c = (c - lo) / (hi - lo) if hi - lo > 1e-7 else np.zeros_like(c)
    return jet_heatmap(cv2.resize(c, (side, side), interpolation=cv2.INTER_LINEAR))


def blend(image: np.ndarray, cam: np.ndarray | None, side: int = PANEL) -> np.ndarray:
    """Grey X-ray with the map in colour on top, BGR uint8 ``side x side``."""
    grey = cv2.cvtColor(_gray_u8(image, side), cv2.COLOR_GRAY2BGR)
    if cam is None:
        return grey
    return cv2.addWeighted(grey, 1.0 - BLEND, _heat(cam, side), BLEND, 0.0)


_FONT, _SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.36


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, _FONT, _SCALE, 1)[0][0]


def _wrap(text: str, width: int) -> list[str]:
    """``text`` broken after its spaces into lines at most ``width`` pixels wide (a word longer than a
    line is cut to fit)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and _text_width(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    lines.append(line)
    fitted = []
    for ln in lines:
        if _text_width(ln) > width:  # the longest prefix that fits (binary search: a word may be very long)
            lo, hi = 1, len(ln)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if _text_width(ln[:mid]) <= width else (lo, mid - 1)
            ln = ln[:lo]
        fitted.append(ln)
    return fitted


def _caption(panel: np.ndarray, lines: list[str], rows: int, colour=(255, 255, 255)) -> np.ndarray:
    """``lines`` (already fitted to the panel's width, see :func:`_wrap`) above ``panel``, in a bar of
    ``rows`` text rows (the same for both panels, so that they stack side by side)."""
    bar = np.zeros((18 * rows + 6, panel.shape[1], 3), np.uint8)
    for k, text in enumerate(lines):
        cv2.putText(bar, text, (4, 16 + 18 * k), _FONT, _SCALE, colour, 1, cv2.LINE_AA)
    return np.vstack([bar, panel])


def overlay_image(image: np.ndarray, verdict, class_names: list[str], *, title: str = "") -> np.ndarray:
    """Two panels side by side: input + its CAM, and the predicted class's reference map (on the
    same X-ray, so the expected attention can be compared in place). BGR uint8."""
    pred = verdict.predicted_index
    # "withheld": a gRPC client is never told the class of a rejected input
    pred_name = class_names[pred] if pred is not None and 0 <= pred < len(class_names) else "withheld"
    if verdict.accepted:
        status = [f"ACCEPTED: {verdict.label}", ""]
    else:
        short = [r.replace("_MISMATCH", "").replace("_CLASS", "") for r in verdict.reasons]
        status = ["REJECTED: " + ", ".join(short), ""]
        if verdict.failed_measures:
            status[1] = "measures: " + ", ".join(verdict.failed_measures)
    width = PANEL - 8
    left_lines = [w for text in (title or "input + Grad-CAM", *status) for w in _wrap(text, width)]
    ref_label = "reference" if verdict.reference_cam is not None else "no reference"
    ref = verdict.reference_index
    ref_name = class_names[ref] if ref is not None and 0 <= ref < len(class_names) else "(class withheld)"
    right_lines = [
        w for text in (f"{ref_label} map: {ref_name}", f"model argmax: {pred_name}", "") for w in _wrap(text, width)
    ]
    rows = max(len(left_lines), len(right_lines))
    left = _caption(blend(image, verdict.cam), left_lines, rows, (120, 255, 120) if verdict.accepted else (90, 90, 255))
    right = _caption(blend(image, verdict.reference_cam), right_lines, rows)
    return np.hstack([left, np.full((left.shape[0], 4, 3), 40, np.uint8), right])


def overlay_path(folder: str | Path, source: str | Path, taken: set, suffix: str = ".overlay.png") -> Path:
    """Where the overlay of ``source`` goes in ``folder``: ``<stem><suffix>``, or — when another input of
    the same run already took that name (``hand.png`` and ``hand.jpg``; ``0000.png`` in two folders) —
    ``<folder>-<stem>-<extension><suffix>``, numbered as a last resort. ``taken`` (names used so far in
    this run) is extended."""
    p = Path(source)
    names = [p.stem, "-".join(x for x in (p.parent.name, p.stem, p.suffix.lstrip(".")) if x)]
    name = next((n for n in names if n not in taken), None)
    if name is None:
        k = 2
        while f"{names[-1]}-{k}" in taken:
            k += 1
        name = f"{names[-1]}-{k}"
    taken.add(name)
    return Path(folder) / f"{name}{suffix}"


def write_overlay(path: str | Path, image: np.ndarray, verdict, class_names: list[str], *, title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), overlay_image(image, verdict, class_names, title=title)):
        raise OSError(f"{path}: could not write the overlay PNG")
    return path
