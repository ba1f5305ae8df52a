"""Image folders on disk: the class-per-folder layout used by calibration and evaluation, and the
file/folder expansion used by ``gamguard verify FILE...`` and ``gamguard suitability --data DIR``.

Order is always deterministic (sorted names), so calibration splits and reports are reproducible.
Non-image files are ignored: anything whose extension is not an image extension (``manifest.json``,
CSV files, ...), hidden files, and segmentation masks written next to images (names containing
``.mask.``, e.g. ``0001.mask.png``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_file

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".dcm", ".dicom", ".dic"})
MASK_MARKER = ".mask."


class DatasetError(ValueError):
    """A data folder or file list is missing, empty or malformed."""


def is_image_file(path: str | Path) -> bool:
    """True for a file name with an image extension that is not hidden and not a mask."""
    name = Path(path).name
    return (
        not name.startswith(".") and MASK_MARKER not in name.lower() and Path(name).suffix.lower() in IMAGE_EXTENSIONS
    )


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by relative path; hidden folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def iter_image_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand a mix of files and folders into image files, in the order given.

    A file named explicitly is kept whatever its extension (DICOM archives often have none); a folder
    is searched recursively for image files (sorted). Duplicates are dropped. Raises
    :class:`DatasetError` for a path that does not exist or a folder without images.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = _walk_images(p)
            if not files:
                raise DatasetError(f"{p}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif p.is_file():
            files = [p]
        else:
            raise DatasetError(f"{p}: no such file or directory")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


class ImageFolder:
    """``root/<class>/**/<image>``: one sub-folder per class, class index = position in ``classes``.

    ``classes`` is the sorted list of non-hidden sub-folder names, or ``class_names`` when given (e.g.
    the bundle's class names, so indices match the model's outputs; folders for some classes may then
    be absent, but a folder whose name is not in ``class_names`` is an error). Files directly in
    ``root`` (e.g. ``manifest.json``) are ignored.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        class_names: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.root = Path(root)
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: data folder does not exist")
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if class_names is None:
            self.classes = folders
        else:
            self.classes = list(class_names)
            unknown = [f for f in folders if f not in self.classes]
            if unknown:
                raise DatasetError(
                    f"{self.root}: class folder(s) {', '.join(unknown)} not among the expected classes "
                    f"{', '.join(self.classes)}"
                )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for name in folders:
            files = _walk_images(self.root / name)
            if not files:
                empty.append(name)
            self.samples.extend((f, self.class_to_idx[name]) for f in files)
        if not folders:
            raise DatasetError(f"{self.root}: no class folders; expected the layout {self.root}/<class>/<image>.png")
        if empty and class_names is None:
            raise DatasetError(f"{self.root}: class folder(s) without images: {', '.join(empty)}")
        if not self.samples:
            raise DatasetError(f"{self.root}: no image files in any class folder")

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, classes={self.classes}, n={len(self)})"

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def load(self, i: int) -> tuple[DecodedImage, int]:
        """Decode sample ``i``; raises :class:`gamguard.runtime.decode.DecodeError` for a bad file."""
        path, label = self.samples[i]
        return decode_file(path, max_pixels=self.max_pixels), label
