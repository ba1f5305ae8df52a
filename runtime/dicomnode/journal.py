"""The journal: received images whose results are not built yet, one durable file per image.

The C-STORE handler acknowledges an image only after :meth:`Journal.put` returned, i.e. after the
received dataset (byte for byte as sent), its verdict and the small maps the overlay needs are on
stable storage. Building the SR and Secondary Capture (:mod:`.results`, ~0.1 s of CPU per image with
highdicom) happens afterwards, from the journal, so it never holds up the console; after a crash or a
restart the node simply builds what the journal still holds. A job file is named after the source SOP
Instance UID: a resend of the same image replaces its job, and the results' UIDs are deterministic, so
nothing is duplicated either way.

A job file is an uncompressed ``.npz``: ``source`` (the received Part 10 bytes), ``verdict`` (JSON),
``thumbnail`` (uint8, the decoded image at overlay size) and the Grad-CAM maps. It holds PHI (the
received dataset): the journal folder needs the same protection as the archive.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .durable import fsync_dir, list_files, remove_stale_temporaries, safe_name, write_durably

SUFFIX = ".job"
THUMBNAIL_SIDE = 256  # the overlay panel side (gamguard.runtime.overlays.PANEL)


@dataclass
class Job:
    sop_instance_uid: str
    source: bytes  # the received dataset, DICOM Part 10
    verdict: object  # gamguard.runtime.guard.Verdict, with cam / reference_cam
    thumbnail: np.ndarray  # uint8, THUMBNAIL_SIDE² grey, MONOCHROME2
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

    def path_of(self, sop_instance_uid: str) -> Path:
        return self.folder / f"{safe_name(sop_instance_uid)}{SUFFIX}"

    def put(self, job: Job) -> Path:
        v = job.verdict
        arrays = {
            "source": np.frombuffer(job.source, np.uint8),
            "verdict": np.frombuffer(json.dumps(_verdict_fields(v)).encode(), np.uint8),
            "calling_ae": np.frombuffer(job.calling_ae.encode(), np.uint8),
            "thumbnail": job.thumbnail,
        }
        if v.cam is not None:
            arrays["cam"] = np.asarray(v.cam, np.float16)
        if v.reference_cam is not None:
            arrays["reference_cam"] = np.asarray(v.reference_cam, np.float16)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return write_durably(self.path_of(job.sop_instance_uid), buf.getvalue())

    def load(self, path: Path) -> Job:
        with np.load(path, allow_pickle=False) as z:
            cam = z["cam"].astype(np.float32) if "cam" in z else None
            ref = z["reference_cam"].astype(np.float32) if "reference_cam" in z else None
            verdict = _verdict_from(json.loads(z["verdict"].tobytes()), cam, ref)
            return Job(
                sop_instance_uid=Path(path).name[: -len(SUFFIX)],
                source=z["source"].tobytes(),
                verdict=verdict,
                thumbnail=z["thumbnail"],
                calling_ae=z["calling_ae"].tobytes().decode(),
            )

    def pending(self) -> list[Path]:
        """Job files, oldest first."""
        return list_files(self.folder, SUFFIX)

    def __len__(self) -> int:
        return len(list_files(self.folder, SUFFIX))

    def done(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(self.folder)
