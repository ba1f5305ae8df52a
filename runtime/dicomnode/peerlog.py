"""pynetdicom's log lines about how peers close their connections, made fit for an operator's log.

pynetdicom logs an ERROR and a traceback ("Connection closed before the entire PDU was received",
``ConnectionResetError``) whenever the peer's TCP connection ends with a reset instead of an orderly
close. After an association is released that is a normal end: the upper layer is then in state Sta13,
"awaiting transport connection close" (PS3.8 9.2), and several DICOM stacks close that way (the RSNA
Central Test Node's ``send_image`` does, after every association). A node that logs an error with a
traceback for each image a console sends buries its real errors, so :func:`quiet_peer_closes` drops those
records. A connection that ends *during* an association (a console powered off mid-transfer) is still
logged — once per 10 s at most and without the traceback, like the other input libraries'
(:class:`~gamguard.runtime.server.quietlog.RateLimitFilter`): a peer cannot fill the disk by resetting
connections — and it is counted as aborted in the metrics.
"""

from __future__ import annotations

import logging
import threading

#: the DICOM upper layer's state after the association is released, until the transport closes
AWAITING_TRANSPORT_CLOSE = "Sta13"
DUL_LOGGER = "pynetdicom.dul"


class ClosedAfterReleaseFilter(logging.Filter):
    """Drops the DUL's ERROR records (and their tracebacks) logged while its association is in
    :data:`AWAITING_TRANSPORT_CLOSE`. pynetdicom logs them from the DUL's own thread (a
    ``DULServiceProvider``), whose state machine says where the association is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        machine = getattr(threading.current_thread(), "state_machine", None)
        return getattr(machine, "current_state", None) != AWAITING_TRANSPORT_CLOSE


def quiet_peer_closes(rate_limit: bool = True) -> None:
    """Install :class:`ClosedAfterReleaseFilter` on pynetdicom's DUL logger and, with ``rate_limit`` (not
    when debugging: it would thin out pynetdicom's debug lines too), rate-limit pynetdicom's other records
    on the root handlers. Idempotent."""
    from gamguard.runtime.server.quietlog import rate_limit_library

    dul = logging.getLogger(DUL_LOGGER)
    if not any(isinstance(f, ClosedAfterReleaseFilter) for f in dul.filters):
        dul.addFilter(ClosedAfterReleaseFilter())
    if rate_limit:
        rate_limit_library("pynetdicom")
