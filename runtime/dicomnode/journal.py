"""The journal: received images whose results are not built yet.

Per received content, named after its SOP Instance UID and the SHA-256 of its bytes,
``<uid>.<sha256>.dcm`` (the entry's *key* is ``<uid>.<sha256>``): the received dataset, byte for byte as
sent, written durably. The same image sent twice is one entry; other content under a SOP Instance UID
already received (a sender's error) is another entry, never written over the first, and each gets the
results of its own bytes. The C-STORE handler writes it *while* the data plane decodes the image and
queues it for the engine, and answers only after both finished: the image is on stable storage before
the console hears "success" (its verdict may come after the answer).
It first lands as ``<key>.<token>-<crc32>.incoming`` (:func:`.durable.write_checked`: file and folder
fsync'd at the same time, the folder's fsync shared by concurrent associations) and becomes
``<key>.dcm`` after the answer, once its verification has finished and its verdict is handed to the
results builder, so the builder never takes an image whose verdict is still on its way.

The verdict itself (and the small maps the overlay needs) is kept in memory by the results builder,
not written: it is derived data, and deriving it again from the image (same bundle, same verdict; one
inference, against ~0.1 s of CPU to build the results) is what happens after a restart or when more
verdicts wait than the builder keeps. Writing it beside every image cost a file write and ~1 ms of CPU
per C-STORE, and the disk's next fsync had to flush it.

Building the SR and Secondary Capture (:mod:`.results`, ~0.1–0.2 s of CPU per image with highdicom)
happens afterwards, from the journal, so it never holds up the console; after a crash or a restart
the node builds what the journal still holds (complete ``.incoming`` files found at start are taken
as received: at worst a console resends an image it got no answer for, and the deterministic result
UIDs make that harmless; one whose checksum does not match was cut short by the crash, so never
acknowledged, and is deleted). The journal holds PHI (received datasets): protect it like the archive.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .durable import (
    FolderSync,
    check_writer,
    checked_name,
    fsync_dir,
    is_complete,
    list_files,
    private_folder,
    remove_stale_temporaries,
    safe_name,
    write_checked,
    writer_of,
)

log = logging.getLogger(__name__)

SUFFIX = ".dcm"  # a received image ready for its results
INCOMING = ".incoming"  # a received image whose C-STORE is not answered yet, or whose verdict is on its way
THUMBNAIL_SIDE = 256  # the overlay panel side (gamguard.runtime.overlays.PANEL)


@dataclass
class Job:
    sop_instance_uid: str
    key: str  # the entry's key (:func:`entry_key`): the kept verdict's too
    source: bytes  # the received dataset, DICOM Part 10
    verdict: object = None  # gamguard.runtime.guard.Verdict with cam / reference_cam; None: derive it again
    thumbnail: np.ndarray | None = None  # uint8, THUMBNAIL_SIDE² grey, MONOCHROME2; None with verdict None


def entry_key(sop_instance_uid: str, data: bytes) -> str:
    """``<uid>.<sha256 hex>``: names a received content in the journal and its verdict kept in memory,
    so that a verdict is only ever used with the bytes it was computed on."""
    return f"{safe_name(sop_instance_uid)}.{hashlib.sha256(data).hexdigest()}"


def split_key(key: str) -> tuple[str, str | None]:
    """``(uid, sha256 hex)`` of an entry key; ``(uid, None)`` for a name without a digest (an entry written
    by a node before digests, ``<uid>.dcm``). A UID has only digits and dots and at most 64 characters."""
    uid, _, digest = key.rpartition(".")
    if uid and len(digest) == 64 and not digest.isdigit():
        return uid, digest
    return key, None


def thumbnail(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The decoded image (float, [0, 1]) as the overlay's ``side``² uint8 grey panel. Shrunk first: OpenCV's
    area averaging runs outside the GIL, and the clean-up (NaN to 0, ±Inf and the rest clipped to
    [0, 1]; the decoder gives none of them) then touches ``side``² pixels rather than a radiograph's
    millions, in a few calls: the C-STORE threads share the GIL with this one (a 1024² image: 2.4 ->
    0.4 ms)."""
    import cv2

    small = cv2.resize(np.asarray(pixels, np.float32), (side, side), interpolation=cv2.INTER_AREA)
    cv2.patchNaNs(small, 0.0)
    np.clip(small, 0.0, 1.0, out=small)
    return (small * 255.0 + 0.5).astype(np.uint8)


