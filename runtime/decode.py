"""Input decoding: encoded bytes (PNG, JPEG, 16-bit PNG, DICOM) or numeric tensors → one grayscale image.

Shared by the server and the offline commands, so every path hands :func:`gamguard.runtime.preprocess.preprocess`
exactly the same thing: a 2-D float32 array in [0, 1], MONOCHROME2 (high = bright = bone).

Safety rules, all enforced before any pixel is decoded:

* the format is chosen by magic bytes, never by file name; anything else is refused with a message
  naming what was seen (TIFF, gzip, text, ...);
* the image dimensions are read from the header (PNG IHDR, JPEG SOF marker, DICOM Rows/Columns) and
  images above ``max_pixels`` per frame are refused, so a forged header cannot make us allocate
  gigabytes (a "decompression bomb");
* the memory decoding will take is estimated from the header too (:func:`decode_cost_bytes`: the
  decoder's output plus the float working copies, about 10-40 bytes per pixel) and an image needing
  more than ``max_decode_bytes`` is refused; a caller that bounds the memory of several decodes at once
  (the server) is told each estimate through ``reserve`` before any pixel is decoded. A deflated DICOM
  is inflated under the same bound, counting, before pydicom sees it;
* truncated or corrupt data is an error, not a partially grey image: a PNG must reach IEND, and JPEG
  goes through libjpeg-turbo in strict mode (simplejpeg), where a short scan or any other decoder
  warning is an error (libjpeg otherwise fills a truncated scan with grey, even when an end-of-image
  marker was appended);
* EXIF orientation (JPEG APP1, PNG eXIf) is applied, as viewers do (see :mod:`.exif`);
* DICOM rescale and window values must be finite numbers (a NaN slope would decode to black).

DICOM follows the grayscale display pipeline of PS3.3 C.11 via pydicom's ``pydicom.pixels`` API:
stored values → modality LUT / rescale → VOI LUT or window → scaled to [0, 1] from the VOI output range
→ MONOCHROME1 inverted last. RGB, YBR and palette-colour data are converted to grayscale explicitly
(ITU-R BT.601 luma weights, the same as OpenCV's). Compressed transfer syntaxes use the installed
pydicom decoder plugins (pylibjpeg + libjpeg/openjpeg here); a missing decoder is an error that names the
transfer syntax and what to install.

Patient-identifying DICOM attributes are never read: ``meta`` is built from a whitelist of technical
attributes, and error messages only mention pixel-module facts — never the text of a pydicom or
decoder-plugin exception, which can quote attribute values.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .exif import apply_orientation, jpeg_orientation, png_orientation
from .preprocess import InvalidInput

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest accepted image, in pixels per frame (64 MP ≈ 8000 x 8000, above any radiograph detector)."""

DEFAULT_MAX_DECODE_BYTES = 768 << 20
"""Most memory one decode may take (estimated from the header, see :func:`decode_cost_bytes`): a
43 x 43 cm detector at 0.1 mm (4300 x 4300, 16-bit DICOM) needs about 670 MB."""

# Working memory per pixel on top of the decoder's own output (float32 copies: conversion, scaling,
# EXIF rotation; DICOM: pydicom's float64 modality/VOI chain plus the decoder's buffer).
_WORK_BYTES_GRAY = 12
_WORK_BYTES_COLOUR = 32
_WORK_BYTES_DICOM = 32

DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128

# BT.601 luma, in RGB order (OpenCV's RGB2GRAY uses the same weights).
_LUMA_RGB = np.array([0.299, 0.587, 0.114])

# Non-PHI DICOM attributes copied into ``meta`` (keyword → meta key). Everything here describes the
# acquisition or the pixel encoding; nothing identifies a patient, a person or an institution.
_DICOM_META_KEYWORDS = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "ViewPosition": "view_position",
    "PatientOrientation": "patient_orientation",
    "SamplesPerPixel": "samples_per_pixel",
    "BitsAllocated": "bits_allocated",
    "BitsStored": "bits_stored",
    "PixelRepresentation": "pixel_representation",
    "PixelSpacing": "pixel_spacing",
    "ImagerPixelSpacing": "imager_pixel_spacing",
    "SOPClassUID": "sop_class_uid",
}

# Known signatures, only used to say what an unsupported input looks like.
_OTHER_FORMATS = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000 (JP2)"),
    (b"\xffO\xffQ", "JPEG 2000 codestream"),
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "ZIP"),
    (b"%PDF", "PDF"),
    (b"\x93NUMPY", "NumPy .npy"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)


class DecodeError(InvalidInput):
    """The input cannot be decoded into an image; the message says what is wrong (never PHI)."""


def decode_cost_bytes(width: int, height: int, samples: int, sample_bytes: int, fmt: str) -> int:
    """Estimated peak memory (bytes) of decoding one ``width x height`` frame of ``samples`` samples
    of ``sample_bytes`` bytes each: the decoder's output plus the working copies of ``fmt``'s path
    ("png" | "jpeg" | "dicom" | "tensor"). Used to refuse or queue work before it is allocated; a test
    checks it against the measured peak."""
    pixels = int(width) * int(height)
    raw = pixels * int(samples) * int(sample_bytes)
    if fmt == "dicom":
        return 2 * raw + pixels * _WORK_BYTES_DICOM
    if fmt == "tensor":
        return pixels * 8
    return raw + pixels * (_WORK_BYTES_COLOUR if samples > 1 else _WORK_BYTES_GRAY)


