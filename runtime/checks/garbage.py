"""Garbage-class check: the classifier has one extra output trained on off-distribution images.

An input whose argmax is that class is rejected outright (``GARBAGE_CLASS``): the combined statistic is
0 for it (:func:`gamguard.runtime.checks.combine.combined_statistic`), so its in-distribution firings
are part of the conformal false-rejection budget.

So that the check also *ranks* (an argmax is yes/no, and ties at 0 make a poor ROC), it has a
continuous score too, the **garbage margin** ``logit[garbage] - max over real classes of logit``
(negative for a confident in-distribution prediction, positive exactly when the argmax is garbage).
Its one-sided p-value against the null part (``garbage.p``) enters the combined statistic like the
other checks' p-values; ``GARBAGE_CLASS`` also fires when ``garbage.p`` falls below the conformal
level ``t*`` — an input the model finds unusually close to garbage for in-distribution data.
"""

from __future__ import annotations

import numpy as np


def garbage_prediction(logits: np.ndarray, garbage: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(probability of the garbage class [N], garbage margin [N], argmax is garbage [N] bool)``."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z[:, garbage]) / np.exp(z).sum(axis=1)
    real = np.delete(logits, garbage, axis=1)
    margin = logits[:, garbage] - real.max(axis=1)
    return prob, margin, logits.argmax(axis=1) == garbage


def garbage_fires(
    garbage_pred: np.ndarray, garbage_p: np.ndarray, level: float, enforced: set[str], *, strict: bool = False
) -> np.ndarray:
    """``GARBAGE_CLASS`` fired: the check is enforced and the input is predicted as garbage or its
    garbage-margin p-value is below ``level`` (``<= level`` under the strict policy)."""
    if "garbage" not in enforced:
        return np.zeros(np.asarray(garbage_pred).shape, bool)
    p = np.asarray(garbage_p, np.float64)
    low = p <= level if strict else p < level
    return np.asarray(garbage_pred, bool) | low
