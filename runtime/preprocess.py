"""Preprocessing from a decoded image to the model's input tensor.

One function, used by training (exporter), calibration and serving alike, so references and
thresholds are computed on exactly the numbers the served model sees.

Decoded images are 2-D float32 arrays in [0, 1], MONOCHROME2 (bone bright) — the decoder's contract.
"""

from __future__ import annotations

import cv2
import numpy as np

from .bundle import InputSpec


class InvalidInput(ValueError):
    """The input cannot be turned into a model input (wrong shape, dtype, NaN/Inf, ...)."""


def resize_image(image: np.ndarray, height: int, width: int, resize: str = "stretch") -> np.ndarray:
    """Bring a 2-D image to ``height x width``.

    ``stretch`` resizes both axes independently (area interpolation when shrinking, bilinear when
    enlarging); ``letterbox`` keeps the aspect ratio and pads with zeros (black) centred.
    """
    h, w = image.shape
    if resize == "stretch":
        if (h, w) == (height, width):
            return image.astype(np.float32, copy=False)
        interp = cv2.INTER_AREA if (h > height or w > width) else cv2.INTER_LINEAR
        return cv2.resize(image, (width, height), interpolation=interp).astype(np.float32, copy=False)
    if resize == "letterbox":
        scale = min(height / h, width / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(image, (nw, nh), interpolation=interp)
        out = np.zeros((height, width), np.float32)
        top, left = (height - nh) // 2, (width - nw) // 2
        out[top : top + nh, left : left + nw] = small
        return out
    raise InvalidInput(f"unknown resize policy {resize!r} (expected 'stretch' or 'letterbox')")


#: the smallest height and width an image may have
MIN_SIDE = 8


def accepts_size(height: int, width: int) -> bool:
    """Whether :func:`preprocess` takes a decoded image of this size (its only check that a decoded grey
    image of finite pixels in [0, 1] can fail)."""
    return height >= MIN_SIDE and width >= MIN_SIDE


def preprocess(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One decoded image (H x W float in [0, 1]) → model input ``[C, H, W]`` float32."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise InvalidInput(f"expected a 2-D grayscale image, got shape {image.shape}")
    if not accepts_size(*image.shape):
        raise InvalidInput(f"image too small: {image.shape[1]}x{image.shape[0]} pixels")
    if not np.issubdtype(image.dtype, np.floating):
        raise InvalidInput(f"expected float pixels in [0, 1], got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise InvalidInput("image contains NaN or Inf")
    x = resize_image(np.clip(image, 0.0, 1.0).astype(np.float32, copy=False), spec.height, spec.width, spec.resize)
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    if spec.channel_source != "grey-replicated":
        raise InvalidInput(f"unsupported input channel_source {spec.channel_source!r}")
    # grey-replicated: every model channel sees the grey pixels, normalised with its own mean/std
    x = np.broadcast_to(x, (spec.channels, spec.height, spec.width))
    return ((x - mean) / std).astype(np.float32, copy=False)


def preprocess_batch(images, spec: InputSpec) -> np.ndarray:
    """A list of decoded images → ``[N, C, H, W]`` float32."""
    return (
        np.stack([preprocess(im, spec) for im in images])
        if len(images)
        else np.zeros((0, spec.channels, spec.height, spec.width), np.float32)
    )
