"""The outbox: result objects (and forwarded originals) waiting for each destination, on disk.

One folder per destination, one Part 10 file per object named after its SOP Instance UID. An object is
removed from a destination's folder only after that destination answered its C-STORE with success (or
a warning); until then it stays on disk across restarts. With no destination configured, results go to
``kept/`` and stay there (the node then works as a local results store).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .durable import fsync_dir, list_files, private_folder, remove_stale_temporaries, safe_name, write_durably

SUFFIX = ".dcm"
KEPT = "kept"
UNREADABLE = "unreadable"  # entries that are not DICOM files, per destination, for an operator to look at

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, folder: str | Path, destinations: list[str]):
        self.folder = Path(folder)
        self.destinations = list(destinations) or [KEPT]
        for name in self.destinations:
            private_folder(self.folder / name)
            remove_stale_temporaries(self.folder / name)
        self._warn_orphans()

    def _warn_orphans(self) -> None:
        """Objects queued for a destination that is no longer configured (its address or AE title changed,
        or ``kept/`` from a run without destinations) are not sent anywhere: say so at start."""
        for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if not entry.is_dir() or entry.name in self.destinations or entry.name == UNREADABLE:
                continue
            waiting = len(list_files(Path(entry.path), SUFFIX))
            if waiting:
                log.warning(
                    "outbox/%s holds %d object(s) for a destination that is not configured now (%s); they are "
                    "not sent: move them into the folder of a configured destination to send them there",
                    entry.name,
                    waiting,
                    ", ".join(self.destinations),
                )

    def put_aside(self, destination: str, path: Path) -> Path:
        """Move an entry of a destination's folder that is not a readable object out of the way."""
        aside = private_folder(self.folder / UNREADABLE / destination)
        target = aside / path.name
        os.replace(path, target)
        return target

    def put(self, sop_instance_uid: str, data: bytes) -> None:
        """Queue one object for every destination (durably; replaces a queued copy with the same UID)."""
        name = f"{safe_name(sop_instance_uid)}{SUFFIX}"
        for dest in self.destinations:
            write_durably(self.folder / dest / name, data)

    def pending(self, destination: str) -> list[Path]:
        """Queued objects of one destination, oldest first."""
        return list_files(self.folder / destination, SUFFIX)

    def depth(self, destination: str) -> int:
        return len(list_files(self.folder / destination, SUFFIX))

    def delivered(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
