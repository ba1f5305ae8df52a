"""Enforce ``--max-pdu`` on what peers send, before the bytes are read.

The node announces its maximum P-DATA length at association (``--max-pdu``), but pynetdicom reads every
PDU whole — the 6-byte header, then as many bytes as the header announces — before anything looks at
it: a peer that announces 1 GiB makes the node buffer 1 GiB. :func:`limit_pdu_lengths` wraps one
association's socket so that the body of a PDU announcing more than allowed is never read: the read
fails as if the connection had dropped, and pynetdicom closes the association (Evt17).

Limits (PS3.8 9.3): a P-DATA-TF PDU's variable field may not exceed the maximum length the node
announced; any other PDU (association request, release, abort) is small — at most
:data:`MAX_OTHER_PDU` bytes.

The same wrapper reads a PDU's body with as few calls as the kernel allows: pynetdicom's own read asks
the socket for 4 KiB at a time, so a 10 MB radiograph took some 2,500 calls, each giving up and taking
back the GIL that every association and the inference share. Here each call fills the rest of one
preallocated buffer (``recv_into``: whatever the socket holds, up to the PDU's end), with pynetdicom's
semantics otherwise: a closed connection returns what was read so far, a timeout or error raises.

This reaches into pynetdicom's association (``assoc.dul.socket.recv``, the only place it reads PDUs, and
``assoc.dul.socket.socket``, the connected socket, pynetdicom 3.x): without the first the limit cannot
be enforced, which is logged once; without the second PDUs are read by pynetdicom's own ``recv``.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
#: the largest non-P-DATA PDU accepted: an association request with a few hundred presentation contexts
MAX_OTHER_PDU = 1 << 20
#: bytes beyond the announced maximum still read, for peers that count a PDU's header or item headers in it
PDATA_SLACK = 64
_warned = False


class PduTooLarge(OSError):
    """A peer announced a PDU larger than the node accepts (no patient data: lengths only)."""


def limit_pdu_lengths(assoc, max_pdata: int) -> bool:
    """Make ``assoc`` refuse PDUs longer than allowed (``max_pdata``: the P-DATA limit, 0 = none); False
    when pynetdicom's socket is not where this expects it (then nothing is enforced)."""
    global _warned
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    recv = getattr(sock, "recv", None)
    if recv is None:
        if not _warned:
            _warned = True
            log.warning("cannot enforce --max-pdu on received PDUs with this pynetdicom version")
        return False
    pending_type: list[int | None] = [None]

    def checked_recv(nr_bytes: int):
        if nr_bytes == 6:  # a PDU header: type, reserved, length
            header = recv(6)
            pending_type[0] = header[0] if len(header) == 6 else None
            return header
        limit = (max_pdata + PDATA_SLACK if max_pdata else None) if pending_type[0] == P_DATA_TF else MAX_OTHER_PDU
        pending_type[0] = None
        if limit is not None and nr_bytes > limit:
            raise PduTooLarge(f"a PDU of {nr_bytes} bytes was announced; at most {limit} are accepted")
        connection = getattr(sock, "socket", None)
        if not hasattr(connection, "recv_into"):  # not where pynetdicom 3.x keeps it: its own read
            return recv(nr_bytes)
        return read_whole(connection, nr_bytes)

    sock.recv = checked_recv
    return True


def read_whole(connection, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from ``connection`` (a socket, plain or TLS), or fewer if the peer closes first — what
    pynetdicom's ``AssociationSocket.recv`` returns, without its 4 KiB steps."""
    data = bytearray(nr_bytes)
    view = memoryview(data)
    got = 0
    while got < nr_bytes:
        n = connection.recv_into(view[got:], nr_bytes - got)
        if not n:  # the peer closed: pynetdicom then reports the PDU cut short
            view.release()
            del data[got:]
            return data
        got += n
    return data