def header_decode_cost(data: bytes) -> int | None:
    """:func:`decode_cost_bytes` of a PNG or JPEG from its header alone, or None (another format, or a
    header that does not parse: decoding will say why). Cheap enough to ask before queueing a decode."""
    try:
        if data[:8] == PNG_SIGNATURE and len(data) >= 33 and data[25] in _PNG_SAMPLES:
            width, height = png_size(data)
            return decode_cost_bytes(width, height, _PNG_SAMPLES[data[25]], 2 if data[24] == 16 else 1, "png")
        if data[:3] == JPEG_SOI:
            width, height, *_ = _jpeg_header(data)
            return decode_cost_bytes(width, height, 1, 1, "jpeg")
    except (DecodeError, struct.error, TypeError):
        return None
    return None


class _DecodeMemory:
    """The memory one decode has claimed: refuses beyond the per-request limit, tells ``reserve``."""

    def __init__(self, limit: int, reserve: Callable[[int], None] | None):
        self.limit, self.reserve, self.total = int(limit), reserve, 0
        self.refusal: BaseException | None = None  # what ``reserve`` raised (passed on unchanged)

    def claim(self, nbytes: int, what: str) -> None:
        self.total += int(nbytes)
        if self.total > self.limit:
            raise DecodeError(
                f"{what} needs about {_mib(self.total)} MiB to decode, above the per-request limit of "
                f"{_mib(self.limit)} MiB (refused before decoding)"
            )
        if self.reserve is not None:
            try:
                self.reserve(int(nbytes))
            except BaseException as exc:
                self.refusal = exc
                raise


def _mib(n: int) -> int:
    return int(math.ceil(n / (1 << 20)))


@dataclass
class DecodedImage:
    """One decoded grayscale image and non-identifying facts about where it came from."""

    pixels: np.ndarray  # float32 H x W in [0, 1], MONOCHROME2 (high = bright = bone)
    format: str  # "png" | "jpeg" | "dicom" | "tensor"
    bit_depth: int  # bits per sample of the source (8, 12, 16, ...; 32 for float tensors)
    sop_instance_uid: str | None = None  # DICOM only; an instance UID, safe to log and audit
    meta: dict = field(default_factory=dict)  # NON-PHI facts only

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


# --------------------------------------------------------------------------------------------- API


def decode_bytes(
    data: bytes,
    *,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    reserve: Callable[[int], None] | None = None,
    on_decodable: Callable[[int, int], None] | None = None,
) -> DecodedImage:
    """Decode an encoded image (PNG, JPEG, DICOM), chosen by its magic bytes.

    ``frame`` selects the frame of a multi-frame DICOM (0-based) and is required for one; a
    single-frame input accepts ``None`` or ``0``. Raises :class:`DecodeError` for anything that is not a
    complete, supported image of at most ``max_pixels`` pixels per frame whose decode needs at most
    ``max_decode_bytes``. ``reserve(nbytes)``, when given, is called with the memory the decode is
    about to take (possibly in several parts) before it is allocated; it may raise to refuse.

    ``on_decodable(height, width)``, when given, is called before the pixel data is decoded once the
    decode is known to succeed, with the size of the image it gives: for a grey DICOM in an uncompressed
    transfer syntax, after the checks of its header, of its pixel data's length and of its grey pipeline
    (:func:`_decodes_from_header`); never for other images. For a caller that answers before the decode
    ends (the DICOM node answers a C-STORE). It must not raise.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise DecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    if not data:
        raise DecodeError("empty input (0 bytes)")
    if frame is not None and (not isinstance(frame, (int, np.integer)) or isinstance(frame, bool)):
        raise DecodeError(f"frame must be an integer, got {frame!r}")

    memory = _DecodeMemory(max_decode_bytes, reserve)
    if data.startswith(PNG_SIGNATURE):
        _require_single_frame(frame, "PNG")
        return _decode_png(data, max_pixels, memory)
    if data.startswith(JPEG_SOI):
        _require_single_frame(frame, "JPEG")
        return _decode_jpeg(data, max_pixels, memory)
    if _looks_like_dicom(data):
        try:
            return _decode_dicom(data, frame, max_pixels, memory, on_decodable)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - hostile bytes can break pydicom in many ways
            if exc is memory.refusal:  # the caller's own refusal (e.g. its memory budget is busy)
                raise
            # A malformed element (e.g. an unparsable Rescale Slope, an unknown VR). pydicom's message
            # can quote the element's value, so only the exception type is reported.
            raise DecodeError(f"corrupt DICOM: malformed element ({type(exc).__name__})") from None
    raise DecodeError(f"unsupported image format: {_describe(data)}; expected PNG, JPEG or DICOM")


def decode_file(path, **kw) -> DecodedImage:
    """Read ``path`` and :func:`decode_bytes` it (keyword arguments are passed on)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DecodeError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise DecodeError(f"{p}: is a directory, not an image file") from None
    except OSError as exc:
        raise DecodeError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        return decode_bytes(data, **kw)
    except DecodeError as exc:
        raise DecodeError(f"{p.name}: {exc}") from None


