"""The drift statistics on synthetic streams with known answers (no model, no server)."""

import math

import numpy as np
import pytest

from gamguard.runtime.drift_monitor import (
    KAPPA,
    DriftMonitor,
    DriftReference,
    _rate_tail_mass,
    _score_tail_mass,
    alarm_threshold,
    bernoulli_llr,
    calibrated_rate_bound,
    monitored_statistic,
    monitored_weights,
    online_conformal_pvalues,
    union_bound_threshold,
)

ALPHA = 0.05


def _reference(conformal, **kw):
    return DriftReference(
        alpha=ALPHA,
        policy="calibrated",
        checks=("garbage", "attention", "feature"),
        conformal_stats=np.asarray(conformal),
        reference_rate=calibrated_rate_bound(ALPHA, len(conformal)),
        calibrated_per_check={},
        **kw,
    )


def _scores(s, garbage_margin=-5.0):
    """Verdict scores whose monitored statistic (3 · the smallest check p-value) is ``s``."""
    return {"garbage.p": s, "attention.p": s / 3, "feature.p": 0.9, "garbage_margin": garbage_margin}


def _feed(monitor, stream, garbage=None, seed=0):
    """Serve ``stream`` (monitored statistics) as the calibrated guard would: reject below the cut."""
    rng = np.random.default_rng(seed)
    stats = np.sort(monitor.reference.conformal_stats)
    cut = stats[int(math.floor(ALPHA * (stats.size + 1) + 1e-9)) - 1]
    for i, s in enumerate(stream):
        if garbage is not None and garbage[i]:
            reasons = ["GARBAGE_CLASS"]
        elif s < cut:
            reasons = ["ATTENTION_MISMATCH"] if rng.random() < 0.5 else ["FEATURE_MISMATCH"]
        else:
            reasons = []
        monitor.observe(reasons, _scores(0.0, 2.0) if garbage is not None and garbage[i] else _scores(float(s)))
    return monitor


def test_rate_bound_covers_the_conformal_cuts_own_rate():
    # The rate of one calibration set's cut is F(s_(k+1)); for uniform scores that is the order statistic itself.
    rng = np.random.default_rng(1)
    n = 200
    k = int(math.floor(ALPHA * (n + 1))) - 1
    rates = np.sort(rng.random((20000, n)), axis=1)[:, k]
    bound = calibrated_rate_bound(ALPHA, n)
    assert ALPHA < bound < 0.2
    assert np.mean(rates > bound) < 0.01  # nominal 0.005
    assert (
        np.mean(rates > np.quantile(rates, 0.9)) > 0.05
    )  # the bound is not vacuous: 10% of rates lie above the 0.9 quantile


def test_online_conformal_pvalues_are_uniform_under_exchangeability():
    rng = np.random.default_rng(2)
    u = np.concatenate([online_conformal_pvalues(rng.random(100), rng.random(400)) for _ in range(20)])
    assert abs(np.mean(u <= 0.05) - 0.05) < 0.015
    assert abs(np.mean(u) - 0.5) < 0.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_alarm_on_an_exchangeable_stream(seed):
    rng = np.random.default_rng(seed)
    m = _feed(DriftMonitor(_reference(rng.random(500))), rng.random(5000), seed=seed)
    assert not m.drift, m.state()
    st = m.state()
    assert st["n"] == 5000 and abs(st["rejection_rate"] - ALPHA) < 0.03
    assert max(st["statistics"].values()) < st["threshold"]


def test_no_alarm_with_garbage_ties_in_calibration():
    # garbage-class inputs have combined statistic 0 in calibration and stream alike (ties)
    rng = np.random.default_rng(3)
    calib = np.where(rng.random(500) < 0.02, 0.0, rng.random(500))
    garbage = rng.random(4000) < 0.02
    m = _feed(DriftMonitor(_reference(calib)), np.where(garbage, 0.0, rng.random(4000)), garbage=garbage)
    assert not m.drift, m.state()


def test_a_shifted_stream_raises_the_flag_quickly():
    rng = np.random.default_rng(4)
    m = _feed(DriftMonitor(_reference(rng.random(500))), rng.random(2000) ** 2.5)  # scores pulled towards 0
    assert m.drift and m.alarm["at"] < 200, m.state()
    assert "score_shift" in m.alarm["by"]


def test_a_rise_of_garbage_rejections_raises_the_rate_alarm():
    rng = np.random.default_rng(5)
    garbage = rng.random(3000) < 0.3
    m = _feed(DriftMonitor(_reference(rng.random(500))), rng.random(3000), garbage=garbage)
    assert m.drift and m.alarm["at"] < 300, m.state()
    assert m.rate_statistic > m.reference.threshold  # the rate CUSUM sees it too, not only the score shift
    assert m.state()["per_check"]["garbage"] == pytest.approx(garbage.mean(), abs=0.01)


