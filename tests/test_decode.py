"""Input decoding (PNG/JPEG/16-bit PNG/DICOM/tensors) and the image-folder loaders.

Inputs are made in the test with OpenCV and pydicom; pydicom's bundled test files and the real pelvis
DICOMs (JPEG 2000, RGB) are used when present (never downloaded).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, generate_uid

from gamguard.runtime.datasets import DatasetError, ImageFolder, is_image_file, iter_image_files
from gamguard.runtime.decode import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    DecodeError,
    decode_bytes,
    decode_file,
    decode_tensor,
)
from gamguard.runtime.preprocess import InvalidInput

RNG = np.random.default_rng(1234)
PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-778899",
    "PatientBirthDate": "19800101",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "AccessionNumber": "ACC-55443",
}


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def gradient(h=48, w=64, dtype=np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.round(np.linspace(0, top, h * w).reshape(h, w)).astype(dtype)


def dicom(
    frames: np.ndarray,
    *,
    photometric="MONOCHROME2",
    bits_stored=None,
    signed=False,
    preamble=True,
    transfer_syntax=ExplicitVRLittleEndian,
    pixel_bytes=None,
    **attrs,
) -> bytes:
    """A DICOM file (bytes) holding ``frames`` ([F,] H, W[, 3]) written by pydicom."""
    arr = np.asarray(frames)
    color = photometric in ("RGB",) or photometric.startswith("YBR")
    n_frames = arr.shape[0] if arr.ndim == (4 if color else 3) else 1
    rows, cols = arr.shape[-3:-1] if color else arr.shape[-2:]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    if n_frames > 1:
        ds.NumberOfFrames = n_frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixel_bytes if pixel_bytes is not None else arr.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=preamble)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ PNG / JPEG


def test_png_8bit_exact():
    img = gradient()
    out = decode_bytes(png(img))
    assert isinstance(out, DecodedImage) and out.format == "png" and out.bit_depth == 8
    assert out.pixels.dtype == np.float32 and out.pixels.shape == img.shape
    np.testing.assert_allclose(out.pixels, img / 255.0, atol=1e-6)
    assert out.sop_instance_uid is None


def test_png_16bit_scaled_by_65535():
    img = gradient(dtype=np.uint16)
    out = decode_bytes(png(img))
    assert out.bit_depth == 16
    np.testing.assert_allclose(out.pixels, img / 65535.0, atol=1e-6)
    # 16-bit detail survives: neighbouring values differ by far less than one 8-bit step
    assert len(np.unique(out.pixels)) > 256


def test_jpeg_grayscale_close():
    img = cv2.GaussianBlur(gradient(64, 64), (5, 5), 0)
    out = decode_bytes(jpeg(img))
    assert out.format == "jpeg" and out.bit_depth == 8 and out.pixels.shape == (64, 64)
    assert np.abs(out.pixels - img / 255.0).mean() < 0.02


@pytest.mark.parametrize("encode", [png, jpeg], ids=["png", "jpeg"])
def test_colour_is_converted_with_bgr_order(encode):
    h, w = 32, 48
    bgr = np.zeros((h, w, 3), np.uint8)
    bgr[:, : w // 2, 2] = 255  # left half pure red (OpenCV order B, G, R)
    bgr[:, w // 2 :, 0] = 255  # right half pure blue
    out = decode_bytes(encode(bgr)).pixels
    tol = 0.002 if encode is png else 0.03
    assert abs(out[h // 2, 4] - 0.299) < tol  # red luma
    assert abs(out[h // 2, w - 4] - 0.114) < tol  # blue luma


def test_rgba_16bit_png_drops_alpha():
    bgra = np.zeros((16, 16, 4), np.uint16)
    bgra[..., 1] = 65535  # green
    bgra[..., 3] = 1000  # nearly transparent: alpha is not used
    out = decode_bytes(png(bgra))
    assert out.bit_depth == 16 and out.meta["channels"] == 4
    np.testing.assert_allclose(out.pixels, 0.587, atol=1e-4)


def test_decode_file_png_and_error_names_file(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(png(gradient()))
    assert decode_file(p).pixels.shape == (48, 64)
    with pytest.raises(DecodeError, match="missing.png: no such file"):
        decode_file(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("hello, not an image\n")
    with pytest.raises(DecodeError, match=r"notes\.png: unsupported image format: text"):
        decode_file(tmp_path / "notes.png")


def test_base64_text_of_an_image_is_named_in_the_error():
    """A client that base64-encodes the file (as JSON APIs do) is told so, not just 'text'."""
    import base64

    for kind, data in (("PNG", png(gradient())), ("JPEG", jpeg(gradient())), ("DICOM", dicom(gradient()))):
        with pytest.raises(DecodeError, match=f"base64 text of a {kind} file"):
            decode_bytes(base64.b64encode(data))
    with pytest.raises(DecodeError, match=r"unsupported image format: text \(\d+ bytes\), not an image"):
        decode_bytes(base64.b64encode(b"hello, an ordinary text file" * 8))


# ------------------------------------------------------------------------------------------- bad input


def forged_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def forged_jpeg(width: int, height: int) -> bytes:
    real = jpeg(gradient(16, 16))
    pos = next(i for i in range(2, len(real)) if real[i] == 0xFF and real[i + 1] == 0xC0)
    return real[: pos + 5] + struct.pack(">HH", height, width) + real[pos + 9 :]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty input"),
        (b"just some words in a text file\nsecond line\n", "text"),
        (b"%PDF-1.7\n...", "PDF"),
        (b"II*\x00" + bytes(100), "TIFF"),
        (b"\x89PNG\r\n\x1a\n", "truncated or corrupt PNG"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(data, message):
    with pytest.raises(DecodeError, match=message):
        decode_bytes(data)


def test_random_bytes_are_not_an_image():
    for _ in range(20):
        data = RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        with pytest.raises(DecodeError):
            decode_bytes(data)
    # Bytes that happen to start like a preamble-less DICOM group are still refused.
    with pytest.raises(DecodeError):
        decode_bytes(b"\x08\x00" + RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("encode", [png, jpeg], ids=["png", "jpeg"])
def test_truncated_images_are_refused(encode):
    data = encode(RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    for cut in (len(data) // 2, len(data) - 20):
        with pytest.raises(DecodeError, match="truncated|corrupt"):
            decode_bytes(data[:cut])


def test_decompression_bombs_refused_before_allocating():
    tracemalloc.start()
    try:
        for data, fmt in ((forged_png(100_000, 100_000), "PNG"), (forged_jpeg(60_000, 60_000), "JPEG")):
            with pytest.raises(DecodeError, match=f"{fmt} image too large: .*refused before decoding"):
                decode_bytes(data)
        big = dicom(np.zeros((4, 4), np.uint16), pixel_bytes=b"\0" * 32)
        ds = pydicom.dcmread(io.BytesIO(big))
        ds.Rows = ds.Columns = 50_000
        buf = io.BytesIO()
        ds.save_as(buf)
        with pytest.raises(DecodeError, match="DICOM image too large"):
            decode_bytes(buf.getvalue())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000  # nothing near the declared 10^10 / 3.6*10^9 / 2.5*10^9 pixels
    # the limit is the caller's to choose
    with pytest.raises(DecodeError, match="too large"):
        decode_bytes(png(gradient(100, 100)), max_pixels=9_999)
    assert decode_bytes(png(gradient(100, 100)), max_pixels=10_000).pixels.shape == (100, 100)
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_decode_error_is_invalid_input():
    assert issubclass(DecodeError, InvalidInput)


# --------------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.array([[0, 255], [51, 102]], np.uint8), [[0, 1], [0.2, 0.4]]),
        (np.array([[0, 65535], [13107, 26214]], np.uint16), [[0, 1], [0.2, 0.4]]),
        (np.array([[0, 1], [0.2, 0.4]], np.float32), [[0, 1], [0.2, 0.4]]),
        (np.array([[[0, 255], [51, 102]]], np.uint8), [[0, 1], [0.2, 0.4]]),  # 1 x H x W
        (np.array([[[0], [255]], [[51], [102]]], np.uint8), [[0, 1], [0.2, 0.4]]),  # H x W x 1
    ],
)
def test_tensor_accepted(arr, expected):
    out = decode_tensor(arr)
    assert out.format == "tensor" and out.pixels.dtype == np.float32
    np.testing.assert_allclose(out.pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    "arr, message",
    [
        (np.array([[0.1, np.nan]], np.float32), "NaN or Inf"),
        (np.array([[0.1, np.inf]], np.float32), "NaN or Inf"),
        (np.array([[0.1, 1.5]], np.float32), r"within|in \[0, 1\]"),
        (np.array([[-0.1, 0.5]], np.float32), r"in \[0, 1\]"),
        (np.zeros((4, 4), np.float64), "dtype float64"),
        (np.zeros((4, 4), np.int32), "dtype int32"),
        (np.zeros((4, 4), bool), "dtype bool"),
        (np.zeros((4,), np.uint8), "shape"),
        (np.zeros((1, 1, 4, 4), np.uint8), "shape"),
        (np.zeros((4, 4, 3), np.uint8), "shape"),
        (np.zeros((0, 4), np.uint8), "empty"),
    ],
)
def test_tensor_refused(arr, message):
    with pytest.raises(DecodeError, match=message):
        decode_tensor(arr)


def test_big_endian_tensor_same_values():
    arr = np.array([[0, 65535], [13107, 26214]], ">u2")
    np.testing.assert_allclose(decode_tensor(arr).pixels, [[0, 1], [0.2, 0.4]], atol=1e-6)


def test_tensor_size_limit_checked_without_touching_pixels():
    huge = np.broadcast_to(np.zeros(1, np.uint8), (20_000, 20_000))  # a view, no memory behind it
    with pytest.raises(DecodeError, match="too large"):
        decode_tensor(huge, max_pixels=100_000_000 - 1)


# ----------------------------------------------------------------------------------------------- DICOM


def test_monochrome1_and_monochrome2_of_the_same_image_decode_equal():
    arr = RNG.integers(100, 4000, (32, 40), dtype=np.uint16)
    mono2 = decode_bytes(dicom(arr, bits_stored=12))
    mono1 = decode_bytes(dicom((4095 - arr).astype(np.uint16), bits_stored=12, photometric="MONOCHROME1"))
    assert mono2.format == mono1.format == "dicom" and mono2.bit_depth == 12
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, atol=1e-6)
    # without a VOI the full range of the modality output is used
    expected = (arr - arr.min()) / (arr.max() - arr.min())
    np.testing.assert_allclose(mono2.pixels, expected, atol=1e-6)
    # the same stored values read as MONOCHROME1 are the negative
    neg = decode_bytes(dicom(arr, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(neg.pixels, 1.0 - mono2.pixels, atol=1e-6)


def test_monochrome1_inversion_comes_after_the_window():
    arr = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    attrs = dict(WindowCenter=1000, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT", bits_stored=12)
    mono2 = decode_bytes(dicom(arr, **attrs)).pixels
    mono1 = decode_bytes(dicom(arr, photometric="MONOCHROME1", **attrs)).pixels
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono1[arr >= 1500].max() == 0.0  # above the window: white before inversion, black after


def test_rescale_then_window():
    arr = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
    slope, intercept, center, width = 2.0, -1000.0, 2000.0, 3000.0
    out = decode_bytes(
        dicom(
            arr,
            bits_stored=12,
            RescaleSlope=slope,
            RescaleIntercept=intercept,
            RescaleType="US",
            WindowCenter=center,
            WindowWidth=width,
        )
    )
    # PS3.3 C.11.2.1.2.1 (LINEAR), on the rescaled values
    values = arr * slope + intercept
    c, w = center - 0.5, width - 1
    expected = np.clip((values - c) / w + 0.5, 0, 1)
    expected[values <= c - w / 2] = 0
    expected[values > c + w / 2] = 1
    np.testing.assert_allclose(out.pixels, expected, atol=1e-5)
    assert out.meta["voi"] == "window" and out.meta["rescale_slope"] == 2.0
    assert 0 < (out.pixels == 0).mean() < 1 and 0 < (out.pixels == 1).mean() < 1  # both clip ends used


def test_voi_lut_sequence_scaled_from_the_lut_output_range():
    arr = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", (np.arange(4096) // 4).tolist())  # LUT Data: 10 of the 16 bits used
    data = dicom(arr, bits_stored=12, VOILUTSequence=[item])
    out = decode_bytes(data)
    assert out.meta["voi"] == "lut"
    np.testing.assert_allclose(out.pixels, (arr // 4) / 1023.0, atol=1e-6)


def test_signed_pixels_with_rescale_and_no_window():
    arr = RNG.integers(-1024, 3000, (16, 16)).astype(np.int16)
    out = decode_bytes(dicom(arr, signed=True, RescaleSlope=1, RescaleIntercept=-1024))
    expected = (arr.astype(float) - arr.min()) / (arr.max() - arr.min())
    np.testing.assert_allclose(out.pixels, expected, atol=1e-6)


def _grey_cases() -> dict:
    """name -> a function giving the DICOM bytes (pydicom's files are looked up, or skipped, when used)."""
    ramp = np.arange(0, 4096, 2, dtype=np.uint16).reshape(32, 64)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", (np.arange(4096) // 4).tolist())
    signed = RNG.integers(-1024, 3000, (40, 40)).astype(np.int16)
    holes = np.where(RNG.random((64, 64)) < 0.5, 100, 3000).astype(np.uint16)  # two levels, a range of 2901
    modality = Dataset()  # identity, except at a level the frame does not have
    modality.LUTDescriptor = [4096, 0, 16]
    modality.ModalityLUTType = "US"
    modality.add_new(0x00283006, "US", [4095 if v == 2000 else v for v in range(4096)])
    return {
        "window": lambda: dicom(ramp, bits_stored=12, WindowCenter=1800, WindowWidth=900),
        "window exact, MONOCHROME1": lambda: dicom(
            ramp,
            bits_stored=12,
            WindowCenter=1000,
            WindowWidth=700,
            VOILUTFunction="LINEAR_EXACT",
            photometric="MONOCHROME1",
        ),
        "sigmoid after rescale": lambda: dicom(
            ramp,
            bits_stored=12,
            RescaleSlope=0.5,
            RescaleIntercept=-300,
            WindowCenter=500,
            WindowWidth=800,
            VOILUTFunction="SIGMOID",
        ),
        "VOI LUT": lambda: dicom(ramp, bits_stored=12, VOILUTSequence=[item]),
        "signed, rescale, no VOI": lambda: dicom(signed, signed=True, RescaleSlope=1, RescaleIntercept=-1024),
        "no VOI, levels missing": lambda: dicom(holes, bits_stored=12),
        "modality LUT, no VOI, levels missing": lambda: dicom(holes, bits_stored=12, ModalityLUTSequence=[modality]),
        "pydicom CT_small": lambda: Path(pydicom_file("CT_small.dcm")).read_bytes(),
        "pydicom MR_small": lambda: Path(pydicom_file("MR_small.dcm")).read_bytes(),
    }


@pytest.mark.parametrize("case", list(_grey_cases()))
def test_grey_pipeline_by_table_equals_it_pixel_by_pixel(case):
    """The per-level table (decode._monochrome) gives exactly the pixels of running pydicom's modality
    LUT and VOI on every pixel, whatever the VOI, rescale, sign and photometric interpretation."""
    from pydicom.pixels import pixel_array

    from gamguard.runtime.decode import _monochrome

    ds = pydicom.dcmread(io.BytesIO(_grey_cases()[case]()))
    arr = pixel_array(ds)
    photometric = str(ds.PhotometricInterpretation)
    by_table, voi = _monochrome(arr, ds, photometric, table=True)
    by_pixel, voi_pixel = _monochrome(arr, ds, photometric, table=False)
    assert by_table.dtype == np.float32 and by_table.shape == arr.shape
    np.testing.assert_array_equal(by_table, by_pixel)
    assert voi == voi_pixel
    assert by_table.min() >= 0.0 and by_table.max() <= 1.0 and by_table.std() > 0.05


@pytest.mark.parametrize("signed", [False, True])
def test_big_endian_dicom_decodes_as_its_little_endian_twin(signed):
    """Explicit VR big endian, windowed, enough pixels per level for the table: the same pixels as the
    little endian file (a found defect: the table's index was read in the wrong byte order, and the
    decode failed with an IndexError)."""
    img = (np.arange(64 * 64) % 300).reshape(64, 64).astype(np.uint16)
    arr = img.astype(np.int16) - 150 if signed else img
    attrs = dict(bits_stored=12, signed=signed, WindowCenter=100, WindowWidth=200)
    little = decode_bytes(dicom(arr, **attrs))
    big = decode_bytes(
        dicom(
            arr,
            transfer_syntax=pydicom.uid.ExplicitVRBigEndian,
            pixel_bytes=arr.astype(arr.dtype.newbyteorder(">")).tobytes(),
            **attrs,
        )
    )
    assert little.pixels.std() > 0.1
    np.testing.assert_array_equal(big.pixels, little.pixels)


def test_rgb_dicom_converted_to_gray():
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[:, :5] = (255, 0, 0)
    rgb[:, 5:] = (0, 0, 255)
    out = decode_bytes(dicom(rgb, photometric="RGB"))
    assert out.pixels.shape == (8, 10)
    np.testing.assert_allclose(out.pixels[:, :5], 0.299, atol=1e-3)  # RGB order, not BGR
    np.testing.assert_allclose(out.pixels[:, 5:], 0.114, atol=1e-3)


def test_multiframe_needs_an_explicit_frame():
    frames = np.stack([np.full((8, 8), v, np.uint16) for v in (0, 1000, 2000)])
    frames[:, 0, 0] = 4095  # each frame spans 0..4095 so frames differ only in the background
    data = dicom(frames, bits_stored=12, WindowCenter=2048, WindowWidth=4096, VOILUTFunction="LINEAR_EXACT")
    with pytest.raises(DecodeError, match=r"multi-frame DICOM \(3 frames\): choose a frame"):
        decode_bytes(data)
    for i, value in enumerate((0, 1000, 2000)):
        out = decode_bytes(data, frame=i)
        assert out.meta["frames"] == 3 and out.meta["frame"] == i
        assert abs(out.pixels[4, 4] - value / 4096 - 0.0) < 1e-3
    for bad in (3, -1):
        with pytest.raises(DecodeError, match="out of range"):
            decode_bytes(data, frame=bad)
    with pytest.raises(DecodeError, match="single frame"):
        decode_bytes(png(gradient()), frame=1)


def test_dicom_without_preamble():
    arr = gradient(16, 16, np.uint16)
    out = decode_bytes(dicom(arr, preamble=False))
    assert out.format == "dicom"
    np.testing.assert_allclose(out.pixels, arr / 65535.0, atol=1e-6)


def test_raw_dicom_without_preamble_or_file_meta():
    reference = decode_file(pydicom_file("MR_small.dcm"))
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert buf.getvalue()[:2] == b"\x08\x00"  # starts straight with group 0008
    out = decode_bytes(buf.getvalue())
    assert out.meta["transfer_syntax"] == "1.2.840.10008.1.2"
    np.testing.assert_allclose(out.pixels, reference.pixels, atol=1e-6)


def test_dicom_without_pixel_data_or_with_truncated_pixels():
    no_pixels = dicom(np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(io.BytesIO(no_pixels))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DecodeError, match="no PixelData"):
        decode_bytes(buf.getvalue())
    short = dicom(np.zeros((64, 64), np.uint16), pixel_bytes=b"\0" * 100)
    with pytest.raises(DecodeError, match="could not decode DICOM pixel data"):
        decode_bytes(short)
    full = dicom(gradient(64, 64, np.uint16))
    with pytest.raises(DecodeError):
        decode_bytes(full[:300])


def test_compressed_syntax_without_decoder_names_it():
    data = dicom(np.zeros((8, 8), np.uint8), transfer_syntax=MPEG2MPML, pixel_bytes=encapsulate([b"\0" * 64]))
    with pytest.raises(DecodeError, match=r"MPEG2 Main Profile.*1\.2\.840\.10008\.1\.2\.4\.100.*not supported"):
        decode_bytes(data)


def test_uninstalled_decoder_names_syntax_and_install(monkeypatch):
    from pydicom.pixels import get_decoder

    path = pydicom_file("MR_small_jp2klossless.dcm")
    # Simulate a machine without the JPEG 2000 plugins: pydicom reports the decoder as unavailable.
    monkeypatch.setattr(type(get_decoder(pydicom.uid.JPEG2000Lossless)), "is_available", property(lambda self: False))
    with pytest.raises(DecodeError, match=r"JPEG 2000 Image Compression \(Lossless Only\).*not installed.*pip install"):
        decode_file(path)


def test_no_phi_in_meta_messages_or_logs(caplog):
    arr = gradient(16, 16, np.uint16)
    single = dicom(arr, **PHI, BodyPartExamined="CHEST", ViewPosition="PA")
    multi = dicom(np.stack([arr, arr]), **PHI)
    caplog.set_level(logging.DEBUG)
    out = decode_bytes(single)
    assert out.meta["body_part"] == "CHEST" and out.meta["modality"] == "DX" and out.meta["rows"] == 16
    assert out.sop_instance_uid == pydicom.dcmread(io.BytesIO(single)).SOPInstanceUID
    with pytest.raises(DecodeError) as err:
        decode_bytes(multi)
    texts = [json.dumps(out.meta), str(err.value), caplog.text]
    for value in PHI.values():
        for text in texts:
            assert value not in text
            assert value.split("^")[0] not in text


# -------------------------------------------------------------------------- pydicom's own test files


def pydicom_file(name: str) -> str:
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return path


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "examples_palette.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_pydicom_test_files_decode_to_unit_range(name):
    out = decode_file(pydicom_file(name))
    p = out.pixels
    assert p.ndim == 2 and p.dtype == np.float32 and np.isfinite(p).all()
    assert p.min() >= 0 and p.max() <= 1 and p.std() > 0.01
    assert out.meta["rows"] == p.shape[0] and out.meta["columns"] == p.shape[1]


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_lossless_compressed_files_match_the_uncompressed_original(name):
    reference = decode_file(pydicom_file("MR_small.dcm"))
    out = decode_file(pydicom_file(name))
    assert out.meta["transfer_syntax"] != reference.meta["transfer_syntax"]
    np.testing.assert_allclose(out.pixels, reference.pixels, atol=1e-6)


def test_pydicom_non_image_object_refused():
    with pytest.raises(DecodeError, match="not an image object"):
        decode_file(pydicom_file("rtplan.dcm"))


# ---------------------------------------------------------------------- real pelvis radiographs


def test_real_pelvis_dicoms_jpeg2000_rgb(datasets_root):
    files = sorted((datasets_root / "ood" / "pelvis_xray").glob("*.dcm"))
    assert len(files) == 10
    for f in files:
        out = decode_file(f)
        assert out.format == "dicom" and out.meta["transfer_syntax_name"] == "JPEG 2000 Image Compression"
        assert out.meta["photometric"] == "RGB" and out.pixels.shape == (331, 331)
        assert np.isfinite(out.pixels).all() and 0 <= out.pixels.min() and out.pixels.max() <= 1
        assert out.pixels.std() > 0.05  # a real radiograph, not a blank frame


# --------------------------------------------------------------------------------------- datasets


def make_tree(root: Path) -> None:
    for cls, n in (("b_late", 2), ("a_early", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i:03d}.png").write_bytes(png(gradient(12, 12)))
            (root / cls / f"{i:03d}.mask.png").write_bytes(png(np.zeros((12, 12), np.uint8)))
        (root / cls / ".hidden.png").write_bytes(b"junk")
        (root / cls / "notes.txt").write_text("not an image")
    (root / "a_early" / "sub").mkdir()
    (root / "a_early" / "sub" / "x.dcm").write_bytes(dicom(gradient(12, 12, np.uint16)))
    (root / "manifest.json").write_text("{}")


def test_image_folder(tmp_path):
    make_tree(tmp_path)
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["a_early", "b_late"] and len(ds) == 6
    names = [p.relative_to(tmp_path).as_posix() for p, _ in ds.samples]
    assert names == [
        "a_early/000.png",
        "a_early/001.png",
        "a_early/002.png",
        "a_early/sub/x.dcm",
        "b_late/000.png",
        "b_late/001.png",
    ]
    assert ds.targets == [0, 0, 0, 0, 1, 1]
    image, label = ds.load(3)
    assert image.format == "dicom" and label == 0 and image.pixels.shape == (12, 12)
    assert ImageFolder(tmp_path).samples == ds.samples  # deterministic
    # pinning the class order to a model's class names (a garbage class without a folder)
    pinned = ImageFolder(tmp_path, class_names=["b_late", "a_early", "garbage"])
    assert pinned.targets == [1, 1, 1, 1, 0, 0]
    with pytest.raises(DatasetError, match="a_early.*not among"):
        ImageFolder(tmp_path, class_names=["b_late"])


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="without images: cls"):
        ImageFolder(tmp_path)


def test_iter_image_files(tmp_path):
    make_tree(tmp_path)
    extra = tmp_path / "IMG0001"  # a DICOM from an archive, no extension: kept when named explicitly
    extra.write_bytes(dicom(gradient(8, 8, np.uint16)))
    files = iter_image_files([extra, tmp_path / "b_late", tmp_path, tmp_path / "b_late" / "000.png"])
    rel = [p.relative_to(tmp_path).as_posix() for p in files]
    assert rel == [
        "IMG0001",
        "b_late/000.png",
        "b_late/001.png",
        "a_early/000.png",
        "a_early/001.png",
        "a_early/002.png",
        "a_early/sub/x.dcm",
    ]
    assert all(decode_file(p).pixels.ndim == 2 for p in files)
    assert iter_image_files(str(extra)) == [extra]
    with pytest.raises(DatasetError, match="no such file"):
        iter_image_files([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        iter_image_files([tmp_path / "empty"])
    assert is_image_file("a/B.JPEG") and not is_image_file("a/b.mask.png") and not is_image_file("m.json")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damaged elements
def test_mutated_inputs_give_decode_error_or_a_valid_image():
    """Fail closed on hostile bytes: any other exception type would escape as a crash."""
    rng = np.random.default_rng(7)
    seeds = [
        png(gradient()),
        jpeg(gradient()),
        Path(pydicom_file("MR_small_RLE.dcm")).read_bytes(),
        Path(pydicom_file("SC_rgb_jpeg_dcmtk.dcm")).read_bytes(),
    ]
    outcomes = {"ok": 0, "refused": 0}
    for seed in seeds:
        for i in range(60):
            data = bytearray(seed)
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(0, min(len(data), 1500)))] = int(rng.integers(0, 256))
            if i % 4 == 0:
                data = data[: int(rng.integers(1, len(data)))]
            try:
                out = decode_bytes(bytes(data))
            except DecodeError:
                outcomes["refused"] += 1
                continue
            outcomes["ok"] += 1
            assert out.pixels.dtype == np.float32 and out.pixels.ndim == 2
            assert np.isfinite(out.pixels).all() and 0 <= out.pixels.min() and out.pixels.max() <= 1
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0


def test_patient_elements_are_never_parsed():
    """pydicom warns with the offending value when it parses an invalid element; decoding must not
    touch patient elements at all, so even malformed ones produce no warning or log line."""
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    with pydicom.config.disable_value_validation():
        ds.PatientID = "SECRET-ID-" * 8  # too long for LO: parsing it would warn
        ds.PatientName = "Secret^Name" * 8
        buf = io.BytesIO()
        ds.save_as(buf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_bytes(buf.getvalue())
    assert out.pixels.shape == (64, 64)
    assert not [w for w in caught if "SECRET" in str(w.message) or "VR LO" in str(w.message)]
    assert "SECRET" not in json.dumps(out.meta)


# ------------------------------------------------------------ known to decode before the pixels are


@pytest.fixture
def fresh_probes(monkeypatch):
    """The remembered grey-pipeline outcomes of this test only."""
    import gamguard.runtime.decode as decode

    monkeypatch.setattr(decode, "_GREY_PROBES", {})


def _promise(data: bytes, **kw):
    """``(sizes on_decodable was called with, the decoded image or the DecodeError)`` of one decode."""
    calls = []
    try:
        out = decode_bytes(data, on_decodable=lambda h, w: calls.append((h, w)), **kw)
    except DecodeError as exc:
        out = exc
    return calls, out


def test_a_grey_uncompressed_dicom_is_known_to_decode_before_its_pixels():
    """on_decodable is called once, with the frame's size, for grey DICOMs in every uncompressed transfer
    syntax; not for colour, compressed or non-DICOM images (only their decode can tell)."""
    img = gradient(48, 64, np.uint16) >> 4
    for syntax in (ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian):
        for photometric in ("MONOCHROME1", "MONOCHROME2"):
            data = dicom(
                img,
                bits_stored=12,
                transfer_syntax=syntax,
                photometric=photometric,
                WindowCenter=2048,
                WindowWidth=4096,
            )
            calls, out = _promise(data)
            assert calls == [(48, 64)] and out.pixels.shape == (48, 64), (syntax, photometric, out)
    rgb = np.stack([gradient(16, 16)] * 3, axis=-1)
    for data in (dicom(rgb, photometric="RGB"), png(gradient()), Path(pydicom_file("MR_small_RLE.dcm")).read_bytes()):
        calls, out = _promise(data)
        assert calls == [] and not isinstance(out, DecodeError)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"WindowCenter": 2048, "WindowWidth": 0}, "invalid VOI LUT / window"),  # pydicom: width must be >= 1
        ({"RescaleSlope": 0}, "RescaleSlope is 0"),
        ({"WindowCenter": 100, "WindowWidth": 200, "VOILUTFunction": "CUBIC"}, "invalid VOI LUT / window"),
        ({"WindowCenter": 100, "WindowWidth": -5, "VOILUTFunction": "SIGMOID"}, "invalid VOI LUT / window"),
    ],
)
def test_a_header_the_decode_refuses_is_not_promised(attrs, message, fresh_probes, monkeypatch):
    """No promise, and the decode's own refusal; the second time the probe is not run again (remembered)."""
    import gamguard.runtime.decode as decode

    calls, out = _promise(dicom(gradient(16, 16, np.uint16) >> 4, bits_stored=12, **attrs))
    assert calls == [] and isinstance(out, DecodeError) and message in str(out)
    probes = []
    real = decode._monochrome
    monkeypatch.setattr(
        decode, "_monochrome", lambda *a, **k: probes.append(1) if k.get("table") is False else None or real(*a, **k)
    )
    calls, again = _promise(dicom(gradient(16, 16, np.uint16) >> 4, bits_stored=12, **attrs))
    assert calls == [] and str(again) == str(out) and not probes


