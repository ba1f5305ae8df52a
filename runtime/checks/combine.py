"""The combined decision: every enforced check's p-value → one statistic → a split-conformal cut.

Each check gives a one-sided p-value against the null part: ``garbage.p`` (garbage margin),
``attention.p`` and ``feature.p``. They are combined by a **weighted Bonferroni minimum**,

    ``combined_p = min over the enforced checks i of p_i / w_i``,

with weights ``w_i > 0`` that sum to 1 over the enforced checks (the bundle's weights, renormalised
over the enforced subset). ``min(1, combined_p)`` is itself a valid p-value (weighted Bonferroni:
``P(min p_i/w_i <= t) <= sum w_i t = t``); a check with a larger weight gets a larger share of the
false-rejection budget. The conformal statistic is ``s = combined_p``, or ``s = 0`` for an input
predicted as the garbage class when the garbage check is enforced. The weights are a calibration fact
(``combination_weights`` in ``reference.npz``, so hashed with the bundle, repeated as
``calibration.combination`` in ``bundle.json``; :class:`Combination`):
new calibrations record :data:`DEFAULT_WEIGHTS`, chosen on validation data with benign acquisition
shift (docs/architecture.md, "The guard decision"); a bundle calibrated before the weights existed
gets :data:`LEGACY_WEIGHTS` (equal weights: the plain minimum it was calibrated with, same ranking
and same decisions). The rule keeps a one-line explanation: a rejected input names every check whose
own share crosses the cut, ``p_i / w_i < t*``, i.e. ``p_i < w_i t*``.

An input is rejected when its conformal p-value ``(1 + #{b in B: s_b <= s}) / (|B| + 1)`` is
``<= alpha`` (``B``: the conformal part of the calibration set); by exchangeability (split conformal
inference) the in-distribution false-rejection rate is then at most ``alpha`` whatever the weights,
garbage-class rejections of in-distribution images included. Equivalently: reject when ``s < t*`` with
``t* = s_(k+1)``, ``k = floor(alpha (|B| + 1)) - 1``. ``t*`` is computed for every subset of
enforced checks, so checks can be switched at serve time without losing the guarantee.

How the cut is fitted (:class:`CutMethod`, recorded in ``reference.npz``): ``split`` (above; every base
calibration) or ``cross-fit`` (site calibration by default): the null tables are fitted on every
held-out image and ``B``'s statistics are replaced by each image's statistic against tables fitted
without its fold (:func:`out_of_fold_pvalues`) — cross-conformal prediction (Vovk 2015, "Cross-conformal
predictors", Ann. Math. Artif. Intell. 74; the CV+ bound of Barber, Candès, Ramdas & Tibshirani 2021,
"Predictive inference with the jackknife+", Ann. Statist. 49). Every image serves both the tables and the
cut, so a few hundred site images give a cut with less spread (docs/architecture.md); the price is the worst-case bound,
``2 alpha`` instead of ``alpha`` (in practice the rate stays near ``alpha``: docs/architecture.md).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np

from .attention import AttentionNull, failed_measures
from .errors import CalibrationError
from .garbage import garbage_fires
from .pvalues import TailPValue
from .scores import ScoreSet

CHECKS = ("garbage", "attention", "feature")
#: the rejection reason each check gives when it fails
REASON_OF_CHECK = {"garbage": "GARBAGE_CLASS", "attention": "ATTENTION_MISMATCH", "feature": "FEATURE_MISMATCH"}

#: the combination rule's name, as recorded in ``calibration.combination.rule``
COMBINATION_RULE = "weighted_bonferroni_min"

#: weights new calibrations record: chosen on validation data only (the PneumoniaMNIST validation split,
#: clean and under benign acquisition changes, against off-distribution *content* no test set uses:
#: synthetic kinds and wrong presentations; docs/architecture.md "The guard decision",
#: scripts/choose_combination.py). The feature check gets most of the budget; the garbage and attention
#: checks keep a share that lets strong evidence of theirs reject on its own (and a garbage argmax
#: always rejects).
DEFAULT_WEIGHTS = {"garbage": 0.01, "attention": 0.01, "feature": 0.98}

#: weights of a bundle whose calibration facts record none (calibrated before weights existed): equal
#: weights, i.e. the plain minimum of the p-values it was calibrated with
LEGACY_WEIGHTS = {c: 1.0 / len(CHECKS) for c in CHECKS}


def checks_key(checks: Iterable[str]) -> str:
    """Canonical name of a set of enforced checks, e.g. ``"garbage+attention+feature"``."""
    checks = set(checks)
    unknown = checks - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; known: {', '.join(CHECKS)}")
    if not checks:
        raise ValueError("at least one check must be enforced")
    return "+".join(c for c in CHECKS if c in checks)


@dataclass(frozen=True)
class Combination:
    """How the checks' p-values become one statistic: ``min_i p_i / w_i`` over the enforced checks."""

    weights: dict  # check -> weight > 0, over all CHECKS
    source: str = "default"

    def __post_init__(self):
        w = self.weights
        if set(w) != set(CHECKS):
            raise CalibrationError(f"combination weights must name exactly {list(CHECKS)}, got {sorted(w)}")
        if not all(math.isfinite(float(v)) and float(v) > 0 for v in w.values()):
            raise CalibrationError(f"combination weights must be finite and > 0, got {w}")

    def for_checks(self, checks: str) -> dict[str, float]:
        """The weights renormalised to sum to 1 over the enforced checks ``checks`` (a :func:`checks_key`)."""
        names = checks.split("+")
        total = sum(float(self.weights[c]) for c in names)
        return {c: float(self.weights[c]) / total for c in names}

    def to_facts(self) -> dict:
        return {"rule": COMBINATION_RULE, "weights": {c: float(self.weights[c]) for c in CHECKS}, "source": self.source}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The weights as ``reference.npz`` arrays (hashed with the bundle; ``bundle.json`` repeats them)."""
        return {
            "combination_rule": np.array(COMBINATION_RULE),
            "combination_weights": np.array([float(self.weights[c]) for c in CHECKS], np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays, facts: dict | None = None) -> "Combination":
        """From ``reference.npz`` (no ``combination_weights``: calibrated before weights existed →
        :data:`LEGACY_WEIGHTS`); ``facts`` (``calibration.combination``) must agree with the arrays."""
        if "combination_weights" not in arrays:
            out = cls(dict(LEGACY_WEIGHTS), "legacy: equal weights (plain minimum)")
        else:
            rule = str(np.asarray(arrays["combination_rule"]))
            if rule != COMBINATION_RULE:
                raise CalibrationError(
                    f"unknown combination rule {rule!r} (this gamguard knows {COMBINATION_RULE!r}); "
                    "re-calibrate the bundle"
                )
            w = np.asarray(arrays["combination_weights"], np.float64).reshape(-1)
            if w.size != len(CHECKS):
                raise CalibrationError(f"combination_weights has {w.size} entries, expected {len(CHECKS)}")
            out = cls(dict(zip(CHECKS, w.tolist())), str((facts or {}).get("source", "")))
        if facts is not None:
            stated = cls.from_facts(facts).weights
            if any(not math.isclose(stated[c], out.weights[c], rel_tol=1e-9) for c in CHECKS):
                raise CalibrationError(
                    f"bundle.json calibration.combination {stated} does not match reference.npz {out.weights}; "
                    "re-calibrate the bundle"
                )
        return out

    @classmethod
    def default(cls) -> "Combination":
        return cls(dict(DEFAULT_WEIGHTS), "gamguard default (docs/architecture.md, The guard decision)")

    @classmethod
    def from_facts(cls, facts: dict | None) -> "Combination":
        """From ``calibration.combination``; ``None`` (a bundle calibrated before weights existed) gives
        :data:`LEGACY_WEIGHTS`."""
        if not facts:
            return cls(dict(LEGACY_WEIGHTS), "legacy: equal weights (plain minimum)")
        if facts.get("rule") != COMBINATION_RULE:
            raise CalibrationError(
                f"unknown combination rule {facts.get('rule')!r} (this gamguard knows {COMBINATION_RULE!r}); "
                "re-calibrate the bundle"
            )
        return cls({c: float(v) for c, v in facts["weights"].items()}, str(facts.get("source", "")))


EQUAL = Combination(dict(LEGACY_WEIGHTS), "equal weights")


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


def out_of_fold_pvalues(held: ScoreSet, n_classes: int, folds: int, seed: int) -> "PValues":
    """Every image's p-values against a :class:`NullModel` fitted without its fold (``folds`` folds of
    ``numpy.random.default_rng(seed).permutation``): no image judges itself. The statistics of a
    ``cross-fit`` cut (:class:`CutMethod`)."""
    order = np.random.default_rng(seed).permutation(held.feature.size)
    parts = np.array_split(order, folds)
    pvs = [NullModel(held.take(np.setdiff1d(order, fold)), n_classes).pvalues(held.take(fold)) for fold in parts]
    back = np.argsort(np.concatenate(parts))  # fold order -> image order
    return PValues(**{f.name: np.concatenate([getattr(pv, f.name) for pv in pvs])[back] for f in fields(PValues)})


@dataclass(frozen=True)
class CutMethod:
    """How the conformal cut is fitted from the held-out images (module docstring): ``split`` (null
    part → tables, conformal part → cut) or ``cross-fit`` (every held-out image → tables; the cut from
    :func:`out_of_fold_pvalues` with ``folds`` folds and ``seed``). Stored in ``reference.npz`` as
    ``cut_method`` / ``cut_folds`` / ``cut_seed`` (absent: ``split``), so hashed with the bundle."""

    name: str = "split"
    folds: int = 0
    seed: int = 0

    NAMES = ("cross-fit", "split")
    DEFAULT_FOLDS = 10

    @classmethod
    def cross_fit(cls, seed: int, folds: int = DEFAULT_FOLDS) -> "CutMethod":
        return cls("cross-fit", int(folds), int(seed))

    @classmethod
    def from_arrays(cls, arrays) -> "CutMethod":
        if "cut_method" not in arrays:
            return cls()
        name = str(np.asarray(arrays["cut_method"]))
        if name == "split":
            return cls()
        if name != "cross-fit":
            raise CalibrationError(
                f"unknown conformal cut method {name!r} in reference.npz (this gamguard knows "
                f"{', '.join(cls.NAMES)}); re-calibrate the bundle"
            )
        folds = int(np.asarray(arrays["cut_folds"]))
        if folds < 2:
            raise CalibrationError(f"reference.npz cut_folds is {folds}: a cross-fitted cut needs at least 2 folds")
        return cls(name, folds, int(np.asarray(arrays["cut_seed"])))

    def fit(self, null_part: ScoreSet, conformal_part: ScoreSet, n_classes: int) -> tuple[NullModel, "PValues"]:
        """The null tables and the p-values the cut is fitted on, from a null and a conformal part:
        ``split``: tables from the null part, the conformal part's p-values; ``cross-fit``: tables from
        both, every image's out-of-fold p-values."""
        if self.name == "split":
            null = NullModel(null_part, n_classes)
            return null, null.pvalues(conformal_part)
        held = ScoreSet.concat([null_part, conformal_part])
        return NullModel(held, n_classes), out_of_fold_pvalues(held, n_classes, self.folds, self.seed)

    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.name == "split":
            return {}
        return {"cut_method": np.array(self.name), "cut_folds": np.array(self.folds), "cut_seed": np.array(self.seed)}

    def describe(self) -> str:
        if self.name == "split":
            return "split conformal: null tables from the null part, the cut from the conformal part"
        return (
            f"cross-fit: null tables from every held-out image, the cut from each image's statistic against "
            f"tables fitted without its fold ({self.folds} folds, seed {self.seed})"
        )


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