def decode_tensor(
    array: np.ndarray,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    reserve: Callable[[int], None] | None = None,
) -> DecodedImage:
    """A numeric image (e.g. an Open Inference Protocol tensor) → :class:`DecodedImage`.

    Accepted: ``uint8`` (divided by 255), ``uint16`` (divided by 65535) and ``float32`` already within
    [0, 1]; shapes ``H x W``, ``1 x H x W`` or ``H x W x 1``. Pixels are taken as MONOCHROME2.
    """
    arr = np.asarray(array)
    if arr.dtype.byteorder not in ("=", "|"):  # e.g. big-endian wire data: same values, native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    scales = {np.dtype(np.uint8): (255.0, 8), np.dtype(np.uint16): (65535.0, 16), np.dtype(np.float32): (1.0, 32)}
    if arr.dtype not in scales:
        raise DecodeError(f"unsupported tensor dtype {arr.dtype}; expected UINT8, UINT16 or FP32 (in [0, 1])")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise DecodeError(
            f"unsupported tensor shape {tuple(np.shape(array))}; expected H x W, 1 x H x W or H x W x 1 "
            "(one grayscale image)"
        )
    h, w = arr.shape
    if h == 0 or w == 0:
        raise DecodeError(f"empty tensor (shape {tuple(np.shape(array))})")
    _check_size(w, h, max_pixels, "tensor")
    _DecodeMemory(max_decode_bytes, reserve).claim(decode_cost_bytes(w, h, 1, 4, "tensor"), f"a {w}x{h} tensor")
    scale, bits = scales[arr.dtype]
    if arr.dtype == np.float32:
        if not np.isfinite(arr).all():
            raise DecodeError("tensor contains NaN or Inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise DecodeError(f"FP32 tensor values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
        pixels = np.ascontiguousarray(arr, dtype=np.float32).copy()
    else:
        pixels = arr.astype(np.float32) / np.float32(scale)
    return DecodedImage(
        pixels=pixels, format="tensor", bit_depth=bits, meta={"rows": h, "columns": w, "dtype": str(arr.dtype)}
    )


# ------------------------------------------------------------------------------------------ helpers


def _require_single_frame(frame, fmt: str) -> None:
    if frame not in (None, 0):
        raise DecodeError(f"frame {frame} requested but a {fmt} image has a single frame (0)")


def _check_size(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"{what} header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(
            f"{what} image too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (refused before decoding)"
        )


def _describe(data: bytes) -> str:
    """A short, PHI-free description of unrecognised bytes for error messages."""
    for magic, name in _OTHER_FORMATS:
        if data.startswith(magic):
            return f"{name} data"
    if data[:12].startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP data"
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        encoded = _base64_of_image(head)
        if encoded:
            return f"base64 text of a {encoded} file ({len(data)} bytes), not the file's bytes"
        return f"text ({len(data)} bytes), not an image"
    return f"unrecognised binary data ({len(data)} bytes, starting {data[:8].hex(' ')})"


def _base64_of_image(head: str | bytes) -> str | None:
    """The format whose base64 encoding ``head`` starts with (a common client mistake), else None."""
    prefix = head[:180]  # 180 base64 characters = 135 bytes: past a DICOM preamble and its 'DICM'
    prefix = prefix[: len(prefix) // 4 * 4]
    try:
        raw = base64.b64decode(prefix, validate=True)
    except (binascii.Error, ValueError):
        return None
    if raw.startswith(PNG_SIGNATURE):
        return "PNG"
    if raw.startswith(JPEG_SOI):
        return "JPEG"
    if raw[128:132] == b"DICM":
        return "DICOM"
    return None


def _to_gray(img: np.ndarray, order: str) -> np.ndarray:
    """Colour → float32 luma, explicit about channel order; alpha (a 4th channel) is ignored."""
    if img.ndim == 2:
        return img
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise DecodeError(f"unsupported channel layout {img.shape}")
    weights = _LUMA_RGB if order == "RGB" else _LUMA_RGB[::-1]  # BGR: blue first
    color = img[:, :, :3].astype(np.float32)
    return (
        color[:, :, 0] * np.float32(weights[0])
        + color[:, :, 1] * np.float32(weights[1])
        + color[:, :, 2] * np.float32(weights[2])
    )


def _finish(gray: np.ndarray, max_value: float) -> np.ndarray:
    """Scale to [0, 1] float32 (values above ``max_value``, e.g. from overstated bits, are clipped)."""
    pixels = np.asarray(gray, dtype=np.float32) * np.float32(1.0 / float(max_value))
    return np.clip(pixels, 0.0, 1.0, out=pixels)


# ---------------------------------------------------------------------------------------- PNG/JPEG


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR chunk, without decoding; None when ``data`` does not
    start with a PNG signature and an IHDR chunk (the IHDR checksum is not checked here)."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


_PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}  # colour type -> samples OpenCV returns (palette as BGR)


def _decode_png(data: bytes, max_pixels: int, memory: _DecodeMemory) -> DecodedImage:
    # Walk the chunk structure first: IHDR gives the size; reaching IEND proves the file is complete
    # (libpng may otherwise return an image whose tail is missing).
    size = png_size(data) if len(data) >= 33 else None
    if size is None:
        raise DecodeError("truncated or corrupt PNG: no IHDR chunk")
    width, height = size
    bit_depth, color_type = data[24], data[25]
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise DecodeError("corrupt PNG: IHDR checksum mismatch")
    _check_size(width, height, max_pixels, "PNG")
    pos, seen_iend, seen_idat = 8, False, False
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            break
        seen_idat |= ctype == b"IDAT"
        if ctype == b"IEND":
            seen_iend = True
            break
        pos += 12 + length
    if not (seen_idat and seen_iend):
        raise DecodeError("truncated or corrupt PNG: image data ends before the IEND chunk")
    if color_type not in _PNG_SAMPLES or bit_depth not in (1, 2, 4, 8, 16):
        raise DecodeError(f"corrupt PNG: colour type {color_type} with bit depth {bit_depth}")
    memory.claim(
        decode_cost_bytes(width, height, _PNG_SAMPLES[color_type], 2 if bit_depth == 16 else 1, "png"),
        f"a {width}x{height} PNG",
    )
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DecodeError("corrupt PNG: OpenCV could not decode the image data")
    max_value = 65535.0 if img.dtype == np.uint16 else 255.0
    if img.dtype not in (np.uint8, np.uint16):
        raise DecodeError(f"unsupported PNG sample type {img.dtype}")
    channels = 1 if img.ndim == 2 else img.shape[2]
    pixels = _finish(_to_gray(img, "BGR"), max_value)  # OpenCV returns colour as BGR(A)
    meta = {"rows": height, "columns": width, "channels": channels, "png_color_type": color_type}
    orientation = png_orientation(data)
    if orientation not in (None, 1):
        pixels = apply_orientation(pixels, orientation)
        meta["exif_orientation"] = orientation
    return DecodedImage(pixels=pixels, format="png", bit_depth=bit_depth, meta=meta)


# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not SOFs.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> tuple[int, int, int, int, int]:
    """Walk the JPEG markers up to the first scan: (width, height, precision, components, sos_offset)."""
    pos, sof = 2, None
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise DecodeError("truncated or corrupt JPEG: marker structure broken before the image data")
        marker = data[pos + 1]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2  # standalone markers
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > len(data):
            raise DecodeError("truncated or corrupt JPEG: segment runs past the end of the data")
        if marker in _JPEG_SOF and sof is None:
            if length < 8:
                raise DecodeError("corrupt JPEG: short frame header")
            precision, height, width, ncomp = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
            sof = (width, height, precision, ncomp)
        if marker == 0xDA:  # start of scan
            if sof is None:
                raise DecodeError("corrupt JPEG: scan data before any frame header")
            return (*sof, pos)
        if marker == 0xD9:
            raise DecodeError("corrupt JPEG: end of image before any scan data")
        pos += 2 + length


def _decode_jpeg(data: bytes, max_pixels: int, memory: _DecodeMemory) -> DecodedImage:
    import simplejpeg

    width, height, precision, ncomp, sos = _jpeg_header(data)
    if height == 0:
        raise DecodeError("unsupported JPEG: height defined later by a DNL marker")
    _check_size(width, height, max_pixels, "JPEG")
    if precision != 8:
        # libjpeg-turbo's strict mode (below) is what catches truncated scans; it decodes 8-bit JPEG only.
        raise DecodeError(
            f"unsupported JPEG: {precision}-bit samples (JPEG files are decoded with 8-bit samples "
            "only; send higher bit depths as 16-bit PNG or DICOM)"
        )
    # Entropy-coded data escapes 0xFF as FF 00, so an EOI after the first scan marks a complete file.
    if data.rfind(b"\xff\xd9") <= sos:
        raise DecodeError("truncated JPEG: no end-of-image marker after the image data")
    memory.claim(decode_cost_bytes(width, height, 1, 1, "jpeg"), f"a {width}x{height} JPEG")
    try:
        # GRAY: libjpeg-turbo returns the luma (Y) plane of colour JPEGs, BT.601 by the JFIF definition.
        # strict: a short scan (a truncated file with EOI appended) or any other warning is an error.
        img = simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)
    except (ValueError, RuntimeError) as exc:  # libjpeg's own message: fixed texts, no data values
        raise DecodeError(
            f"corrupt or truncated JPEG ({precision}-bit, {ncomp} components): {str(exc)[:120]}"
        ) from None
    pixels = _finish(img[:, :, 0] if img.ndim == 3 else img, 255.0)
    meta = {"rows": height, "columns": width, "channels": ncomp, "jpeg_precision": precision}
    orientation = jpeg_orientation(data)
    if orientation not in (None, 1):
        pixels = apply_orientation(pixels, orientation)
        meta["exif_orientation"] = orientation
    return DecodedImage(pixels=pixels, format="jpeg", bit_depth=precision, meta=meta)


