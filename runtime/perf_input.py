"""Input files for Triton's perf_analyzer (``--input-data FILE``): real images, as a client sends them.

perf_analyzer's default input is random data for every input the model declares, which a guarded
model refuses (random bytes are not an image, and gamguard's four input forms are alternatives: a
request carries exactly one). Given a JSON file it sends, step after step, the tensors the file
holds. :func:`input_data` writes each image as gamguard's ``image`` input (BYTES: the encoded file as
it is — PNG, JPEG or DICOM, as a console or PACS client sends it).

Format (perf_analyzer's "Real Input Data"): ``{"data": [{"image": {"b64": ...}}, ...]}``. perf_analyzer
sends a ``b64`` value as the tensor's raw bytes, and the raw form of a BYTES tensor is, per element,
its length as 4 bytes little-endian followed by its bytes (KServe v2 / Triton binary tensor format):
so each image is the base64 of that length-prefixed form. The file's bytes alone would be refused
as a "malformed BYTES tensor".
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

#: file name endings taken from a folder (any file named explicitly is taken as it is)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
INPUT_NAME = "image"


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (preamble + ``DICM``), whatever its name: files from consoles often have none."""
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def image_files(paths) -> list[Path]:
    """Files named in ``paths`` as they are, and in the folders among them (recursively, sorted) the
    files ending in :data:`IMAGE_SUFFIXES` or holding a DICOM preamble. Raises FileNotFoundError for a
    path that does not exist."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(f)):
                    files.append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def bytes_element(data: bytes) -> bytes:
    """One BYTES tensor element in its raw form: 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(data)) + data


def input_data(files, input_name: str = INPUT_NAME) -> dict:
    """perf_analyzer's ``--input-data`` JSON for ``files`` (encoded images): one step per file."""
    steps = []
    for f in files:
        raw = Path(f).read_bytes()
        steps.append({input_name: {"b64": base64.b64encode(bytes_element(raw)).decode("ascii")}})
    return {"data": steps}
