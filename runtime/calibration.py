"""References and calibration: what the guard compares against, and where its thresholds come from.

``gamguard calibrate`` runs the *deployed engine* (:func:`gamguard.runtime.engine.create_engine`, the
same ONNX Runtime session the server uses) over an in-distribution calibration set and writes
``reference.npz`` plus the ``calibration`` section of ``bundle.json`` (re-hashing the bundle).

Split (seeded, ``--seed``, default 0): the images are shuffled with ``numpy.random.default_rng(seed)``
and cut into three parts —

* **reference** (50 %): per real class, the mean Grad-CAM of the *correctly classified* images (of
  all its images when fewer than ``MIN_REFERENCE_PER_CLASS`` are correct); the early-feature reference statistics
  (:class:`gamguard.runtime.features.FeatureReference`, all images, classes pooled);
* **null** (25 %, "part A"): every check's score distribution on in-distribution data. Each score
  becomes a one-sided empirical p-value in the direction of dissimilarity (:class:`TailPValue`).
  Attention measures are scored against the reference map of the *predicted* class (that is what
  serving does) and get per-class null distributions when that class has at least
  ``MIN_NULL_PER_CLASS`` null images, the pooled distribution otherwise; the feature score is pooled;
* **conformal** (25 %, "part B"): the distribution of the combined statistic
  ``s = min(p-values of the enforced checks)`` (``s = 0`` for an input predicted as the garbage class
  when the garbage check is enforced). An input is rejected when its conformal p-value
  ``(1 + #{b in B: s_b <= s}) / (|B| + 1)`` is ``<= alpha``; by exchangeability (split conformal
  inference) the in-distribution false-rejection rate is then at most ``alpha``, garbage-class
  rejections of in-distribution images included. Equivalently: reject when ``s < t*`` with
  ``t* = s_(k+1)``, ``k = floor(alpha (|B| + 1)) - 1``. ``t*`` is computed for every subset of
  enforced checks, so checks can be switched at serve time without losing the guarantee.

The measured false-rejection rate recorded in ``bundle.json`` is **cross-fitted**: the held-out part
(A ∪ B) is cut into ``CROSSFIT_FOLDS`` folds; for each fold the null tables and ``t*`` are rebuilt
from the other folds (halved at random) and the fold itself is scored — no image judges itself.

``reference.npz`` stores raw arrays only (reference maps, feature statistics, the null and conformal
parts' raw scores); the p-value tables and thresholds are rebuilt deterministically from them when a
bundle is loaded (:class:`CalibrationData`), so there is one code path for calibration and serving.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import bundle as bundle_mod
from .bundle import REFERENCE_FILE, BundleError, InputSpec
from .features import FeatureReference
from .similarity import DEFAULT_GRID, HIGHER_IS_SIMILAR, MEASURES, batch_scores, prepare

log = logging.getLogger(__name__)

CHECKS = ("garbage", "attention", "feature")
DEFAULT_ALPHA = 0.05
SPLIT = {"reference": 0.5, "null": 0.25, "conformal": 0.25}
MIN_NULL_PER_CLASS = 30
MIN_REFERENCE_PER_CLASS = 5
CROSSFIT_FOLDS = 5
TAIL_FRACTION = 0.1
BATCH = 32
#: the array fields of a :class:`ScoreSet` besides its optional ``label``, in constructor order
SCORE_FIELDS = ("sims", "feature", "pred", "pred_real", "garbage_prob", "garbage_pred")


class CalibrationError(BundleError):
    """Calibration cannot produce a trustworthy guard from the given data."""


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


def dissimilarity(measure: str, values: np.ndarray) -> np.ndarray:
    """Orient a score so that higher means more dissimilar (the rejection direction)."""
    values = np.asarray(values, np.float64)
    return -values if HIGHER_IS_SIMILAR[measure] else values


class TailPValue:
    """One-sided empirical p-value of a dissimilarity ``x`` against a null sample, made continuous.

    Inside the null's range: linear interpolation of ``(1 + #{null >= x}) / (n + 1)`` between the
    sorted null values (1 below the minimum). Beyond the null maximum the rank p-value would stick at
    its floor ``~1/(n+1)``, so ties among all far-off inputs would make a conformal cut impossible;
    there the p-value decays exponentially, ``p_max · exp(-(x - x_max) / scale)``, with ``scale`` the
    mean excess of the top ``TAIL_FRACTION`` of the null over its ``1 - TAIL_FRACTION`` quantile (an
    exponential tail, i.e. a generalised Pareto tail with shape 0). Non-finite ``x`` gives 0.
    The validity of the guard's false-rejection bound does not rest on this smoothing: the final cut
    is conformal on a separate part.
    """

    def __init__(self, null: np.ndarray):
        x = np.sort(np.asarray(null, np.float64)[np.isfinite(null)])
        if x.size < 2:
            raise CalibrationError(f"need at least 2 finite null scores for a p-value table, got {x.size}")
        n = x.size
        self.knots = x
        self.pvals = (n - np.arange(n) + 1.0) / (n + 1.0)  # 1 at the minimum
        q = np.quantile(x, 1.0 - TAIL_FRACTION)
        top = x[-max(5, int(math.ceil(TAIL_FRACTION * n))):]
        spread = float(x[-1] - x[0])
        self.scale = max(float(np.mean(top - q)), 1e-3 * spread, 1e-9)
        self.n = n

    def __call__(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, np.float64)
        p = np.interp(v, self.knots, self.pvals)  # NaN stays NaN
        beyond = v > self.knots[-1]
        if beyond.any():
            with np.errstate(over="ignore", invalid="ignore"):
                p[beyond] = self.pvals[-1] * np.exp(-(v[beyond] - self.knots[-1]) / self.scale)
        p[~np.isfinite(v)] = 0.0  # fail closed: a score that cannot be judged is maximally suspicious
        return p

    def inverse(self, level: float) -> float:
        """The dissimilarity at which the p-value equals ``level`` (for human-readable thresholds)."""
        if level >= 1.0:
            return float(self.knots[0])
        if level >= self.pvals[-1]:
            return float(np.interp(level, self.pvals[::-1], self.knots[::-1]))
        if level <= 0:
            return math.inf
        return float(self.knots[-1] + self.scale * math.log(self.pvals[-1] / level))


@dataclass
class ScoreSet:
    """The guard's raw scores for a set of images (no decisions)."""

    sims: np.ndarray  # [N, M] raw similarity scores, columns in MEASURES order
    feature: np.ndarray  # [N] early-feature dissimilarity
    pred: np.ndarray  # [N] argmax over all classes (garbage included)
    pred_real: np.ndarray  # [N] argmax over the real classes
    garbage_prob: np.ndarray  # [N]
    garbage_pred: np.ndarray  # [N] bool, argmax is the garbage class
    label: np.ndarray | None = None  # [N] true class indices when known (calibration)

    def take(self, idx) -> "ScoreSet":
        return ScoreSet(self.sims[idx], self.feature[idx], self.pred[idx], self.pred_real[idx],
                        self.garbage_prob[idx], self.garbage_pred[idx],
                        None if self.label is None else self.label[idx])

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