# ------------------------------------------------------------------------------------------- DICOM


def _looks_like_dicom(data: bytes) -> bool:
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    # No preamble ("raw" DICOM, e.g. from some PACS exports): only try when the first element is a
    # group 0002/0008 tag, so random bytes are never handed to a forced parse.
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dicom_file_meta(data: bytes) -> tuple[str | None, int]:
    """``(transfer syntax UID, offset of the dataset)`` from a DICOM file meta group (0002, explicit VR
    little endian), walked without pydicom; ``(None, 0)`` when there is no meta group."""
    pos = DICOM_MAGIC_OFFSET + 4 if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM" else 0
    tsuid = None
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                break
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if element == 0x0010:
            tsuid = data[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return tsuid, pos


def _check_inflated_size(data: bytes, offset: int, memory: _DecodeMemory) -> None:
    """Inflate a deflated DICOM dataset once, counting and discarding, under the memory bound: a few
    MB of deflate can hold gigabytes of zeros, and pydicom inflates everything at once."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total, step = data[offset:], 0, 16 << 20
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, step))
            pending = inflater.unconsumed_tail
            if total > memory.limit:
                raise DecodeError(
                    f"deflated DICOM inflates to more than {_mib(memory.limit)} MiB, the per-request "
                    "decode limit (refused while inflating)"
                )
    except zlib.error:
        raise DecodeError("corrupt DICOM: the deflated dataset does not inflate") from None
    # pydicom holds the inflated stream and the element values parsed from it
    memory.claim(2 * total, f"a deflated DICOM of {_mib(total)} MiB inflated")


def _read_dicom(data: bytes, memory: _DecodeMemory):
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_preamble = data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"
    tsuid, dataset_offset = dicom_file_meta(data)
    if tsuid == DEFLATED_TRANSFER_SYNTAX:
        _check_inflated_size(data, dataset_offset, memory)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except InvalidDicomError:
        raise DecodeError("invalid DICOM: not a DICOM file (no valid preamble or file meta)") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is bad input
        raise DecodeError(f"corrupt or truncated DICOM ({type(exc).__name__})") from None
    missing = [k for k in ("Rows", "Columns", "PixelData") if k not in ds]
    if missing:
        what = "DICOM" if has_preamble else "data (not a DICOM image)"
        raise DecodeError(f"unsupported {what}: no {', '.join(missing)} — not an image object")
    if not has_preamble and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # pydicom guessed the encoding while forcing; record it so the pixel decoder knows it.
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
        if not little:
            raise DecodeError("unsupported DICOM: big-endian data without a file meta header")
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _int_attr(ds, keyword: str, default=None) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DecodeError(f"DICOM attribute {keyword} has an invalid value") from None


def _check_decoder(ds):
    """The transfer syntax, after making sure an installed plugin can decode it."""
    from pydicom.pixels import get_decoder

    tsuid = ds.file_meta.TransferSyntaxUID
    label = f"{tsuid.name} ({tsuid})" if tsuid.name != str(tsuid) else str(tsuid)
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise DecodeError(
            f"DICOM transfer syntax {label} is not supported: pydicom has no pixel data decoder for it "
            "(transcode the file, e.g. to JPEG 2000 or uncompressed)"
        ) from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "a pydicom decoder plugin"
        raise DecodeError(
            f"DICOM transfer syntax {label} needs a decoder that is not installed; install one of: "
            f"{options} (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle)"
        )
    return tsuid, label


def _voi_output(values: np.ndarray, ds) -> tuple[np.ndarray, float, float, dict]:
    """Apply the VOI LUT or window (PS3.3 C.11.2); return the output, its full range and a summary."""
    from pydicom.pixels import apply_voi, apply_windowing

    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)):
            values = values.astype(np.int64)  # a LUT is indexed by integers
        out = apply_voi(values, ds, 0)
        # Scale from the LUT's own output range: its data often uses fewer bits than the descriptor says.
        n_entries, first_mapped = int(seq[0].LUTDescriptor[0]) or 65536, int(seq[0].LUTDescriptor[1])
        lut = apply_voi(np.arange(first_mapped, first_mapped + n_entries), ds, 0)
        lo, hi = float(lut.min()), float(lut.max())
        return out, lo, hi, {"voi": "lut"}
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        out = apply_windowing(values, ds, 0)
        # Probe far below/above the window: pydicom maps them to the ends of its output range.
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        span = abs(width) * 1e6 + 1e6
        with np.errstate(over="ignore"):
            ends = apply_windowing(np.array([center - span, center + span]), ds, 0)
        return (
            out,
            float(ends.min()),
            float(ends.max()),
            {"voi": "window", "window_center": center, "window_width": width},
        )
    # Neither present: the full range of the modality output values of this frame (what viewers show
    # without a VOI). The theoretical range of BitsStored would flatten e.g. signed 16-bit CT to grey.
    return values, float(np.min(values)), float(np.max(values)), {"voi": "none (modality output min..max)"}


def _technical_meta(ds) -> dict:
    """The whitelisted, non-identifying attributes; one that does not parse is left out (meta is informative)."""
    meta = {}
    for keyword, key in _DICOM_META_KEYWORDS.items():
        try:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            if keyword.endswith("Spacing"):
                meta[key] = [float(v) for v in value]
            elif keyword == "PatientOrientation":
                meta[key] = [str(v) for v in value]
            else:
                meta[key] = value if isinstance(value, int) else str(value)
        except Exception:  # noqa: BLE001 - e.g. an element of unknown VR: read after the decode is promised
            continue
    return meta


def _finite_attrs(ds, *keywords: str) -> None:
    """Refuse a rescale or window attribute that is present but not finite (NaN, Inf) or unparsable."""
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        from pydicom.multival import MultiValue

        try:
            numbers = [float(v) for v in (value if isinstance(value, (MultiValue, list, tuple)) else [value])]
        except (TypeError, ValueError):
            raise DecodeError(f"DICOM attribute {keyword} is not a number") from None
        if not all(math.isfinite(v) for v in numbers):
            raise DecodeError(f"DICOM attribute {keyword} is not a finite number (NaN or Inf)")


#: A frame of integer pixels goes through the grey pipeline once per stored level (:func:`_monochrome`)
#: when it has at least this many pixels per level between its smallest and largest stored value.
TABLE_PIXELS_PER_LEVEL = 4


def _monochrome(arr: np.ndarray, ds, photometric: str, *, table: bool | None = None) -> tuple[np.ndarray, dict]:
    """A MONOCHROME1/2 frame of stored values → float32 in [0, 1], and the VOI summary: modality LUT or
    rescale → VOI LUT or window (:func:`_voi_output`) → scaled by the VOI's output range → clipped →
    MONOCHROME1 inverted last, after the VOI (PS3.3 C.7.6.3.1.2).

    Every step maps one stored value to one output value. A 12- to 16-bit radiograph has a few thousand
    stored levels and a million pixels or more, so for integer pixel data with a window or VOI LUT and
    at least :data:`TABLE_PIXELS_PER_LEVEL` pixels per level of its range the steps run once per level
    (on ``arange(min, max + 1)``) and the frame is one table lookup: the same pydicom functions on the
    same values, so the same float32 pixels, 1.5-4x faster (pydicom's windowing makes float64 passes
    with boolean masks over whatever it is given). ``table``: force the table (True) or the per-pixel
    path (False); None chooses as above. Without a VOI the output range is that of the frame's own
    levels, so the table then marks which levels occur (and the per-pixel path is cheaper anyway)."""
    index = None
    if not arr.dtype.isnative:  # big endian data: the table's index below is a view in the native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if table is not False and arr.dtype.kind in "iu" and arr.size:
        first, last = int(arr.min()), int(arr.max())
        if table is None:  # without a VOI the per-pixel path is a few cheap passes: no table pays
            has_voi = ds.get("WindowCenter") is not None or bool(ds.get("VOILUTSequence"))
            table = has_voi and (last - first + 1) * TABLE_PIXELS_PER_LEVEL <= arr.size
        if table:
            # the offset from the smallest level, in the pixels' own width: a signed difference that
            # wraps is right once read as unsigned (it is below 2**bits)
            index = np.subtract(arr, arr.dtype.type(first)).view(arr.dtype.str.replace("i", "u"))
            levels = np.arange(first, last + 1, dtype=arr.dtype)
    values = _modality_output(levels if index is not None else arr, ds)
    try:
        out, lo, hi, voi = _voi_output(values, ds)
    except (ValueError, NotImplementedError, IndexError, TypeError) as exc:
        raise DecodeError(f"invalid VOI LUT / window in DICOM ({type(exc).__name__})") from None
    if index is not None and voi["voi"].startswith("none"):  # the range of the levels the frame has
        present = np.zeros(len(levels), bool)
        present[index] = True
        lo, hi = float(np.min(out[present])), float(np.max(out[present]))
    # A uniform frame (hi == lo) has no contrast to scale; it decodes to black. In place, one float64
    # copy: without the table this is the decode's memory peak (see decode_cost_bytes).
    if hi > lo:
        pixels = np.subtract(out, lo, dtype=np.float64)
        pixels /= hi - lo
    else:
        pixels = np.zeros(np.shape(out))
    values = out = None  # noqa: F841 - release the modality/VOI outputs before the float32 copy
    np.clip(pixels, 0.0, 1.0, out=pixels)
    if photometric == "MONOCHROME1":  # low values bright: invert last, after the VOI (PS3.3 C.7.6.3.1.2)
        np.subtract(1.0, pixels, out=pixels)
    pixels = pixels.astype(np.float32)
    return (pixels if index is None else pixels[index]), voi


def _modality_output(values: np.ndarray, ds) -> np.ndarray:
    """pydicom's modality LUT / rescale, refusing an output that is not finite."""
    from pydicom.pixels import apply_modality_lut

    out = apply_modality_lut(values, ds)
    if np.issubdtype(np.asarray(out).dtype, np.floating) and not np.isfinite(out).all():
        raise DecodeError("DICOM modality LUT / rescale produced NaN or Inf")
    return out


@dataclass
class _DicomHeader:
    rows: int
    cols: int
    frames: int
    photometric: str
    label: str  # the transfer syntax, for messages
    bits_stored: int
    meta: dict  # (without the informative attributes, read after the decode is promised: _technical_meta)


def _dicom_header(ds, frame: int | None, max_pixels: int, memory: _DecodeMemory) -> _DicomHeader:
    """Everything the decode reads from a parsed DICOM's header and checks there, before it touches the
    pixel data, with the decode's memory claimed (what it reads after that cannot fail)."""
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    n_frames = _int_attr(ds, "NumberOfFrames", 1) if ds.get("NumberOfFrames") not in (None, "") else 1
    if n_frames < 1:
        raise DecodeError(f"DICOM NumberOfFrames is {n_frames}")
    # Only the chosen frame is ever decoded, so the limit is per frame.
    _check_size(cols, rows, max_pixels, "DICOM")
    if n_frames > 1 and frame is None:
        raise DecodeError(f"multi-frame DICOM ({n_frames} frames): choose a frame explicitly (frame=0..{n_frames - 1})")
    if frame is not None and not 0 <= int(frame) < n_frames:
        raise DecodeError(f"frame {frame} out of range: the DICOM has {n_frames} frame(s) (0..{n_frames - 1})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise DecodeError("DICOM has no PhotometricInterpretation")
    _finite_attrs(ds, "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
    if ds.get("RescaleSlope") not in (None, "") and float(ds.RescaleSlope) == 0.0:
        raise DecodeError("DICOM RescaleSlope is 0 (every pixel would map to the intercept)")
    tsuid, label = _check_decoder(ds)
    samples = max(1, _int_attr(ds, "SamplesPerPixel", 1))
    sample_bytes = max(1, (_int_attr(ds, "BitsAllocated", 16) + 7) // 8)
    memory.claim(decode_cost_bytes(cols, rows, samples, sample_bytes, "dicom"), f"a {cols}x{rows} DICOM frame")
    meta: dict = {
        "photometric": photometric,
        "rows": rows,
        "columns": cols,
        "frames": n_frames,
        "frame": int(frame) if frame is not None else 0,
        "transfer_syntax": str(tsuid),
        "transfer_syntax_name": tsuid.name,
    }
    if photometric in ("MONOCHROME1", "MONOCHROME2"):  # (both numbers: _finite_attrs)
        meta["rescale_slope"] = float(ds.get("RescaleSlope", 1) or 1)
        meta["rescale_intercept"] = float(ds.get("RescaleIntercept", 0) or 0)
    return _DicomHeader(
        rows=rows,
        cols=cols,
        frames=n_frames,
        photometric=photometric,
        label=label,
        bits_stored=_int_attr(ds, "BitsStored", _int_attr(ds, "BitsAllocated", 8)),
        meta=meta,
    )


def _sop_instance_uid(ds) -> str | None:
    """The dataset's SOP Instance UID (informative here: None when it does not read)."""
    try:
        uid = ds.get("SOPInstanceUID")
    except Exception:  # noqa: BLE001 - e.g. an unknown VR
        return None
    return str(uid) if uid else None


#: transfer syntaxes whose pixel data is stored as it is, no codec: implicit and explicit VR little
#: endian, explicit VR big endian (PS3.5 A.1–A.3; deflated is left out: its dataset must be inflated)
NATIVE_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


def _decodes_from_header(ds, header: _DicomHeader, frame: int | None) -> bool:
    """Whether the decode of ``ds`` (its header checked: ``header``) is known to succeed before its pixel
    data is decoded: True for a grey image (MONOCHROME1/2, one sample) in an uncompressed transfer syntax
    whose pixel data has the length the header implies (pydicom's own validation, which its decode runs
    again) and whose grey pipeline turns every value the pixels can store into a finite pixel
    (:func:`_probe_grey_pipeline`): nothing left depends on the pixel values. False otherwise — only
    decoding can tell (compressed, colour, more than 16 bits stored), or some image with this header
    would fail. Never raises: what it finds never changes the decode's outcome, only whether it is
    promised."""
    from pydicom.pixels.decoders.base import DecodeRunner

    tsuid = ds.file_meta.TransferSyntaxUID
    if tsuid not in NATIVE_TRANSFER_SYNTAXES or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return False
    try:
        if _int_attr(ds, "SamplesPerPixel", 1) != 1:
            return False
        runner = DecodeRunner(tsuid)
        runner.set_source(ds)
        runner.validate()
        if frame is None and runner.number_of_frames != header.frames:  # the decode would get every frame
            return False
        return _probe_grey_pipeline(ds, header.photometric, runner)
    except Exception:  # noqa: BLE001 - the decode finds out and says why
        return False


#: whether the grey pipeline turned every storable value into a finite pixel (:func:`_probe_grey_pipeline`),
#: by the values it depends on; a console sends the same ones image after image
_GREY_PROBES: dict = {}
_GREY_PROBES_MAX = 256
#: Modality LUT Sequence, VOI LUT Sequence (a raw element in implicit VR has no VR to tell)
_LUT_SEQUENCES = (0x00283000, 0x00283010)
_SPECIFIC_CHARACTER_SET = 0x00080005


def _probe_grey_pipeline(ds, photometric: str, runner) -> bool:
    """Whether the decode's grey pipeline (:func:`_monochrome`: modality LUT or rescale, VOI LUT or window,
    scaling) turns every value the pixels can store into a finite pixel, without an error: it is run on
    all of them, in the type pydicom decodes them to (at most 16 bits stored: 65,536 values; False
    above). The decode's own pass covers a subset of those values (the frame's), scaled by a range inside
    theirs.

    Every attribute that pipeline reads (rescale, modality LUT, window, VOI LUT, bits, sign, photometric
    interpretation) is in group 0028, so the outcome is remembered by that group's values as encoded, with
    the transfer syntax and the character set that say how they read; a header with a LUT sequence is
    probed every time."""
    bits = runner.bits_stored
    if not 1 <= bits <= 16:
        return False
    key = [photometric, str(ds.file_meta.TransferSyntaxUID)]  # (how the raw values below read)
    for tag in ds.keys():
        if tag != _SPECIFIC_CHARACTER_SET and (tag.group != 0x0028 or tag.element == 0):
            continue
        element = ds.get_item(tag)
        if element.VR == "SQ" or tag in _LUT_SEQUENCES:
            key = None
            break
        value = element.value
        key.append((int(tag), element.VR, value if isinstance(value, bytes) else str(value)))
    key = tuple(key) if key is not None else None
    known = _GREY_PROBES.get(key) if key is not None else None  # (one read: another thread may clear it)
    if known is not None:
        return known
    dtype = np.dtype(runner.pixel_dtype)  # what pydicom decodes the stored values to (1 bit: uint8 0, 1)
    if dtype.kind == "i":
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    try:
        with np.errstate(all="ignore"):
            pixels, _ = _monochrome(np.arange(lo, hi + 1, dtype=dtype)[None], ds, photometric, table=False)
        finite = bool(np.isfinite(pixels).all())
    except Exception:  # noqa: BLE001 - the decode of some image with this header fails: no promise
        finite = False
    if key is not None:
        if len(_GREY_PROBES) >= _GREY_PROBES_MAX:
            _GREY_PROBES.clear()
        _GREY_PROBES[key] = finite
    return finite


def _decode_dicom(
    data: bytes, frame: int | None, max_pixels: int, memory: _DecodeMemory, on_decodable=None
) -> DecodedImage:
    from pydicom.pixels import apply_color_lut, pixel_array

    ds = _read_dicom(data, memory)
    header = _dicom_header(ds, frame, max_pixels, memory)
    if on_decodable is not None and _decodes_from_header(ds, header, frame):
        on_decodable(header.rows, header.cols)
    rows, cols, n_frames, photometric = header.rows, header.cols, header.frames, header.photometric
    bits_stored, meta = header.bits_stored, {**header.meta, **_technical_meta(ds)}
    try:
        arr = pixel_array(ds, index=int(frame) if n_frames > 1 else None)
    except Exception as exc:  # noqa: BLE001 - a corrupt codestream can fail in many ways
        # the exception's text can quote attribute values: only its type is reported
        raise DecodeError(f"could not decode DICOM pixel data ({header.label}): {type(exc).__name__}") from None
    if n_frames == 1 and arr.ndim >= 3 and arr.shape[0] == 1 and arr.shape[1:3] == (rows, cols):
        arr = arr[0]

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise DecodeError(f"{photometric} DICOM frame has unexpected shape {arr.shape}")
        pixels, voi = _monochrome(arr, ds, photometric)
        meta.update(voi)
    elif photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        max_value = 65535.0 if rgb.dtype == np.uint16 else 255.0
        pixels = _finish(_to_gray(rgb, "RGB"), max_value)
        meta["color_to_gray"] = "palette → BT.601 luma"
    elif photometric == "RGB" or photometric.startswith("YBR"):
        # pydicom returns YBR data converted to RGB (as_rgb=True is its default).
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DecodeError(f"{photometric} DICOM frame has unexpected shape {arr.shape}")
        pixels = _finish(_to_gray(arr, "RGB"), 2**bits_stored - 1)
        meta["color_to_gray"] = "BT.601 luma"
    else:
        raise DecodeError(f"unsupported DICOM PhotometricInterpretation {photometric!r}")

    if not np.isfinite(pixels).all():
        raise DecodeError("DICOM pixel pipeline produced NaN or Inf")
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels),
        format="dicom",
        bit_depth=bits_stored,
        sop_instance_uid=_sop_instance_uid(ds),
        meta=meta,
    )
