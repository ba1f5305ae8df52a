"""The embedded demo data: hand phantoms, off-distribution generators, writing to disk, `data synth`."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from gamguard.runtime import cli
from gamguard.runtime.commands import data as data_cmd
from gamguard.runtime.demo import phantoms, synth
from gamguard.runtime.demo.phantoms import CLASS_NAMES, OOD_KINDS


def _phantoms_by_stage(n: int, seed: int, size: int = 256, acquisition: bool = True):
    rng = np.random.default_rng(seed)
    return {
        s: [phantoms.hand_phantom(s, rng, size, acquisition=acquisition) for _ in range(n)]
        for s in range(len(CLASS_NAMES))
    }


@pytest.fixture(scope="module")
def by_stage():
    return _phantoms_by_stage(8, seed=123)


def test_public_constants():
    assert len(CLASS_NAMES) >= 4
    assert set(phantoms.GARBAGE_TRAIN_KINDS).isdisjoint(phantoms.HELD_OUT_KINDS)
    assert OOD_KINDS == phantoms.GARBAGE_TRAIN_KINDS + phantoms.HELD_OUT_KINDS
    # the CLI help lists the kinds without importing the generators; keep the two in sync
    assert data_cmd._GARBAGE == phantoms.GARBAGE_TRAIN_KINDS
    assert data_cmd._HELD_OUT == phantoms.HELD_OUT_KINDS


def test_sets_are_deterministic_and_seed_dependent():
    a, la = phantoms.phantom_set(2, seed=5, size=64)
    b, lb = phantoms.phantom_set(2, seed=5, size=64)
    c, _ = phantoms.phantom_set(2, seed=6, size=64)
    assert a.shape == (8, 64, 64) and a.dtype == np.float32 and la.dtype == np.int64
    assert la.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert np.abs(a - c).mean() > 0.01
    # images within one set are all different
    flat = a.reshape(len(a), -1)
    assert len({row.tobytes() for row in flat}) == len(a)

    o1, k1 = phantoms.ood_set(["chest", "noise"], 2, seed=9, size=64)
    o2, k2 = phantoms.ood_set(["chest", "noise"], 2, seed=9, size=64)
    o3, _ = phantoms.ood_set(["chest", "noise"], 2, seed=10, size=64)
    assert k1 == k2 == ["chest", "chest", "noise", "noise"]
    assert np.array_equal(o1, o2) and np.abs(o1 - o3).mean() > 0.01
    # a kind's images do not depend on which other kinds are asked for
    o4, _ = phantoms.ood_set("noise", 2, seed=9, size=64)
    assert np.array_equal(o4, o1[2:])
    # nor on which kinds the generator has: each kind's seed salt is fixed (a kind added later takes the
    # next one), so the sets an evaluation used keep their images when a garbage kind is added
    first_twelve = ("noise", "blobs", "text", "geometric", "knee", "cropped_hand")
    first_twelve += ("chest", "rotated_hand", "inverted_hand", "noisy_hand", "texture", "photo")
    assert [phantoms._SALT[k] for k in first_twelve] == list(range(1, 13))
    assert sorted(phantoms._SALT.values()) == list(range(1, len(OOD_KINDS) + 1))


def test_masks_present_and_aligned_with_image(by_stage):
    for stage, items in by_stage.items():
        for ph in items:
            assert ph.stage == stage and ph.image.dtype == np.float32 and ph.image.shape == (256, 256)
            assert 0.0 <= ph.image.min() and ph.image.max() <= 1.0
            for name in phantoms.MASK_NAMES:
                m = ph.masks[name]
                assert m.dtype == bool and m.shape == ph.image.shape and m.any(), (stage, name)
            bone, hand = ph.masks["bone"], ph.masks["hand"]
            assert (bone & ~hand).sum() < 0.02 * bone.sum()  # bones lie inside the soft tissue
            soft = hand & ~cv2.dilate(bone.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            # bone brighter than soft tissue, soft tissue brighter than air, at the mask locations
            background = ~cv2.dilate(hand.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
            background &= ph.image < 0.75  # exclude bright collimation borders and the side marker
            assert ph.image[bone].mean() > ph.image[soft].mean() + 0.05
            assert ph.image[soft].mean() > ph.image[background].mean() + 0.03


def test_stage_cues_follow_bone_age_rules(by_stage):
    plate_area, epi_ratio = [], []
    for stage, items in by_stage.items():
        lo, hi = phantoms._STAGES[stage]["carpals"]
        for ph in items:
            n_comp, _ = cv2.connectedComponents(ph.masks["carpal"].astype(np.uint8), connectivity=8)
            assert n_comp - 1 == ph.params["n_carpals"], (stage, ph.params)
            assert lo <= ph.params["n_carpals"] <= hi
        plate_area.append(np.mean([ph.masks["growth_plate"].sum() for ph in items]))
        epi_ratio.append(np.mean([ph.masks["epiphysis"].sum() / ph.masks["bone"].sum() for ph in items]))
    # growth plates narrow with maturity and close in adults
    assert all(a > b for a, b in zip(plate_area, plate_area[1:])), plate_area
    # epiphyses grow from small nuclei to metaphysis-wide caps before fusing
    assert epi_ratio[0] < epi_ratio[1] < epi_ratio[2], epi_ratio
    # carpal count increases strictly between stages (mask components)
    counts = [np.mean([ph.params["n_carpals"] for ph in by_stage[s]]) for s in range(4)]
    assert all(a < b for a, b in zip(counts, counts[1:]))


def test_acquisition_is_applied_and_masks_follow_it():
    rng = np.random.default_rng(0)
    plain = phantoms.hand_phantom(2, rng, 128, acquisition=False)
    assert plain.params["rotation_deg"] == 0.0 and "gamma" not in plain.params
    rotations, centroids = [], []
    for _ in range(12):
        ph = phantoms.hand_phantom(2, rng, 128)
        for key in ("rotation_deg", "scale", "gamma", "gain", "blur_px", "noise_counts", "marker"):
            assert key in ph.params
        assert -15 <= ph.params["rotation_deg"] <= 15
        rotations.append(ph.params["rotation_deg"])
        # the principal axis of the forearm+hand mask turns with the drawn rotation
        ys, xs = np.nonzero(ph.masks["bone"])
        centroids.append((xs.mean(), ys.mean()))
        m = cv2.moments(ph.masks["hand"].astype(np.uint8), binaryImage=True)
        axis = 0.5 * np.degrees(np.arctan2(2 * m["mu11"], m["mu20"] - m["mu02"]))  # from the x axis
        tilt = axis - 90 if axis > 0 else axis + 90  # image y down: positive = clockwise
        assert abs(tilt - ph.params["rotation_deg"]) < 8, (tilt, ph.params["rotation_deg"])
    assert np.std(rotations) > 3 and np.std(np.array(centroids)[:, 0]) > 1


def test_hand_phantom_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        phantoms.hand_phantom(len(CLASS_NAMES), rng)
    with pytest.raises(ValueError):
        phantoms.ood_image("not-a-kind", rng)
    with pytest.raises(ValueError):
        phantoms.ood_set(["chest", "bogus"], 1, seed=0)


@pytest.mark.parametrize("size", [64, 97, 256])
def test_every_ood_kind_generates_valid_images(size):
    rng = np.random.default_rng(size)
    hand = phantoms.hand_phantom(1, np.random.default_rng(1), size).image
    for kind in OOD_KINDS:
        img = phantoms.ood_image(kind, rng, size)
        assert img.shape == (size, size) and img.dtype == np.float32, kind
        assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1, kind
        if kind == "flat":  # a blank frame on purpose: most pixels near one level
            assert np.mean(np.abs(img - np.median(img)) < 0.1) > 0.5, kind
        else:
            assert img.std() > 0.02, kind  # not a blank frame
        assert np.abs(img - hand).mean() > 0.02, kind


def test_resolve_kinds_groups():
    assert phantoms.resolve_kinds("all-held-out") == list(phantoms.HELD_OUT_KINDS)
    assert phantoms.resolve_kinds(["all-garbage", "chest", "noise"]) == list(phantoms.GARBAGE_TRAIN_KINDS) + ["chest"]
    assert phantoms.resolve_kinds("all") == list(OOD_KINDS)


def _display(path) -> np.ndarray:
    """What a conforming viewer shows: modality LUT → VOI window → MONOCHROME1 inversion, in [0, 1]."""
    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    arr /= (1 << ds.BitsStored) - 1
    return 1.0 - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


def test_dicom_monochrome1_and_2_display_the_same_image(tmp_path):
    image = phantoms.hand_phantom(2, np.random.default_rng(4), 128).image
    p2 = synth.write_dicom(tmp_path / "m2.dcm", image, photometric="MONOCHROME2")
    p1 = synth.write_dicom(tmp_path / "m1.dcm", image, photometric="MONOCHROME1")
    d1, d2 = _display(p1), _display(p2)
    assert np.abs(d2 - image).max() < 2e-3
    assert np.abs(d1 - d2).max() < 2e-3
    raw1, raw2 = pydicom.dcmread(p1).pixel_array, pydicom.dcmread(p2).pixel_array
    assert np.corrcoef(raw1.ravel(), raw2.ravel())[0, 1] < -0.99  # stored values really are inverted

    ds = pydicom.dcmread(p2)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "DX" and ds.BodyPartExamined == "HAND"
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (ds.Rows, ds.Columns) == (128, 128) and ds.pixel_array.max() <= 4095
    for tag in (
        "RescaleSlope",
        "RescaleIntercept",
        "WindowCenter",
        "WindowWidth",
        "PixelSpacing",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ):
        assert tag in ds, tag
    assert str(ds.PatientName) == "" and ds.PatientID == ""
    assert pydicom.dcmread(p1).SOPInstanceUID != ds.SOPInstanceUID


def test_dicom_with_patient_fields(tmp_path):
    image = phantoms.ood_image("chest", np.random.default_rng(0), 64)
    path = synth.write_dicom(
        tmp_path / "phi.dcm",
        image,
        body_part="CHEST",
        patient=dict(PatientName="Doe^Jane", PatientID="ID-42", PatientBirthDate="19800101"),
    )
    ds = pydicom.dcmread(path)
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "ID-42" and ds.PatientBirthDate == "19800101"
    assert ds.BodyPartExamined == "CHEST"


def test_cli_data_synth_writes_layout_and_manifest(tmp_path, capsys):
    out = tmp_path / "hands"
    rc = cli.main(
        ["data", "synth", "--out", str(out), "--per-class", "3", "--seed", "7", "--size", "64", "--masks", "--json"]
    )
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "data synth:" in captured.err  # progress goes to stderr
    assert summary["total"] == 12 and summary["counts"] == {c: 3 for c in CLASS_NAMES}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["size"] == 64 and manifest["classes"] == list(CLASS_NAMES)
    assert len(manifest["files"]) == 12
    expected, labels = phantoms.phantom_set(3, seed=7, size=64)
    for i, entry in enumerate(manifest["files"]):
        assert entry["label"] == CLASS_NAMES[labels[i]] and entry["stage"] == labels[i]
        assert entry["file"] == f"{entry['label']}/{i % 3:04d}.png"
        img = cv2.imread(str(out / entry["file"]), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint16 and img.shape == (64, 64)
        assert np.abs(img / 65535.0 - expected[i]).max() < 1e-4  # same pixels as phantom_set
        assert entry["params"]["n_carpals"] >= 1
        with np.load(out / entry["masks"]) as m:
            assert set(phantoms.MASK_NAMES) <= set(m.files) and m["bone"].any()
    # refuses to overwrite silently; --overwrite replaces the earlier dataset (no stale files left)
    assert cli.main(["data", "synth", "--out", str(out), "--per-class", "1", "--seed", "7"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["data", "synth", "--out", str(out), "--per-class", "1", "--seed", "8", "--overwrite"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        ["manifest.json"] + [f"{c}/0000.png" for c in CLASS_NAMES]
    )
    # a folder with anything else in it is refused and left as it was: no manifest of ours, or a foreign
    # file beside one (which would otherwise end up in the "new" dataset)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["data", "synth", "--out", str(other), "--per-class", "1", "--seed", "7", "--overwrite"]) == 2
    assert "more than a dataset written by data synth" in capsys.readouterr().err and (other / "notes.txt").exists()
    (out / CLASS_NAMES[0] / "9999.png").write_bytes(b"a foreign image")
    before = sorted(p.name for p in out.rglob("*"))
    assert cli.main(["data", "synth", "--out", str(out), "--per-class", "1", "--seed", "9", "--overwrite"]) == 2
    assert "more than a dataset" in capsys.readouterr().err and sorted(p.name for p in out.rglob("*")) == before


def test_cli_data_synth_kinds_and_dicom(tmp_path, capsys):
    out = tmp_path / "ood"
    rc = cli.main(
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--per-class",
            "2",
            "--seed",
            "1",
            "--size",
            "48",
            "--kind",
            "all-held-out",
            "--kind",
            "text",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    kinds = list(phantoms.HELD_OUT_KINDS) + ["text"]
    assert summary["classes"] == kinds
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kinds"]["text"] == "garbage_train" and manifest["kinds"]["chest"] == "held_out"
    for k in kinds:
        assert sorted(p.name for p in (out / k).iterdir()) == ["0000.png", "0001.png"]

    dcm = tmp_path / "dcm"
    rc = cli.main(
        [
            "data",
            "synth",
            "--out",
            str(dcm),
            "--per-class",
            "1",
            "--seed",
            "1",
            "--size",
            "48",
            "--format",
            "dicom",
            "--photometric",
            "MONOCHROME1",
        ]
    )
    assert rc == 0
    files = sorted(dcm.glob("*/*.dcm"))
    assert len(files) == len(CLASS_NAMES)
    expected, _ = phantoms.phantom_set(1, seed=1, size=48)
    assert np.abs(_display(dcm / "infant" / "0000.dcm") - expected[0]).max() < 2e-3

    # PNG cannot carry MONOCHROME1: a clear error, not a silently inverted file
    rc = cli.main(
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "bad"),
            "--per-class",
            "1",
            "--seed",
            "1",
            "--photometric",
            "MONOCHROME1",
        ]
    )
    assert rc == 2 and "MONOCHROME1" in capsys.readouterr().err


def test_data_synth_help_lists_kinds_by_split(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "synth", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "garbage" in text and "held-out" in text.lower()
    for kind in OOD_KINDS:
        assert kind in text
