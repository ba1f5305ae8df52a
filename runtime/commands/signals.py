"""Signal handling shared by the long-running commands (`serve`, `dicom-node`)."""

from __future__ import annotations

import asyncio
import signal


def stop_event_on_signals(audit=None) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT on the running loop; SIGHUP reopens ``audit`` (an audit log,
    after logrotate has moved it) when there is one."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    if audit is not None and hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, audit.reopen)
    return stop