def combined_p(pv: PValues, checks: str, combination: Combination) -> np.ndarray:
    """``min_i p_i / w_i`` over the enforced checks: the guard's ranking score (``combined_p``; above 1
    means no evidence against the input at all). ``combination`` has no default on purpose: ranking with
    other weights than the cut was built with gives wrong conformal p-values."""
    w = combination.for_checks(checks)
    return np.minimum.reduce([np.asarray(pv.of(c), np.float64) / w[c] for c in w])


def combined_statistic(pv: PValues, checks: str, combination: Combination) -> np.ndarray:
    """The conformal statistic ``s``: :func:`combined_p`, and 0 for inputs predicted as garbage when
    that check is enforced (they are always rejected)."""
    return conformal_statistic(combined_p(pv, checks, combination), pv, checks)


def conformal_statistic(combined: np.ndarray, pv: PValues, checks: str) -> np.ndarray:
    """:func:`combined_statistic` from an already computed ``combined_p``."""
    if "garbage" in checks.split("+"):
        return np.where(pv.garbage_pred, 0.0, combined)
    return combined


def decision_order(combined: np.ndarray, garbage_pred: np.ndarray, checks: str) -> np.ndarray:
    """A score (lower = more off-distribution) that orders inputs as the guard's decision does when its
    level varies: with the garbage check enforced, an input predicted as the garbage class is rejected at
    every level, so it comes before every other input (among themselves, by ``combined_p``); the rest by
    ``combined_p``. The ROC curve of this score is the one the guard traces as alpha moves; ``combined_p``
    alone ranks a garbage-argmax input by its p-values, which the decision never looks at for it.
    ``-1 / (1 + combined_p)`` maps ``[0, inf)`` increasingly into ``[-1, 0)``, below every ``combined_p``."""
    c = np.asarray(combined, np.float64)
    if "garbage" not in checks.split("+"):
        return c
    return np.where(np.asarray(garbage_pred, bool), -1.0 / (1.0 + c), c)


