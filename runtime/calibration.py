"""References and calibration: what the guard compares against, and where its thresholds come from.

``gamguard calibrate`` runs the *deployed engine* (:func:`gamguard.runtime.engines.create_engine`, the
same ONNX Runtime session the server uses) over an in-distribution calibration set and writes
``reference.npz`` plus the ``calibration`` section of ``bundle.json`` (re-hashing the bundle).

Split (seeded, ``--seed``, default 0): the images are shuffled with ``numpy.random.default_rng(seed)``
and cut into three parts —

* **reference** (50 %): per real class, the mean Grad-CAM of the *correctly classified* images (of
  all its images when fewer than ``MIN_REFERENCE_PER_CLASS`` are correct); the early-feature reference statistics
  (:class:`gamguard.runtime.checks.FeatureReference`: class means and a Ledoit-Wolf tied covariance);
* **null** (25 %, "part A"): every check's score distribution on in-distribution data. Each score
  becomes a one-sided empirical p-value in the direction of dissimilarity (:class:`TailPValue`).
  Attention measures are scored against the reference map of the *predicted* class (that is what
  serving does) and get per-class null distributions when that class has at least
  ``MIN_NULL_PER_CLASS`` null images, the pooled distribution otherwise; the feature score and the
  garbage margin are pooled;
* **conformal** (25 %, "part B"): the distribution of the combined statistic
  ``s = min(p-values of the enforced checks)`` (garbage margin, attention, feature; ``s = 0`` for an
  input predicted as the garbage class when the garbage check is enforced). An input is rejected when its
  conformal p-value
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

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import bundle as bundle_mod
from .bundle import REFERENCE_FILE, InputSpec
from .checks import (
    CHECKS,
    DEFAULT_ALPHA,
    CalibrationData,
    CalibrationError,
    Combination,
    ConformalCut,
    CutMethod,
    FeatureReference,
    ScoreSet,
    all_check_sets,
    check_levels,
    checks_key,
    combined_statistic,
    decide,
    read_reference_arrays,
    real_class_indices,
    score_outputs,
)
from .similarity import DEFAULT_GRID, MEASURES, prepare

log = logging.getLogger(__name__)

SPLIT = {"reference": 0.5, "null": 0.25, "conformal": 0.25}
MIN_REFERENCE_PER_CLASS = 5
CROSSFIT_FOLDS = 5
BATCH = 32

__all__ = ["CalibrationError", "calibrate_bundle", "calibrate_site", "crossfit_rates", "recalibrate_alpha"]


# --------------------------------------------------------------------------------------------------
# Calibration run
# --------------------------------------------------------------------------------------------------


def run_engine(
    engine,
    images: Callable[[int], np.ndarray],
    indices: Sequence[int],
    spec: InputSpec,
    on_batch: Callable,
    *,
    progress: Callable[[str], None] | None,
    label: str,
    batch: int = BATCH,
):
    """Preprocess and run ``indices`` through the engine in batches, handing each batch's outputs to
    ``on_batch(idx, out)``; progress every ~10 %."""
    from .preprocess import preprocess_batch

    total = len(indices)
    next_report = 0.0
    t0 = time.perf_counter()
    for start in range(0, total, batch):
        idx = list(indices[start : start + batch])
        x = preprocess_batch([images(i) for i in idx], spec)
        on_batch(idx, engine.run(x))
        done = start + len(idx)
        if progress and (done / total >= next_report or done == total):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress(f"{label}: {done}/{total} images ({rate:.0f}/s)")
            next_report = done / total + 0.1


def crossfit_rates(
    held: ScoreSet,
    n_classes: int,
    alpha: float,
    seed: int,
    combination: Combination | None = None,
    cut: CutMethod | None = None,
) -> dict:
    """Cross-fitted false-rejection rates on the held-out part, for every check set and policy
    (``combination``: the weights the guard will combine with; default :meth:`Combination.default`;
    ``cut``: how the guard's cut is fitted, done the same way on each fold's other folds; default split)."""
    combination = combination or Combination.default()
    cut_method = cut or CutMethod()
    rng = np.random.default_rng(seed + 7919)
    n = held.feature.size
    folds = np.array_split(rng.permutation(n), CROSSFIT_FOLDS)
    out: dict[str, dict] = {}
    counts = {key: {"calibrated": np.zeros(4), "strict": np.zeros(4)} for key in all_check_sets()}
    for k, fold in enumerate(folds):
        rest = np.concatenate([f for j, f in enumerate(folds) if j != k])
        rest = rng.permutation(rest)
        a, b = rest[: rest.size // 2], rest[rest.size // 2 :]
        fold_cut = CutMethod(cut_method.name, cut_method.folds, cut_method.seed + k)
        null, pv_b = fold_cut.fit(held.take(a), held.take(b), n_classes)
        pv = null.pvalues(held.take(fold))
        for key in all_check_sets():
            cut = ConformalCut(combined_statistic(pv_b, key, combination), alpha, null, combination)
            for policy in ("calibrated", "strict"):
                d = decide(pv, checks=key, policy=policy, alpha=alpha, cut=cut)
                counts[key][policy] += [d.reject.sum(), d.garbage.sum(), d.attention.sum(), d.feature.sum()]
    for key, per_policy in counts.items():
        out[key] = {
            policy: {
                "false_rejection_rate": float(c[0] / n),
                "per_check": {"garbage": float(c[1] / n), "attention": float(c[2] / n), "feature": float(c[3] / n)},
            }
            for policy, c in per_policy.items()
        }
    return out


def _record_thresholds(manifest: dict, arrays) -> None:
    """Rebuild the tables exactly as serving will and record the thresholds they give (for humans)."""
    cal = manifest["calibration"]
    class_names = manifest["class_names"]
    data = CalibrationData(arrays, manifest)
    default_key = checks_key(manifest["guard"]["enforced_checks"])
    levels = check_levels(data.combination, default_key, data.cuts[default_key].threshold)
    cal["thresholds"] = {
        "conformal_t": {key: cut.threshold for key, cut in data.cuts.items()},
        "check_levels_at_default_t": levels,
        "conformal_n": int(data.conformal_pvalues.feature.size),
        "cut_method": data.cut_method.describe(),
        "null_per_class": {class_names[c]: int(c in data.null.per_class) for c in data.real},
        "raw_at_default_t": {
            class_names[c]: {k: (v if math.isfinite(v) else None) for k, v in data.raw_thresholds(c, levels).items()}
            for c in data.real
        },
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
            "Retrain or fine-tune the garbage class (it is firing on in-distribution data), or raise --alpha"
        )


def recalibrate_alpha(bundle_dir: str | Path, alpha: float, progress: Callable[[str], None] | None = None) -> dict:
    """Re-derive the cut and the measured rates for a new ``alpha`` from the raw scores stored in
    ``reference.npz`` — no images, no engine (the references and null part do not depend on alpha).
    Returns the new manifest."""
    if not 0 < alpha < 0.5:
        raise CalibrationError(f"alpha must be in (0, 0.5), got {alpha}")
    bundle_dir = Path(bundle_dir)
    manifest = dict(bundle_mod.load_manifest(bundle_dir, require_calibration=True))
    arrays = read_reference_arrays(bundle_dir)
    cal = dict(manifest["calibration"])
    held = ScoreSet.concat([ScoreSet.from_arrays(arrays, "null_"), ScoreSet.from_arrays(arrays, "conformal_")])
    combination = Combination.from_arrays(arrays, cal.get("combination"))  # kept
    cut = CutMethod.from_arrays(arrays)
    n_conf = held.feature.size if cut.name == "cross-fit" else int(np.asarray(arrays["conformal_feature"]).size)
    if n_conf < math.ceil(2.0 / alpha):
        raise CalibrationError(
            f"the conformal cut rests on {n_conf} images; alpha={alpha} needs at least "
            f"{math.ceil(2.0 / alpha)}: recalibrate with more images"
        )
    rates = crossfit_rates(held, len(manifest["class_names"]), alpha, int(cal.get("seed", 0)), combination, cut)
    cal["alpha"] = float(alpha)
    cal["realpha_from"] = cal.get("realpha_from") or cal.get("created")
    cal["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    guard_section = manifest.get("guard") or {"policy": "calibrated", "enforced_checks": list(CHECKS)}
    _set_measured(cal, rates, checks_key(guard_section["enforced_checks"]), guard_section["policy"])
    if cal.get("site"):  # the stored null and conformal parts are the site's images
        cal["measured_method"] = f"{CROSSFIT_FOLDS}-fold cross-fitted on the site images"
    key = checks_key(guard_section["enforced_checks"])
    manifest = _commit_calibration(bundle_dir, manifest, cal, arrays, key, alpha, write_references=False)
    if progress:
        progress(f"alpha {alpha}: measured held-out false-rejection rate {cal['measured_false_rejection_rate']:.3f}")
    return manifest


@dataclass
class Split:
    """Which images build the references and which are held out (null part A, conformal part B)."""

    ref_images: Callable[[int], np.ndarray]
    ref_labels: np.ndarray
    ref_idx: np.ndarray
    null_idx: np.ndarray
    conf_idx: np.ndarray
    reference_set: dict | None  # description of a separate reference set, None when split from one set

    def facts(self) -> dict:
        return {
            "reference": int(len(self.ref_idx)),
            "null": int(len(self.null_idx)),
            "conformal": int(len(self.conf_idx)),
            "fractions": SPLIT if self.reference_set is None else {"null": 0.5, "conformal": 0.5},
            "method": "numpy.random.default_rng(seed).permutation",
            "reference_set": self.reference_set,
        }


def _check_labels(labels: np.ndarray, n_classes: int, garbage: int, what: str) -> None:
    if np.any(labels == garbage) or np.any(labels < 0) or np.any(labels >= n_classes):
        raise CalibrationError(f"{what} labels must be real (non-garbage) classes of the bundle")


def split_images(
    images, labels: np.ndarray, *, alpha: float, seed: int, n_classes: int, garbage: int, reference=None
) -> Split:
    """Step 1: the seeded split (see module docstring); refuses a conformal part too small for ``alpha``."""
    n = labels.size
    conformal_fraction = SPLIT["conformal"] if reference is None else 0.5
    n_conformal = n - int(round(n * (1 - conformal_fraction)))
    min_conformal = int(math.ceil(2.0 / alpha))
    if n_conformal < min_conformal:
        raise CalibrationError(
            f"{n} calibration images give a conformal part of {n_conformal}; alpha={alpha} needs at least "
            f"{min_conformal} (i.e. >= {int(math.ceil(min_conformal / conformal_fraction))} images)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    if reference is None:
        n_ref = int(round(n * SPLIT["reference"]))
        n_null = int(round(n * SPLIT["null"]))
        return Split(images, labels, perm[:n_ref], perm[n_ref : n_ref + n_null], perm[n_ref + n_null :], None)
    ref_images, ref_labels, ref_description = reference
    ref_labels = np.asarray(ref_labels, np.int64)
    _check_labels(ref_labels, n_classes, garbage, "reference")
    n_null = n - n_conformal
    return Split(ref_images, ref_labels, np.arange(ref_labels.size), perm[:n_null], perm[n_null:], ref_description)


@dataclass
class References:
    """What step 2 builds: per-class mean Grad-CAM maps and the early-feature reference."""

    cam: np.ndarray  # [K_real, H, W] float32
    counts: np.ndarray  # [K_real] images averaged per class
    fallback: list[str]  # classes whose map averages all their images (too few correct ones)
    feature: FeatureReference
    accuracy: float  # on the reference part


def build_references(
    engine, split: Split, spec: InputSpec, class_names: list[str], real: np.ndarray, progress
) -> References:
    """Step 2: per real class, the mean Grad-CAM of the *correctly classified* reference images (of all its
    images when fewer than ``MIN_REFERENCE_PER_CLASS`` are correct); the early-feature reference over all
    reference images with their labels (class-conditional Mahalanobis, :mod:`gamguard.runtime.checks.feature`)."""
    h, w = spec.height, spec.width
    cam_sum = np.zeros((len(real), h, w), np.float64)
    cam_n = np.zeros(len(real), np.int64)
    all_sum = np.zeros_like(cam_sum)
    all_n = np.zeros(len(real), np.int64)
    early_parts: list[np.ndarray] = []
    early_labels: list[np.ndarray] = []
    correct = [0]

    def on_batch(idx, out):
        if out.cam.shape[1:] != (h, w):
            raise CalibrationError(f"engine CAM shape {out.cam.shape[1:]} differs from the input size {(h, w)}")
        lab = split.ref_labels[idx]
        pred = out.logits.argmax(axis=1)
        pos = np.searchsorted(real, lab)
        for j in range(len(idx)):
            c = pos[j]
            all_sum[c] += out.cam[j]
            all_n[c] += 1
            if pred[j] == lab[j]:
                cam_sum[c] += out.cam[j]
                cam_n[c] += 1
        correct[0] += int((pred == lab).sum())
        early_parts.append(out.early)
        early_labels.append(lab)

    run_engine(engine, split.ref_images, split.ref_idx, spec, on_batch, progress=progress, label="reference part")
    fallback = []
    for pos, c in enumerate(real):
        if cam_n[pos] < MIN_REFERENCE_PER_CLASS:
            if all_n[pos] == 0:
                raise CalibrationError(f"class {class_names[c]!r} has no images in the reference part")
            fallback.append(class_names[c])
            log.warning(
                "class %s: only %d correctly classified reference images; using all %d of its images",
                class_names[c],
                cam_n[pos],
                all_n[pos],
            )
    use_all = cam_n < MIN_REFERENCE_PER_CLASS
    counts = np.where(use_all, all_n, cam_n).astype(np.float64)
    sums = np.where(use_all[:, None, None], all_sum, cam_sum)
    return References(
        cam=(sums / counts[:, None, None]).astype(np.float32),
        counts=counts.astype(np.int64),
        fallback=fallback,
        feature=FeatureReference.fit(np.concatenate(early_parts), np.concatenate(early_labels)),
        accuracy=float(correct[0] / max(len(split.ref_idx), 1)),
    )


def score_held_out(
    engine,
    images,
    labels: np.ndarray,
    held_idx: np.ndarray,
    spec: InputSpec,
    refs: References,
    garbage: int,
    grid: int,
    progress,
) -> ScoreSet:
    """Step 3: every check's raw scores on the held-out images (null part then conformal part), exactly
    as serving computes them."""
    parts: list[ScoreSet] = []
    ref_prepared = prepare(refs.cam, grid)

    def on_batch(idx, out):
        s = score_outputs(
            out.logits, out.cam, out.early, garbage=garbage, ref_cams=ref_prepared, feature_ref=refs.feature, grid=grid
        )
        s.label = labels[idx]
        parts.append(s)

    run_engine(engine, images, held_idx, spec, on_batch, progress=progress, label="held-out part")
    return ScoreSet.concat(parts)


def _commit_calibration(
    bundle_dir: Path, manifest: dict, cal: dict, arrays: dict, key: str, alpha: float, *, write_references: bool = True
) -> dict:
    """The last step of every calibration: thresholds rebuilt from the arrays as serving will, the cut
    checked, then ``reference.npz`` (unless unchanged: ``write_references=False``) and the re-hashed manifest
    written. Returns the written manifest."""
    manifest["calibration"] = cal
    _record_thresholds(manifest, arrays)
    _check_cut_is_usable(manifest, key, alpha)
    if write_references:
        write_reference_file(Path(bundle_dir), arrays)
    return bundle_mod.write_manifest(bundle_dir, manifest)


def write_reference_file(bundle_dir: Path, arrays: dict) -> None:
    """Write ``reference.npz`` next to the bundle, then move it in: a failure before this point leaves the
    old calibration intact (the manifest is re-hashed after)."""
    fd, tmp = tempfile.mkstemp(prefix=".reference-", suffix=".npz", dir=bundle_dir.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, bundle_dir / REFERENCE_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def calibrate_bundle(
    bundle_dir: str | Path,
    *,
    images: Callable[[int], np.ndarray],
    labels: Sequence[int],
    dataset: dict,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    providers=None,
    threads: int | None = None,
    reference: tuple[Callable[[int], np.ndarray], Sequence[int], dict] | None = None,
    combination: Combination | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Calibrate ``bundle_dir`` in place on in-distribution images.

    ``images(i)`` returns decoded image ``i`` (HxW float32 in [0, 1]); ``labels[i]`` is its class index
    *in the bundle's class list* (never the garbage class). Returns the new manifest.

    ``reference=(images, labels, description)`` builds the references (mean CAMs, early-feature
    statistics) from a separate in-distribution set — e.g. the model's training images, which are
    plentiful where held-out images are scarce — and then *all* calibration images are held out,
    split 50/50 into the null and conformal parts. The p-values and the false-rejection bound still
    come only from images the references never saw.

    ``combination``: the weights of the combined statistic, recorded in ``calibration.combination``
    (default :meth:`Combination.default`, the documented :data:`DEFAULT_WEIGHTS`).

    Steps: :func:`split_images` → :func:`build_references` → :func:`score_held_out` →
    :func:`crossfit_rates` → thresholds and facts into the manifest → :func:`write_reference_file`.
    """
    from .engines import create_engine

    if not 0 < alpha < 0.5:
        raise CalibrationError(f"alpha must be in (0, 0.5), got {alpha}")
    bundle_dir = Path(bundle_dir)
    manifest = bundle_mod.load_manifest(bundle_dir, require_calibration=False)
    spec = InputSpec.from_manifest(manifest["input"])
    class_names = list(manifest["class_names"])
    garbage = int(manifest["garbage_class"])
    real = real_class_indices(len(class_names), garbage)
    labels = np.asarray(labels, np.int64)
    _check_labels(labels, len(class_names), garbage, "calibration")
    split = split_images(
        images, labels, alpha=alpha, seed=seed, n_classes=len(class_names), garbage=garbage, reference=reference
    )

    engine = create_engine(bundle_dir, manifest, providers=providers, threads=threads)
    if progress:
        progress(
            f"{labels.size} images ({dataset.get('kind', 'dataset')}), engine {engine.describe()}, "
            f"split reference/null/conformal = {len(split.ref_idx)}/{len(split.null_idx)}/"
            f"{len(split.conf_idx)} (seed {seed})"
        )
    refs = build_references(engine, split, spec, class_names, real, progress)
    grid = DEFAULT_GRID
    held_idx = np.concatenate([split.null_idx, split.conf_idx])
    held = score_held_out(engine, images, labels, held_idx, spec, refs, garbage, grid, progress)
    n_null = len(split.null_idx)
    combination = combination or Combination.default()
    arrays = {
        "measures": np.array(MEASURES),
        **combination.to_arrays(),
        "ref_cam": refs.cam,
        "ref_count": refs.counts,
        **refs.feature.to_arrays(),
        **held.take(np.arange(n_null)).to_arrays("null_"),
        **held.take(np.arange(n_null, len(held_idx))).to_arrays("conformal_"),
    }
    if progress:
        progress("cross-fitting the measured false-rejection rate")
    rates = crossfit_rates(held, len(class_names), alpha, seed, combination)

    guard_section = dict(manifest.get("guard") or {})
    guard_section.setdefault("policy", "calibrated")
    guard_section.setdefault("enforced_checks", list(CHECKS))
    default_key = checks_key(guard_section["enforced_checks"])
    cal = {
        "dataset": dataset,
        "seed": int(seed),
        "alpha": float(alpha),
        "grid": grid,
        "split": split.facts(),
        "n": int(labels.size),
        "reference_counts": {class_names[c]: int(refs.counts[p]) for p, c in enumerate(real)},
        "reference_fallback_all_images": refs.fallback,
        "reference_accuracy": refs.accuracy,
        "feature_reference": refs.feature.facts(),
        "heldout_accuracy": float(np.mean(held.pred == held.label)),
        "heldout_garbage_rate": float(np.mean(held.garbage_pred)),
        "policy": guard_section["policy"],
        "enforced_checks": guard_section["enforced_checks"],
        "combination": combination.to_facts(),
        "engine": engine.describe(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _set_measured(cal, rates, default_key, guard_section["policy"])
    manifest = dict(manifest)
    manifest["guard"] = guard_section
    manifest = _commit_calibration(bundle_dir, manifest, cal, arrays, default_key, alpha)
    if progress:
        progress(
            f"done: measured held-out false-rejection rate {cal['measured_false_rejection_rate']:.3f} "
            f"at alpha {alpha} ({cal['measured_method']})"
        )
    return manifest


# --------------------------------------------------------------------------------------------------
# Site calibration: new null tables and conformal cut from a site's own unlabelled images
# --------------------------------------------------------------------------------------------------

#: fewest site images accepted whatever alpha asks for: the null tables' tails (TailPValue) and the
#: per-class attention tables need some images besides the conformal part's ``2 / alpha``
MIN_SITE_IMAGES = 100


#: how ``calibrate --site`` may fit the cut, the default first (:class:`~.checks.combine.CutMethod`)
SITE_CUTS = CutMethod.NAMES


def min_site_images(alpha: float, cut: str = "cross-fit") -> int:
    """The fewest unlabelled site images :func:`calibrate_site` accepts at ``alpha``: the cut rests on
    ``ceil(2 / alpha)`` statistics (so that ``t*`` is not the smallest one): every image's with ``cross-fit``,
    half of them (the conformal part) with ``split``."""
    per_cut = int(math.ceil(2.0 / alpha))
    return max(MIN_SITE_IMAGES, per_cut if cut == "cross-fit" else 2 * per_cut)


def site_arrays(arrays: dict, site: ScoreSet, seed: int, cut: str = "cross-fit") -> tuple[dict, int, int]:
    """``reference.npz`` arrays with the null and conformal parts replaced by the site's scores (a seeded
    50/50 split, stored as such whatever ``cut`` says) and the cut method (``cross-fit``: every site image
    fits the tables and the cut, see :class:`~.checks.combine.CutMethod`; ``split``: the halves do); the
    references (maps, feature statistics) are kept. Returns ``(arrays, n_null, n_conf)``: the images behind
    the tables and behind the cut."""
    if cut not in SITE_CUTS:
        raise CalibrationError(f"unknown site cut {cut!r} (one of {', '.join(SITE_CUTS)})")
    n = site.feature.size
    perm = np.random.default_rng(seed).permutation(n)
    null_idx, conf_idx = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    out = {k: v for k, v in arrays.items() if not k.startswith(("null_", "conformal_", "cut_"))}
    out.update(site.take(null_idx).to_arrays("null_"))
    out.update(site.take(conf_idx).to_arrays("conformal_"))
    if cut == "cross-fit":
        out.update(CutMethod.cross_fit(seed).to_arrays())
        return out, int(n), int(n)
    return out, int(null_idx.size), int(conf_idx.size)


def score_images(
    bundle_dir: str | Path,
    images,
    n: int,
    *,
    providers=None,
    threads=None,
    progress=None,
    label: str = "site images",
) -> ScoreSet:
    """The guard's raw scores of ``n`` decoded images (``images(i)``) against the bundle's references, with
    the deployed engine — exactly as serving computes them."""
    from .engines import create_engine

    bundle_dir = Path(bundle_dir)
    manifest = bundle_mod.load_manifest(bundle_dir, require_calibration=True)
    data = CalibrationData.load(bundle_dir, manifest)
    engine = create_engine(bundle_dir, manifest, providers=providers, threads=threads)
    spec = InputSpec.from_manifest(manifest["input"])
    parts: list[ScoreSet] = []
    run_engine(
        engine,
        images,
        np.arange(n),
        spec,
        lambda idx, out: parts.append(data.score(out.logits, out.cam, out.early)),
        progress=progress,
        label=label,
    )
    return ScoreSet.concat(parts)


def calibrate_site(
    bundle_dir: str | Path,
    *,
    images: Callable[[int], np.ndarray],
    n: int,
    site: dict,
    alpha: float | None = None,
    seed: int = 0,
    cut: str = "cross-fit",
    providers=None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Re-fit the null tables and the conformal cut of a calibrated bundle from ``n`` unlabelled
    in-distribution images of a new site (``images(i)``), keeping its references, model and engine.

    Why: the false-rejection bound holds for data exchangeable with the conformal part. A new console or
    hospital shifts every score a little (on the ``evaluate`` preset the PneumoniaMNIST test split, a
    separately collected set, is falsely rejected at 0.14 by a guard calibrated at alpha 0.05 on the
    validation split); images of the site itself restore exchangeability. ``cut="cross-fit"`` (default):
    every image fits the null tables and, out of fold, the cut (:class:`~.checks.combine.CutMethod`: less
    spread than a split cut on a few hundred images; worst-case bound ``2 alpha``); ``cut="split"``:
    a seeded 50/50 split into a null part and a conformal part (bound ``alpha``, more spread). The measured
    rate is cross-fitted on the site images.
    ``site`` describes them (recorded in ``calibration.site`` with the base calibration's facts); give it
    a ``sha256`` of the images. Refuses fewer than :func:`min_site_images` images. Returns the manifest.
    """
    bundle_dir = Path(bundle_dir)
    manifest = dict(bundle_mod.load_manifest(bundle_dir, require_calibration=True))
    cal = dict(manifest["calibration"])
    alpha = float(cal.get("alpha", DEFAULT_ALPHA) if alpha is None else alpha)
    if not 0 < alpha < 0.5:
        raise CalibrationError(f"alpha must be in (0, 0.5), got {alpha}")
    if cut not in SITE_CUTS:
        raise CalibrationError(f"unknown site cut {cut!r} (one of {', '.join(SITE_CUTS)})")
    need = min_site_images(alpha, cut)
    if n < need:
        behind = "every image is behind the cut" if cut == "cross-fit" else "half of them form the conformal part"
        raise CalibrationError(
            f"{n} site images: site calibration at alpha={alpha} needs at least {need} unlabelled in-distribution "
            f"images of the site ({behind}, which needs {int(math.ceil(2.0 / alpha))}; and at least "
            f"{MIN_SITE_IMAGES} for the null tables)"
        )
    if progress:
        progress(f"site calibration: {n} images, alpha {alpha}, references and model kept")
    scores = score_images(bundle_dir, images, n, providers=providers, threads=threads, progress=progress)
    base_arrays = read_reference_arrays(bundle_dir)
    arrays, n_null, n_conf = site_arrays(base_arrays, scores, seed, cut)
    cut_method = CutMethod.from_arrays(arrays)
    combination = Combination.from_arrays(base_arrays, cal.get("combination"))  # the base calibration's, kept
    rates = crossfit_rates(scores, len(manifest["class_names"]), alpha, seed, combination, cut_method)
    base = cal.get("site", {}).get("base") or {
        k: cal.get(k) for k in ("dataset", "split", "n", "alpha", "measured_false_rejection_rate", "created")
    }
    cal["site"] = {
        **site,
        "n": int(n),
        "null": n_null,
        "conformal": n_conf,
        "seed": int(seed),
        "cut": cut,
        "method": cut_method.describe()
        + "; stored as a numpy.random.default_rng(seed) 50/50 null/conformal split; references kept",
        "garbage_rate": float(np.mean(scores.garbage_pred)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": base,
    }
    cal["alpha"] = alpha
    cal["heldout_garbage_rate"] = cal["site"]["garbage_rate"]
    guard_section = manifest.get("guard") or {"policy": "calibrated", "enforced_checks": list(CHECKS)}
    key = checks_key(guard_section["enforced_checks"])
    _set_measured(cal, rates, key, guard_section["policy"])
    cal["measured_method"] = f"{CROSSFIT_FOLDS}-fold cross-fitted on the site images"
    manifest = _commit_calibration(bundle_dir, manifest, cal, arrays, key, alpha)
    if progress:
        progress(
            f"done: site {site.get('name', '?')!r}, measured false-rejection rate on the site images "
            f"{cal['measured_false_rejection_rate']:.3f} at alpha {alpha} ({cal['measured_method']})"
        )
    return manifest