def _without_promise(data: bytes):
    try:
        return decode_bytes(data)
    except DecodeError as exc:
        return exc


def test_a_pipeline_that_overflows_for_some_stored_values_is_not_promised(fresh_probes):
    """Finite rescale and window values whose products overflow for some of the values the pixels can
    hold: no promise, whatever this image's own values, and the same outcome as a decode that was asked
    for none (found defects: the probe on the stored range's two ends alone promised the first two, and
    their decode failed; 1-bit signed data was probed as -1, 0 where pydicom gives 0, 1)."""
    flat = np.zeros((16, 16), np.int16)
    ends = flat.copy()
    ends[0, :2] = (-2048, 2047)
    rescale = {"RescaleSlope": "8e304", "RescaleIntercept": "0"}
    cases = [
        dicom(flat, bits_stored=12, signed=True, WindowCenter="0", WindowWidth="1e307", **rescale),
        dicom(ends, bits_stored=12, signed=True, **rescale),
        dicom(flat, bits_stored=12, signed=True, **rescale),
    ]
    one_bit = pydicom.dcmread(io.BytesIO(dicom(np.zeros((8, 8), np.uint8))))
    one_bit.BitsAllocated, one_bit.BitsStored, one_bit.HighBit, one_bit.PixelRepresentation = 1, 1, 0, 1
    one_bit.RescaleSlope = one_bit.RescaleIntercept = "1e308"
    one_bit.PixelData = np.packbits(np.tile([0, 1], 32), bitorder="little").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, one_bit, enforce_file_format=True)
    cases.append(buf.getvalue())
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        failed = 0
        for i, data in enumerate(cases):
            calls, out = _promise(data)
            plain = _without_promise(data)
            assert calls == [] and type(out) is type(plain) and str(out)[:40] == str(plain)[:40], (i, out, plain)
            failed += isinstance(out, DecodeError)
    assert failed >= 3  # the image with both ends, the windowed one and the 1-bit one fail to decode


