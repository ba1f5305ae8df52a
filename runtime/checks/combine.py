"""The combined decision: every enforced check's p-value → one statistic → a split-conformal cut.

Each check gives a one-sided p-value against the null part: ``garbage.p`` (garbage margin),
``attention.p`` and ``feature.p``. The combined statistic is their minimum over the enforced checks,
``combined_p = min(p of the enforced checks)``, and ``s = combined_p`` except ``s = 0`` for an input
predicted as the garbage class when the garbage check is enforced. The minimum was chosen on
validation data (docs/architecture.md, "Decision"): it ranked off-distribution inputs best of the
rules tried (Fisher's ``-2 Σ log p``, weighted Fisher, a learned logistic weighting) and keeps a
one-line explanation — a rejected input names every check whose p-value is below the cut.

An input is rejected when its conformal p-value ``(1 + #{b in B: s_b <= s}) / (|B| + 1)`` is
``<= alpha`` (``B``: the conformal part of the calibration set); by exchangeability (split conformal
inference) the in-distribution false-rejection rate is then at most ``alpha``, garbage-class
rejections of in-distribution images included. Equivalently: reject when ``s < t*`` with
``t* = s_(k+1)``, ``k = floor(alpha (|B| + 1)) - 1``. ``t*`` is computed for every subset of
enforced checks, so checks can be switched at serve time without losing the guarantee.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .attention import AttentionNull, failed_measures
from .errors import CalibrationError
from .garbage import garbage_fires
from .pvalues import TailPValue
from .scores import ScoreSet

CHECKS = ("garbage", "attention", "feature")


def checks_key(checks: Iterable[str]) -> str:
    """Canonical name of a set of enforced checks, e.g. ``"garbage+attention+feature"``."""
    checks = set(checks)
    unknown = checks - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; known: {', '.join(CHECKS)}")
    if not checks:
        raise ValueError("at least one check must be enforced")
    return "+".join(c for c in CHECKS if c in checks)


def all_check_sets() -> list[str]:
    return [checks_key(s) for r in range(1, len(CHECKS) + 1) for s in itertools.combinations(CHECKS, r)]


class NullModel:
    """Per-check p-value tables built from the null part's scores (garbage-predicted images left out):
    the attention check's (:class:`~gamguard.runtime.checks.attention.AttentionNull`) and the feature
    check's (one pooled :class:`~gamguard.runtime.checks.pvalues.TailPValue`)."""

    def __init__(self, null: ScoreSet, n_classes: int):
        s = null.take(~null.garbage_pred)
        if s.feature.size < 10:
            raise CalibrationError(
                f"only {s.feature.size} non-garbage images in the null part; calibrate with more in-distribution images"
            )
        self.attention = AttentionNull(s, n_classes)
        self.feature = TailPValue(s.feature)
        self.garbage = TailPValue(s.garbage_margin)
        self.n = int(s.feature.size)

    @property
    def per_class(self) -> dict:
        return self.attention.per_class

    def tables_for(self, cls: int) -> list[TailPValue]:
        return self.attention.tables_for(cls)

    def pvalues(self, scores: ScoreSet) -> "PValues":
        """Every check's p-value for a batch of scores."""
        pm = self.attention.measure_pvalues(scores)
        return PValues(
            measures=pm,
            attention=self.attention.p(pm),
            feature=self.feature(scores.feature),
            garbage=self.garbage(scores.garbage_margin),
            garbage_pred=np.asarray(scores.garbage_pred, bool),
        )

    def attention_p(self, pm: np.ndarray) -> np.ndarray:
        return self.attention.p(pm)

    def measure_level(self, level: float) -> float:
        return self.attention.measure_level(level)


@dataclass
class PValues:
    """Every check's p-value for a batch (:meth:`NullModel.pvalues`)."""

    measures: np.ndarray  # [N, M] per attention measure
    attention: np.ndarray  # [N] attention.p
    feature: np.ndarray  # [N] feature.p
    garbage: np.ndarray  # [N] garbage.p (garbage margin)
    garbage_pred: np.ndarray  # [N] bool, argmax is the garbage class

    def of(self, check: str) -> np.ndarray:
        return getattr(self, check)