def score_outputs(logits, cam, early, *, garbage: int, ref_cams: np.ndarray, feature_ref: FeatureReference,
                  grid: int = DEFAULT_GRID, refs_prepared: bool = False) -> ScoreSet:
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
    probs = softmax(logits)
    sims = batch_scores(cam, ref_cams[pred_real_pos], grid=grid, b_prepared=refs_prepared)
    return ScoreSet(
        sims=np.stack([np.asarray(sims[m], np.float64) for m in MEASURES], axis=1),
        feature=feature_ref.score(early),
        pred=pred,
        pred_real=real[pred_real_pos],
        garbage_prob=probs[:, garbage],
        garbage_pred=pred == garbage,
    )


class NullModel:
    """Per-check p-value tables built from the null part's scores.

    Attention: one table per measure (per predicted class where the class has enough null images,
    pooled otherwise) gives ``p_m``; the check's own p-value ``attention.p`` is the smallest ``p_m``
    calibrated once more against the null part's smallest ``p_m`` (a TailPValue on ``-log min_m p_m``).
    Without that second step the minimum of seven correlated p-values would be far from uniform and
    the attention check would take most of the combined cut's false-rejection budget from the feature
    check; with it both checks' p-values are on the same scale.
    """

    def __init__(self, null: ScoreSet, n_classes: int):
        keep = ~null.garbage_pred
        s = null.take(keep)
        if s.feature.size < 10:
            raise CalibrationError(f"only {s.feature.size} non-garbage images in the null part; "
                                   "calibrate with more in-distribution images")
        self.pooled = [TailPValue(dissimilarity(m, s.sims[:, j])) for j, m in enumerate(MEASURES)]
        self.per_class: dict[int, list[TailPValue]] = {}
        for c in range(n_classes):
            sel = s.pred_real == c
            if sel.sum() >= MIN_NULL_PER_CLASS:
                self.per_class[c] = [TailPValue(dissimilarity(m, s.sims[sel, j])) for j, m in enumerate(MEASURES)]
        self.feature = TailPValue(s.feature)
        self.attention = TailPValue(_neglog(self._measure_pvalues(s).min(axis=1)))
        self.n = int(s.feature.size)

    def tables_for(self, cls: int) -> list[TailPValue]:
        return self.per_class.get(int(cls), self.pooled)

    def _measure_pvalues(self, scores: ScoreSet) -> np.ndarray:
        n = scores.feature.shape[0]
        pm = np.empty((n, len(MEASURES)))
        for c in np.unique(scores.pred_real):
            sel = scores.pred_real == c
            for j, (m, table) in enumerate(zip(MEASURES, self.tables_for(c))):
                pm[sel, j] = table(dissimilarity(m, scores.sims[sel, j]))
        return pm

    def pvalues(self, scores: ScoreSet) -> tuple[np.ndarray, np.ndarray]:
        """(p per measure ``[N, M]``, p of the feature score ``[N]``)."""
        return self._measure_pvalues(scores), self.feature(scores.feature)

    def attention_p(self, pm: np.ndarray) -> np.ndarray:
        """The attention check's p-value ``[N]`` from the per-measure p-values ``[N, M]``."""
        return self.attention(_neglog(np.asarray(pm).min(axis=1)))

    def measure_level(self, level: float) -> float:
        """The per-measure p-value below which ``attention_p`` falls below ``level``."""
        d = self.attention.inverse(level)
        return float(math.exp(-d)) if math.isfinite(d) else 0.0


