"""The guard on the calibrated demo bundle: verdict contract, fail-closed behaviour, bundle refusal,
`gamguard verify`, and the evidence (in-distribution false rejection, held-out off-distribution kinds)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from testlib import id_phantoms, load_guard, ood_images

from gamguard.runtime.bundle import BundleError, read_manifest, write_manifest
from gamguard.runtime.demo import phantoms
from gamguard.runtime.guard import REASONS, Guard
from gamguard.runtime.similarity import MEASURES

COMBINED = "garbage+attention+feature"


@pytest.fixture(scope="module")
def guard(demo_bundle):
    return load_guard(str(demo_bundle))


def _cli(*args, timeout=300):
    # the installed entry point's way in (``python -m gamguard.runtime.cli`` would load cli twice)
    return subprocess.run(
        [sys.executable, "-c", "import sys; from gamguard.runtime.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------- contract
def test_verdicts_follow_the_contract(guard):
    ids, _ = id_phantoms()
    ood, _ = ood_images(40)
    images = list(ids[:6]) + list(ood[::40])
    verdicts = guard.verify_images(images)
    assert len(verdicts) == len(images)
    real = [c for i, c in enumerate(guard.class_names) if i != guard.garbage_index]
    seen_accept = seen_reject = False
    for v in verdicts:
        json.dumps(v.to_dict())  # JSON-serialisable
        assert set(v.reasons) <= set(REASONS)
        for m in MEASURES:
            assert f"attention.{m}" in v.scores and f"attention.{m}.p" in v.scores
            assert f"attention.{m}" in v.thresholds
        for k in (
            "garbage_prob",
            "garbage_margin",
            "garbage.p",
            "attention.p",
            "feature",
            "feature.p",
            "combined_p",
            "conformal_p",
        ):
            assert k in v.scores and np.isfinite(v.scores[k])
        assert v.cam is not None and v.cam.shape == (guard.spec.height, guard.spec.width)
        assert v.reference_cam is not None and v.predicted_index is not None
        if v.accepted:
            seen_accept = True
            assert v.label in real and v.label_index == guard.class_names.index(v.label)
            assert not v.reasons and not v.failed_measures
            assert abs(sum(v.probabilities.values()) - 1) < 1e-6 and set(v.probabilities) == set(real)
            assert v.scores["conformal_p"] > guard.alpha
        else:
            seen_reject = True
            assert v.label is None and v.label_index is None and v.probabilities is None and v.reasons
            assert v.scores["conformal_p"] <= guard.alpha or "GARBAGE_CLASS" in v.reasons
            if "ATTENTION_MISMATCH" in v.reasons:
                assert v.failed_measures
                for m in v.failed_measures:
                    assert v.scores[f"attention.{m}.p"] < v.thresholds[f"attention.{m}.p"]
            if "FEATURE_MISMATCH" in v.reasons:
                assert v.scores["feature.p"] < v.thresholds["feature.p"]
            if "GARBAGE_CLASS" in v.reasons:  # argmax garbage, or a garbage margin unusual for in-distribution
                assert (v.predicted_index == guard.garbage_index) or v.scores["garbage.p"] < v.thresholds["garbage.p"]
    assert seen_accept and seen_reject
    info = guard.info()
    assert info["alpha"] == guard.alpha and info["policy"] == "calibrated"
    assert info["enforced_checks"] == ["garbage", "attention", "feature"]
    assert info["calibration"]["measured_false_rejection_rate"] is not None and info["providers"]


def test_images_and_tensor_paths_agree(guard):
    from gamguard.runtime.preprocess import preprocess_batch

    ids, _ = id_phantoms()
    a = guard.verify_images(list(ids[:4]))
    b = guard.verify_tensor(preprocess_batch(list(ids[:4]), guard.spec))
    assert [v.accepted for v in a] == [v.accepted for v in b]
    assert all(np.isclose(x.scores["attention.ssim"], y.scores["attention.ssim"]) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- fail closed
class _Exploding:
    name, providers = "exploding", ["none"]

    def run(self, batch):
        raise RuntimeError("device lost")

    def describe(self):
        return {}


def test_engine_exception_rejects_every_item_with_guard_error(demo_bundle):
    g = Guard.from_bundle(demo_bundle, threads=1)
    g.engine = _Exploding()
    ids, _ = id_phantoms()
    verdicts = g.verify_images(list(ids[:3]))
    assert [v.reasons for v in verdicts] == [["GUARD_ERROR"]] * 3
    assert all(v.label is None and v.probabilities is None and not v.accepted for v in verdicts)
    assert "device lost" in verdicts[0].detail


class _Corrupting:
    """Wraps the real engine and overwrites part of its output with NaN (fault injection)."""

    name, providers = "corrupting", ["cpu"]

    def __init__(self, engine, corrupt):
        self.engine, self.corrupt = engine, corrupt

    def run(self, batch):
        out = self.engine.run(batch)
        self.corrupt(out)
        return out

    def describe(self):
        return {}


def test_non_finite_engine_output_is_a_guard_error(demo_bundle):
    g = Guard.from_bundle(demo_bundle, threads=1)
    g.engine = _Corrupting(g.engine, lambda out: out.logits.fill(np.nan))
    ids, _ = id_phantoms()
    v = g.verify_images(list(ids[:2]))
    assert [x.reasons for x in v] == [["GUARD_ERROR"]] * 2 and all(x.label is None for x in v)


def test_non_finite_output_rejects_only_its_own_input(demo_bundle):
    """Micro-batches mix clients: one input whose outputs are NaN must not take its batch-mates down.
    (The CAM is corrupted after the engine ran, so the host must see it: host arithmetic. The in-graph
    finiteness flag is tested in test_guard_graph.py.)"""
    g = Guard.from_bundle(demo_bundle, threads=1, arithmetic="host")
    ids, _ = id_phantoms()
    clean = g.verify_images(list(ids[:3]))
    g.engine = _Corrupting(g.engine, lambda out: out.cam[1].fill(np.nan))
    v = g.verify_images(list(ids[:3]))
    assert v[1].reasons == ["GUARD_ERROR"] and v[1].label is None and "NaN" in v[1].detail
    for i in (0, 2):  # batch-mates get exactly the verdict they get alone
        assert v[i].accepted == clean[i].accepted and v[i].label == clean[i].label
        assert v[i].scores == pytest.approx(clean[i].scores)


def test_invalid_inputs_are_rejected_per_item(guard):
    ids, _ = id_phantoms()
    nan_img = ids[0].copy()
    nan_img[10, 10] = np.nan
    v = guard.verify_images([nan_img, ids[1], np.zeros((3, 3), np.float32), np.zeros((64, 64, 3), np.float32)])
    assert v[0].reasons == ["INVALID_INPUT"] and v[0].label is None and "NaN" in v[0].detail
    assert "INVALID_INPUT" not in v[1].reasons
    assert v[2].reasons == ["INVALID_INPUT"] and v[3].reasons == ["INVALID_INPUT"]
    from gamguard.runtime.preprocess import preprocess_batch

    x = preprocess_batch(list(ids[:3]), guard.spec)
    x[1, 0, 5, 5] = np.inf
    v = guard.verify_tensor(x)
    assert v[1].reasons == ["INVALID_INPUT"] and v[0].reasons != ["INVALID_INPUT"] and v[2].reasons != ["INVALID_INPUT"]
    v = guard.verify_tensor(np.zeros((2, 3, 7, 7), np.float32))
    assert [x.reasons for x in v] == [["INVALID_INPUT"]] * 2
    assert guard.verify_tensor(np.zeros((0,) + x.shape[1:], np.float32)) == []


# ---------------------------------------------------------------------------------------------- bundle refusal
def test_tampered_or_uncalibrated_bundle_is_refused_everywhere(copy_bundle, tmp_path):
    tampered = copy_bundle("tampered")
    ref = tampered / "reference.npz"
    data = bytearray(ref.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ref.write_bytes(bytes(data))
    uncalibrated = copy_bundle("uncalibrated")
    m = read_manifest(uncalibrated)
    m["calibration"] = None
    (uncalibrated / "reference.npz").unlink()
    write_manifest(uncalibrated, m)
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), (id_phantoms()[0][0] * 255).astype(np.uint8))

    with pytest.raises(BundleError, match="SHA-256"):
        Guard.from_bundle(tampered)
    with pytest.raises(BundleError, match="no calibration"):
        Guard.from_bundle(uncalibrated)
    for bundle, msg in ((tampered, "does not match its SHA-256"), (uncalibrated, "has no calibration")):
        for cmd in (["verify", str(img)], ["suitability", "--data", str(tmp_path)]):
            out = _cli(cmd[0], "--bundle", str(bundle), *cmd[1:])
            assert out.returncode == 2, (cmd, out.stdout, out.stderr)
            assert msg in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------- verify CLI
def test_verify_command_json_overlays_and_bad_files(demo_bundle, tmp_path):
    ids, _ = id_phantoms()
    ood, kinds = ood_images(40)
    cv2.imwrite(str(tmp_path / "hand.png"), (ids[0] * 255).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "hand16.png"), (ids[1] * 65535).astype(np.uint16))
    cv2.imwrite(str(tmp_path / "chest.jpg"), (ood[list(kinds).index("chest")] * 255).astype(np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from gamguard.runtime.demo.synth import write_dicom

    write_dicom(tmp_path / "hand_m1.dcm", ids[2], photometric="MONOCHROME1")  # inverted storage, decoded back
    (tmp_path / "more").mkdir()
    cv2.imwrite(str(tmp_path / "more" / "hand.jpg"), (ids[3] * 255).astype(np.uint8))  # the same stem again
    ov = tmp_path / "ov"
    out = _cli("verify", "--bundle", str(demo_bundle), "--json", "--overlays", str(ov), str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    by = {r["file"].rsplit("/", 1)[-1]: r for r in lines}
    assert set(by) == {"hand.png", "hand16.png", "chest.jpg", "broken.png", "hand_m1.dcm", "hand.jpg"}
    for r in lines:
        assert {"file", "accepted", "label", "reasons", "scores", "thresholds", "failed_measures"} <= set(r)
        assert (r["label"] is None) == (not r["accepted"])
    assert by["broken.png"]["reasons"] == ["INVALID_INPUT"] and by["broken.png"]["label"] is None
    assert not by["chest.jpg"]["accepted"]
    assert sorted(p.name for p in ov.iterdir()) == [  # one overlay per input: none overwrites another
        "chest.overlay.png",
        "hand.overlay.png",
        "hand16.overlay.png",
        "hand_m1.overlay.png",
        "more-hand-jpg.overlay.png",
    ]
    # the 12-bit MONOCHROME1 DICOM is judged like the image itself (decoder inversion and bit depth handled)
    direct = load_guard(str(demo_bundle)).verify_images([ids[2]])[0]
    dcm = by["hand_m1.dcm"]
    assert dcm["accepted"] == direct.accepted
    assert abs(dcm["scores"]["feature"] - direct.scores["feature"]) < 0.1 * direct.scores["feature"]
    assert abs(dcm["scores"]["attention.pearson"] - direct.scores["attention.pearson"]) < 0.05
    assert cv2.imread(str(ov / "hand.overlay.png")).shape[1] > 2 * 200
    # readable table, checks override, and --fail-on-reject
    out = _cli(
        "verify",
        "--bundle",
        str(demo_bundle),
        "--checks",
        "garbage",
        "--fail-on-reject",
        str(tmp_path / "chest.jpg"),
        str(tmp_path / "broken.png"),
    )
    assert out.returncode == 1 and "REJECT" in out.stdout and "INVALID_INPUT" in out.stdout
    out = _cli("verify", "--bundle", str(demo_bundle), "--checks", "colour", str(tmp_path / "hand.png"))
    assert out.returncode == 2 and "unknown check" in out.stderr
    # a path that does not exist is a usage error (exit 2), after the inputs that do exist are verified
    out = _cli("verify", "--bundle", str(demo_bundle), str(tmp_path / "hand.png"), str(tmp_path / "typo.png"))
    assert out.returncode == 2 and "no such file or directory" in out.stderr
    assert f"{tmp_path / 'hand.png'} " in out.stdout  # the existing input still got its verdict


def test_enforced_checks_and_policy_overrides(demo_bundle, guard):
    ood, kinds = ood_images(40)
    only_garbage = load_guard(str(demo_bundle), enforced_checks="garbage")
    for v in only_garbage.verify_images(list(ood[::20])):
        assert set(v.reasons) <= {"GARBAGE_CLASS"}
        # rejected: argmax garbage, or a garbage margin below the garbage-only cut
        fired = v.predicted_index == guard.garbage_index or v.scores["garbage.p"] < v.thresholds["garbage.p"]
        assert v.accepted == (not fired)
    strict = load_guard(str(demo_bundle), policy="strict")
    assert strict.level == strict.alpha
    ids, _ = id_phantoms()
    sample = list(ids[:60])
    rej_default = guard.rejections_by_checks(sample, [COMBINED])[COMBINED]
    rej_strict = strict.rejections_by_checks(sample, [COMBINED])[COMBINED]
    if guard.level <= guard.alpha:  # strict compares with alpha >= t*: it rejects a superset
        assert np.all(rej_strict >= rej_default)


# ---------------------------------------------------------------------------------------------- evidence
def test_in_distribution_false_rejection_within_alpha_plus_3_points(guard, copy_bundle):
    ids, _ = id_phantoms()  # 600 fresh phantoms, seed unseen by training and calibration
    assert len(ids) >= 400
    rate05 = guard.rejections_by_checks(list(ids), [COMBINED])[COMBINED].mean()
    assert guard.alpha == 0.05
    assert rate05 <= 0.05 + 0.03, f"in-distribution false rejection {rate05:.3f} at alpha 0.05"
    b10 = copy_bundle("alpha10")
    out = _cli("calibrate", "--bundle", str(b10), "--from-stored-scores", "--alpha", "0.10")
    assert out.returncode == 0, out.stderr
    g10 = Guard.from_bundle(b10, threads=2)
    assert g10.alpha == 0.10
    rate10 = g10.rejections_by_checks(list(ids), [COMBINED])[COMBINED].mean()
    assert rate10 <= 0.10 + 0.03, f"in-distribution false rejection {rate10:.3f} at alpha 0.10"
    assert rate10 >= rate05
    print(f"\nID false rejection (n={len(ids)}): alpha 0.05 → {rate05:.3f}, alpha 0.10 → {rate10:.3f}")


def test_held_out_off_distribution_kinds_are_rejected(guard):
    ood, kinds = ood_images(40)
    rej = guard.rejections_by_checks(list(ood), ["garbage", "attention", "feature", COMBINED])
    rows = []
    for kind in phantoms.HELD_OUT_KINDS:
        sel = kinds == kind
        rates = {k: rej[k][sel].mean() for k in rej}
        rows.append((kind, rates))
    print("\nkind: garbage / attention / feature / combined")
    for kind, r in rows:
        print(f"  {kind:<14} " + " / ".join(f"{r[k]:.2f}" for k in ("garbage", "attention", "feature", COMBINED)))
    for kind, r in rows:
        assert r[COMBINED] >= 0.95, f"{kind}: only {r[COMBINED]:.1%} rejected by the default policy"


def test_real_radiographs_are_refused_by_the_phantom_model(guard, datasets_root):
    """Real hand and pelvis radiographs (PNG, JPEG 2000 DICOM) are not what the phantom-trained demo
    model was made for: the guard must refuse them all (skips without ../shared/datasets)."""
    from gamguard.runtime.datasets import iter_image_files
    from gamguard.runtime.decode import decode_file

    files = iter_image_files([datasets_root / "ood" / "hand_xray", datasets_root / "ood" / "pelvis_xray"])
    assert len(files) >= 10
    verdicts = guard.verify_images([decode_file(f).pixels for f in files])
    refused = [not v.accepted for v in verdicts]
    assert all(refused), [str(f) for f, v in zip(files, verdicts) if v.accepted]
    assert all(
        v.label is None and set(v.reasons) <= {"GARBAGE_CLASS", "ATTENTION_MISMATCH", "FEATURE_MISMATCH"}
        for v in verdicts
    )