def test_the_remembered_outcome_depends_on_the_character_set(fresh_probes):
    """A group-0028 text value reads differently under another character set (a found defect: a header
    decodable in UTF-8 made the same bytes promised in the default character set, whose decode failed).
    The VOI LUT Function is written with VR LO as UTF-8 'LıNEAR', which upper-cases to LINEAR."""
    import gamguard.runtime.decode as decode

    def with_charset(charset):
        attrs = {"SpecificCharacterSet": charset} if charset else {}
        ds = pydicom.dcmread(io.BytesIO(dicom(gradient(16, 16, np.uint16) >> 4, bits_stored=12, **attrs)))
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.add_new(0x00281056, "LO", "QQQQQQQQ")
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds)
        return buf.getvalue().replace(b"QQQQQQQQ", b"L\xc4\xb1NEAR ")

    utf8, default = with_charset("ISO_IR 192"), with_charset(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = {name: _promise(data) for name, data in (("utf8", utf8), ("default", default))}
        assert alone["utf8"][0] == [(16, 16)] and not isinstance(alone["utf8"][1], DecodeError)
        assert alone["default"][0] == [] and isinstance(alone["default"][1], DecodeError)
        for first, second in ((utf8, default), (default, utf8)):
            decode._GREY_PROBES.clear()
            for data in (first, second):
                calls, out = _promise(data)
                assert bool(calls) == (data is utf8) and isinstance(out, DecodeError) == (data is default)


@pytest.mark.filterwarnings("ignore:The number of bytes of pixel data is sufficient")
def test_pixel_data_of_the_wrong_length_is_refused_before_the_pixels():
    img = gradient(16, 16, np.uint16)
    for pixel_bytes in (img.tobytes()[:-64], img.tobytes() * 2):  # cut short; two frames' worth for one
        calls, out = _promise(dicom(img, pixel_bytes=pixel_bytes))
        assert calls == [] and isinstance(out, DecodeError), out


@pytest.mark.parametrize("seed", range(3))
def test_an_image_known_to_decode_always_decodes_whatever_its_header_says(seed):
    """The DICOM node answers a C-STORE once on_decodable is called, before the decode: a promise that
    must hold. Bytes of a windowed, rescaled 12-bit DX are overwritten at random (1-3 per case, mostly in
    the header: values, VRs, lengths, tags; now and then cut short), 1500 cases per seed: whenever the
    promise is made, the decode succeeds. (Decodes go through the remembered grey-pipeline outcomes too.)
    :func:`test_an_image_known_to_decode_always_decodes_whatever_its_header_values` draws the values."""
    rng = np.random.default_rng(seed)
    base = dicom(  # 4096 pixels over 501 levels: the decode's VOI runs by table, as for a radiograph
        (gradient(64, 64, np.uint16) % 501).astype(np.uint16),
        bits_stored=12,
        photometric="MONOCHROME1",
        WindowCenter=2000,
        WindowWidth=3000,
        RescaleSlope=1.5,
        RescaleIntercept=-100,
        VOILUTFunction="LINEAR",
    )
    pixels_at = base.rindex(b"\xe0\x7f\x10\x00")
    promised = refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in range(1500):
            data = bytearray(base)
            for _ in range(rng.integers(1, 4)):
                end = pixels_at + 12 if rng.random() < 0.9 else len(data)
                data[int(rng.integers(128, end))] = int(rng.integers(0, 256))
            if rng.random() < 0.05:
                data = data[: int(rng.integers(132, len(data)))]
            calls, out = _promise(bytes(data))
            assert not (calls and isinstance(out, DecodeError)), f"case {case}: promised, then {out}"
            promised += bool(calls)
            refused += isinstance(out, DecodeError)
    assert promised > 300 and refused > 150, (promised, refused)  # both sides were exercised


@pytest.mark.parametrize("seed", range(2))
def test_an_image_known_to_decode_always_decodes_whatever_its_header_values(seed, fresh_probes):
    """The promise against header values drawn at random, absurd ones included (slopes and windows near
    the float64 limits, zero and negative widths, unknown VOI functions, every stored bit depth, signed and
    not, 8 or 16 bits allocated, big endian): 600 images per seed, each decoded twice (the second time
    from the remembered outcome); whenever the promise is made, the decode succeeds."""
    rng = np.random.default_rng(100 + seed)

    def number():
        kind = rng.integers(0, 4)
        if kind == 0:
            return f"{rng.choice([-1, 1]) * 10.0 ** rng.integers(-300, 308):.3g}"
        if kind == 1:
            return str(int(rng.integers(-5, 5)))
        return f"{rng.normal(0, 10.0 ** rng.integers(0, 6)):.6g}"

    promised = refused = 0
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for case in range(600):
            bits = int(rng.integers(1, 17))
            signed = bool(rng.integers(0, 2))
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            side = int(rng.choice([16, 64]))
            wide = bits > 8 or rng.random() < 0.5  # 8 or 16 bits allocated
            img = rng.integers(lo, hi + 1, size=(side, side)).astype(
                (np.int16 if wide else np.int8) if signed else (np.uint16 if wide else np.uint8)
            )
            attrs = {}
            for key in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
                if rng.random() < 0.6:
                    attrs[key] = number()
            if rng.random() < 0.4:
                attrs["VOILUTFunction"] = str(rng.choice(["LINEAR", "LINEAR_EXACT", "SIGMOID", "CUBIC", ""]))
            data = dicom(
                img,
                bits_stored=bits,
                signed=signed,
                photometric=str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
                transfer_syntax=rng.choice([ExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian]),
                **attrs,
            )
            for _ in range(2):
                calls, out = _promise(data)
                assert not (calls and isinstance(out, DecodeError)), f"case {case} {bits} {signed} {attrs}: {out}"
            promised += bool(calls)
            refused += isinstance(out, DecodeError)
    assert promised > 150 and refused > 50, (promised, refused)


def test_the_decode_stage_promises_only_what_preprocessing_takes():
    """Decoder.decode_here passes the promise on only for an image preprocess accepts (8 pixels a side)."""
    from gamguard.runtime.bundle import InputSpec
    from gamguard.runtime.server.dataplane import DataPlaneConfig, Decoder

    decoder = Decoder(DataPlaneConfig(), InputSpec(channels=1, height=32, width=32, mean=(0.5,), std=(0.25,)))
    for side, promised in ((16, True), (4, False)):
        calls = []
        data = dicom(gradient(side, side, np.uint16))
        try:
            decoder.decode_here(data, on_decodable=lambda: calls.append(1))
        except Exception:  # noqa: BLE001 - the 4x4 image is refused after its decode
            assert not promised
        assert bool(calls) == promised
