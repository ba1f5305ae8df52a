"""Regression tests of the hardening review (issue 10) that need no server: decoding limits, strict
JPEG, EXIF orientation, DICOM rescale values, bundle integrity, rejected-verdict redaction and the
server's log rate limit. The server-side findings are in ``test_hardening_server.py``."""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from testlib import ood_images, phantom

from gamguard.runtime import bundle as bundle_mod
from gamguard.runtime.decode import DecodeError, decode_bytes, decode_cost_bytes, header_decode_cost

# ------------------------------------------------------------------------------------ helpers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_bomb(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A tiny, complete PNG whose header declares a large image (the pixel data is never reached)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def dicom_bytes_with(tmp_path, image: np.ndarray, *, transfer_syntax=None, **attrs) -> bytes:
    import pydicom

    from gamguard.runtime.demo.synth import write_dicom

    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", image))
    for k, v in attrs.items():
        setattr(ds, k, v)
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def exif_app1(orientation: int, big_endian: bool = False) -> bytes:
    """An APP1 Exif segment holding only IFD0 with one Orientation entry."""
    o = ">" if big_endian else "<"
    tiff = (b"MM" if big_endian else b"II") + struct.pack(o + "HI", 42, 8)
    tiff += struct.pack(o + "H", 1) + struct.pack(o + "HHI", 274, 3, 1) + struct.pack(o + "HH", orientation, 0)
    tiff += struct.pack(o + "I", 0)
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def asymmetric(h: int = 48, w: int = 64) -> np.ndarray:
    """A non-square image whose every flip and rotation differs (a bright corner block and a bar)."""
    img = np.full((h, w), 40, np.uint8)
    img[2:14, 3:20] = 250
    img[h - 8 : h - 3, w // 2 : w - 2] = 150
    return img


# ------------------------------------------------------------------ 2. decompression bombs


def test_png_header_bomb_refused_by_decode_memory_not_only_pixels():
    # 8000 x 8000 RGBA 16-bit is within the pixel limit (64 MP) but needs gigabytes to decode
    data = png_header_bomb(8000, 8000, 16, 6)
    assert len(data) < 200
    with pytest.raises(DecodeError, match=r"needs about \d+ MiB to decode, above the per-request limit"):
        decode_bytes(data)


def test_deflated_dicom_bomb_refused_while_inflating(tmp_path):
    import pydicom

    # 512 x 512 frame, but the dataset carries 96 MB of zeros: ~100 KB once deflated
    img = np.zeros((512, 512), np.float32)
    data = dicom_bytes_with(
        tmp_path, img, transfer_syntax=pydicom.uid.DeflatedExplicitVRLittleEndian, PixelData=b"\x00" * (96 << 20)
    )
    assert len(data) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="inflates to more than 32 MiB"):
            decode_bytes(data, max_decode_bytes=32 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # refused while counting: never held the inflated dataset


def test_small_deflated_dicom_still_decodes(tmp_path):
    import pydicom

    img = phantom(1, 3)
    plain = decode_bytes(dicom_bytes_with(tmp_path, img))
    deflated = decode_bytes(dicom_bytes_with(tmp_path, img, transfer_syntax=pydicom.uid.DeflatedExplicitVRLittleEndian))
    np.testing.assert_array_equal(plain.pixels, deflated.pixels)


@pytest.mark.parametrize("kind", ["png_gray16", "png_rgb8", "jpeg", "dicom"])
def test_decode_cost_estimate_covers_measured_peak(kind, tmp_path):
    """The estimate admission control relies on is not below what decoding really allocates
    (numpy and OpenCV's Python outputs are traced by tracemalloc)."""
    rng = np.random.default_rng(0)
    h, w = 700, 900
    if kind == "png_gray16":
        data, cost = cv2.imencode(".png", rng.integers(0, 65535, (h, w), np.uint16))[1].tobytes(), (1, 2, "png")
    elif kind == "png_rgb8":
        data, cost = cv2.imencode(".png", rng.integers(0, 255, (h, w, 3), np.uint8))[1].tobytes(), (3, 1, "png")
    elif kind == "jpeg":
        data, cost = cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), np.uint8))[1].tobytes(), (1, 1, "jpeg")
    else:
        data, cost = dicom_bytes_with(tmp_path, rng.random((h, w), np.float32)), (1, 2, "dicom")
    decode_bytes(data)  # warm up lazy imports outside the measurement
    tracemalloc.start()
    try:
        decode_bytes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = decode_cost_bytes(w, h, *cost)
    assert peak <= estimate, f"{kind}: measured {peak / 2**20:.1f} MiB > estimate {estimate / 2**20:.1f} MiB"


def test_reserve_hook_told_before_decoding_and_may_refuse():
    data = cv2.imencode(".png", np.zeros((300, 200), np.uint8))[1].tobytes()
    seen = []
    decode_bytes(data, reserve=seen.append)
    assert seen == [decode_cost_bytes(200, 300, 1, 1, "png")] == [header_decode_cost(data)]
    jpeg = cv2.imencode(".jpg", np.zeros((300, 200, 3), np.uint8))[1].tobytes()
    assert header_decode_cost(jpeg) == decode_cost_bytes(200, 300, 1, 1, "jpeg")
    assert header_decode_cost(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8) is None  # no IHDR: decoding says why

    class Busy(Exception):
        pass

    def refuse(nbytes):
        raise Busy

    with pytest.raises(Busy):  # the caller's refusal passes through unchanged
        decode_bytes(data, reserve=refuse)


