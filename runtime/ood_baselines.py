"""Published post-hoc out-of-distribution scores, used as baselines for the guard.

Every function returns an *OOD score*: higher means "more likely out of distribution", so all of them
(and the guard's own rejection statistic) feed the same ROC code. Pure numpy, no torch.

References
----------
- Maximum softmax probability: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
  Out-of-Distribution Examples in Neural Networks", ICLR 2017.
- Energy score: Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020.
- Max logit: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
- Mahalanobis distance: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
  Samples and Adversarial Attacks", NeurIPS 2018 (class means, one tied covariance); on radiographs
  Wollek et al., 2024 report it as the strongest simple detector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax


def msp_score(logits: np.ndarray) -> np.ndarray:
    """``1 - max softmax probability`` over the given classes (pass real classes only)."""
    return 1.0 - softmax(np.asarray(logits, np.float64), axis=1).max(axis=1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy ``-T · logsumexp(logits / T)``; in-distribution inputs have lower energy."""
    z = np.asarray(logits, np.float64)
    return -temperature * logsumexp(z / temperature, axis=1)


def max_logit_score(logits: np.ndarray) -> np.ndarray:
    """``-max logit``."""
    return -np.asarray(logits, np.float64).max(axis=1)


@dataclass
class MahalanobisDetector:
    """Class-conditional Gaussians with a tied covariance, fitted on in-distribution training features.

    The score of a feature vector is its smallest squared Mahalanobis distance to any class mean.
    A small ridge (``shrinkage`` × mean variance) keeps the covariance invertible when features
    outnumber samples.
    """

    means: np.ndarray  # [K, D]
    precision: np.ndarray  # [D, D]

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, shrinkage: float = 1e-3) -> "MahalanobisDetector":
        x = np.asarray(features, np.float64).reshape(len(features), -1)
        y = np.asarray(labels)
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / len(x)
        cov += shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        return cls(means=means, precision=np.linalg.inv(cov))

    def score(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, np.float64).reshape(len(features), -1)
        d = x[:, None, :] - self.means[None, :, :]  # [N, K, D]
        dist = np.einsum("nkd,de,nke->nk", d, self.precision, d)
        return dist.min(axis=1)
