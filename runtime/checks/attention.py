"""Attention check: the Grad-CAM map of the predicted class against that class's reference map.

Seven similarity measures (:mod:`gamguard.runtime.similarity`) are each judged against their
distribution on in-distribution data (per predicted class where that class has at least
``MIN_NULL_PER_CLASS`` null images, pooled otherwise) and give ``p_m``; the check's own p-value is the
smallest ``p_m`` calibrated once more against the null part's smallest ``p_m`` (a
:class:`~gamguard.runtime.checks.pvalues.TailPValue` on ``-log min_m p_m``). Without that second step
the minimum of seven correlated p-values would be far from uniform and the attention check would take
most of the combined cut's false-rejection budget from the feature check; with it both checks'
p-values are on the same scale. ``ATTENTION_MISMATCH`` names the measures whose own p-value is below the
per-measure level equivalent to the check's level.
"""

from __future__ import annotations

import math

import numpy as np

from ..similarity import MEASURES
from .pvalues import TailPValue, dissimilarity, neglog
from .scores import ScoreSet

MIN_NULL_PER_CLASS = 30


class AttentionNull:
    """Per-measure p-value tables of the attention check, built from the null part's scores."""

    def __init__(self, null: ScoreSet, n_classes: int):
        self.pooled = [TailPValue(dissimilarity(m, null.sims[:, j])) for j, m in enumerate(MEASURES)]
        self.per_class: dict[int, list[TailPValue]] = {}
        for c in range(n_classes):
            sel = null.pred_real == c
            if sel.sum() >= MIN_NULL_PER_CLASS:
                self.per_class[c] = [TailPValue(dissimilarity(m, null.sims[sel, j])) for j, m in enumerate(MEASURES)]
        # min_scale 1: beyond the null, the check's p-value falls no faster than its smallest measure's
        self.combined = TailPValue(neglog(self.measure_pvalues(null).min(axis=1)), min_scale=1.0)

    def tables_for(self, cls: int) -> list[TailPValue]:
        return self.per_class.get(int(cls), self.pooled)

    def measure_pvalues(self, scores: ScoreSet) -> np.ndarray:
        """p per measure ``[N, M]`` (each against the table of the input's predicted class)."""
        n = scores.feature.shape[0]
        pm = np.empty((n, len(MEASURES)))
        for c in np.unique(scores.pred_real):
            sel = scores.pred_real == c
            for j, (m, table) in enumerate(zip(MEASURES, self.tables_for(c))):
                pm[sel, j] = table(dissimilarity(m, scores.sims[sel, j]))
        return pm

    def p(self, pm: np.ndarray) -> np.ndarray:
        """The attention check's p-value ``[N]`` from the per-measure p-values ``[N, M]``."""
        return self.combined(neglog(np.asarray(pm).min(axis=1)))

    def p_one(self, pm: list[float]) -> float:
        """:meth:`p` for one image's per-measure p-values (Python floats, never NaN)."""
        weakest = min(pm)
        return self.combined.one(-math.log(weakest) if weakest > 0.0 else math.inf)

    def measure_level(self, level: float) -> float:
        """The per-measure p-value below which :meth:`p` falls below ``level``."""
        d = self.combined.inverse(level)
        return float(math.exp(-d)) if math.isfinite(d) else 0.0


def failed_measures(pm: np.ndarray, fired: np.ndarray, measure_level: float) -> np.ndarray:
    """``[N, M]`` bool: the measures named in an ``ATTENTION_MISMATCH`` — those whose own p-value is below
    ``measure_level``, and always at least the weakest one (the table can be flat at the boundary)."""
    failed = (pm < measure_level) & fired[:, None]
    if pm.shape[0]:
        weakest = np.zeros_like(failed)
        weakest[np.arange(pm.shape[0]), pm.argmin(axis=1)] = True
        failed |= weakest & fired[:, None] & ~failed.any(axis=1, keepdims=True)
    return failed