def test_alarm_after_a_change_point_not_before():
    rng = np.random.default_rng(6)
    stream = np.concatenate([rng.random(3000), rng.random(1000) ** 3])
    m = _feed(DriftMonitor(_reference(rng.random(500))), stream)
    assert m.drift and 3000 < m.alarm["at"] < 3200, m.state()


def test_union_bound_threshold():
    h = union_bound_threshold(10_000, 0.005, 2)
    assert 2 * 10_000 * math.exp(-h) == pytest.approx(0.005)


def _max_cusums(p0, p1, horizon, streams, rng):
    """Brute force: each in-control stream's largest rate and score CUSUM (rejections at p0, uniform ranks)."""
    up, down = bernoulli_llr(True, p0, p1), bernoulli_llr(False, p0, p1)
    rate, score = np.zeros(streams), np.zeros(streams)
    peak = np.zeros(streams)
    for _ in range(horizon):
        rate = np.maximum(0.0, rate + np.where(rng.random(streams) < p0, up, down))
        score = np.maximum(0.0, score + math.log(KAPPA) + (KAPPA - 1) * np.log(rng.random(streams)))
        peak = np.maximum(peak, np.maximum(rate, score))
    return peak


@pytest.mark.parametrize("n_conformal", [135, 1000])
def test_simulated_threshold_keeps_its_false_alarm_promise(n_conformal):
    # a large false-alarm budget so that brute force can count alarms: the promise holds, and the threshold
    # is not vacuous (it lets through a fair share of the budget, far more than the union bound would)
    p0 = calibrated_rate_bound(ALPHA, n_conformal)
    p1 = min(2 * p0, 0.5 * (1 + p0))
    horizon, budget, streams = 2000, 0.1, 3000
    h = alarm_threshold(p0, p1, horizon, budget)
    assert h < union_bound_threshold(horizon, budget) - 2
    _rate_tail_mass.cache_clear()
    _score_tail_mass.cache_clear()
    assert h == alarm_threshold(p0, p1, horizon, budget)  # seeded: the same bundle gets the same threshold
    peak = _max_cusums(p0, p1, horizon, streams, np.random.default_rng(n_conformal))
    rate = np.mean(peak >= h)
    assert rate <= budget + 3 * math.sqrt(budget * (1 - budget) / streams)
    assert rate > budget / 10
    assert np.mean(peak >= union_bound_threshold(horizon, budget)) < rate / 5


def test_threshold_grows_with_the_horizon_and_shrinks_with_the_budget():
    p0 = calibrated_rate_bound(ALPHA, 500)
    p1 = 2 * p0
    h = alarm_threshold(p0, p1)
    assert 11 < h < 13  # the default (T = 10,000, 0.5 %): docs/drift.md
    assert alarm_threshold(p0, p1, 40_000) > h + 1
    assert alarm_threshold(p0, p1, 10_000, 0.05) < h - 2


def test_faults_are_not_counted():
    m = DriftMonitor(_reference(np.linspace(0.001, 1, 500)))
    m.observe(["INVALID_INPUT"], {})
    m.observe(["GUARD_ERROR"], {})
    m.observe([], _scores(0.5))
    st = m.state()
    assert (st["n"], st["n_skipped"], st["rejection_rate"]) == (1, 2, 0.0)


def test_monitored_statistic_is_every_enforced_check_at_equal_weight():
    """k · min_i p_i over the enforced checks, whatever weights the decision uses: a shift in one check's
    p-values moves it (and so the score-shift CUSUM) even when that check has a small share of the decision."""
    weights = monitored_weights(("garbage", "attention", "feature"))
    assert weights == pytest.approx({"garbage": 1 / 3, "attention": 1 / 3, "feature": 1 / 3})
    scores = {"garbage.p": 0.6, "attention.p": 0.02, "feature.p": 0.3, "combined_p": 0.3, "garbage_margin": -2.0}
    assert monitored_statistic(scores, weights) == pytest.approx(3 * 0.02)
    assert monitored_statistic(scores, monitored_weights(("garbage", "feature"))) == pytest.approx(2 * 0.3)
    # a garbage argmax is 0 (as in the calibration's statistic) only while the garbage check is enforced
    assert monitored_statistic({**scores, "garbage_margin": 1.5}, weights) == 0.0
    assert monitored_statistic(
        {**scores, "garbage_margin": 1.5}, monitored_weights(("attention", "feature"))
    ) == pytest.approx(0.04)
    assert monitored_statistic({"feature.p": 0.3}, weights) is None  # cannot be ranked: skipped
    # calibration: three independent uniform p-values; the stream: the attention check's p-values shift
    rng = np.random.default_rng(7)
    calib = 3 * rng.random((500, 3)).min(axis=1)
    m = DriftMonitor(_reference(calib))
    for i in range(3000):
        p = rng.random(3)
        if i >= 1000:
            p[1] = p[1] ** 3  # attention: less typical than calibration
        m.observe([], {"garbage.p": p[0], "attention.p": p[1], "feature.p": p[2], "garbage_margin": -1.0})
    assert m.drift and m.alarm["at"] > 1000 and m.alarm["by"] == ["score_shift"], m.state()
