"""The guard's raw scores for a batch of engine outputs: similarity measures, feature score, garbage.

:func:`score_outputs` is the one place that turns the fused model's outputs (logits, Grad-CAM, early
features) into the numbers every check judges; calibration and serving both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..similarity import DEFAULT_GRID, MEASURES, batch_scores
from .feature import FeatureReference
from .garbage import garbage_prediction

#: the array fields of a :class:`ScoreSet` besides its optional ``label``, in constructor order
SCORE_FIELDS = ("sims", "feature", "pred", "pred_real", "garbage_prob", "garbage_pred", "garbage_margin")


@dataclass
class ScoreSet:
    """The guard's raw scores for a set of images (no decisions)."""

    sims: np.ndarray  # [N, M] raw similarity scores, columns in MEASURES order
    feature: np.ndarray  # [N] early-feature dissimilarity
    pred: np.ndarray  # [N] argmax over all classes (garbage included)
    pred_real: np.ndarray  # [N] argmax over the real classes
    garbage_prob: np.ndarray  # [N]
    garbage_pred: np.ndarray  # [N] bool, argmax is the garbage class
    garbage_margin: np.ndarray  # [N] garbage logit minus the largest real-class logit
    label: np.ndarray | None = None  # [N] true class indices when known (calibration)

    def take(self, idx) -> "ScoreSet":
        return ScoreSet(
            self.sims[idx],
            self.feature[idx],
            self.pred[idx],
            self.pred_real[idx],
            self.garbage_prob[idx],
            self.garbage_pred[idx],
            self.garbage_margin[idx],
            None if self.label is None else self.label[idx],
        )

    @staticmethod
    def concat(parts: Sequence["ScoreSet"]) -> "ScoreSet":
        labels = None if any(p.label is None for p in parts) else np.concatenate([p.label for p in parts])
        return ScoreSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in SCORE_FIELDS), label=labels)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}{f}": getattr(self, f) for f in SCORE_FIELDS}
        if self.label is not None:
            out[f"{prefix}label"] = self.label
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "ScoreSet":
        label = arrays[f"{prefix}label"] if f"{prefix}label" in arrays else None
        return cls(*(np.asarray(arrays[f"{prefix}{f}"]) for f in SCORE_FIELDS), label=label)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def real_class_indices(n_classes: int, garbage: int) -> np.ndarray:
    return np.array([i for i in range(n_classes) if i != garbage], dtype=np.int64)


def score_outputs(
    logits,
    cam,
    early,
    *,
    garbage: int,
    ref_cams: np.ndarray,
    feature_ref: FeatureReference,
    grid: int = DEFAULT_GRID,
    refs_prepared: bool = False,
) -> ScoreSet:
    """Raw scores of a batch of engine outputs. ``ref_cams`` is indexed by *real* class position
    (class index with the garbage class removed); passing them already through
    :func:`gamguard.runtime.similarity.prepare` (as :class:`CalibrationData` does) gives identical
    scores — preparing is idempotent — and saves the per-request resampling of the references;
    ``refs_prepared=True`` says they were and skips preparing them again."""
    logits = np.asarray(logits, np.float64)
    if not np.isfinite(logits).all():
        raise ValueError("engine returned non-finite logits")
    # A non-finite CAM raises ValueError in batch_scores (similarity.prepare checks the maps with one
    # read-only pass); it is not tested twice on the hot path.
    real = real_class_indices(logits.shape[1], garbage)
    pred = logits.argmax(axis=1)
    pred_real_pos = logits[:, real].argmax(axis=1)  # position among real classes
    garbage_prob, garbage_margin, garbage_pred = garbage_prediction(logits, garbage)
    sims = batch_scores(cam, ref_cams[pred_real_pos], grid=grid, b_prepared=refs_prepared)
    return ScoreSet(
        sims=np.stack([np.asarray(sims[m], np.float64) for m in MEASURES], axis=1),
        feature=feature_ref.score(early),
        pred=pred,
        pred_real=real[pred_real_pos],
        garbage_prob=garbage_prob,
        garbage_pred=garbage_pred,
        garbage_margin=garbage_margin,
    )
