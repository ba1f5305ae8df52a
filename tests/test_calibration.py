"""Calibration statistics (p-values, conformal cut, decision rule, early-feature reference) and the
`gamguard calibrate` command on a copy of the demo bundle."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from gamguard.runtime.checks import (
    ConformalCut,
    FeatureReference,
    PValues,
    TailPValue,
    all_check_sets,
    checks_key,
    combined_statistic,
    decide,
)


# ---------------------------------------------------------------------------------------------- p-values
def test_tail_pvalue_is_a_monotone_valid_pvalue():
    rng = np.random.default_rng(0)
    null = rng.normal(size=400)
    p = TailPValue(null)
    xs = np.linspace(-5, 8, 500)
    ps = p(xs)
    assert np.all(np.diff(ps) <= 1e-12), "p must not increase with dissimilarity"
    assert ps[0] == 1.0 and 0 < ps[-1] < 1e-3, "far beyond the null the p-value keeps decaying (no tie floor)"
    # Validity: on fresh draws from the null, P(p <= a) ~ a.
    fresh = p(rng.normal(size=20000))
    for a in (0.01, 0.05, 0.1, 0.3):
        assert abs(np.mean(fresh <= a) - a) < 0.02
    assert p(np.array([np.nan, np.inf]))[0] == 0.0 and p(np.array([np.inf]))[0] == 0.0


def test_tail_pvalue_extrapolation_is_conservative_for_small_nulls():
    # An exponential null (the tail model itself) of the size a null part has (67 images): the
    # extrapolated p-value at the null's true 1e-6 quantile must rarely claim more evidence than 1e-6.
    # With the plain mean-excess scale it does so about half the time; the 95 % upper bound of the
    # scale keeps it near 5 %.
    rng = np.random.default_rng(3)
    x_true = -math.log(1e-6)  # P(X > x_true) = 1e-6 for Exp(1)
    too_small = [float(TailPValue(rng.exponential(size=67))(np.array([x_true]))[0]) < 1e-6 for _ in range(400)]
    assert np.mean(too_small) < 0.12


def test_tail_pvalue_min_scale_bounds_the_decay():
    # min_scale 1 on a -log p score: one more unit of -log p beyond the null never costs more than a factor e
    null = np.random.default_rng(4).exponential(scale=0.2, size=100)  # a steep null: its own scale < 1
    p = TailPValue(null, min_scale=1.0)
    assert p.scale >= 1.0 and TailPValue(null).scale < 1.0
    far = null.max() + np.array([1.0, 2.0])
    ratio = p(far[:1])[0] / p(far[1:])[0]
    assert ratio == pytest.approx(math.e ** (1.0 / p.scale)) and ratio <= math.e + 1e-9


def test_tail_pvalue_inverse_round_trips():
    p = TailPValue(np.random.default_rng(1).gamma(2.0, size=300))
    for level in (0.5, 0.1, 0.01, 1e-4):
        x = p.inverse(level)
        assert math.isclose(float(p(np.array([x]))[0]), level, rel_tol=1e-6)


def test_tail_pvalue_one_equals_the_vectorised_lookup():
    """The scalar form used per image when serving: the same p-value for every kind of value — inside the
    null (also exactly on a knot and on tied knots), below it, beyond it, non-finite."""
    rng = np.random.default_rng(6)
    null = np.concatenate([rng.gamma(2.0, size=200), np.full(20, 1.5), np.round(rng.normal(3, 1, 50), 1)])
    p = TailPValue(null)
    values = np.concatenate(
        [
            rng.uniform(-1.0, null.max() + 5.0, 3000),
            p.knots,  # exactly on every knot (ties included)
            [p.knots[0] - 1.0, p.knots[-1], p.knots[-1] + 1e-12, 1e6, np.inf, -np.inf, np.nan],
        ]
    )
    vectorised = p(values)
    for v, expected in zip(values.tolist(), vectorised.tolist()):
        assert p.one(v) == pytest.approx(expected, rel=1e-12, abs=1e-300), v


def test_tail_pvalue_needs_a_null():
    from gamguard.runtime.calibration import CalibrationError

    with pytest.raises(CalibrationError, match="at least 2"):
        TailPValue(np.array([1.0, np.nan]))


# ---------------------------------------------------------------------------------------------- conformal
@pytest.mark.parametrize("alpha", [0.05, 0.10])
def test_conformal_cut_bounds_false_rejection(alpha):
    rng = np.random.default_rng(2)
    # 400 repetitions of: calibrate on 250 exchangeable draws, test on 200 more.
    rates = []
    for _ in range(400):
        cal = rng.uniform(size=250) ** 3  # any continuous statistic
        cut = ConformalCut(cal, alpha)
        test = rng.uniform(size=200) ** 3
        rates.append(cut.rejects(test).mean())
        # the two forms of the rule agree: conformal p <= alpha  <=>  s < t*
        assert np.array_equal(cut.p_value(test) <= alpha, cut.rejects(test))
    assert np.mean(rates) <= alpha + 0.005
    assert np.mean(rates) >= alpha - 0.02  # and it is not vacuous


def test_conformal_cut_counts_garbage_rejections():
    # 3 % of the conformal part is predicted garbage (statistic 0): the cut tightens so that the total
    # in-distribution rejection stays at alpha.
    rng = np.random.default_rng(3)
    s = rng.uniform(size=1000)
    s[:30] = 0.0
    cut = ConformalCut(s, 0.05)
    fresh = rng.uniform(size=100000)
    fresh[:3000] = 0.0
    assert abs(cut.rejects(fresh).mean() - 0.05) < 0.006


def test_checks_key_and_sets():
    assert checks_key(["feature", "garbage"]) == "garbage+feature"
    assert len(all_check_sets()) == 7
    with pytest.raises(ValueError):
        checks_key(["colour"])
    with pytest.raises(ValueError):
        checks_key([])


def _null_model():
    from gamguard.runtime.checks import NullModel, ScoreSet
    from gamguard.runtime.similarity import HIGHER_IS_SIMILAR, MEASURES

    rng = np.random.default_rng(5)
    n = 300
    sims = np.stack(
        [rng.uniform(0.5, 1.0, n) if HIGHER_IS_SIMILAR[m] else rng.uniform(0, 0.5, n) for m in MEASURES], axis=1
    )
    s = ScoreSet(
        sims=sims,
        feature=rng.gamma(4.0, size=n),
        pred=np.zeros(n, int),
        pred_real=np.zeros(n, int),
        garbage_prob=np.zeros(n),
        garbage_pred=np.zeros(n, bool),
        garbage_margin=rng.normal(-5.0, 1.0, n),
    )
    return NullModel(s, n_classes=2), s


def test_null_model_attention_pvalue_is_calibrated():
    null, s = _null_model()
    pv = null.pvalues(s)
    pm, pf, pa, pg = pv.measures, pv.feature, pv.attention, pv.garbage
    assert abs(np.mean(pg <= 0.05) - 0.05) < 0.03
    # the minimum of seven p-values is far from uniform; the calibrated attention p is not
    assert np.mean(pm.min(axis=1) <= 0.05) > 0.15
    assert abs(np.mean(pa <= 0.05) - 0.05) < 0.03 and abs(np.mean(pf <= 0.05) - 0.05) < 0.03
    for level in (0.05, 0.01):
        ml = null.measure_level(level)
        assert np.array_equal(pa < level, pm.min(axis=1) < ml)


def _pv(null, pm, pf, garbage, pg=None):
    pg = np.full(len(pf), 0.5) if pg is None else pg
    return PValues(measures=pm, attention=null.attention_p(pm), feature=pf, garbage=pg, garbage_pred=garbage)


def test_decide_reasons_follow_the_failing_pvalues():
    null, _ = _null_model()
    ml = null.measure_level(0.01)
    pm = np.full((5, 7), 0.5)
    pm[1, [1, 5]] = ml / 10  # two measures far below the level → attention fails, naming both
    pf = np.array([0.5, 0.5, 0.0001, 0.5, 0.5])
    pg = np.array([0.5, 0.5, 0.5, 0.5, 0.0001])  # item 4: garbage margin unusually high, argmax not garbage
    garbage = np.array([False, False, False, True, False])
    pv = _pv(null, pm, pf, garbage, pg)
    cut = ConformalCut(np.linspace(0.01, 1, 200), 0.05, null)
    assert cut.threshold == pytest.approx(0.01 + 9 * (0.99 / 199))
    d = decide(pv, checks="garbage+attention+feature", policy="calibrated", alpha=0.05, cut=cut)
    assert d.reject.tolist() == [False, True, True, True, True]
    assert d.attention.tolist() == [False, True, False, False, False]
    assert d.failed_measures[1].nonzero()[0].tolist() == [1, 5] and not d.failed_measures[[0, 2, 3, 4]].any()
    assert d.feature.tolist() == [False, False, True, False, False]
    assert d.garbage.tolist() == [False, False, False, True, True]
    # not enforced → never a reason
    d = decide(pv, checks="attention", policy="calibrated", alpha=0.05, cut=cut)
    assert d.reject.tolist() == [False, True, False, False, False] and not d.failed_measures[2].any()
    # strict compares each check's own p with alpha
    pv_strict = _pv(null, pm, pf * 0 + 0.04, garbage * False)
    d = decide(pv_strict, checks="feature", policy="strict", alpha=0.05, cut=None, null=null)
    assert d.reject.all() and d.level == 0.05
    # calibrated: rejection <=> combined statistic below the cut; with equal weights (the cut's) the
    # ranking score is the plain minimum times the number of checks (Bonferroni)
    s = combined_statistic(pv, "garbage+attention+feature", cut.combination)
    d = decide(pv, checks="garbage+attention+feature", policy="calibrated", alpha=0.05, cut=cut)
    assert np.array_equal(d.reject, s < cut.threshold)
    assert s[3] == 0.0 and d.combined_p[3] == pytest.approx(1.5)
    assert np.allclose(d.combined_p, 3 * np.minimum.reduce([pv.garbage, pv.attention, pv.feature]))
    with pytest.raises(ValueError, match="null model"):
        decide(pv, checks="attention", policy="calibrated", alpha=0.05, cut=ConformalCut(pf, 0.05))


# ---------------------------------------------------------------------------------------------- features
def test_feature_reference_is_class_conditional_mahalanobis_of_the_polar_form():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(4)
    base = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)  # two classes, D = 36
    labels = rng.integers(0, 2, 400)
    train = base[labels] * rng.uniform(0.8, 1.2, (400, 1, 1, 1)).astype(np.float32)
    train += 0.3 * rng.normal(size=(400, 4, 3, 3)).astype(np.float32)
    ref = FeatureReference.fit(train, labels)
    assert ref.to_arrays()["feature_kind"] == "mahalanobis_polar_ledoit_wolf"

    def parts(a):  # direction u = x / |x| and log-norm l
        a = a.reshape(len(a), -1).astype(np.float64)
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        return a / norm, np.log(norm[:, 0])

    # score = min over classes of (u - mu_k)^T S^-1 (u - mu_k) + (l - m_k)^2 / v: S sklearn's Ledoit-Wolf
    # covariance of the class-centred directions, m_k the class median log-norm, v the pooled within-class
    # variance of the log-norms from their median absolute deviation
    u, ln = parts(train)
    mus = np.stack([u[labels == k].mean(0) for k in (0, 1)])
    ms = np.array([np.median(ln[labels == k]) for k in (0, 1)])
    prec = np.linalg.inv(LedoitWolf(assume_centered=True).fit(u - mus[labels]).covariance_)
    v = (1.4826 * np.median(np.abs(ln - ms[labels]))) ** 2

    def want(a):
        ua, la = parts(a)
        d = ua[:, None] - mus[None]
        return (np.einsum("nkd,de,nke->nk", d, prec, d) + (la[:, None] - ms[None]) ** 2 / v).min(axis=1)

    test = base[[0, 1, 1]] + 0.3 * rng.normal(size=(3, 4, 3, 3)).astype(np.float32)
    assert np.allclose(ref.score(test), want(test), rtol=1e-3)
    # the overall scale of the activations moves only the log-norm term: a much weaker (nearly
    # featureless) input with the usual layout is still far
    assert np.allclose(ref.score(3.0 * test), want(3.0 * test), rtol=1e-3)
    assert ref.score(0.05 * test).min() > 10 * ref.score(test).max()
    # a few blank reference images (zero activations) do not switch the log-norm term off
    blank = train.copy()
    blank[:8] = 0.0
    robust = FeatureReference.fit(blank, labels)
    assert robust.score(0.05 * test).min() > 10 * robust.score(test).max()
    # in-distribution scores are near D (chi-square); structure changes are far above
    same = ref.score(base[labels[:50]] + 0.3 * rng.normal(size=(50, 4, 3, 3)).astype(np.float32))
    rotated = ref.score(
        np.rot90(base[labels[:50]], axes=(2, 3)) + 0.3 * rng.normal(size=(50, 4, 3, 3)).astype(np.float32)
    )
    inverted = ref.score(-base[labels[:50]] + 0.3 * rng.normal(size=(50, 4, 3, 3)).astype(np.float32))
    assert 20 < np.median(same) < 60
    assert rotated.min() > same.max() and inverted.min() > same.max()
    bad = base[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    assert ref.score(bad)[0] == np.inf
    back = FeatureReference.from_arrays(ref.to_arrays())
    assert np.array_equal(back.score(train[:5]), ref.score(train[:5]))


def test_feature_reference_of_a_bundle_calibrated_on_raw_features_is_still_served_raw():
    """Bundles calibrated before unit length (feature_kind mahalanobis_ledoit_wolf) keep their meaning."""
    rng = np.random.default_rng(5)
    train = rng.normal(size=(4, 2, 2, 2)).astype(np.float32)
    a = rng.normal(size=(8, 8))
    w = np.linalg.cholesky(a @ a.T + 8 * np.eye(8)).astype(np.float32)
    means = rng.normal(size=(2, 8)).astype(np.float32)
    arrays = {
        "feature_kind": np.asarray("mahalanobis_ledoit_wolf"),
        "feature_whitener": w,
        "feature_means_white": means @ w,
        "feature_means": means,
        "feature_shape": np.asarray([2, 2, 2]),
        "feature_shrinkage": np.asarray(0.1),
        "feature_n": np.asarray(300),
    }
    raw = FeatureReference.from_arrays(arrays)
    assert not raw.normalize and raw.to_arrays()["feature_kind"] == "mahalanobis_ledoit_wolf"
    x = train.reshape(4, -1) @ w
    want = ((x[:, None] - (means @ w)[None]) ** 2).sum(2).min(1)
    assert np.allclose(raw.score(train), want, rtol=1e-4)
    assert not np.allclose(raw.score(3.0 * train), raw.score(train), rtol=1e-2)


def test_old_feature_reference_is_refused_with_a_recalibrate_message():
    from gamguard.runtime.bundle import BundleError

    old = {"feature_mean": np.zeros((2, 2, 2)), "feature_sd": np.ones((2, 2, 2)), "feature_n": np.asarray(3)}
    with pytest.raises(BundleError, match="re-calibrate"):
        FeatureReference.from_arrays(old)


# ---------------------------------------------------------------------------------------------- command
def _cli(*args, timeout=600):
    # the installed entry point's way in (``python -m gamguard.runtime.cli`` would load cli twice)
    return subprocess.run(
        [sys.executable, "-c", "import sys; from gamguard.runtime.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_calibrate_command_writes_references_hashes_and_is_seeded(copy_bundle):
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.calibration import calibrate_bundle
    from gamguard.runtime.commands.calibrate import load_phantoms

    b1 = copy_bundle("cal1")
    b2 = copy_bundle("cal2")
    out = _cli("calibrate", "--bundle", str(b1), "--phantoms", "40", "--seed", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert "reference part" in out.stderr and "held-out part" in out.stderr  # progress on stderr
    rep = json.loads(out.stdout)
    cal = rep["calibration"]
    assert cal["n"] == 160 and cal["alpha"] == 0.05 and cal["seed"] == 3
    assert cal["split"]["reference"] + cal["split"]["null"] + cal["split"]["conformal"] == 160
    assert cal["dataset"]["kind"] == "phantoms"
    assert 0.0 <= cal["measured_false_rejection_rate"] <= 1.0
    assert set(cal["measured_per_check"]) == {"garbage", "attention", "feature"}
    assert set(cal["thresholds"]["conformal_t"]) == set(all_check_sets())
    manifest = bundle_mod.load_manifest(b1)  # hashes match, calibration present
    assert manifest["files"]["reference.npz"] == bundle_mod.sha256_file(b1 / "reference.npz")
    assert rep["bundle_hash"] == bundle_mod.bundle_hash(manifest)
    # same seed, same data → identical references and scores (the API the command uses, in-process)
    m2 = bundle_mod.read_manifest(b2)
    spec = bundle_mod.InputSpec.from_manifest(m2["input"])
    images, labels = load_phantoms(40, 3, spec, m2["class_names"], m2["garbage_class"])
    calibrate_bundle(b2, images=images.__getitem__, labels=labels, dataset={"kind": "phantoms"}, seed=3, progress=None)
    with np.load(b1 / "reference.npz") as z1, np.load(b2 / "reference.npz") as z2:
        for k in ("ref_cam", "feature_whitener", "null_sims", "conformal_feature"):
            assert np.allclose(z1[k], z2[k], rtol=1e-5, atol=1e-6), f"{k} differs between runs with the same seed"
    # a new alpha from the stored scores: no images needed, the cut moves, hashes are rewritten
    t05 = cal["thresholds"]["conformal_t"]["garbage+attention+feature"]
    out = _cli("calibrate", "--bundle", str(b1), "--from-stored-scores", "--alpha", "0.1", "--json")
    assert out.returncode == 0, out.stderr
    cal10 = json.loads(out.stdout)["calibration"]
    assert cal10["alpha"] == 0.1 and cal10["thresholds"]["conformal_t"]["garbage+attention+feature"] >= t05
    bundle_mod.load_manifest(b1)


def test_calibrate_refuses_bad_input(copy_bundle, tmp_path):
    b = copy_bundle("calbad")
    out = _cli("calibrate", "--bundle", str(b), "--phantoms", "5")
    assert out.returncode == 2 and "needs at least" in out.stderr
    out = _cli("calibrate", "--bundle", str(b))
    assert out.returncode == 2 and "--data" in out.stderr
    wrong = tmp_path / "wrong"
    (wrong / "cat").mkdir(parents=True)
    out = _cli("calibrate", "--bundle", str(b), "--data", str(wrong))
    assert out.returncode == 2 and "cat" in out.stderr


def test_separate_reference_set_holds_out_every_calibration_image(copy_bundle):
    """With ``reference=``, references come from another set and all calibration images are split
    between the null and conformal parts (none is spent on references)."""
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.calibration import CalibrationError, calibrate_bundle
    from gamguard.runtime.commands.calibrate import load_phantoms

    b = copy_bundle("calref")
    m = bundle_mod.read_manifest(b)
    spec = bundle_mod.InputSpec.from_manifest(m["input"])
    cal_images, cal_labels = load_phantoms(20, 5, spec, m["class_names"], m["garbage_class"])
    ref_images, ref_labels = load_phantoms(15, 6, spec, m["class_names"], m["garbage_class"])
    manifest = calibrate_bundle(
        b,
        images=cal_images.__getitem__,
        labels=cal_labels,
        dataset={"kind": "phantoms"},
        reference=(ref_images.__getitem__, ref_labels, {"kind": "phantoms", "seed": 6}),
        progress=None,
    )
    split = manifest["calibration"]["split"]
    assert split["reference"] == len(ref_labels) == 60
    assert split["null"] + split["conformal"] == len(cal_labels) == 80
    assert split["reference_set"] == {"kind": "phantoms", "seed": 6}
    with np.load(b / "reference.npz") as z:
        assert z["null_feature"].size + z["conformal_feature"].size == 80
        # bundle.json says, for people, which feature score the arrays hold (fitted on the reference images)
        facts = manifest["calibration"]["feature_reference"]
        assert facts["kind"] == str(z["feature_kind"]) == "mahalanobis_polar_ledoit_wolf"
        assert facts["n"] == 60 and facts["dimension"] == z["feature_whitener"].shape[0]
        assert facts["dimension"] == int(np.prod(facts["early_shape"])) + 1  # direction and log-norm
    bundle_mod.load_manifest(b)  # calibrated, hashes consistent
    with pytest.raises(CalibrationError, match="reference labels"):
        calibrate_bundle(
            b,
            images=cal_images.__getitem__,
            labels=cal_labels,
            dataset={},
            reference=(ref_images.__getitem__, [m["garbage_class"]] * len(ref_labels), {}),
            progress=None,
        )


def test_calibration_refuses_a_garbage_class_that_eats_the_budget(copy_bundle):
    """If the garbage class alone rejects >= alpha of the in-distribution calibration images, the
    conformal cut would be 0 and attention/feature could never fire: refuse, and leave the bundle as it was."""
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.calibration import CalibrationError, calibrate_bundle
    from gamguard.runtime.commands.calibrate import load_phantoms
    from gamguard.runtime.demo import phantoms

    b = copy_bundle("calgarbage")
    before = bundle_mod.read_manifest(b)
    spec = bundle_mod.InputSpec.from_manifest(before["input"])
    images, labels = load_phantoms(40, 11, spec, before["class_names"], before["garbage_class"])
    noise, _ = phantoms.ood_set(["noise"], 40, seed=12)  # mislabelled "in-distribution" data: 20 % garbage
    all_images = list(images) + list(noise)
    all_labels = list(labels) + [0] * len(noise)
    with pytest.raises(CalibrationError, match="garbage class rejects"):
        calibrate_bundle(b, images=all_images.__getitem__, labels=all_labels, dataset={"kind": "bad"}, progress=None)
    assert bundle_mod.load_manifest(b)["files"] == before["files"]  # untouched and still valid
