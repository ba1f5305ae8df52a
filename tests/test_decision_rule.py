"""The per-image decision used when the engine computes the checks' arithmetic (``DecisionRule``,
``Guard._decide_rows``) against the vectorised numpy reference (``decide``, ``Guard._judge``).

Both must give the same decisions on the same p-values, exactly — including p-values that sit exactly
on a level (``<`` under the calibrated policy, ``<=`` under strict), zeros, garbage argmaxes — for every
set of enforced checks and both policies; and the same verdicts from the same engine outputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from gamguard.runtime.checks import (
    CHECKS,
    DecisionRule,
    PValues,
    all_check_sets,
    check_levels,
    conformal_statistic,
    decide,
)
from gamguard.runtime.checks.graph import GUARD_COLUMNS
from gamguard.runtime.demo.phantoms import HELD_OUT_KINDS, hand_phantom, ood_set
from gamguard.runtime.engines import EngineOutput
from gamguard.runtime.guard import Guard
from gamguard.runtime.preprocess import preprocess_batch
from gamguard.runtime.similarity import MEASURES

M = len(MEASURES)


@pytest.fixture(scope="module")
def graph_guard(demo_bundle):
    guard = Guard.from_bundle(demo_bundle, providers="cpu", threads=1, prefer="onnxruntime", arithmetic="graph")
    assert guard.engine.guarded
    return guard


def _pvalues(rng, n: int, levels: dict, mlevel: float) -> PValues:
    """Random p-values over the whole range, with some exactly at their level, some 0, some tiny."""

    def column(level, size):
        p = rng.uniform(0.0, 1.0, size) ** 3  # many small ones
        pick = rng.random(size)
        p = np.where(pick < 0.15, level, p)  # exactly on the level
        p = np.where((pick >= 0.15) & (pick < 0.2), 0.0, p)
        return np.where((pick >= 0.2) & (pick < 0.25), level * 0.999, p)

    return PValues(
        measures=np.stack([column(mlevel, n) for _ in range(M)], axis=1),
        attention=column(levels["attention"], n),
        feature=column(levels["feature"], n),
        garbage=column(levels["garbage"], n),
        garbage_pred=rng.random(n) < 0.1,
    )


@pytest.mark.parametrize("policy", ["calibrated", "strict"])
def test_decision_rule_equals_decide_for_every_check_set(graph_guard, policy):
    cal = graph_guard.calibration
    rng = np.random.default_rng(3)
    for checks in all_check_sets():
        cut = cal.cuts[checks]
        rule = DecisionRule(checks=checks, policy=policy, alpha=cal.alpha, cut=cut, null=cal.null)
        levels = check_levels(cut.combination, checks, cut.threshold) if policy == "calibrated" else None
        levels = levels or {c: cal.alpha for c in CHECKS}
        assert rule.levels == levels
        pv = _pvalues(rng, 400, levels, rule.measure_level)
        d = decide(pv, checks=checks, policy=policy, alpha=cal.alpha, cut=cut)
        conformal = cut.p_value(conformal_statistic(d.combined_p, pv, checks))
        for i in range(400):
            one = rule(
                {"garbage": pv.garbage[i], "attention": pv.attention[i], "feature": pv.feature[i]},
                bool(pv.garbage_pred[i]),
                pv.measures[i].tolist(),
            )
            got = (one.reject, one.garbage, one.attention, one.feature)
            assert got == (d.reject[i], d.garbage[i], d.attention[i], d.feature[i]), (checks, policy, i)
            assert one.failed_measures == tuple(np.flatnonzero(d.failed_measures[i])), (checks, policy, i)
            assert one.combined_p == d.combined_p[i]
            assert one.conformal_p == (conformal[i] if policy == "calibrated" else None)
        assert d.reject.any() and not d.reject.all()  # the sample covers both outcomes


@pytest.fixture(scope="module")
def graph_outputs(graph_guard):
    rng = np.random.default_rng(5)
    inside = [hand_phantom(i % 4, rng, 256).image for i in range(16)]
    outside, _ = ood_set(list(HELD_OUT_KINDS) + ["noise"], 2, seed=13)
    x = preprocess_batch(inside + list(outside), graph_guard.spec)
    return graph_guard.engine.run(x)


def _assert_same_verdicts(fast, reference):
    assert len(fast) == len(reference)
    for a, b in zip(fast, reference):
        assert (a.accepted, a.label, a.label_index, a.reasons, a.failed_measures, a.detail) == (
            b.accepted,
            b.label,
            b.label_index,
            b.reasons,
            b.failed_measures,
            b.detail,
        )
        assert (a.predicted_index, a.reference_index) == (b.predicted_index, b.reference_index)
        assert list(a.scores) == list(b.scores) and a.thresholds == b.thresholds
        np.testing.assert_allclose(list(a.scores.values()), list(b.scores.values()), rtol=1e-12, atol=0)
        assert (a.probabilities is None) == (b.probabilities is None)
        if a.probabilities is not None:
            assert list(a.probabilities) == list(b.probabilities)
            np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), rtol=1e-12)
        assert np.array_equal(a.cam, b.cam) and np.array_equal(a.reference_cam, b.reference_cam)


@pytest.mark.parametrize("policy", ["calibrated", "strict"])
@pytest.mark.parametrize("checks", ["garbage+attention+feature", "attention+feature", "feature"])
def test_decide_rows_gives_the_reference_verdicts(graph_guard, graph_outputs, policy, checks):
    guard = Guard(
        graph_guard.bundle_dir,
        graph_guard.manifest,
        graph_guard.engine,
        graph_guard.calibration,
        policy=policy,
        enforced_checks=checks,
    )
    n = graph_outputs.logits.shape[0]
    fast = guard._decide_rows(graph_outputs, n, 0.0, 0.0)
    reference = guard._judge(graph_outputs, n, 0.0, 0.0)
    _assert_same_verdicts(fast, reference)
    accepted = [v.accepted for v in fast]
    if checks == "garbage+attention+feature":
        assert any(accepted) and not all(accepted)


def test_decide_rows_on_extreme_engine_numbers(graph_guard, graph_outputs):
    """p-values that are NaN, negative or 0, a garbage argmax, a p-value just below its level: the
    same verdicts as the reference, and none of them accepted where a check must fail."""
    out = graph_outputs
    guard_cols = np.array(out.guard, np.float32, copy=True)
    logits = np.array(out.logits, np.float32, copy=True)
    col = GUARD_COLUMNS.index
    guard_cols[0, col("feature.p")] = np.nan
    guard_cols[1, M : 2 * M] = -1.0  # every measure's p-value
    guard_cols[2, M] = np.nan  # one measure's p-value
    guard_cols[3, col("garbage.p")] = 0.0
    logits[4, graph_guard.garbage_index] = logits[4].max() + 5.0  # the garbage class wins
    # the largest float32 below the feature level (rounding the level itself to float32 may go either way)
    level32 = np.float32(graph_guard.check_levels["feature"])
    below = level32 if level32 < graph_guard.check_levels["feature"] else np.nextafter(level32, np.float32(0))
    guard_cols[5, col("feature.p")] = below  # just below its level: fails
    extreme = EngineOutput(logits, out.cam, out.early, guard_cols)
    n = logits.shape[0]
    fast = graph_guard._decide_rows(extreme, n, 0.0, 0.0)
    _assert_same_verdicts(fast, graph_guard._judge(extreme, n, 0.0, 0.0))
    assert not any(fast[i].accepted for i in range(6))
    assert fast[2].scores[f"attention.{MEASURES[0]}.p"] == 0.0 and MEASURES[0] in fast[2].failed_measures

    assert "GARBAGE_CLASS" in fast[4].reasons and "FEATURE_MISMATCH" in fast[5].reasons

    # a non-finite logit, the graph's finiteness flag down, or a reference class other than the one the
    # logits predict: that image only is a GUARD_ERROR
    logits[6, 0] = np.nan
    guard_cols[7, col("finite")] = 0.0
    real = len(graph_guard._real)
    guard_cols[8, col("reference_position")] = (guard_cols[8, col("reference_position")] + 1) % real
    broken = graph_guard._decide_rows(EngineOutput(logits, out.cam, out.early, guard_cols), n, 0.0, 0.0)
    assert [v.reasons for v in broken[6:9]] == [["GUARD_ERROR"]] * 3
    assert all(v.label is None for v in broken[6:9])
    _assert_same_verdicts(broken[:6] + broken[9:], fast[:6] + fast[9:])


def test_engine_pvalues_that_are_not_finite_reject(graph_guard, graph_outputs):
    """An infinite p-value is as wrong as a NaN (a p-value is at most 1): both paths reject on it."""
    out = graph_outputs
    n = out.logits.shape[0]
    accepted = [i for i, v in enumerate(graph_guard._decide_rows(out, n, 0.0, 0.0)) if v.accepted]
    assert accepted
    col = GUARD_COLUMNS.index
    for column in ("feature.p", "garbage.p", f"attention.{MEASURES[3]}.p"):
        guard_cols = np.array(out.guard, np.float32, copy=True)
        guard_cols[accepted, col(column)] = np.inf
        bad = EngineOutput(out.logits, out.cam, out.early, guard_cols)
        fast, reference = graph_guard._decide_rows(bad, n, 0.0, 0.0), graph_guard._judge(bad, n, 0.0, 0.0)
        assert not any(fast[i].accepted for i in accepted), column
        _assert_same_verdicts(fast, reference)


def test_attention_p_one_equals_the_vectorised_p(graph_guard):
    null = graph_guard.calibration.null.attention
    rng = np.random.default_rng(8)
    pm = rng.uniform(0.0, 1.0, (2000, M)) ** 4
    pm[:50, 2] = 0.0
    for row, expected in zip(pm.tolist(), null.p(pm).tolist()):
        assert null.p_one(row) == pytest.approx(expected, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("policy", ["calibrated", "strict"])
def test_decision_rule_fails_closed_on_a_nan(graph_guard, policy):
    """Its callers never pass a NaN; if one did, the check it belongs to fails (it is written as
    "not passing", not as "below the level")."""
    cal = graph_guard.calibration
    for check in CHECKS:
        rule = DecisionRule(checks=check, policy=policy, alpha=cal.alpha, cut=cal.cuts[check], null=cal.null)
        p = {c: 1.0 for c in CHECKS}
        p[check] = float("nan")
        d = rule(p, False, [1.0] * M)
        assert d.reject and getattr(d, check), (policy, check)
