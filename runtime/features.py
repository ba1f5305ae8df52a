"""Early-feature check: reference statistics of the early layer and a per-input dissimilarity score.

Why: the attention check looks at *where* the classifier looks; it can be fooled by an input whose
Grad-CAM happens to land in the usual place (a rotated or contrast-inverted radiograph, another
anatomy with a bright blob in the same spot). The early convolutional layer still encodes the raw
structure of the image — edges, bone/soft-tissue contrast, their layout — so comparing it with what
the layer shows on in-distribution images catches structural misalignment.

Reference (built from the reference part of the calibration set, all classes pooled because early
layers are class-agnostic): the per-channel, per-position mean map ``mu[C, h, w]`` and standard
deviation ``sd[C, h, w]`` of the early activations (the fused model may already average-pool them to
a small grid). The standard deviation is floored at ``SD_FLOOR_FRACTION`` of its median over the map
(plus a tiny epsilon) so that a position that is always dark in the reference cannot blow the score up.

Score (higher = more dissimilar): the mean squared standardised deviation

    feature(x) = mean_{c, i, j} ((x[c, i, j] - mu[c, i, j]) / sd[c, i, j])^2

— a diagonal-covariance Mahalanobis distance per element, ≈ 1 for a typical in-distribution input.
A non-finite activation gives ``inf`` (maximally dissimilar: the check fails closed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SD_FLOOR_FRACTION = 0.1
_EPS = 1e-6


@dataclass
class FeatureReference:
    mean: np.ndarray  # [C, h, w] float32
    sd: np.ndarray  # [C, h, w] float32, floored
    n: int

    @classmethod
    def fit(cls, early: np.ndarray) -> "FeatureReference":
        """Reference statistics from early activations ``[N, C, h, w]`` of in-distribution images."""
        early = np.asarray(early, np.float64)
        if early.ndim != 4 or early.shape[0] < 2:
            raise ValueError(f"need early features [N>=2, C, h, w], got {early.shape}")
        mean = early.mean(axis=0)
        sd = early.std(axis=0)
        floor = SD_FLOOR_FRACTION * float(np.median(sd)) + _EPS
        return cls(mean=mean.astype(np.float32), sd=np.maximum(sd, floor).astype(np.float32),
                   n=int(early.shape[0]))

    def score(self, early: np.ndarray) -> np.ndarray:
        """Dissimilarity score per input, ``[N]`` float64 (see module docstring)."""
        early = np.asarray(early, np.float32)
        if early.shape[1:] != self.mean.shape:
            raise ValueError(f"early features {early.shape[1:]} do not match the reference {self.mean.shape}")
        z = (early - self.mean) / self.sd
        out = np.einsum("nchw,nchw->n", z, z, dtype=np.float64) / z[0].size
        out[~np.isfinite(out)] = np.inf
        return out

    def to_arrays(self, prefix: str = "feature_") -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean, f"{prefix}sd": self.sd, f"{prefix}n": np.asarray(self.n)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "feature_") -> "FeatureReference":
        return cls(mean=np.asarray(arrays[f"{prefix}mean"], np.float32),
                   sd=np.asarray(arrays[f"{prefix}sd"], np.float32), n=int(arrays[f"{prefix}n"]))