# ------------------------------------------------------------------- 5. truncated JPEG


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("fraction", [0.95, 0.97, 0.99])
def test_truncated_jpeg_with_eoi_appended_is_refused(fraction, progressive):
    img = (np.clip(phantom(2, 5), 0, 1) * 255).astype(np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] + ([cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else [])
    data = cv2.imencode(".jpg", img, params)[1].tobytes()
    assert decode_bytes(data).pixels.shape == img.shape  # the complete file decodes
    cut = data[: int(len(data) * fraction)] + b"\xff\xd9"
    with pytest.raises(DecodeError, match="corrupt or truncated JPEG"):
        decode_bytes(cut)


def test_jpeg_colour_decodes_to_bt601_luma():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30  # R, G, B
    data = cv2.imencode(".jpg", rgb[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 30) / 255
    assert abs(float(decode_bytes(data).pixels.mean()) - luma) < 3 / 255


def test_twelve_bit_jpeg_refused_with_advice():
    data = bytearray(cv2.imencode(".jpg", np.zeros((16, 16), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 4] = 12  # precision byte of the frame header
    with pytest.raises(DecodeError, match="12-bit.*16-bit PNG or DICOM"):
        decode_bytes(bytes(data))


# ------------------------------------------------------------------- 9. EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_exif_orientation_applied_like_a_viewer(orientation, fmt):
    from PIL import Image, ImageOps

    stored = asymmetric()
    if fmt == "jpeg":
        plain = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
        data = plain[:2] + exif_app1(orientation, big_endian=orientation % 2 == 0) + plain[2:]
    else:
        plain = cv2.imencode(".png", stored)[1].tobytes()
        tiff = exif_app1(orientation)[10:]  # drop the APP1 marker, length and "Exif\0\0"
        data = plain[:33] + _png_chunk(b"eXIf", tiff) + plain[33:]
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L"), np.float32) / 255
    got = decode_bytes(data)
    assert got.pixels.shape == expected.shape
    assert np.abs(got.pixels - expected).max() < 0.05  # JPEG at quality 100: codec rounding only
    assert got.meta.get("exif_orientation", 1) == orientation


# ------------------------------------------------------------- 9. DICOM rescale / window values


@pytest.mark.parametrize(
    "attrs",
    [
        {"RescaleSlope": "NaN"},
        {"RescaleSlope": "inf"},
        {"RescaleIntercept": "-inf"},
        {"RescaleSlope": "0"},
        {"WindowWidth": "inf"},
        {"WindowCenter": "NaN"},
    ],
    ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()),
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_dicom_non_finite_rescale_or_window_is_invalid(tmp_path, attrs):
    data = dicom_bytes_with(tmp_path, phantom(0, 1), **attrs)
    with pytest.raises(DecodeError, match=r"RescaleSlope|RescaleIntercept|WindowWidth|WindowCenter"):
        decode_bytes(data)


# ------------------------------------------------------------------- 8. no exception text


def test_pydicom_exception_text_never_reaches_the_message(tmp_path, monkeypatch):
    import pydicom.pixels

    data = dicom_bytes_with(tmp_path, phantom(0, 1))

    def broken(*a, **kw):
        raise ValueError("PatientName=DOE^JOHN leaked")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", broken)
    with pytest.raises(DecodeError) as info:
        decode_bytes(data)
    assert "ValueError" in str(info.value) and "DOE" not in str(info.value)


# ------------------------------------------------------------------- 1. bundle integrity


def test_editing_a_served_setting_is_refused(copy_bundle):
    copy_bundle = copy_bundle()
    manifest = json.loads((copy_bundle / "bundle.json").read_text())
    original = bundle_mod.load_manifest(copy_bundle)
    for key, value in (
        ("class_names", list(reversed(manifest["class_names"]))),
        ("garbage_class", 0),
        ("guard", {"policy": "calibrated", "enforced_checks": ["garbage"]}),
    ):
        edited = dict(manifest, **{key: value})
        (copy_bundle / "bundle.json").write_text(json.dumps(edited))
        with pytest.raises(bundle_mod.BundleError, match="modified after it was written"):
            bundle_mod.load_manifest(copy_bundle)
        # and its identity differs from the original's whatever the recorded field says
        assert bundle_mod.bundle_hash(edited) != bundle_mod.bundle_hash(original)
    calibrated = json.loads(json.dumps(manifest))
    calibrated["calibration"]["alpha"] = 1e-9
    assert bundle_mod.bundle_hash(calibrated) != bundle_mod.bundle_hash(original)


def test_manifest_without_recorded_hash_is_refused(copy_bundle):
    """Deleting the field must not be a way round the check (an edit plus a deleted hash is refused)."""
    copy_bundle = copy_bundle()
    manifest = json.loads((copy_bundle / "bundle.json").read_text())
    manifest.pop("bundle_hash")
    manifest["class_names"] = list(reversed(manifest["class_names"]))
    (copy_bundle / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle_mod.BundleError, match="records no bundle_hash"):
        bundle_mod.load_manifest(copy_bundle)
    # ... but the command the error names (calibrate, which re-writes the manifest) can still read it
    assert bundle_mod.load_manifest(copy_bundle, require_calibration=False)["class_names"] == manifest["class_names"]


def test_served_overrides_change_bundle_hash_and_pin_refuses(copy_bundle, tmp_path):
    from gamguard.runtime.guard import Guard
    from gamguard.runtime.server.app import default_guard_factory
    from gamguard.runtime.server.config import ServeConfig

    copy_bundle = copy_bundle()
    manifest = bundle_mod.load_manifest(copy_bundle)
    default = Guard.served_manifest(manifest, *Guard.settings(manifest))
    assert bundle_mod.bundle_hash(default) == manifest["bundle_hash"]
    strict = Guard.served_manifest(manifest, "strict", Guard.settings(manifest)[1])
    assert bundle_mod.bundle_hash(strict) != manifest["bundle_hash"]

    pinned = ServeConfig(bundle=str(copy_bundle), insecure=True, expect_bundle_hash=manifest["bundle_hash"])
    assert default_guard_factory(pinned)().bundle_hash == manifest["bundle_hash"]
    other = tmp_path / "other"
    shutil.copytree(copy_bundle, other)
    edited = dict(manifest, model={"name": "other", "version": "2"})
    bundle_mod.write_manifest(other, edited)  # a consistent, re-hashed bundle that is not the approved one
    with pytest.raises(bundle_mod.BundleError, match="expect-bundle-hash"):
        default_guard_factory(
            ServeConfig(bundle=str(other), insecure=True, expect_bundle_hash=manifest["bundle_hash"])
        )()


def test_signed_bundle_served_only_with_a_valid_signature(copy_bundle, tmp_path):
    pytest.importorskip("cryptography", reason="bundle signatures need the cryptography package")
    from gamguard.runtime.server.app import default_guard_factory
    from gamguard.runtime.server.config import ServeConfig
    from gamguard.runtime.signing import generate_key, sign_bundle

    bundle = copy_bundle()
    key, pub = generate_key(tmp_path / "operator")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    other_key, other_pub = generate_key(tmp_path / "intruder")

    def serve(trusted):
        return default_guard_factory(ServeConfig(bundle=str(bundle), insecure=True, trusted_key=str(trusted)))()

    with pytest.raises(bundle_mod.BundleError, match="no bundle.sig"):
        serve(pub)
    record = sign_bundle(bundle, key)
    assert bundle_mod.load_manifest(bundle)  # bundle.sig is not an unlisted bundle file
    assert serve(pub).bundle_hash == record["bundle_hash"]
    with pytest.raises(bundle_mod.BundleError, match="not a valid signature"):
        serve(other_pub)
    # a consistent re-hash by someone without the key: the signature no longer matches
    manifest = bundle_mod.read_manifest(bundle)
    bundle_mod.write_manifest(bundle, dict(manifest, garbage_class=0))
    with pytest.raises(bundle_mod.BundleError, match="changed after it was signed"):
        serve(pub)
    sign_bundle(bundle, other_key)  # re-signed with another key: refused too
    with pytest.raises(bundle_mod.BundleError, match="not a valid signature"):
        serve(pub)


# ------------------------------------------------------------- 4. rejected verdict redaction


def test_rejected_verdict_without_class_details_is_the_same_for_every_class(demo_bundle):
    from gamguard.runtime.guard import CLASS_SPECIFIC_THRESHOLDS, Guard

    guard = Guard.from_bundle(demo_bundle)
    ood, _ = ood_images(4)
    inputs = list(ood) + [np.rot90(phantom(stage, 40 + stage)).copy() for stage in range(4)]
    verdicts = [v for v in guard.verify_images(inputs) if not v.accepted]
    assert len({v.reference_index for v in verdicts}) > 1, "want rejected inputs of several top classes"
    assert len({json.dumps(v.thresholds, sort_keys=True) for v in verdicts}) > 1  # raw: class-specific
    public = [v.without_class_details() for v in verdicts]
    assert len({json.dumps(p.thresholds, sort_keys=True) for p in public}) == 1  # nothing tells them apart
    for p in public:
        assert p.reference_cam is None and p.predicted_index is None and p.reference_index is None
        assert not CLASS_SPECIFIC_THRESHOLDS & set(p.thresholds) and p.thresholds


# ------------------------------------------------------------------- 9. log rate limit


def test_log_limited_summarises_repeats(caplog):
    from gamguard.runtime.server.quietlog import log_limited

    logger = logging.getLogger("gamguard.test.quietlog")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        written = [log_limited(logger, "k", "bad request %d", i, interval_s=60) for i in range(500)]
    assert sum(written) == 1 and len(caplog.records) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert log_limited(logger, "k", "again", interval_s=0)
    assert "499 similar message(s) suppressed" in caplog.records[-1].getMessage()
