"""The weighted Bonferroni combination (checks/combine.py): weights as calibration facts, the conformal
bound on the weighted statistic, reasons consistent with the rule, and a bundle's weights reaching the
served decision."""

from __future__ import annotations

import numpy as np
import pytest
from testlib import id_phantoms

from gamguard.runtime.checks import (
    CHECKS,
    DEFAULT_WEIGHTS,
    EQUAL,
    LEGACY_WEIGHTS,
    CalibrationError,
    Combination,
    ConformalCut,
    NullModel,
    ScoreSet,
    check_levels,
    combined_p,
    combined_statistic,
    decide,
    decision_order,
)
from gamguard.runtime.similarity import HIGHER_IS_SIMILAR, MEASURES

ALL = "garbage+attention+feature"
SKEWED = Combination({"garbage": 0.5, "attention": 0.1, "feature": 0.4}, "test")


def _scores(rng, n, shift=0.0):
    """Exchangeable synthetic raw scores with correlated checks (a shared latent ``z``); ``shift`` moves
    every check towards 'dissimilar'."""
    z = rng.normal(size=n) + shift
    sims = np.stack(
        [
            (0.8 - 0.05 * z + 0.05 * rng.normal(size=n))
            if HIGHER_IS_SIMILAR[m]
            else (0.2 + 0.05 * z + 0.05 * rng.normal(size=n))
            for m in MEASURES
        ],
        axis=1,
    )
    return ScoreSet(
        sims=sims,
        feature=np.exp(0.5 * z + 0.5 * rng.normal(size=n)),
        pred=np.zeros(n, int),
        pred_real=np.zeros(n, int),
        garbage_prob=np.zeros(n),
        garbage_pred=rng.uniform(size=n) < 0.01,
        garbage_margin=-5.0 + z + rng.normal(size=n),
    )


def test_weights_are_facts_with_a_documented_default_and_a_legacy_reading():
    facts = Combination.default().to_facts()
    assert facts["rule"] == "weighted_bonferroni_min" and facts["weights"] == DEFAULT_WEIGHTS
    assert abs(sum(DEFAULT_WEIGHTS.values()) - 1) < 1e-9 and set(DEFAULT_WEIGHTS) == set(CHECKS)
    assert Combination.from_facts(facts).weights == DEFAULT_WEIGHTS  # round trip
    assert Combination.from_facts(None).weights == LEGACY_WEIGHTS  # calibrated before weights existed
    with pytest.raises(CalibrationError, match="re-calibrate"):
        Combination.from_facts({"rule": "fisher", "weights": DEFAULT_WEIGHTS})
    with pytest.raises(CalibrationError, match="> 0"):
        Combination({"garbage": 0.0, "attention": 0.5, "feature": 0.5})
    with pytest.raises(CalibrationError, match="exactly"):
        Combination({"garbage": 0.5, "feature": 0.5})
    # renormalised over the enforced subset; a single check is its own p-value
    assert SKEWED.for_checks("attention+feature") == pytest.approx({"attention": 0.2, "feature": 0.8})
    assert SKEWED.for_checks("feature") == {"feature": 1.0}


def test_weighted_statistic_is_the_weighted_minimum():
    rng = np.random.default_rng(0)
    null = NullModel(_scores(rng, 300), 2)
    pv = null.pvalues(_scores(rng, 200, shift=0.5))
    p = np.stack([pv.garbage, pv.attention, pv.feature], 1)
    assert np.allclose(combined_p(pv, ALL, SKEWED), (p / [0.5, 0.1, 0.4]).min(1))
    # equal weights rank exactly like the plain minimum (the legacy rule), up to the factor 3
    assert np.allclose(combined_p(pv, ALL, EQUAL), 3 * p.min(1))
    assert np.allclose(combined_p(pv, "attention+feature", SKEWED), np.minimum(p[:, 1] / 0.2, p[:, 2] / 0.8))
    s = combined_statistic(pv, ALL, SKEWED)
    assert np.all(s[pv.garbage_pred] == 0) and np.allclose(
        s[~pv.garbage_pred], combined_p(pv, ALL, SKEWED)[~pv.garbage_pred]
    )
    # the weights change the ranking (otherwise storing them would be pointless)
    assert not np.array_equal(np.argsort(combined_p(pv, ALL, SKEWED)), np.argsort(combined_p(pv, ALL, EQUAL)))


@pytest.mark.parametrize("alpha", [0.05, 0.10])
@pytest.mark.parametrize("checks", [ALL, "attention+feature"])
def test_conformal_bound_holds_for_the_weighted_statistic(alpha, checks):
    # repeated: null part, conformal part and fresh in-distribution draws, all exchangeable
    rng = np.random.default_rng(7)
    rates = []
    for _ in range(60):
        null = NullModel(_scores(rng, 150), 2)
        pv_b = null.pvalues(_scores(rng, 200))
        cut = ConformalCut(combined_statistic(pv_b, checks, SKEWED), alpha, null, SKEWED)
        d = decide(null.pvalues(_scores(rng, 400)), checks=checks, policy="calibrated", alpha=alpha, cut=cut)
        rates.append(d.reject.mean())
    assert np.mean(rates) <= alpha + 0.006
    assert np.mean(rates) >= alpha - 0.02  # not vacuous