def combined_p(pv: PValues, checks: str) -> np.ndarray:
    """``min`` of the enforced checks' p-values: the guard's ranking score (``combined_p``)."""
    return np.minimum.reduce([np.asarray(pv.of(c), np.float64) for c in checks.split("+")])


def combined_statistic(pv: PValues, checks: str) -> np.ndarray:
    """The conformal statistic ``s``: :func:`combined_p`, and 0 for inputs predicted as garbage when
    that check is enforced (they are always rejected)."""
    s = combined_p(pv, checks)
    if "garbage" in checks.split("+"):
        s = np.where(pv.garbage_pred, 0.0, s)
    return s


class ConformalCut:
    """Split-conformal rejection rule on the combined statistic (see module docstring).

    ``null``: the :class:`NullModel` the statistics were computed with (so :func:`decide` can turn
    per-measure p-values into the attention p-value the cut was calibrated on)."""

    def __init__(self, stats: np.ndarray, alpha: float, null: "NullModel | None" = None):
        self.stats = np.sort(np.asarray(stats, np.float64))
        self.alpha = float(alpha)
        self.null = null
        n = self.stats.size
        k = int(math.floor(alpha * (n + 1) + 1e-9)) - 1  # number of calibration stats a rejected s may be >=
        self.threshold = float(self.stats[k]) if 0 <= k < n else 0.0  # reject iff s < threshold

    def p_value(self, s: np.ndarray) -> np.ndarray:
        return (1.0 + np.searchsorted(self.stats, s, side="right")) / (self.stats.size + 1.0)

    def rejects(self, s: np.ndarray) -> np.ndarray:
        return np.asarray(s) < self.threshold


@dataclass
class Decisions:
    reject: np.ndarray  # [N] bool
    garbage: np.ndarray  # [N] bool, GARBAGE_CLASS fired
    attention: np.ndarray  # [N] bool, ATTENTION_MISMATCH fired
    feature: np.ndarray  # [N] bool, FEATURE_MISMATCH fired
    failed_measures: np.ndarray  # [N, M] bool
    level: float  # the p-value level a check is compared with (t* or alpha)
    attention_p: np.ndarray  # [N] the attention check's p-value
    combined_p: np.ndarray  # [N] min of the enforced checks' p-values
    measure_level: float  # the per-measure p-value level equivalent to ``level``


def decide(
    pv: PValues,
    *,
    checks: str,
    policy: str,
    alpha: float,
    cut: ConformalCut | None,
    null: NullModel | None = None,
) -> Decisions:
    """Vectorised decision for a batch (``null`` defaults to ``cut.null``).

    ``calibrated``: a check fails when its p-value is below the conformal level t* (so the combined
    rule rejects exactly when some enforced check fails; the garbage check also fails on a garbage
    argmax); ``strict``: a check fails when its own p-value is <= alpha (no sharing of the budget
    between checks: more false rejections, by design). The failed measures of an attention failure
    are those whose own p-value is below the per-measure level equivalent to the check's level (at
    least the smallest one)."""
    null = null if null is not None else getattr(cut, "null", None)
    if null is None:
        raise ValueError("decide needs the null model (pass null= or a cut built with one)")
    enforced = set(checks.split("+"))
    if policy == "calibrated":
        if cut is None:
            raise ValueError("calibrated policy needs a conformal cut")
        level = cut.threshold
        att, feat = pv.attention < level, pv.feature < level
    elif policy == "strict":
        level = alpha
        att, feat = pv.attention <= level, pv.feature <= level
    else:
        raise ValueError(f"unknown policy {policy!r} (calibrated, strict)")
    garbage = garbage_fires(pv.garbage_pred, pv.garbage, level, enforced, strict=policy == "strict")
    mlevel = null.measure_level(level)
    if "attention" not in enforced:
        att = np.zeros_like(att)
    if "feature" not in enforced:
        feat = np.zeros_like(feat)
    failed = failed_measures(pv.measures, att, mlevel)
    return Decisions(
        reject=garbage | att | feat,
        garbage=garbage,
        attention=att,
        feature=feat,
        failed_measures=failed,
        level=float(level),
        attention_p=pv.attention,
        combined_p=combined_p(pv, checks),
        measure_level=mlevel,
    )
