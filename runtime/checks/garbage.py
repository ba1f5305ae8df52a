"""Garbage-class check: the classifier has one extra output trained on off-distribution images, and an
input whose argmax is that class is rejected (``GARBAGE_CLASS``).

It needs no reference statistics: the classifier itself carries the check. In the combined decision a
garbage prediction sets the combined statistic to 0 (:func:`gamguard.runtime.checks.combine.combined_statistic`),
so it always rejects when the check is enforced, and its in-distribution firings are part of the
conformal false-rejection budget.
"""

from __future__ import annotations

import numpy as np


def garbage_prediction(logits: np.ndarray, garbage: int) -> tuple[np.ndarray, np.ndarray]:
    """``(probability of the garbage class [N], argmax is the garbage class [N] bool)`` from raw logits."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z[:, garbage]) / np.exp(z).sum(axis=1)
    return prob, logits.argmax(axis=1) == garbage


def garbage_fires(garbage_pred: np.ndarray, enforced: set[str]) -> np.ndarray:
    """``GARBAGE_CLASS`` fired: predicted as garbage, and the check is enforced."""
    return np.asarray(garbage_pred, bool) & ("garbage" in enforced)
