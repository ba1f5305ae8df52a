"""Writing generated phantoms to disk: an ImageFolder tree plus ``manifest.json``.

Layout written by :func:`synth_dataset`::

    out_dir/
      manifest.json                 # generator, versions, seed, size, format, counts, one entry per file
      <class>/<NNNN>.png            # hand phantoms, one folder per maturity stage (CLASS_NAMES)
      <class>/<NNNN>.masks.npz      # only with masks=True: the Phantom's bool masks, one array per name
      <kind>/<NNNN>.png             # instead of classes when ``kind`` selects off-distribution generators

Images are 16-bit grayscale PNG (``uint16``, full range 0..65535 = [0, 1], MONOCHROME2) or DICOM
(:func:`write_dicom`: DX, 12 bits stored in 16). The mask files use a suffix that image loaders
(e.g. torchvision's ImageFolder) ignore. The files are identical to :func:`phantoms.phantom_set` /
:func:`phantoms.ood_set` with the same seed and size, up to 16-bit (or 12-bit) quantisation.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from .. import package_version
from . import phantoms

PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
FORMATS = ("png", "dicom")

# BodyPartExamined for the DICOM of each generator (empty where no anatomy is depicted).
_BODY_PART = {
    "knee": "KNEE",
    "chest": "CHEST",
    "cropped_hand": "HAND",
    "rotated_hand": "HAND",
    "inverted_hand": "HAND",
    "noisy_hand": "HAND",
}


def write_dicom(
    path,
    image: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    patient: dict | None = None,
    body_part: str = "HAND",
    laterality: str | None = "L",
    pixel_spacing_mm: float = 0.2,
    description: str = "gamguard synthetic phantom",
) -> Path:
    """Write one float [0, 1] MONOCHROME2 image as a DX "For Presentation" DICOM file.

    ``bits`` bits stored in 16-bit words, explicit VR little endian. ``RescaleSlope``/``Intercept``
    are identity and the VOI window spans the full stored range, so a viewer that applies modality
    LUT → VOI window → MONOCHROME1 inversion shows the same picture for either ``photometric``:
    MONOCHROME1 stores inverted values (bright = low). Patient fields are empty unless ``patient``
    (e.g. ``dict(PatientName=..., PatientID=..., PatientBirthDate=...)``) fills them, for tests of
    PHI handling.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    if not 8 <= int(bits) <= 16:
        raise ValueError(f"bits must be in 8..16, got {bits}")
    image = np.asarray(image, np.float32)
    if image.ndim != 2 or not np.isfinite(image).all():
        raise ValueError("image must be a finite 2-D array")
    max_value = (1 << int(bits)) - 1
    stored = np.rint(np.clip(image, 0.0, 1.0) * max_value).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (max_value - stored).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    now = _dt.datetime.now()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.Manufacturer = "gamguard"
    ds.SeriesDescription = description
    ds.BodyPartExamined = body_part
    if laterality:
        ds.ImageLaterality = laterality
    ds.BurnedInAnnotation = "NO"
    ds.ReferringPhysicianName = ""
    # Type 2 patient module attributes: present, empty unless the caller fills them in.
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    for key, value in (patient or {}).items():
        setattr(ds, key, value)
    ds.PatientOrientation = ""
    # set_pixel_data fills Rows/Columns/Bits*/SamplesPerPixel/PixelRepresentation and a new SOPInstanceUID
    ds.set_pixel_data(stored, photometric_interpretation=photometric, bits_stored=int(bits))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.RescaleType = "US"
    ds.WindowCenter = (max_value + 1) / 2
    ds.WindowWidth = max_value + 1
    ds.VOILUTFunction = "LINEAR"
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png16(path, image: np.ndarray) -> Path:
    """Write a float [0, 1] image as a 16-bit grayscale PNG."""
    path = Path(path)
    data = np.rint(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 65535.0).astype(np.uint16)
    if not cv2.imwrite(str(path), data):
        raise OSError(f"could not write {path}")
    return path