def _neglog(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -np.log(np.asarray(p, np.float64))


def combined_statistic(pa: np.ndarray, pf: np.ndarray, garbage_pred: np.ndarray, checks: str) -> np.ndarray:
    """``s = min`` of the enforced checks' p-values (``pa`` attention, ``pf`` feature; 1 when only
    the garbage check is enforced); 0 for inputs predicted as garbage when that check is enforced."""
    enforced = checks.split("+")
    parts = []
    if "attention" in enforced:
        parts.append(np.asarray(pa, np.float64))
    if "feature" in enforced:
        parts.append(np.asarray(pf, np.float64))
    s = np.minimum.reduce(parts) if parts else np.ones(np.asarray(pf).shape[0])
    if "garbage" in enforced:
        s = np.where(garbage_pred, 0.0, s)
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
    measure_level: float  # the per-measure p-value level equivalent to ``level``


def decide(pm, pf, garbage_pred, *, checks: str, policy: str, alpha: float,
           cut: ConformalCut | None, null: NullModel | None = None) -> Decisions:
    """Vectorised decision for a batch (``null`` defaults to ``cut.null``).

    ``calibrated``: a check fails when its p-value is below the conformal level t* (so the combined
    rule rejects exactly when some enforced check fails); ``strict``: a check fails when its own
    p-value is <= alpha (no sharing of the budget between checks: more false rejections, by design).
    The failed measures of an attention failure are those whose own p-value is below the
    per-measure level equivalent to the check's level (at least the smallest one)."""
    null = null if null is not None else getattr(cut, "null", None)
    if null is None:
        raise ValueError("decide needs the null model (pass null= or a cut built with one)")
    enforced = set(checks.split("+"))
    garbage = np.asarray(garbage_pred, bool) & ("garbage" in enforced)
    pm = np.asarray(pm, np.float64)
    pa = null.attention_p(pm)
    if policy == "calibrated":
        if cut is None:
            raise ValueError("calibrated policy needs a conformal cut")
        level = cut.threshold
        att, feat = pa < level, np.asarray(pf) < level
    elif policy == "strict":
        level = alpha
        att, feat = pa <= level, np.asarray(pf) <= level
    else:
        raise ValueError(f"unknown policy {policy!r} (calibrated, strict)")
    mlevel = null.measure_level(level)
    if "attention" not in enforced:
        att = np.zeros_like(att)
    if "feature" not in enforced:
        feat = np.zeros_like(feat)
    failed = (pm < mlevel) & att[:, None]
    if pm.shape[0]:
        # the p-value table can be flat at the boundary: always name at least the weakest measure
        weakest = np.zeros_like(failed)
        weakest[np.arange(pm.shape[0]), pm.argmin(axis=1)] = True
        failed |= weakest & att[:, None] & ~failed.any(axis=1, keepdims=True)
    return Decisions(reject=garbage | att | feat, garbage=garbage, attention=att, feature=feat,
                     failed_measures=failed, level=float(level), attention_p=pa, measure_level=mlevel)


class CalibrationData:
    """Everything the guard needs from ``reference.npz``, with tables and cuts rebuilt from raw scores."""

    def __init__(self, arrays, manifest: dict):
        cal = manifest.get("calibration") or {}
        self.alpha = float(cal.get("alpha", DEFAULT_ALPHA))
        self.grid = int(cal.get("grid", DEFAULT_GRID))
        self.class_names = list(manifest["class_names"])
        self.garbage = int(manifest["garbage_class"])
        self.real = real_class_indices(len(self.class_names), self.garbage)
        measures = [str(m) for m in arrays["measures"]]
        if measures != list(MEASURES):
            raise BundleError(f"reference.npz measures {measures} do not match this gamguard's {list(MEASURES)}; "
                              "re-calibrate the bundle")
        self.ref_cams = np.asarray(arrays["ref_cam"], np.float32)  # [K_real, H, W]
        self.ref_prepared = prepare(self.ref_cams, self.grid)  # [K_real, grid, grid], hot-path form
        self.feature_ref = FeatureReference.from_arrays(arrays)
        self.null_scores = ScoreSet.from_arrays(arrays, "null_")
        self.conformal_scores = ScoreSet.from_arrays(arrays, "conformal_")
        self.null = NullModel(self.null_scores, len(self.class_names))
        pm, pf = self.null.pvalues(self.conformal_scores)
        pa = self.null.attention_p(pm)
        self.cuts = {key: ConformalCut(combined_statistic(pa, pf, self.conformal_scores.garbage_pred, key),
                                       self.alpha, self.null) for key in all_check_sets()}

    @classmethod
    def load(cls, bundle_dir: str | Path, manifest: dict) -> "CalibrationData":
        path = Path(bundle_dir) / REFERENCE_FILE
        arrays = read_reference_arrays(bundle_dir)
        try:
            return cls(arrays, manifest)
        except KeyError as exc:
            raise BundleError(f"{path}: missing array {exc}; re-calibrate the bundle") from exc

    def ref_cam_for(self, cls_index: int) -> np.ndarray:
        return self.ref_cams[int(np.searchsorted(self.real, cls_index))]

    def score(self, logits, cam, early) -> ScoreSet:
        return score_outputs(logits, cam, early, garbage=self.garbage, ref_cams=self.ref_prepared,
                             feature_ref=self.feature_ref, grid=self.grid, refs_prepared=True)

    def raw_thresholds(self, cls_index: int, level: float) -> dict[str, float]:
        """Score values at which each check's p-value equals ``level`` for predictions of ``cls_index``."""
        out = {}
        mlevel = self.null.measure_level(level)
        for m, table in zip(MEASURES, self.null.tables_for(cls_index)):
            d = table.inverse(mlevel) if mlevel > 0 else math.inf
            out[f"attention.{m}"] = -d if HIGHER_IS_SIMILAR[m] else d
        out["feature"] = self.null.feature.inverse(level)
        return out


def read_reference_arrays(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    """Every array of a bundle's ``reference.npz`` (:class:`BundleError` when it cannot be read)."""
    path = Path(bundle_dir) / REFERENCE_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path}: cannot read the guard references: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Calibration run
# --------------------------------------------------------------------------------------------------

def _progress(msg: str) -> None:
    print(f"calibrate: {msg}", file=sys.stderr, flush=True)


def run_engine(engine, images: Callable[[int], np.ndarray], indices: Sequence[int], spec: InputSpec,
               on_batch: Callable, *, progress: Callable[[str], None] | None, label: str, batch: int = BATCH):
    """Preprocess and run ``indices`` through the engine in batches, handing each batch's outputs to
    ``on_batch(idx, out)``; progress every ~10 %."""
    from .preprocess import preprocess_batch

    total = len(indices)
    next_report = 0.0
    t0 = time.perf_counter()
    for start in range(0, total, batch):
        idx = list(indices[start:start + batch])
        x = preprocess_batch([images(i) for i in idx], spec)
        on_batch(idx, engine.run(x))
        done = start + len(idx)
        if progress and (done / total >= next_report or done == total):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress(f"{label}: {done}/{total} images ({rate:.0f}/s)")
            next_report = done / total + 0.1


def crossfit_rates(held: ScoreSet, n_classes: int, alpha: float, seed: int) -> dict:
    """Cross-fitted false-rejection rates on the held-out part, for every check set and policy."""
    rng = np.random.default_rng(seed + 7919)
    n = held.feature.size
    folds = np.array_split(rng.permutation(n), CROSSFIT_FOLDS)
    out: dict[str, dict] = {}
    counts = {key: {"calibrated": np.zeros(4), "strict": np.zeros(4)} for key in all_check_sets()}
    for k, fold in enumerate(folds):
        rest = np.concatenate([f for j, f in enumerate(folds) if j != k])
        rest = rng.permutation(rest)
        a, b = rest[: rest.size // 2], rest[rest.size // 2:]
        null = NullModel(held.take(a), n_classes)
        pm_b, pf_b = null.pvalues(held.take(b))
        pa_b = null.attention_p(pm_b)
        ev = held.take(fold)
        pm, pf = null.pvalues(ev)
        for key in all_check_sets():
            cut = ConformalCut(combined_statistic(pa_b, pf_b, held.garbage_pred[b], key), alpha, null)
            for policy in ("calibrated", "strict"):
                d = decide(pm, pf, ev.garbage_pred, checks=key, policy=policy, alpha=alpha, cut=cut)
                counts[key][policy] += [d.reject.sum(), d.garbage.sum(), d.attention.sum(), d.feature.sum()]
    for key, per_policy in counts.items():
        out[key] = {policy: {"false_rejection_rate": float(c[0] / n),
                             "per_check": {"garbage": float(c[1] / n), "attention": float(c[2] / n),
                                           "feature": float(c[3] / n)}}
                    for policy, c in per_policy.items()}
    return out


def _record_thresholds(manifest: dict, arrays) -> None:
    """Rebuild the tables exactly as serving will and record the thresholds they give (for humans)."""
    cal = manifest["calibration"]
    class_names = manifest["class_names"]
    data = CalibrationData(arrays, manifest)
    default_key = checks_key(manifest["guard"]["enforced_checks"])
    cal["thresholds"] = {
        "conformal_t": {key: cut.threshold for key, cut in data.cuts.items()},
        "conformal_n": int(data.conformal_scores.feature.size),
        "null_per_class": {class_names[c]: int(c in data.null.per_class) for c in data.real},
        "raw_at_default_t": {class_names[c]: {k: (v if math.isfinite(v) else None) for k, v in
                                              data.raw_thresholds(c, data.cuts[default_key].threshold).items()}
                             for c in data.real},
    }


def _set_measured(cal: dict, rates: dict, key: str, policy: str) -> None:
    cal["measured_false_rejection_rate"] = rates[key][policy]["false_rejection_rate"]
    cal["measured_per_check"] = rates[key][policy]["per_check"]
    cal["measured_method"] = f"{CROSSFIT_FOLDS}-fold cross-fitted on the held-out part (null + conformal)"
    cal["measured_by_checks"] = rates


def _check_cut_is_usable(manifest: dict, key: str, alpha: float) -> None:
    """Refuse a calibration whose conformal cut is 0 for the enforced checks: that happens when the
    garbage class alone already rejects at least ``alpha`` of the in-distribution calibration images,
    and it would silently switch the attention and feature checks off (no p-value is below 0)."""
    cal = manifest["calibration"]
    t = cal["thresholds"]["conformal_t"][key]
    if key != "garbage" and not t > 0:
        rate = cal.get("heldout_garbage_rate", float("nan"))
        raise CalibrationError(
            f"the garbage class rejects {rate:.1%} of the in-distribution calibration images, which uses up the "
            f"whole false-rejection budget alpha={alpha}: the attention and feature checks could never fire. "
            "Retrain or fine-tune the garbage class (it is firing on in-distribution data), or raise --alpha")


def recalibrate_alpha(bundle_dir: str | Path, alpha: float,
                      progress: Callable[[str], None] | None = _progress) -> dict:
    """Re-derive the cut and the measured rates for a new ``alpha`` from the raw scores stored in
    ``reference.npz`` — no images, no engine (the references and null part do not depend on alpha).
    Returns the new manifest."""
    if not 0 < alpha < 0.5:
        raise CalibrationError(f"alpha must be in (0, 0.5), got {alpha}")
    bundle_dir = Path(bundle_dir)
    manifest = dict(bundle_mod.load_manifest(bundle_dir, require_calibration=True))
    arrays = read_reference_arrays(bundle_dir)
    cal = dict(manifest["calibration"])
    n_conf = int(np.asarray(arrays["conformal_feature"]).size)
    if n_conf < math.ceil(2.0 / alpha):
        raise CalibrationError(f"the conformal part has {n_conf} images; alpha={alpha} needs at least "
                               f"{math.ceil(2.0 / alpha)}: recalibrate with more images")
    held = ScoreSet.concat([ScoreSet.from_arrays(arrays, "null_"), ScoreSet.from_arrays(arrays, "conformal_")])
    rates = crossfit_rates(held, len(manifest["class_names"]), alpha, int(cal.get("seed", 0)))
    cal["alpha"] = float(alpha)
    cal["realpha_from"] = cal.get("realpha_from") or cal.get("created")
    cal["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    guard_section = manifest.get("guard") or {"policy": "calibrated", "enforced_checks": list(CHECKS)}
    _set_measured(cal, rates, checks_key(guard_section["enforced_checks"]), guard_section["policy"])
    manifest["calibration"] = cal
    _record_thresholds(manifest, arrays)
    _check_cut_is_usable(manifest, checks_key(guard_section["enforced_checks"]), alpha)
    manifest = bundle_mod.write_manifest(bundle_dir, manifest)
    if progress:
        progress(f"alpha {alpha}: measured held-out false-rejection rate {cal['measured_false_rejection_rate']:.3f}")
    return manifest


def calibrate_bundle(bundle_dir: str | Path, *, images: Callable[[int], np.ndarray], labels: Sequence[int],
                     dataset: dict, alpha: float = DEFAULT_ALPHA, seed: int = 0,
                     providers=None, threads: int | None = None,
                     reference: tuple[Callable[[int], np.ndarray], Sequence[int], dict] | None = None,
                     progress: Callable[[str], None] | None = _progress) -> dict:
    """Calibrate ``bundle_dir`` in place on in-distribution images.

    ``images(i)`` returns decoded image ``i`` (HxW float32 in [0, 1]); ``labels[i]`` is its class index
    *in the bundle's class list* (never the garbage class). Returns the new manifest.

    ``reference=(images, labels, description)`` builds the references (mean CAMs, early-feature
    statistics) from a separate in-distribution set — e.g. the model's training images, which are
    plentiful where held-out images are scarce — and then *all* calibration images are held out,
    split 50/50 into the null and conformal parts. The p-values and the false-rejection bound still
    come only from images the references never saw.
    """
    from .engine import create_engine

    if not 0 < alpha < 0.5:
        raise CalibrationError(f"alpha must be in (0, 0.5), got {alpha}")
    bundle_dir = Path(bundle_dir)
    manifest = bundle_mod.load_manifest(bundle_dir, require_calibration=False)
    spec = InputSpec.from_manifest(manifest["input"])
    class_names = list(manifest["class_names"])
    garbage = int(manifest["garbage_class"])
    real = real_class_indices(len(class_names), garbage)
    labels = np.asarray(labels, np.int64)
    n = labels.size
    if np.any(labels == garbage) or np.any(labels < 0) or np.any(labels >= len(class_names)):
        raise CalibrationError("calibration labels must be real (non-garbage) classes of the bundle")
    conformal_fraction = SPLIT["conformal"] if reference is None else 0.5
    n_conformal = n - int(round(n * (1 - conformal_fraction)))
    min_conformal = int(math.ceil(2.0 / alpha))
    if n_conformal < min_conformal:
        raise CalibrationError(
            f"{n} calibration images give a conformal part of {n_conformal}; alpha={alpha} needs at least "
            f"{min_conformal} (i.e. >= {int(math.ceil(min_conformal / conformal_fraction))} images)")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if reference is None:
        ref_images, ref_labels = images, labels
        n_ref = int(round(n * SPLIT["reference"]))
        n_null = int(round(n * SPLIT["null"]))
        ref_idx, null_idx, conf_idx = perm[:n_ref], perm[n_ref:n_ref + n_null], perm[n_ref + n_null:]
    else:
        ref_images, ref_labels, ref_description = reference
        ref_labels = np.asarray(ref_labels, np.int64)
        if np.any(ref_labels == garbage) or np.any(ref_labels < 0) or np.any(ref_labels >= len(class_names)):
            raise CalibrationError("reference labels must be real (non-garbage) classes of the bundle")
        ref_idx = np.arange(ref_labels.size)
        n_null = n - n_conformal
        null_idx, conf_idx = perm[:n_null], perm[n_null:]

    engine = create_engine(bundle_dir, manifest, providers=providers, threads=threads)
    if progress:
        progress(f"{n} images ({dataset.get('kind', 'dataset')}), engine {engine.describe()}, "
                 f"split reference/null/conformal = {len(ref_idx)}/{len(null_idx)}/{len(conf_idx)} (seed {seed})")

    # Pass 1: references.
    h, w = spec.height, spec.width
    cam_sum = np.zeros((len(real), h, w), np.float64)
    cam_n = np.zeros(len(real), np.int64)
    all_sum = np.zeros_like(cam_sum)
    all_n = np.zeros(len(real), np.int64)
    early_parts: list[np.ndarray] = []
    ref_correct = [0]

    def on_ref(idx, out):
        if out.cam.shape[1:] != (h, w):
            raise CalibrationError(f"engine CAM shape {out.cam.shape[1:]} differs from the input size {(h, w)}")
        lab = ref_labels[idx]
        pred = out.logits.argmax(axis=1)
        pos = np.searchsorted(real, lab)
        for j in range(len(idx)):
            c = pos[j]
            all_sum[c] += out.cam[j]
            all_n[c] += 1
            if pred[j] == lab[j]:
                cam_sum[c] += out.cam[j]
                cam_n[c] += 1
        ref_correct[0] += int((pred == lab).sum())
        early_parts.append(out.early)

    run_engine(engine, ref_images, ref_idx, spec, on_ref, progress=progress, label="reference part")
    fallback = []
    for pos, c in enumerate(real):
        if cam_n[pos] < MIN_REFERENCE_PER_CLASS:
            if all_n[pos] == 0:
                raise CalibrationError(f"class {class_names[c]!r} has no images in the reference part")
            fallback.append(class_names[c])
            log.warning("class %s: only %d correctly classified reference images; using all %d of its images",
                        class_names[c], cam_n[pos], all_n[pos])
    use_all = cam_n < MIN_REFERENCE_PER_CLASS  # the fallback classes
    counts = np.where(use_all, all_n, cam_n).astype(np.float64)
    sums = np.where(use_all[:, None, None], all_sum, cam_sum)
    ref_cam = (sums / counts[:, None, None]).astype(np.float32)
    feature_ref = FeatureReference.fit(np.concatenate(early_parts))
    grid = DEFAULT_GRID

    # Pass 2: held-out scores.
    held_parts: list[ScoreSet] = []
    ref_prepared = prepare(ref_cam, grid)

    def on_held(idx, out):
        s = score_outputs(out.logits, out.cam, out.early, garbage=garbage, ref_cams=ref_prepared,
                          feature_ref=feature_ref, grid=grid)
        s.label = labels[idx]
        held_parts.append(s)

    held_idx = np.concatenate([null_idx, conf_idx])
    run_engine(engine, images, held_idx, spec, on_held, progress=progress, label="held-out part")
    held = ScoreSet.concat(held_parts)
    null_s = held.take(np.arange(len(null_idx)))
    conf_s = held.take(np.arange(len(null_idx), len(held_idx)))

    arrays = {
        "measures": np.array(MEASURES),
        "ref_cam": ref_cam,
        "ref_count": counts.astype(np.int64),
        **feature_ref.to_arrays(),
        **null_s.to_arrays("null_"),
        **conf_s.to_arrays("conformal_"),
    }
    if progress:
        progress("cross-fitting the measured false-rejection rate")
    rates = crossfit_rates(held, len(class_names), alpha, seed)

    guard_section = dict(manifest.get("guard") or {})
    guard_section.setdefault("policy", "calibrated")
    guard_section.setdefault("enforced_checks", list(CHECKS))
    default_key = checks_key(guard_section["enforced_checks"])
    cal = {
        "dataset": dataset,
        "seed": int(seed),
        "alpha": float(alpha),
        "grid": grid,
        "split": {"reference": int(len(ref_idx)), "null": int(len(null_idx)), "conformal": int(len(conf_idx)),
                  "fractions": SPLIT if reference is None else {"null": 0.5, "conformal": 0.5},
                  "method": "numpy.random.default_rng(seed).permutation",
                  "reference_set": None if reference is None else ref_description},
        "n": int(n),
        "reference_counts": {class_names[c]: int(counts[p]) for p, c in enumerate(real)},
        "reference_fallback_all_images": fallback,
        "reference_accuracy": float(ref_correct[0] / max(len(ref_idx), 1)),
        "heldout_accuracy": float(np.mean(held.pred == held.label)),
        "heldout_garbage_rate": float(np.mean(held.garbage_pred)),
        "policy": guard_section["policy"],
        "enforced_checks": guard_section["enforced_checks"],
        "engine": engine.describe(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _set_measured(cal, rates, default_key, guard_section["policy"])
    manifest = dict(manifest)
    manifest["calibration"] = cal
    manifest["guard"] = guard_section
    _record_thresholds(manifest, arrays)  # rebuilds the tables from the arrays, as serving will
    _check_cut_is_usable(manifest, default_key, alpha)
    # Write the references next to the bundle, then move them in and re-hash: a failure before this
    # point leaves the old calibration intact.
    fd, tmp = tempfile.mkstemp(prefix=".reference-", suffix=".npz", dir=bundle_dir.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, bundle_dir / REFERENCE_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    manifest = bundle_mod.write_manifest(bundle_dir, manifest)
    if progress:
        progress(f"done: measured held-out false-rejection rate {cal['measured_false_rejection_rate']:.3f} "
                 f"at alpha {alpha} ({cal['measured_method']})")
    return manifest