class ConformalCut:
    """Split-conformal rejection rule on the combined statistic (see module docstring).

    ``null``: the :class:`NullModel` the statistics were computed with (so :func:`decide` can turn
    per-measure p-values into the attention p-value the cut was calibrated on); ``combination``: the
    weights the statistics were combined with (so :func:`decide` gives each check its share of ``t*``)."""

    def __init__(
        self,
        stats: np.ndarray,
        alpha: float,
        null: "NullModel | None" = None,
        combination: Combination = EQUAL,
    ):
        self.stats = np.sort(np.asarray(stats, np.float64))
        self.alpha = float(alpha)
        self.null = null
        self.combination = combination
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
    level: float  # the level the combined statistic is compared with (t*), or alpha under strict
    attention_p: np.ndarray  # [N] the attention check's p-value
    combined_p: np.ndarray  # [N] min_i p_i / w_i over the enforced checks
    measure_level: float  # the per-measure p-value level equivalent to the attention check's level
    check_levels: dict  # check -> the level its own p-value is compared with (w_i t*, or alpha under strict)


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

    ``calibrated``: a check fails when its share of the combined statistic crosses the conformal level,
    ``p_i / w_i < t*`` (so the combined rule rejects exactly when some enforced check fails; the garbage
    check also fails on a garbage argmax); ``strict``: a check fails when its own p-value is <= alpha
    (no sharing of the budget between checks: more false rejections, by design). The failed measures
    of an attention failure are those whose own p-value is below the per-measure level equivalent to
    the check's level (at least the smallest one)."""
    null = null if null is not None else getattr(cut, "null", None)
    if null is None:
        raise ValueError("decide needs the null model (pass null= or a cut built with one)")
    enforced = set(checks.split("+"))
    combination = cut.combination if cut is not None else EQUAL
    if policy == "calibrated":
        if cut is None:
            raise ValueError("calibrated policy needs a conformal cut")
        level = cut.threshold
        levels = check_levels(combination, checks, level)
        att, feat = pv.attention < levels["attention"], pv.feature < levels["feature"]
    elif policy == "strict":
        level = alpha
        levels = {c: level for c in CHECKS}
        att, feat = pv.attention <= level, pv.feature <= level
    else:
        raise ValueError(f"unknown policy {policy!r} (calibrated, strict)")
    garbage = garbage_fires(pv.garbage_pred, pv.garbage, levels["garbage"], enforced, strict=policy == "strict")
    mlevel = null.measure_level(levels["attention"])
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
        combined_p=combined_p(pv, checks, combination),
        measure_level=mlevel,
        check_levels=levels,
    )