def synth_dataset(
    out_dir,
    *,
    per_class: int,
    seed: int,
    size: int = 256,
    kind=None,
    fmt: str = "png",
    photometric: str = "MONOCHROME2",
    masks: bool = False,
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Generate a dataset on disk (layout in the module docstring) and return its summary.

    ``kind=None`` writes hand phantoms, ``per_class`` per maturity stage; otherwise ``kind`` (an
    off-distribution kind, a list of kinds, or ``all`` / ``all-garbage`` / ``all-held-out``) writes
    ``per_class`` images per kind. ``progress(done, total)`` is called after each file.
    Refuses a non-empty ``out_dir``; with ``overwrite`` an earlier dataset of this function there is
    replaced (its files deleted first), anything else is still refused.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    if fmt == "png" and photometric != "MONOCHROME2":
        raise ValueError("PNG has no photometric tag: MONOCHROME1 output needs format 'dicom'")
    per_class, size, seed = int(per_class), int(size), int(seed)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    kinds = None if kind is None else phantoms.resolve_kinds(kind)
    if masks and kinds is not None:
        raise ValueError("masks exist for hand phantoms only; drop masks or kind")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty (--overwrite replaces a dataset written there by data synth)")
        _remove_earlier_dataset(out)

    groups = list(phantoms.CLASS_NAMES) if kinds is None else kinds
    for g in groups:
        (out / g).mkdir(parents=True, exist_ok=True)
    total = per_class * len(groups)
    ext = "png" if fmt == "png" else "dcm"
    # a provisional manifest first: a run that stops half-way leaves a folder --overwrite can replace
    planned = [
        {"file": f"{g}/{j:04d}.{ext}", **({"masks": f"{g}/{j:04d}.masks.npz"} if masks else {})}
        for g in groups
        for j in range(per_class)
    ]
    (out / "manifest.json").write_text(
        json.dumps({"generator": _GENERATOR, "complete": False, "classes": groups, "files": planned}, indent=1)
    )
    entries: list[dict] = []
    t0 = time.perf_counter()

    def write(image, rel: str, body_part: str):
        if fmt == "png":
            write_png16(out / rel, image)
        else:
            write_dicom(
                out / rel,
                image,
                photometric=photometric,
                body_part=body_part,
                laterality="L" if body_part == "HAND" else None,
            )

    if kinds is None:
        for i, ph in enumerate(phantoms.iter_phantoms(per_class, seed, size)):
            cls = phantoms.CLASS_NAMES[ph.stage]
            stem = f"{cls}/{i % per_class:04d}"
            write(ph.image, f"{stem}.{ext}", "HAND")
            entry = {"file": f"{stem}.{ext}", "label": cls, "stage": ph.stage, "params": ph.params}
            if masks:
                np.savez_compressed(out / f"{stem}.masks.npz", **ph.masks)
                entry["masks"] = f"{stem}.masks.npz"
            entries.append(entry)
            if progress:
                progress(i + 1, total)
    else:
        for i, (k, image) in enumerate(phantoms.iter_ood(kinds, per_class, seed, size)):
            stem = f"{k}/{i % per_class:04d}"
            write(image, f"{stem}.{ext}", _BODY_PART.get(k, ""))
            split = "garbage_train" if k in phantoms.GARBAGE_TRAIN_KINDS else "held_out"
            entries.append({"file": f"{stem}.{ext}", "kind": k, "split": split})
            if progress:
                progress(i + 1, total)

    manifest = {
        "generator": _GENERATOR,
        "complete": True,
        "generator_version": phantoms.GENERATOR_VERSION,
        "gamguard_version": package_version(),
        "seed": seed,
        "size": size,
        "format": fmt,
        "pixel_format": "uint16 PNG, 0..65535 = [0, 1]" if fmt == "png" else "DICOM DX, 12 bits stored",
        "photometric": photometric,
        "content": "hand_phantoms" if kinds is None else "off_distribution",
        "classes": groups,
        "counts": {g: per_class for g in groups},
        "masks": bool(masks),
        "files": entries,
    }
    if kinds is not None:
        manifest["kinds"] = {k: ("garbage_train" if k in phantoms.GARBAGE_TRAIN_KINDS else "held_out") for k in kinds}
    manifest_path = out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return {
        "out_dir": str(out),
        "manifest": str(manifest_path),
        "format": fmt,
        "photometric": photometric,
        "size": size,
        "seed": seed,
        "classes": groups,
        "counts": manifest["counts"],
        "total": total,
        "masks": bool(masks),
        "seconds": round(time.perf_counter() - t0, 3),
    }


_GENERATOR = "gamguard.runtime.demo.phantoms"
_SYNTH_FILE = re.compile(r"^[A-Za-z0-9_.-]+/[0-9]{4,}\.(png|dcm|masks\.npz)$")


def _remove_earlier_dataset(out: Path) -> None:
    """Delete an earlier :func:`synth_dataset` in ``out`` — the files its manifest lists (names of the
    form ``<group>/NNNN.<ext>``), the manifest, then its group folders — so that the new dataset is the
    only one there. Refused, deleting nothing, when ``out`` holds no such manifest or holds anything
    else (``overwrite`` never deletes or keeps a file this module did not write)."""
    refuse = f"{out} is not empty and holds more than a dataset written by data synth: use a new or empty folder"
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise ValueError(refuse) from None
    if not isinstance(manifest, dict) or manifest.get("generator") != _GENERATOR:
        raise ValueError(refuse)
    groups = {str(g) for g in manifest.get("classes") or []}
    listed = {
        rel
        for entry in manifest.get("files") or []
        if isinstance(entry, dict)
        for rel in (entry.get("file"), entry.get("masks"))
        if isinstance(rel, str) and _SYNTH_FILE.match(rel) and rel.split("/", 1)[0] in groups
    }
    present = set()
    for folder, dirs, files in os.walk(out):  # symlinks are not followed
        rel_folder = Path(folder).relative_to(out)
        if len(rel_folder.parts) > 1 or (rel_folder.parts and rel_folder.parts[0] not in groups):
            raise ValueError(refuse)
        present.update((rel_folder / f).as_posix() for f in files)
        present.update((rel_folder / d).as_posix() for d in dirs if (Path(folder) / d).is_symlink())
    if not present <= listed | {"manifest.json"}:
        raise ValueError(refuse)
    for rel in present - {"manifest.json"}:
        (out / rel).unlink()
    manifest_path.unlink()
    for group in groups:
        folder = out / group
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()


def stderr_progress(prefix: str = "synth"):
    """A progress callback printing about twenty updates to stderr."""

    def report(done: int, total: int) -> None:
        step = max(1, total // 20)
        if done == total or done % step == 0:
            print(f"{prefix}: {done}/{total}", file=sys.stderr, flush=True)

    return report
