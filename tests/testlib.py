"""Plain helpers shared by the tests (the fixtures are in ``conftest.py``): the calibrated demo bundle,
cached phantom sets, a real GuardServer on a loopback port in a background event loop, encoded test
images and TLS certificates. No mocks: server tests send every request over gRPC.

The evidence tests run on the embedded demo bundle (``runtime/demo/bundle``, built by
``scripts/build_demo_bundle.sh``); ``GAMGUARD_TEST_BUNDLE`` points them at another calibrated bundle.
Phantom seeds here are never used by training (``derive_seed`` streams) nor by calibration
(``900_000 + seed``).
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from gamguard.runtime.bundle import BundleError, default_bundle_dir, load_manifest
from gamguard.runtime.server.background import BackgroundServer as ThreadedServer  # noqa: F401 (re-export)

TEST_ID_SEED = 7_100_001
TEST_OOD_SEED = 7_100_002
TEST_SUIT_SEED = 7_100_003
TEST_SHIFT_SEED = 7_100_004
N_ID_PER_CLASS = 150  # 600 fresh in-distribution phantoms for the false-rejection evidence


def demo_bundle_path() -> Path:
    """The calibrated demo bundle (``GAMGUARD_TEST_BUNDLE`` may point elsewhere while developing). It is
    committed: its absence or a failed hash check is a bug, not a skip."""
    path = Path(os.environ.get("GAMGUARD_TEST_BUNDLE") or default_bundle_dir())
    try:
        load_manifest(path)
    except BundleError as exc:
        pytest.fail(f"the calibrated demo bundle is needed: {exc} (rebuild it with scripts/build_demo_bundle.sh)")
    return path


@functools.lru_cache(maxsize=None)
def id_phantoms(n_per_class: int = N_ID_PER_CLASS, seed: int = TEST_ID_SEED):
    from gamguard.runtime.demo import phantoms

    images, labels = phantoms.phantom_set(n_per_class, seed, 256)
    images.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=None)
def ood_images(n_per_kind: int, seed: int = TEST_OOD_SEED, kinds: tuple[str, ...] | None = None):
    from gamguard.runtime.demo import phantoms

    images, names = phantoms.ood_set(list(kinds or phantoms.HELD_OUT_KINDS), n_per_kind, seed, 256)
    images.setflags(write=False)
    return images, np.array(names)


@functools.lru_cache(maxsize=None)
def load_guard(path: str, **kw):
    from gamguard.runtime.guard import Guard

    return Guard.from_bundle(path, threads=2, **dict(kw))


# ------------------------------------------------------------------------------------ test images


def png16(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.rint(np.clip(image, 0, 1) * 65535).astype(np.uint16))
    assert ok
    return buf.tobytes()


def phantom(stage: int, seed: int) -> np.ndarray:
    from gamguard.runtime.demo.phantoms import hand_phantom

    return hand_phantom(stage, np.random.default_rng(seed)).image


def ood(kind: str, seed: int = 0) -> np.ndarray:
    from gamguard.runtime.demo.phantoms import ood_image

    return ood_image(kind, np.random.default_rng(seed))


def dicom_bytes(tmp_path: Path, image: np.ndarray, name: str, **kw) -> bytes:
    from gamguard.runtime.demo.synth import write_dicom

    return write_dicom(tmp_path / name, image, **kw).read_bytes()


def multiframe_dicom(tmp_path: Path, image: np.ndarray) -> bytes:
    """A two-frame DICOM of ``image`` (the decoder must demand an explicit frame)."""
    import pydicom

    from gamguard.runtime.demo.synth import write_dicom

    path = write_dicom(tmp_path / "single.dcm", image)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData + ds.PixelData
    out = tmp_path / "multi.dcm"
    ds.save_as(out)
    return out.read_bytes()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims an absurd size (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------ certificates


def make_ca(tmp: Path, name: str) -> tuple[Path, Path]:
    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
        ],
        check=True,
        capture_output=True,
    )
    return crt, key


def make_cert(tmp: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    key, csr, crt, ext = tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.crt", tmp / f"{name}.ext"
    subprocess.run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={name}",
        ],
        check=True,
        capture_output=True,
    )
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca[0]),
            "-CAkey",
            str(ca[1]),
            "-CAcreateserial",
            "-out",
            str(crt),
            "-days",
            "2",
            "-extfile",
            str(ext),
        ],
        check=True,
        capture_output=True,
    )
    return crt, key
