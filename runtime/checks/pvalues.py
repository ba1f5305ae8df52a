"""Scores to p-values: every check's score is judged against its distribution on in-distribution data.

:class:`TailPValue` is the one-sided empirical p-value (in the direction of dissimilarity) that every
check uses; :func:`dissimilarity` orients a similarity measure so that higher means more dissimilar.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
from scipy.special import gammaincinv

from ..similarity import HIGHER_IS_SIMILAR
from .errors import CalibrationError

TAIL_FRACTION = 0.1
#: the tail scale is the upper confidence bound of the exponential scale at this level (see TailPValue)
TAIL_CONFIDENCE = 0.95


def dissimilarity(measure: str, values: np.ndarray) -> np.ndarray:
    """Orient a score so that higher means more dissimilar (the rejection direction)."""
    values = np.asarray(values, np.float64)
    return -values if HIGHER_IS_SIMILAR[measure] else values


class TailPValue:
    """One-sided empirical p-value of a dissimilarity ``x`` against a null sample, made continuous.

    Inside the null's range: linear interpolation of ``(1 + #{null >= x}) / (n + 1)`` between the
    sorted null values (1 below the minimum). Beyond the null maximum the rank p-value would stick at
    its floor ``~1/(n+1)``, so ties among all far-off inputs would make a conformal cut impossible;
    there the p-value decays exponentially, ``p_max · exp(-(x - x_max) / scale)`` (an exponential tail,
    i.e. a generalised Pareto tail with shape 0). Non-finite ``x`` gives 0.

    ``scale`` is a *conservative* estimate: the one-sided upper ``TAIL_CONFIDENCE`` (95 %) confidence
    bound of the exponential scale from the ``k`` excesses of the top ``TAIL_FRACTION`` of the null over
    its ``1 - TAIL_FRACTION`` quantile. Their sum is ``Gamma(k, scale)``-distributed, so the bound is
    ``sum / Q_Gamma(k)(1 - TAIL_CONFIDENCE)`` — 2.5× the mean excess at ``k = 5``, 1.6× at ``k = 14``,
    → 1 for large nulls. Why: everything beyond the null's maximum is extrapolated from a handful of
    points, and the guard combines the checks by their smallest p-value, so an extrapolation that is
    too steep (a mean excess that happened to be small) lets one check claim evidence (``p`` of 1e-9 and
    below) on in-distribution images from a new site that the data never showed; that single check
    then outranks every other check's evidence on truly off-distribution inputs. The wider tail keeps
    every check's order of its own scores and keeps extrapolated p-values within what the null part
    can support. ``min_scale`` floors the scale (for a score that is itself ``-log p``: 1, so that a
    re-calibration never reports stronger evidence than the p-value it re-calibrates).
    The validity of the guard's false-rejection bound does not rest on this smoothing: the final cut
    is conformal on a separate part.
    """

    def __init__(self, null: np.ndarray, min_scale: float = 0.0):
        x = np.sort(np.asarray(null, np.float64)[np.isfinite(null)])
        if x.size < 2:
            raise CalibrationError(f"need at least 2 finite null scores for a p-value table, got {x.size}")
        n = x.size
        self.knots = x
        self.pvals = (n - np.arange(n) + 1.0) / (n + 1.0)  # 1 at the minimum
        q = np.quantile(x, 1.0 - TAIL_FRACTION)
        top = x[-max(5, int(math.ceil(TAIL_FRACTION * n))) :]
        excess = np.maximum(top - q, 0.0)
        upper = float(excess.sum()) / float(gammaincinv(top.size, 1.0 - TAIL_CONFIDENCE))
        spread = float(x[-1] - x[0])
        self.scale = max(upper, 1e-3 * spread, float(min_scale), 1e-9)
        self.n = n
        self._knot_list, self._pval_list = x.tolist(), self.pvals.tolist()  # for one()

    def __call__(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, np.float64)
        p = np.interp(v, self.knots, self.pvals)  # NaN stays NaN
        beyond = v > self.knots[-1]
        if beyond.any():
            with np.errstate(over="ignore", invalid="ignore"):
                p[beyond] = self.pvals[-1] * np.exp(-(v[beyond] - self.knots[-1]) / self.scale)
        p[~np.isfinite(v)] = 0.0  # fail closed: a score that cannot be judged is maximally suspicious
        return p

    def one(self, value: float) -> float:
        """:meth:`__call__` for one Python float (serving: one image at a time, without numpy's per-call
        overhead). The same arithmetic as ``np.interp`` between the knots (bit-equal there); beyond the
        last knot ``math.exp`` may differ from numpy's vectorised ``exp`` in the last bit
        (``tests/test_calibration.py`` holds both equal to 1e-12)."""
        if not math.isfinite(value):
            return 0.0
        knots, last = self._knot_list, len(self._knot_list) - 1
        if value > knots[last]:
            return self._pval_list[last] * math.exp(-(value - knots[last]) / self.scale)
        if value >= knots[last]:
            return self._pval_list[last]
        if value < knots[0]:
            return self._pval_list[0]
        j = bisect.bisect_right(knots, value) - 1  # knots[j] <= value < knots[j + 1]
        p0, p1 = self._pval_list[j], self._pval_list[j + 1]
        return (p1 - p0) / (knots[j + 1] - knots[j]) * (value - knots[j]) + p0

    def inverse(self, level: float) -> float:
        """The dissimilarity at which the p-value equals ``level`` (for human-readable thresholds)."""
        if level >= 1.0:
            return float(self.knots[0])
        if level >= self.pvals[-1]:
            return float(np.interp(level, self.pvals[::-1], self.knots[::-1]))
        if level <= 0:
            return math.inf
        return float(self.knots[-1] + self.scale * math.log(self.pvals[-1] / level))


def neglog(p: np.ndarray) -> np.ndarray:
    """``-log p`` (``inf`` for 0), the scale on which p-values are combined and re-calibrated."""
    with np.errstate(divide="ignore"):
        return -np.log(np.asarray(p, np.float64))
