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
from pathlib import Path

from .server.codecs import serialize_bytes
from .server.grpc_inference import INPUT_NAME


def input_data(files, input_name: str = INPUT_NAME) -> dict:
    """perf_analyzer's ``--input-data`` JSON for ``files`` (encoded images): one step per file."""
    steps = []
    for f in files:
        raw = serialize_bytes([Path(f).read_bytes()])  # one BYTES element, length-prefixed
        steps.append({input_name: {"b64": base64.b64encode(raw).decode("ascii")}})
    return {"data": steps}