class Journal:
    def __init__(self, folder: str | Path, *, recover: bool = True, writer: str = ""):
        """``recover``: take what a previous run left (the node at its start); False for a receiver process
        (:mod:`.receiver`), which only writes incoming images into the node's journal, named for its
        ``writer`` tag (:meth:`take_incoming` takes them when that process dies)."""
        self.folder = Path(folder)
        self.writer = check_writer(writer) if writer else ""
        private_folder(self.folder)
        if recover:
            remove_stale_temporaries(self.folder)
            self.take_incoming()
        self._folder_sync = FolderSync(self.folder)

    def take_incoming(self, writer: str | None = None, skip=()) -> int:
        """Incoming images left by a crash — of the whole node (``writer`` None, at start) or of one
        receiver process that died (its ``writer`` tag) — taken as received if complete (module doc), deleted
        if cut short; ``skip``: paths being handed over right now. Returns how many were taken."""
        taken = 0
        for p in list_files(self.folder, INCOMING):
            if (writer is not None and not writer_of(p, writer)) or p in skip:
                continue
            try:
                if is_complete(p):
                    os.replace(p, self.folder / (self.incoming_key(p) + SUFFIX))
                    taken += 1
                else:
                    log.warning("journal: %s was cut short by a crash before its C-STORE was answered; deleted", p.name)
                    p.unlink()
            except FileNotFoundError:  # handed over or discarded meanwhile
                continue
        return taken

    def close(self) -> None:
        self._folder_sync.close()

    def put_source(self, sop_instance_uid: str, data: bytes) -> Path:
        """The received dataset, durably, as ``<key>.<token>-<crc32>.incoming``; returns that path for
        :meth:`release_source` / :meth:`discard_source` (:func:`incoming_key` gives its key). The token keeps
        two associations sending the same instance at the same time from renaming each other's file."""
        name = checked_name(entry_key(sop_instance_uid, data), data, INCOMING, self.writer)
        return write_checked(self.folder / name, data, self._folder_sync)

    @staticmethod
    def incoming_key(incoming: Path) -> str:
        """The entry key of a path :meth:`put_source` returned."""
        return Path(incoming).name.rsplit(".", 2)[0]

    @staticmethod
    def discard_source(incoming: Path) -> None:
        """Drop an incoming image the node refused (its C-STORE is answered with a failure)."""
        try:
            os.unlink(incoming)
        except FileNotFoundError:
            pass

    def release_source(self, incoming: Path) -> None:
        """An incoming image becomes ready for its results, as ``<key>.dcm`` (not fsync'd: at a restart an
        ``.incoming`` file is taken as received anyway). The same content received again replaces its
        entry with the same bytes."""
        os.replace(incoming, self.folder / (self.incoming_key(incoming) + SUFFIX))

    def put(self, sop_instance_uid: str, data: bytes) -> None:
        """Both at once (tests, tools)."""
        self.release_source(self.put_source(sop_instance_uid, data))

    def load(self, path: Path) -> Job:
        """The job of a ready image (its verdict is the builder's to find or derive)."""
        path = Path(path)
        key = path.name[: -len(SUFFIX)]
        return Job(sop_instance_uid=split_key(key)[0], key=key, source=path.read_bytes())

    def pending(self) -> list[Path]:
        """Images ready for their results, oldest first."""
        return list_files(self.folder, SUFFIX)

    def __len__(self) -> int:
        return len(list_files(self.folder, SUFFIX))

    def done(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fsync_dir(self.folder)
