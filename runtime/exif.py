"""EXIF orientation of JPEG and PNG files: read the tag from the bytes and turn pixels upright.

A camera or a phone (and some scanning consoles) store a sideways image plus an EXIF ``Orientation``
tag (TIFF tag 274) saying how to display it; viewers honour it, so the image a clinician saw is the
oriented one. The model must see the same: an upright radiograph tagged as rotated would otherwise be
judged sideways (and rejected), a correctly tagged sideways one judged upright.

Only the tag is parsed (TIFF header, IFD0), with every offset bounds-checked: the rest of the EXIF
block (which can carry camera serials, GPS, dates) is never read.
"""

from __future__ import annotations

import struct

import numpy as np

ORIENTATION_TAG = 274
_EXIF_HEADER = b"Exif\x00\x00"


def tiff_orientation(tiff: bytes) -> int | None:
    """The Orientation (1..8) in a TIFF/EXIF block's IFD0, or None when absent or malformed."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    if struct.unpack(order + "H", tiff[2:4])[0] != 42:
        return None
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        tag, kind, n = struct.unpack(order + "HHI", tiff[entry : entry + 8])
        if tag == ORIENTATION_TAG:
            if kind != 3 or n != 1:  # SHORT, one value (inline, first two bytes of the value field)
                return None
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return int(value) if 1 <= value <= 8 else None
    return None


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF Orientation of a JPEG (APP1 "Exif" segment before the first scan), or None."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF after this
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(_EXIF_HEADER):
            return tiff_orientation(segment[len(_EXIF_HEADER) :])
        pos += 2 + length
    return None


def png_orientation(data: bytes) -> int | None:
    """The EXIF Orientation of a PNG (``eXIf`` chunk, PNG 1.5), or None."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            return tiff_orientation(data[pos + 8 : pos + 8 + length])
        if kind in (b"IDAT", b"IEND"):  # eXIf must come before the image data
            return None
        pos += 12 + length
    return None


def apply_orientation(image: np.ndarray, orientation: int | None) -> np.ndarray:
    """Turn a 2-D image stored with EXIF ``orientation`` upright (as a viewer displays it).

    1 upright, 2 mirrored, 3 rotated 180°, 4 flipped vertically, 5 transposed, 6 needs 90° clockwise,
    7 transversed, 8 needs 90° counter-clockwise. None or 1: the image itself.
    """
    if orientation in (None, 1):
        return image
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: a.T,
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].T,
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(transforms[int(orientation)](image))
