"""`gamguard calibrate --site DIR`: new null tables and conformal cut from a site's unlabelled images, the
references kept; refusals with a clear minimum; the site recorded in the calibration facts with its hash."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-c", "import sys; from gamguard.runtime.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def site_images(tmp_path_factory):
    """120 fresh phantoms (30 per stage, a seed no calibration or training uses) as unlabelled files, nested
    in sub-folders the way a site export might be (the folder names are not read as labels)."""
    out = tmp_path_factory.mktemp("site")
    res = _cli("data", "synth", "--out", str(out), "--per-class", "30", "--seed", "4242", "--size", "128")
    assert res.returncode == 0, res.stderr
    return out


def test_site_calibration_refits_null_and_cut_keeps_references(copy_bundle, site_images):
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.guard import Guard

    b = copy_bundle("site")
    with np.load(b / "reference.npz") as z:
        before = {k: z[k] for k in z.files}
    hash_before = bundle_mod.bundle_hash(bundle_mod.load_manifest(b))
    out = _cli("calibrate", "--bundle", str(b), "--site", str(site_images), "--site-name", "clinic B", "--json")
    assert out.returncode == 0, out.stderr
    assert "site images" in out.stderr  # progress
    rep = json.loads(out.stdout)
    site = rep["calibration"]["site"]
    assert site["name"] == "clinic B" and site["n"] == 120  # 4 stages x 30 (manifest.json is not an image)
    # the default cut is cross-fitted: every site image fits the null tables and, out of fold, the cut
    assert site["cut"] == "cross-fit" and site["null"] == site["conformal"] == site["n"] and len(site["sha256"]) == 64
    assert "cross-fit" in rep["calibration"]["thresholds"]["cut_method"]
    assert rep["calibration"]["thresholds"]["conformal_n"] == site["n"]
    assert site["base"]["dataset"]["kind"] == "phantoms"  # the base calibration's facts are kept
    assert "site" in rep["calibration"]["measured_method"]
    assert rep["bundle_hash"] != hash_before
    manifest = bundle_mod.load_manifest(b)  # re-hashed and consistent
    assert manifest["calibration"]["site"]["sha256"] == site["sha256"]
    with np.load(b / "reference.npz") as z:
        after = {k: z[k] for k in z.files}
    for k in ("ref_cam", "feature_whitener", "feature_means_white"):  # references untouched
        assert np.array_equal(before[k], after[k]), k
    assert after["null_feature"].size + after["conformal_feature"].size == site["n"]
    assert "null_label" not in after  # unlabelled
    assert str(after["cut_method"]) == "cross-fit" and int(after["cut_folds"]) >= 2  # hashed with the bundle
    guard = Guard.from_bundle(b, threads=1)  # loads and serves
    assert guard.calibration.cut_method.name == "cross-fit"
    assert guard.calibration.null.n == guard.calibration.conformal_pvalues.feature.size  # both: every site image
    # a new alpha from the stored (site) scores keeps the site facts
    out = _cli("calibrate", "--bundle", str(b), "--from-stored-scores", "--alpha", "0.1", "--json")
    assert out.returncode == 0, out.stderr
    cal10 = json.loads(out.stdout)["calibration"]
    assert cal10["alpha"] == 0.1 and cal10["site"]["sha256"] == site["sha256"] and "site" in cal10["measured_method"]
    # the same images give the same hash and the same split (seeded)
    b2 = copy_bundle("site2")
    out2 = _cli("calibrate", "--bundle", str(b2), "--site", str(site_images), "--json")
    site2 = json.loads(out2.stdout)["calibration"]["site"]
    assert site2["sha256"] == site["sha256"] and site2["name"] == site_images.name
    with np.load(b2 / "reference.npz") as z:
        assert np.array_equal(z["conformal_feature"], after["conformal_feature"])


def test_site_calibration_refusals(copy_bundle, site_images, tmp_path):
    from gamguard.runtime import bundle as bundle_mod

    b = copy_bundle("siterefuse")
    files_before = bundle_mod.load_manifest(b)["files"]
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(site_images.rglob("*.png"))[:30]:
        (few / p.name.replace(".png", f"-{p.parent.name}.png")).write_bytes(p.read_bytes())
    out = _cli("calibrate", "--bundle", str(b), "--site", str(few))
    assert out.returncode == 2 and "30 images" in out.stderr and "at least 100" in out.stderr
    out = _cli("calibrate", "--bundle", str(b), "--site", str(site_images), "--alpha", "0.01")
    assert out.returncode == 2 and "at least 200" in out.stderr  # ceil(2 / alpha), every image behind the cut
    out = _cli("calibrate", "--bundle", str(b), "--site", str(site_images), "--alpha", "0.01", "--site-cut", "split")
    assert out.returncode == 2 and "at least 400" in out.stderr  # 2 * ceil(2 / alpha): half behind the cut
    out = _cli("calibrate", "--bundle", str(b), "--site-cut", "split", "--phantoms", "10")
    assert out.returncode == 2 and "--site-cut goes with --site" in out.stderr
    out = _cli("calibrate", "--bundle", str(b), "--site", str(tmp_path / "missing"))
    assert out.returncode == 2 and "not a directory" in out.stderr
    out = _cli("calibrate", "--bundle", str(b), "--site-name", "x", "--phantoms", "10")
    assert out.returncode == 2 and "--site-name goes with --site" in out.stderr
    out = _cli("calibrate", "--bundle", str(b), "--site", str(site_images), "--phantoms", "10")
    assert out.returncode == 2  # one data source at a time
    assert bundle_mod.load_manifest(b)["files"] == files_before  # nothing written on refusal


@pytest.mark.parametrize("cut", ["cross-fit", "split"])
def test_site_calibration_restores_the_bound_on_a_shifted_site(demo_bundle, cut):
    """In-process, on scores: a site whose feature scores are shifted up is falsely rejected far above
    alpha by the base calibration; after site calibration on half of it the other half is near alpha."""
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.calibration import site_arrays
    from gamguard.runtime.checks import CalibrationData, ScoreSet, decide, read_reference_arrays

    manifest = bundle_mod.load_manifest(demo_bundle)
    base = read_reference_arrays(demo_bundle)
    conf = ScoreSet.from_arrays(base, "conformal_")
    null = ScoreSet.from_arrays(base, "null_")
    shifted = ScoreSet.concat([conf, null])
    rng = np.random.default_rng(0)
    f = shifted.feature
    shifted.feature = f + (f.max() - np.median(f))  # the site's median is the base's maximum
    perm = rng.permutation(shifted.feature.size)
    site, measured = perm[: perm.size // 2], perm[perm.size // 2 :]

    def frr(arrays):
        data = CalibrationData(arrays, manifest)
        key = "garbage+attention+feature"
        d = decide(
            data.null.pvalues(shifted.take(measured)), checks=key, policy="calibrated", alpha=0.05, cut=data.cuts[key]
        )
        return d.reject.mean()

    arrays, n_null, n_conf = site_arrays(base, shifted.take(site), seed=0, cut=cut)
    assert (n_null, n_conf) == (
        (site.size, site.size) if cut == "cross-fit" else (site.size // 2, site.size - site.size // 2)
    )
    before, after = frr(base), frr(arrays)
    assert before > 0.3, before
    assert abs(after - 0.05) < 0.04, after


def _held(bundle_dir):
    from gamguard.runtime.checks import ScoreSet, read_reference_arrays

    base = read_reference_arrays(bundle_dir)
    return base, ScoreSet.concat([ScoreSet.from_arrays(base, "null_"), ScoreSet.from_arrays(base, "conformal_")])


def test_out_of_fold_pvalues_never_judge_an_image_by_itself(demo_bundle):
    """An image far outside the others gets the table's extreme-tail p-value out of fold (its own fold
    is left out of the tables), far below what it gets from tables that include it."""
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.checks import NullModel, out_of_fold_pvalues

    k = len(bundle_mod.load_manifest(demo_bundle)["class_names"])
    _, held = _held(demo_bundle)
    held = held.take(~held.garbage_pred)
    odd = int(np.argmax(held.feature))
    held.feature = held.feature.copy()
    held.feature[odd] = held.feature.max() * 10  # an outlier of the feature check
    oof = out_of_fold_pvalues(held, k, folds=10, seed=3)
    inside = NullModel(held, k).pvalues(held)
    assert oof.feature.shape == inside.feature.shape == held.feature.shape
    assert oof.feature[odd] < 0.1 * inside.feature[odd], (oof.feature[odd], inside.feature[odd])
    others = np.arange(held.feature.size) != odd
    assert np.median(np.abs(oof.feature[others] - inside.feature[others])) < 0.05  # the rest barely moves
    again = out_of_fold_pvalues(held, k, folds=10, seed=3)
    assert np.array_equal(again.feature, oof.feature) and np.array_equal(again.measures, oof.measures)  # seeded


def test_cross_fit_cut_keeps_the_rate_with_less_spread(demo_bundle):
    """Exchangeable halvings of the demo bundle's held-out images (one half calibrates a 'site', the other
    measures): both cuts keep the false-rejection rate near alpha on average; the cross-fitted one, whose
    tables and cut both use every site image, varies less from halving to halving."""
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.calibration import site_arrays
    from gamguard.runtime.checks import CalibrationData, decide

    manifest = bundle_mod.load_manifest(demo_bundle)
    base, held = _held(demo_bundle)
    n, key, alpha = held.feature.size, "garbage+attention+feature", 0.1
    manifest = {**manifest, "calibration": {**manifest["calibration"], "alpha": alpha}}
    rates = {"cross-fit": [], "split": []}
    for s in range(30):
        perm = np.random.default_rng(500 + s).permutation(n)
        site, measured = held.take(perm[: n // 2]), held.take(perm[n // 2 :])
        for cut in rates:
            data = CalibrationData(site_arrays(base, site, s, cut)[0], manifest)
            pv = data.null.pvalues(measured)
            rates[cut].append(
                decide(pv, checks=key, policy="calibrated", alpha=alpha, cut=data.cuts[key]).reject.mean()
            )
    cross, split = np.asarray(rates["cross-fit"]), np.asarray(rates["split"])
    assert abs(cross.mean() - alpha) < 0.03 and abs(split.mean() - alpha) < 0.03, (cross.mean(), split.mean())
    assert cross.std() < split.std(), (cross.std(), split.std())


def test_unknown_cut_method_is_refused_at_load(demo_bundle):
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.bundle import BundleError
    from gamguard.runtime.checks import CalibrationData

    base, _ = _held(demo_bundle)
    with pytest.raises(BundleError, match="unknown conformal cut method 'jackknife'"):
        CalibrationData({**base, "cut_method": np.array("jackknife")}, bundle_mod.load_manifest(demo_bundle))
