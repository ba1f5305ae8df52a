"""Writing files so that they survive a crash: write to a temporary name, fsync, rename, fsync the folder.

After :func:`write_durably` returns, the file is complete under its final name on stable storage (as far
as the file system and disk honour fsync); after a crash at any earlier point there is either no file
under the final name or the previous one, never a partial file. Temporary files start with ``.tmp-`` and
are ignored (and cleaned) by readers.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def safe_name(uid: str) -> str:
    """A DICOM UID as a file name (UIDs are digits and dots; anything else is refused, never escaped)."""
    s = str(uid).strip().rstrip("\x00")
    if not s or len(s) > 64 or any(c not in "0123456789." for c in s) or s.startswith("."):
        raise ValueError("not a valid DICOM UID")
    return s


def remove_stale_temporaries(folder: Path) -> int:
    """Delete ``.tmp-*`` leftovers of writes a crash interrupted; returns how many."""
    n = 0
    for p in Path(folder).glob(f"{TMP_PREFIX}*"):
        try:
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
        except OSError:
            pass
    return n


def list_files(folder: Path, suffix: str) -> list[Path]:
    """Complete files ending in ``suffix``, oldest first (temporaries of writes in progress left out; a file
    removed while listing is simply not listed)."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX) or not entry.name.endswith(suffix):
            continue
        try:
            found.append((entry.stat().st_mtime_ns, entry.name))
        except FileNotFoundError:
            continue
    return [Path(folder) / name for _, name in sorted(found)]
