"""Rate-limited server logging: a client sending bad requests must not be able to fill the disk.

:func:`log_limited` writes a message at most once per ``interval_s`` per key; the next line it writes
says how many were suppressed in between. A traceback (``exc_info``) is kept only on the first line of
a key, later ones carry the exception type alone.
"""

from __future__ import annotations

import logging
import threading
import time

INTERVAL_S = 10.0

_lock = threading.Lock()
_state: dict[str, list] = {}  # key -> [last written (monotonic), suppressed since, tracebacks written]


def log_limited(
    logger: logging.Logger,
    key: str,
    msg: str,
    *args,
    level: int = logging.WARNING,
    exc_info=None,
    interval_s: float = INTERVAL_S,
) -> bool:
    """Log ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago; returns whether it was."""
    now = time.monotonic()
    with _lock:
        last, suppressed, tracebacks = _state.get(key, (None, 0, 0))
        if last is not None and now - last < interval_s:
            _state[key] = [last, suppressed + 1, tracebacks]
            return False
        _state[key] = [now, 0, tracebacks + (1 if exc_info else 0)]
    if suppressed:
        msg += f" ({suppressed} similar message(s) suppressed in the last {interval_s:.0f} s)"
    logger.log(level, msg, *args, exc_info=exc_info if tracebacks == 0 else None)
    return True


class RateLimitFilter(logging.Filter):
    """A logging filter with :func:`log_limited`'s policy for records a library logs by itself (one per
    logger and level per ``interval_s``, without tracebacks, with a count of what was dropped)."""

    def __init__(self, interval_s: float = INTERVAL_S, prefix: str = ""):
        super().__init__()
        self.interval_s = interval_s
        self.prefix = prefix  # only records of loggers named so (e.g. "pydicom") are limited
        self._last: dict[tuple[str, int], list] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key, now = (record.name, record.levelno), time.monotonic()
        with _lock:
            last, dropped = self._last.get(key, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._last[key] = [last, dropped + 1]
                return False
            self._last[key] = [now, 0]
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar message(s) suppressed)"
            record.args = ()
        return True


def rate_limit_library(prefix: str) -> None:
    """Put a :class:`RateLimitFilter` for the loggers named ``prefix...`` on the root handlers (on the
    handlers: a logger's own filters do not see its children's records, pydicom.pixels...). Idempotent."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RateLimitFilter) and f.prefix == prefix for f in handler.filters):
            handler.addFilter(RateLimitFilter(prefix=prefix))


def quiet_input_libraries() -> None:
    """Keep hostile inputs from filling the server log through the libraries that parse them: pydicom
    logs a warning (sometimes a traceback) and emits a Python warning for many malformed files. Its value
    validation is switched off: each of its warnings quotes the value ("Invalid value for VR DA:
    '1961-07-04'"), a patient's birth date or name, and the server does not rely on it (the decoder and the
    result builders check what they use)."""
    import warnings

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE

    rate_limit_library("pydicom")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")


def where_raised(exc: BaseException) -> str:
    """``Type at file.py:123 in function``: where an exception came from, without its text — which, on the
    DICOM paths, can quote a header value (a patient's name or birth date) that must not reach a log."""
    import re
    import traceback

    # an operating-system error's own words ("No space left on device") name the cause and quote no data
    cause = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
    # raised in a concurrent.futures worker process: its frames exist here only as the text attached as
    # the cause (``tb``), of which the innermost "File ..., line ..., in ..." is kept, never the message
    remote = getattr(exc.__cause__, "tb", None)
    places = re.findall(r'File "([^"]*)", line (\d+), in (\S+)', remote) if isinstance(remote, str) else []
    if places:
        path, line, function = places[-1]
        return f"{type(exc).__name__}{cause} at {path.rsplit('/', 1)[-1]}:{line} in {function} (in a worker process)"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__ + cause
    last = frames[-1]
    return f"{type(exc).__name__}{cause} at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"
