"""Early-feature check: class-conditional Mahalanobis distance of the early-layer features.

Why: the attention check looks at *where* the classifier looks; it can be fooled by an input whose
Grad-CAM happens to land in the usual place (a rotated or contrast-inverted radiograph, another
anatomy with a bright blob in the same spot). The early convolutional layer still encodes the raw
structure of the image — edges, bone/soft-tissue contrast, their layout — so comparing it with what
the layer shows on in-distribution images catches structural misalignment.

Score (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018 — the strongest simple detector on radiographs in Wollek et al.
2024 — on the features in polar form): with ``x`` the flattened ``early`` output (``D = C·h·w`` values;
the fused model average-pools the activations to a small grid), its direction ``u = x / |x|`` and
log-norm ``l = log |x|`` (``|x|`` at least ``eps``), per real class the mean direction ``mu_k`` and the
median log-norm ``m_k``, ONE tied covariance ``S`` of the directions and one pooled within-class variance
``v`` of the log-norms, estimated robustly (``v = (1.4826 · median |l - m_k|)^2``, the normal-consistent
median absolute deviation: a few blank or faint reference images must not inflate it),

    feature(x) = min_k [ (u - mu_k)^T S^-1 (u - mu_k) + (l - m_k)^2 / v ]    (higher = more dissimilar)

i.e. the Mahalanobis distance of ``(u, l)`` under a block-diagonal tied covariance.

Why the direction: the norm of the early activations follows the image's overall exposure and
contrast, which vary between consoles; left inside the vector it is one direction of large variance
that dominates the distance and, through the shared covariance, blurs the layout the check is for.
Scaling the features to unit length first is Mueller & Hein's "Mahalanobis++: Improving OOD Detection
via Feature Normalization" (2025). Why the log-norm beside it: unit length alone throws the norm away,
so a nearly featureless input (little edge energy, a small norm) whose few activations happen to have
the usual layout would look in-distribution; as its own, separately scaled term the norm counts as one
more coordinate instead of dominating. Chosen on validation data only (the PneumoniaMNIST validation split
against synthetic off-distribution content and wrong presentations, the protocol of
``scripts/choose_combination.py``): mean AUROC 0.983 for the polar form and for unit length alone,
0.975 for the raw features; under strong acquisition changes 0.80, 0.80 and 0.66.
Bundles calibrated before (``feature_kind`` ``mahalanobis_ledoit_wolf``) keep the raw features.

``S`` is the Ledoit-Wolf shrunk covariance of the class-centred reference directions
(:class:`sklearn.covariance.LedoitWolf`: ``D`` is ~1000 and the sample covariance of a few thousand
images is ill-conditioned; the shrinkage is chosen analytically, no tuning). Everything is fitted on
the reference images — the model's training images when calibration is given them (plentiful), else
the reference part of the calibration set — with their labels.

Stored form (``reference.npz``), chosen so that serving (and an in-graph implementation) is two matrix
products: ``W`` = the lower Cholesky factor of the block-diagonal precision ``diag(S^-1, 1/v) = W W^T``
(``feature_whitener``, ``[D + 1, D + 1]`` float32) and the whitened class means ``(mu_k, m_k) W``
(``feature_means_white``, ``[K, D + 1]``); then ``feature(x) = min_k |(u, l) W - (mu_k, m_k) W|^2``.
``feature_means`` (raw ``(mu_k, m_k)``) and ``feature_shrinkage`` are kept for people. A non-finite
activation gives ``inf`` (fail closed).

On the ``evaluate`` preset's model this score alone separates the PneumoniaMNIST test split from the
evaluation's off-distribution sets with AUROC 0.994-1.000 (the PCA score it replaces: 0.97 inside the guard).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import BundleError

#: ``feature_kind`` of a reference on the polar form (what :meth:`FeatureReference.fit` writes)
KIND = "mahalanobis_polar_ledoit_wolf"
#: ``feature_kind`` of a reference on the raw features (bundles calibrated before the polar form): still served
RAW_KIND = "mahalanobis_ledoit_wolf"
#: the smallest norm a feature vector is divided by (an all-zero vector: direction 0, log-norm log(eps))
NORM_EPS = 1e-12
#: the median absolute deviation of a normal distribution times this is its standard deviation
MAD_TO_SD = 1.4826


def polar(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``[N, D]`` in polar form ``[N, D + 1]``: the direction ``x / |x|`` and ``log |x|``
    (``|x|`` at least :data:`NORM_EPS`), in ``x``'s dtype."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        norm = np.maximum(np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True), NORM_EPS)  # no overflow
        return np.concatenate([x / norm, np.log(norm)], axis=1).astype(x.dtype)


@dataclass
class FeatureReference:
    whitener: np.ndarray  # [F, F] float32, lower Cholesky factor of the precision (F = D + 1 in polar form)
    means_white: np.ndarray  # [K, F] float32, class means times the whitener
    means: np.ndarray  # [K, F] float32, raw class means
    shape: tuple[int, ...]  # (C, h, w) of one early output
    shrinkage: float
    n: int
    normalize: bool = True  # features in polar form (KIND); False: raw features (RAW_KIND)

    @property
    def kind(self) -> str:
        return KIND if self.normalize else RAW_KIND

    @classmethod
    def fit(cls, early: np.ndarray, labels: np.ndarray) -> "FeatureReference":
        """Fit on early activations ``[N, C, h, w]`` of in-distribution images and their class labels
        (any integer coding; one mean per distinct label)."""
        from sklearn.covariance import LedoitWolf

        early = np.asarray(early)
        labels = np.asarray(labels)
        if early.ndim != 4 or early.shape[0] < 3 or labels.shape != (early.shape[0],):
            raise ValueError(f"need early features [N>=3, C, h, w] and N labels, got {early.shape}, {labels.shape}")
        x = early.reshape(early.shape[0], -1).astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError("non-finite early features in the reference images")
        x = polar(x)
        classes, y = np.unique(labels, return_inverse=True)
        means = np.stack([x[y == k].mean(axis=0) for k in range(classes.size)])
        # the log-norm's centre and spread robustly (median, MAD): a few blank or faint reference images
        # (log-norms far below the rest) would otherwise inflate v and switch the term off
        means[:, -1] = [np.median(x[y == k, -1]) for k in range(classes.size)]
        centred = x - means[y]
        lw = LedoitWolf(assume_centered=True).fit(centred[:, :-1])  # the directions
        lognorm_var = max(float((MAD_TO_SD * np.median(np.abs(centred[:, -1]))) ** 2), 1e-12)  # pooled
        d = x.shape[1]
        precision = np.zeros((d, d))
        precision[:-1, :-1] = np.linalg.inv(lw.covariance_)
        precision[-1, -1] = 1.0 / lognorm_var
        whitener = np.linalg.cholesky((precision + precision.T) / 2.0)
        return cls(
            whitener=whitener.astype(np.float32),
            means_white=(means @ whitener).astype(np.float32),
            means=means.astype(np.float32),
            shape=tuple(early.shape[1:]),
            shrinkage=float(lw.shrinkage_),
            n=int(x.shape[0]),
        )

    def score(self, early: np.ndarray) -> np.ndarray:
        """Dissimilarity score per input, ``[N]`` float64 (see module docstring)."""
        early = np.asarray(early, np.float32)
        if tuple(early.shape[1:]) != self.shape:
            raise ValueError(f"early features {early.shape[1:]} do not match the reference {self.shape}")
        with np.errstate(invalid="ignore", over="ignore"):
            x = early.reshape(early.shape[0], -1)
            if self.normalize:
                x = polar(x)
            z = x @ self.whitener  # float32 matmul: the hot path
            d = ((z[:, None, :] - self.means_white[None]).astype(np.float64) ** 2).sum(axis=2)
            out = d.min(axis=1)
        out[~np.isfinite(out)] = np.inf
        return out

    def facts(self) -> dict:
        """What ``bundle.json`` says about it (``calibration.feature_reference``; the arrays are in
        ``reference.npz``)."""
        return {
            "kind": self.kind,
            "score": "min_k |(u, log|x|) W - m_k|^2, u = x/|x|" if self.normalize else "min_k |x W - m_k|^2",
            "early_shape": list(self.shape),
            "dimension": int(self.whitener.shape[0]),
            "classes": int(self.means.shape[0]),
            "ledoit_wolf_shrinkage": round(self.shrinkage, 6),
            "n": self.n,
        }

    def to_arrays(self, prefix: str = "feature_") -> dict[str, np.ndarray]:
        return {
            f"{prefix}kind": np.asarray(self.kind),
            f"{prefix}whitener": self.whitener,
            f"{prefix}means_white": self.means_white,
            f"{prefix}means": self.means,
            f"{prefix}shape": np.asarray(self.shape, np.int64),
            f"{prefix}shrinkage": np.asarray(self.shrinkage),
            f"{prefix}n": np.asarray(self.n),
        }

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "feature_") -> "FeatureReference":
        kind = str(arrays.get(f"{prefix}kind", ""))
        if f"{prefix}whitener" not in arrays or kind not in (KIND, RAW_KIND):
            raise BundleError(
                "reference.npz holds an early-feature reference of an older gamguard (per-element PCA score); "
                "this version uses a class-conditional Mahalanobis distance: re-calibrate the bundle "
                "(gamguard calibrate --bundle DIR --data DIR | --phantoms N)"
            )
        return cls(
            whitener=np.asarray(arrays[f"{prefix}whitener"], np.float32),
            means_white=np.asarray(arrays[f"{prefix}means_white"], np.float32),
            means=np.asarray(arrays[f"{prefix}means"], np.float32),
            shape=tuple(int(v) for v in np.asarray(arrays[f"{prefix}shape"])),
            shrinkage=float(arrays[f"{prefix}shrinkage"]),
            n=int(arrays[f"{prefix}n"]),
            normalize=kind == KIND,
        )
