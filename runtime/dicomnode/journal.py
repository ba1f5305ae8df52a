"""The journal: received images whose results are not built yet.

Per image, named after its SOP Instance UID:

* ``<uid>.dcm`` — the received dataset, byte for byte as sent, written durably. The C-STORE handler
  writes it *while* the data plane verifies the image and acknowledges only after both finished: the
  image is on stable storage before the console hears "success". It first lands as
  ``<uid>.<token>-<crc32>.incoming`` (:func:`.durable.write_checked`: file and folder fsync'd at the same
  time, the folder's fsync shared by concurrent associations) and becomes ``<uid>.dcm`` once its verdict
  is written, so the builder never takes an image whose verdict is still on its way;
* ``<uid>.verdict`` — the verdict and the small maps the overlay needs (an uncompressed ``.npz``:
  ``verdict`` JSON, ``thumbnail``, Grad-CAM maps, calling AE title). Written atomically but not
  fsync'd, and after the C-STORE was answered: after a crash it may be missing, and the verdict is then
  derived again from the image (same bundle, same verdict), which costs one inference instead of an
  fsync and a file write on every C-STORE's path.

Building the SR and Secondary Capture (:mod:`.results`, ~0.1–0.2 s of CPU per image with highdicom)
happens afterwards, from the journal, so it never holds up the console; after a crash or a restart
the node builds what the journal still holds (complete ``.incoming`` files found at start are taken
as received: at worst a console resends an image it got no answer for, and the deterministic result
UIDs make that harmless; one whose checksum does not match was cut short by the crash, so never
acknowledged, and is deleted). The journal holds PHI (received datasets): protect it like the archive.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .durable import (
    TMP_PREFIX,
    FolderSync,
    checked_name,
    fsync_dir,
    is_complete,
    list_files,
    remove_stale_temporaries,
    safe_name,
    write_checked,
)

log = logging.getLogger(__name__)

SUFFIX = ".dcm"  # a received image ready for its results
INCOMING = ".incoming"  # a received image whose verdict is not written yet
VERDICT = ".verdict"
THUMBNAIL_SIDE = 256  # the overlay panel side (gamguard.runtime.overlays.PANEL)


@dataclass
class Job:
    sop_instance_uid: str
    source: bytes  # the received dataset, DICOM Part 10
    verdict: object  # gamguard.runtime.guard.Verdict with cam / reference_cam; None: derive it again
    thumbnail: np.ndarray | None  # uint8, THUMBNAIL_SIDE² grey, MONOCHROME2; None with verdict None
    calling_ae: str = ""


def thumbnail(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    import cv2

    img = np.clip(np.nan_to_num(np.asarray(pixels, np.float32)), 0.0, 1.0)
    return (cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA) * 255.0 + 0.5).astype(np.uint8)


def _verdict_fields(v) -> dict:
    d = v.to_dict()
    d.pop("timings_ms", None)
    d["predicted_index"] = v.predicted_index
    d["reference_index"] = v.reference_index
    return d


def _verdict_from(fields: dict, cam, reference_cam):
    from gamguard.runtime.guard import Verdict

    return Verdict(
        accepted=bool(fields["accepted"]),
        label=fields["label"],
        label_index=fields["label_index"],
        probabilities=fields["probabilities"],
        reasons=list(fields["reasons"]),
        failed_measures=list(fields["failed_measures"]),
        scores={k: (float("nan") if v is None else float(v)) for k, v in fields["scores"].items()},
        thresholds={k: (float("nan") if v is None else float(v)) for k, v in fields["thresholds"].items()},
        cam=cam,
        reference_cam=reference_cam,
        predicted_index=fields.get("predicted_index"),
        detail=fields.get("detail", ""),
        reference_index=fields.get("reference_index"),
    )


class Journal:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        for p in list_files(self.folder, INCOMING):  # received before a crash: kept if complete (module doc)
            if is_complete(p):
                os.replace(p, self._path(p.name.rsplit(".", 2)[0], SUFFIX))
            else:
                log.warning("journal: %s was cut short by a crash before its C-STORE was answered; deleted", p.name)
                p.unlink()
        self._folder_sync = FolderSync(self.folder)

    def close(self) -> None:
        self._folder_sync.close()

    def _path(self, sop_instance_uid: str, suffix: str) -> Path:
        return self.folder / f"{safe_name(sop_instance_uid)}{suffix}"

    def put_source(self, sop_instance_uid: str, data: bytes) -> Path:
        """The received dataset, durably, as ``<uid>.<token>-<crc32>.incoming``; returns that path for
        :meth:`put_verdict` / :meth:`discard_source`. The token keeps two associations sending the same
        instance at the same time from renaming each other's file."""
        name = checked_name(safe_name(sop_instance_uid), data, INCOMING)
        return write_checked(self.folder / name, data, self._folder_sync)

    @staticmethod
    def discard_source(incoming: Path) -> None:
        """Drop an incoming image the node refused (its C-STORE is answered with a failure)."""
        try:
            os.unlink(incoming)
        except FileNotFoundError:
            pass

    def put_verdict(
        self, sop_instance_uid: str, incoming: Path, verdict, thumbnail_u8: np.ndarray, calling_ae: str = ""
    ) -> None:
        """The verdict beside its image (atomic, not fsync'd), then the image becomes ready for building."""
        v = verdict
        arrays = {
            "verdict": np.frombuffer(json.dumps(_verdict_fields(v)).encode(), np.uint8),
            "calling_ae": np.frombuffer(calling_ae.encode(), np.uint8),
            "thumbnail": np.asarray(thumbnail_u8, np.uint8),
        }
        if v.cam is not None:
            arrays["cam"] = np.asarray(v.cam, np.float16)
        if v.reference_cam is not None:
            arrays["reference_cam"] = np.asarray(v.reference_cam, np.float16)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = self._path(sop_instance_uid, VERDICT)
        tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")  # unique: same-UID writers race
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        self.release_source(sop_instance_uid, incoming)

    def release_source(self, sop_instance_uid: str, incoming: Path) -> None:
        """An incoming image becomes ready for its results (with or without its verdict file)."""
        os.replace(incoming, self._path(sop_instance_uid, SUFFIX))

    def put(self, job: Job) -> None:
        """Both at once (tests, tools): the image durably, then its verdict."""
        incoming = self.put_source(job.sop_instance_uid, job.source)
        self.put_verdict(job.sop_instance_uid, incoming, job.verdict, job.thumbnail, job.calling_ae)

    def load(self, path: Path) -> Job:
        """The job of a ready image; ``verdict`` None when its verdict file is missing or unreadable."""
        path = Path(path)
        uid = path.name[: -len(SUFFIX)]
        verdict, thumb, calling_ae = None, None, ""
        try:
            with np.load(path.with_suffix(VERDICT), allow_pickle=False) as z:
                cam = z["cam"].astype(np.float32) if "cam" in z else None
                ref = z["reference_cam"].astype(np.float32) if "reference_cam" in z else None
                verdict = _verdict_from(json.loads(z["verdict"].tobytes()), cam, ref)
                thumb, calling_ae = z["thumbnail"], z["calling_ae"].tobytes().decode()
        except (OSError, ValueError, KeyError):  # missing after a crash, or torn: derive it again
            verdict, thumb = None, None
        return Job(
            sop_instance_uid=uid, source=path.read_bytes(), verdict=verdict, thumbnail=thumb, calling_ae=calling_ae
        )

    def pending(self) -> list[Path]:
        """Images ready for their results, oldest first."""
        return list_files(self.folder, SUFFIX)

    def __len__(self) -> int:
        return len(list_files(self.folder, SUFFIX))

    def done(self, path: Path) -> None:
        path = Path(path)
        for p in (path.with_suffix(VERDICT), path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        fsync_dir(self.folder)