def check_levels(combination: Combination, checks: str, level: float) -> dict[str, float]:
    """Each check's own p-value level under the calibrated policy: ``w_i t*`` for an enforced check (its
    share of the cut ``level``); a check that is not enforced is reported at ``level`` (it never fires)."""
    w = combination.for_checks(checks)
    return {c: w[c] * level if c in w else level for c in CHECKS}


@dataclass(frozen=True)
class OneDecision:
    """:func:`decide` for one input (:class:`DecisionRule`)."""

    reject: bool
    garbage: bool
    attention: bool
    feature: bool
    failed_measures: tuple[int, ...]  # indices into MEASURES
    combined_p: float
    conformal_p: float | None  # calibrated policy only


class DecisionRule:
    """:func:`decide` for one input at a time, with everything that does not depend on the input fixed
    at load (policy, enforced checks, levels, the cut's sorted statistics): the serving form of the
    decision when the engine computed the checks' arithmetic (:mod:`.graph`) and the host only reads a
    few numbers per image. Python floats instead of numpy arrays, because for the one to eight images
    of a serving batch numpy's per-call overhead, not the arithmetic, is the cost (several hundred
    microseconds per batch once the engine has left the CPU caches cold). Same comparisons, same
    float64 arithmetic, the same decisions as :func:`decide` (``tests/test_decision_rule.py`` holds them
    equal)."""

    def __init__(self, *, checks: str, policy: str, alpha: float, cut: ConformalCut | None, null: NullModel):
        self.enforced = frozenset(checks.split("+"))
        self.policy = policy
        combination = cut.combination if cut is not None else EQUAL
        if policy == "calibrated":
            if cut is None:
                raise ValueError("calibrated policy needs a conformal cut")
            self.levels = check_levels(combination, checks, cut.threshold)
            self._stats = cut.stats.tolist()
        elif policy == "strict":
            self.levels = {c: float(alpha) for c in CHECKS}
            self._stats = None
        else:
            raise ValueError(f"unknown policy {policy!r} (calibrated, strict)")
        self.measure_level = null.measure_level(self.levels["attention"])
        # combined_p's terms, in CHECKS order as combined_p takes them (the minimum is order-free anyway)
        self._weights = list(combination.for_checks(checks).items())

    def __call__(self, p: dict[str, float], garbage_pred: bool, measures: list[float]) -> OneDecision:
        """``p``: check → p-value (never NaN: see :func:`~.graph.scores_from_graph`); ``measures``: the
        attention measures' p-values in MEASURES order."""
        lv, enforced = self.levels, self.enforced
        # written as "not passing" so that a NaN fails (decide()'s callers never pass one; fail closed anyway)
        if self.policy == "calibrated":
            att, feat = not p["attention"] >= lv["attention"], not p["feature"] >= lv["feature"]
            low_garbage = not p["garbage"] >= lv["garbage"]
        else:
            att, feat = not p["attention"] > lv["attention"], not p["feature"] > lv["feature"]
            low_garbage = not p["garbage"] > lv["garbage"]
        garbage = "garbage" in enforced and (garbage_pred or low_garbage)
        att = att and "attention" in enforced
        feat = feat and "feature" in enforced
        failed: tuple[int, ...] = ()
        if att:
            failed = tuple(j for j, pm in enumerate(measures) if pm < self.measure_level)
            if not failed:  # at least the weakest measure (failed_measures: the first smallest)
                failed = (min(range(len(measures)), key=measures.__getitem__),)
        combined = min(p[c] / w for c, w in self._weights)
        conformal = None
        if self._stats is not None:
            stat = 0.0 if garbage_pred and "garbage" in enforced else combined
            conformal = (1.0 + bisect.bisect_right(self._stats, stat)) / (len(self._stats) + 1.0)
        return OneDecision(
            bool(garbage or att or feat), bool(garbage), bool(att), bool(feat), failed, combined, conformal
        )
