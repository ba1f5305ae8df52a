"""The guard's serve-time decision: engine outputs → scores → p-values → accept or reject, with reasons.

One module per check and one for their combination:

* :mod:`.scores` — :func:`score_outputs`: the raw scores of a batch (seven similarity measures, the
  feature score, the garbage prediction), :class:`ScoreSet`;
* :mod:`.pvalues` — :class:`TailPValue`, the empirical p-value every check uses;
* :mod:`.garbage` — the garbage-class check (``GARBAGE_CLASS``);
* :mod:`.attention` — the Grad-CAM attention check (``ATTENTION_MISMATCH``);
* :mod:`.feature` — the early-feature check (``FEATURE_MISMATCH``), :class:`FeatureReference`;
* :mod:`.combine` — the checks' p-values combined and cut conformally (:func:`decide`, and
  :class:`DecisionRule`, its per-image form for serving);
* :mod:`.reference` — :class:`CalibrationData`, everything the above loads from ``reference.npz``;
* :mod:`.graph` — the same per-image arithmetic (measures, feature score, p-values) as an ONNX
  subgraph appended to the fused model, so the engine can compute it where it runs.

The offline job that produces ``reference.npz`` is :mod:`gamguard.runtime.calibration`.
"""

from __future__ import annotations

from .combine import (
    CHECKS,
    DEFAULT_WEIGHTS,
    EQUAL,
    LEGACY_WEIGHTS,
    REASON_OF_CHECK,
    Combination,
    ConformalCut,
    CutMethod,
    DecisionRule,
    Decisions,
    NullModel,
    OneDecision,
    PValues,
    all_check_sets,
    check_levels,
    checks_key,
    combined_p,
    combined_statistic,
    conformal_statistic,
    decide,
    decision_order,
    out_of_fold_pvalues,
)
from .errors import CalibrationError
from .feature import FeatureReference
from .pvalues import TailPValue, dissimilarity
from .reference import DEFAULT_ALPHA, CalibrationData, read_reference_arrays
from .scores import SCORE_FIELDS, ScoreSet, real_class_indices, score_outputs, softmax

__all__ = [
    "CHECKS",
    "REASON_OF_CHECK",
    "DEFAULT_ALPHA",
    "DEFAULT_WEIGHTS",
    "EQUAL",
    "LEGACY_WEIGHTS",
    "SCORE_FIELDS",
    "CalibrationData",
    "CalibrationError",
    "Combination",
    "ConformalCut",
    "CutMethod",
    "DecisionRule",
    "Decisions",
    "FeatureReference",
    "NullModel",
    "OneDecision",
    "PValues",
    "ScoreSet",
    "TailPValue",
    "all_check_sets",
    "check_levels",
    "checks_key",
    "combined_p",
    "combined_statistic",
    "conformal_statistic",
    "decide",
    "decision_order",
    "dissimilarity",
    "out_of_fold_pvalues",
    "read_reference_arrays",
    "real_class_indices",
    "score_outputs",
    "softmax",
]
