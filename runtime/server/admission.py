"""Admission control before decoding: a memory budget shared by every request in the decode stage.

A request holds, from its arrival until its model input is queued for the engine, its encoded bytes
and, while it is decoded, the decoder's working memory (estimated from the image header before any
pixel is decoded, :func:`gamguard.runtime.decode.decode_cost_bytes`). Both are claimed from one
:class:`MemoryBudget`; a claim that does not fit waits a moment for others to finish (a decode takes
milliseconds to a few hundred) and is then refused with :class:`~.errors.Overloaded`
(RESOURCE_EXHAUSTED), so a flood of large images is turned away at the door instead of growing the
process without limit, and small images behind it are not stuck in a long decode queue.
"""

from __future__ import annotations

import math
import threading


def _mib(n: int) -> int:
    return int(math.ceil(n / (1 << 20)))


class BudgetExceeded(Exception):
    """A claim did not fit in the budget within the wait (the data plane turns it into Overloaded)."""


class MemoryBudget:
    """Bytes claimed by requests in the decode stage, at most ``limit_bytes`` at once (thread-safe)."""

    def __init__(self, limit_bytes: int, *, wait_s: float = 1.0):
        self.limit = int(limit_bytes)
        self.wait_s = float(wait_s)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def take(self, nbytes: int, what: str, *, wait: bool = True) -> None:
        """Claim ``nbytes`` or raise :class:`BudgetExceeded` (after waiting up to ``wait_s`` if ``wait``)."""
        nbytes = int(nbytes)
        with self._cond:
            fits = lambda: self.used + nbytes <= self.limit  # noqa: E731
            if not fits() and not (wait and self.wait_s > 0 and self._cond.wait_for(fits, self.wait_s)):
                raise BudgetExceeded(
                    f"server busy: {what} needs {_mib(nbytes)} MiB of decode memory and {_mib(self.used)} of "
                    f"{_mib(self.limit)} MiB are in use (--decode-memory-mb); retry later"
                )
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def give(self, nbytes: int) -> None:
        with self._cond:
            self.used -= int(nbytes)
            self._cond.notify_all()


class Claim:
    """What one request holds in a :class:`MemoryBudget`; :meth:`release` returns all of it."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held = 0

    def take(self, nbytes: int, what: str = "this image", *, wait: bool = True) -> None:
        self.budget.take(nbytes, what, wait=wait)
        self.held += int(nbytes)

    def release(self) -> None:
        if self.held:
            self.budget.give(self.held)
            self.held = 0
