"""A received C-STORE dataset as a DICOM file: pynetdicom's ``event.encoded_dataset()``, cheaper.

pynetdicom prefixes the dataset as sent with a preamble and File Meta Information that it builds as a
pydicom ``FileMetaDataset`` and encodes, on every C-STORE: about 0.2 ms of pure Python, held under the
GIL that every association and the inference share. Those bytes depend on the SOP class, the transfer
syntax and the SOP Instance UID, and the UID only fills its own value field. So they are encoded once
per (class, transfer syntax, UID length) by pynetdicom's own functions with two placeholder UIDs of that
length; the bytes where the two encodings differ are the UID's field, and each C-STORE writes its UID
there: the very bytes pynetdicom would return (tests/test_dicom_node.py holds them equal). A UID that is
not plain ASCII digits and dots (a malformed request) takes pynetdicom's own path.
"""

from __future__ import annotations

import re

_PLAIN_UID = re.compile(r"[0-9.]{1,64}")
_PREAMBLE = b"\x00" * 128 + b"DICM"
#: (class, transfer syntax, UID length) -> (preamble and meta before the UID field, meta after it), or None
#: where pynetdicom's encoding does not hold the UID as one field (then its own path is taken)
_templates: dict[tuple[str, str, int], tuple[bytes, bytes] | None] = {}


def encoded_dataset(event) -> bytes:
    """``event.encoded_dataset()`` (preamble, File Meta Information and the dataset as sent) of a C-STORE
    ``event``."""
    request = event.request
    uid = str(request.AffectedSOPInstanceUID or "")
    if not _PLAIN_UID.fullmatch(uid):
        return event.encoded_dataset()
    template = _template(str(request.AffectedSOPClassUID), str(event.context.transfer_syntax), len(uid))
    if template is None:
        return event.encoded_dataset()
    head, tail = template
    return b"".join((head, uid.encode("ascii"), tail, event.encoded_dataset(include_meta=False)))


def _template(sop_class: str, transfer_syntax: str, n: int) -> tuple[bytes, bytes] | None:
    key = (sop_class, transfer_syntax, n)
    if key not in _templates:
        first, second = (_meta(sop_class, transfer_syntax, digit * n) for digit in "12")
        differ = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
        one_field = len(first) == len(second) and differ == list(range(differ[0], differ[0] + n))
        _templates[key] = (_PREAMBLE + first[: differ[0]], first[differ[0] + n :]) if one_field else None
    return _templates[key]


def _meta(sop_class: str, transfer_syntax: str, uid: str) -> bytes:
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(uid), transfer_syntax=UID(transfer_syntax)
    )
    return encode_file_meta(meta)