def test_decision_order_ranks_as_the_decision_rejects_at_every_level():
    """The evaluation's ROC score: for every cut t the guard could be calibrated to, the inputs the
    decision rejects are exactly a lowest-ranked prefix (a garbage argmax at any level, then combined_p)."""
    rng = np.random.default_rng(11)
    null = NullModel(_scores(rng, 300), 2)
    pv = null.pvalues(_scores(rng, 2000, shift=0.7))
    pv.garbage_pred = rng.uniform(size=2000) < 0.1
    pv.garbage_pred[np.argmax(combined_p(pv, ALL, SKEWED))] = True  # the most "in-distribution" p-values
    rank = decision_order(combined_p(pv, ALL, SKEWED), pv.garbage_pred, ALL)
    order = np.argsort(rank, kind="stable")
    for t in np.quantile(combined_statistic(pv, ALL, SKEWED), [0.02, 0.1, 0.3, 0.6, 0.9]):
        cut = ConformalCut(np.array([t]), 0.5, null, SKEWED)  # k = 0: the threshold is t itself
        rejects = decide(pv, checks=ALL, policy="calibrated", alpha=0.5, cut=cut).reject
        assert set(np.flatnonzero(rejects)) == set(order[: rejects.sum()])
    assert rank[pv.garbage_pred].max() < rank[~pv.garbage_pred].min()  # a garbage argmax before the rest
    # without the garbage check, a garbage argmax is not rejected for it: combined_p alone
    c = combined_p(pv, "attention+feature", SKEWED)
    assert np.array_equal(decision_order(c, pv.garbage_pred, "attention+feature"), c)


def test_reasons_are_the_checks_whose_share_crosses_the_cut():
    rng = np.random.default_rng(3)
    null = NullModel(_scores(rng, 300), 2)
    cut = ConformalCut(combined_statistic(null.pvalues(_scores(rng, 300)), ALL, SKEWED), 0.05, null, SKEWED)
    pv = null.pvalues(_scores(rng, 3000, shift=1.0))
    d = decide(pv, checks=ALL, policy="calibrated", alpha=0.05, cut=cut)
    t = cut.threshold
    assert d.check_levels == pytest.approx({"garbage": 0.5 * t, "attention": 0.1 * t, "feature": 0.4 * t})
    assert np.array_equal(d.feature, pv.feature / 0.4 < t)
    assert np.array_equal(d.attention, pv.attention / 0.1 < t)
    assert np.array_equal(d.garbage, pv.garbage_pred | (pv.garbage / 0.5 < t))
    # the decision is the conformal rule on the weighted statistic, and some input fails each check
    assert np.array_equal(d.reject, combined_statistic(pv, ALL, SKEWED) < t)
    assert d.garbage.any() and d.attention.any() and d.feature.any()
    # an attention p-value between w_a t* and t* fails under equal weights but not under SKEWED
    between = (pv.attention >= 0.1 * t) & (pv.attention < t / 3)
    assert between.any() and not d.attention[between].any()
    assert check_levels(SKEWED, "feature", t) == {"garbage": t, "attention": t, "feature": t}


def test_bundle_weights_are_recorded_hashed_and_used(copy_bundle):
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.bundle import BundleError
    from gamguard.runtime.calibration import write_reference_file
    from gamguard.runtime.checks import read_reference_arrays
    from gamguard.runtime.guard import Guard

    b = copy_bundle("weights")
    m = bundle_mod.read_manifest(b)
    # the embedded bundle records the default weights, in reference.npz (hashed) and bundle.json (documented)
    assert m["calibration"]["combination"]["weights"] == DEFAULT_WEIGHTS
    assert np.allclose(read_reference_arrays(b)["combination_weights"], [DEFAULT_WEIGHTS[c] for c in CHECKS])
    g0 = Guard.from_bundle(b)
    other = Combination({"garbage": 0.2, "attention": 0.6, "feature": 0.2}, "test")
    write_reference_file(b, {**read_reference_arrays(b), **other.to_arrays()})
    m["calibration"]["combination"] = other.to_facts()
    bundle_mod.write_manifest(b, m)
    g1 = Guard.from_bundle(b)
    assert g1.bundle_hash != g0.bundle_hash  # the weights are part of the hashed bundle
    assert g1.info()["calibration"]["combination"]["weights"]["attention"] == 0.6
    image = id_phantoms()[0][0]
    for g, w in ((g0, DEFAULT_WEIGHTS), (g1, other.weights)):
        v = g.verify_images([image])[0]
        assert v.thresholds["feature.p"] == pytest.approx(w["feature"] * v.thresholds["combined_p"])
        assert v.thresholds["attention.p"] == pytest.approx(w["attention"] * v.thresholds["combined_p"])
        s = v.scores
        expect = min(s["garbage.p"] / w["garbage"], s["attention.p"] / w["attention"], s["feature.p"] / w["feature"])
        assert s["combined_p"] == pytest.approx(expect)
    # bundle.json stating other weights than the hashed arrays is refused
    m["calibration"]["combination"] = Combination.default().to_facts()
    bundle_mod.write_manifest(b, m)
    with pytest.raises(BundleError, match="does not match reference.npz"):
        Guard.from_bundle(b)
