"""Wake pynetdicom's reactor threads on events instead of after fixed 1 ms sleeps.

Each pynetdicom association runs two polling loops (pynetdicom 3.x):

* the DUL thread moves PDUs between the socket and the queues and sleeps ``_run_loop_delay`` (1 ms)
  whenever a pass found nothing to do. Bytes the console sends wait there until the sleep ends, and
  so does the node's C-STORE answer, queued by the association thread;
* the association thread sleeps 1 ms at the top of every pass before it looks for a complete DIMSE
  message (the next C-STORE to serve).

At one association that is about 1.2 ms of waiting per image out of ~2.9 ms of transport with dcmtk's
``storescu`` (`gamguard bench`, ``dicom_efficiency``). :func:`wake_on_events` makes one acceptor
association wait on what it waits for:

* the DUL's idle sleep becomes a ``select`` on its socket and on a wake-up pipe, written to when the
  association thread queues a primitive to send or stops the DUL; what neither covers (the ARTIM
  timer) is checked at least every :data:`DUL_IDLE_S`;
* the association's pass waits for a DIMSE message or for a primitive the DUL received (the peer's
  release or abort request) before it checks whether it is paused; what neither brings (the DUL
  thread ending, the network timeout) is checked at least every :data:`DUL_IDLE_S`. pynetdicom's own
  1 ms sleep at the top of each pass stays.

It reaches into pynetdicom's internals, as :mod:`.pdulimit` does (``assoc.dul``, ``dul.socket``,
``dul.to_provider_queue``, ``dul.to_user_queue``, ``dul._run_loop_delay``, ``dul._kill_thread``,
``assoc.dimse.msg_queue``, ``assoc._reactor_checkpoint``): where one is not as expected (another
pynetdicom version) the association keeps pynetdicom's polling, which is logged once. The order of
pynetdicom's checks is unchanged; only the waits between them end earlier.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import weakref

log = logging.getLogger(__name__)

#: the longest an idle DUL or association thread waits without an event (the DUL's ARTIM timer, the
#: association's network timeout and its DUL thread's end are checked at least this often)
DUL_IDLE_S = 0.02
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux
_warned = False


def wake_on_events(assoc) -> bool:
    """Make one acceptor association wake on events, before its threads start (pynetdicom's
    ``EVT_CONN_OPEN``). False, logged once, where pynetdicom is not as this expects: the association
    then polls as pynetdicom does."""
    global _warned
    dul = getattr(assoc, "dul", None)
    messages = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    state = getattr(dul, "__dict__", {})
    if (
        dul is None
        or dul.is_alive()
        or not isinstance(state.get("_run_loop_delay"), float)
        or not isinstance(state.get("_kill_thread"), bool)
        or type(state.get("to_provider_queue")) is not queue.Queue
        or not state["to_provider_queue"].empty()  # an acceptor not started has sent nothing yet
        or type(state.get("to_user_queue")) is not queue.Queue
        or not state["to_user_queue"].empty()  # ... nor received anything
        or not isinstance(messages, queue.Queue)
        or type(checkpoint) is not threading.Event
    ):
        if not _warned:
            _warned = True
            log.warning("pynetdicom's reactors are not as this node expects: its associations poll every 1 ms")
        return False
    try:
        wake_r, wake_w = os.pipe()
    except OSError as exc:  # e.g. out of file descriptors: this association polls, as pynetdicom does
        log.warning("cannot create an association's wake-up pipe (%s): it polls every 1 ms", exc.strerror or exc)
        return False
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    weakref.finalize(dul, _close, wake_r, wake_w)

    def wake() -> None:
        try:
            os.write(wake_w, b"\0")
        except OSError:  # the pipe is full (the DUL wakes anyway) or closed (the association has ended)
            pass

    base = type(dul)
    if base not in _dul_classes:
        _dul_classes[base] = _event_driven_dul(base)
    delay, killed = state.pop("_run_loop_delay"), state.pop("_kill_thread")
    dul.__class__ = _dul_classes[base]
    state.update(_gamguard_delay=delay, _gamguard_killed=killed, _gamguard_wake_r=wake_r, _gamguard_wake=wake)
    dul.to_provider_queue = _WakingQueue(wake)
    dul.to_user_queue = _WakingQueue(lambda: _notify(messages))
    assoc._reactor_checkpoint = _MessageCheckpoint(messages, dul.to_user_queue, checkpoint.is_set())
    return True


def _notify(messages: queue.Queue) -> None:
    """Wake the association thread waiting in :meth:`_MessageCheckpoint.wait`."""
    with messages.not_empty:
        messages.not_empty.notify_all()


class _WakingQueue(queue.Queue):
    """A queue whose put also wakes its reader: the DUL thread (primitives to send) or the association
    thread (primitives received: release and abort requests)."""

    def __init__(self, wake):
        super().__init__()
        self._wake = wake

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        self._wake()


def _event_driven_dul(base: type) -> type:
    """A subclass of pynetdicom's DUL class ``base`` (set on the instance, whose state it keeps). Its
    reactor reads ``_run_loop_delay`` only right before its idle sleep: reading it there waits for the
    socket or the wake-up pipe and returns 0, so the sleep that follows is none. Setting
    ``_kill_thread`` (the DUL being stopped) wakes it."""

    class EventDrivenDUL(base):
        @property
        def _run_loop_delay(self) -> float:
            delay = self.__dict__["_gamguard_delay"]
            if threading.current_thread() is not self:  # stop_dul waiting for this thread to end
                return delay
            self._gamguard_idle_wait()
            return 0.0

        @_run_loop_delay.setter
        def _run_loop_delay(self, value: float) -> None:
            self.__dict__["_gamguard_delay"] = value

        @property
        def _kill_thread(self) -> bool:
            return self.__dict__["_gamguard_killed"]

        @_kill_thread.setter
        def _kill_thread(self, value: bool) -> None:
            self.__dict__["_gamguard_killed"] = value
            if value:
                self.__dict__["_gamguard_wake"]()

        def _gamguard_idle_wait(self) -> None:
            wake_r = self.__dict__["_gamguard_wake_r"]
            raw = getattr(getattr(self, "socket", None), "socket", None)  # AssociationSocket -> socket
            if raw is None:  # not connected (any more): pynetdicom's own pace
                select.select([wake_r], [], [], self.__dict__["_gamguard_delay"])
                return
            pending = getattr(raw, "pending", None)  # TLS: decrypted bytes that select() cannot see
            if pending is not None and pending():
                return
            try:
                _quick_ack(raw)
                readable, _, _ = select.select([raw, wake_r], [], [], DUL_IDLE_S)
            except (OSError, ValueError):  # the socket closed under us: pynetdicom's pace until it notices
                readable, _, _ = select.select([wake_r], [], [], self.__dict__["_gamguard_delay"])
            if wake_r in readable:
                try:
                    os.read(wake_r, 4096)
                except OSError:
                    pass

    EventDrivenDUL.__name__ = EventDrivenDUL.__qualname__ = f"EventDriven{base.__name__}"
    return EventDrivenDUL


_dul_classes: dict[type, type] = {}


class _MessageCheckpoint(threading.Event):
    """The association's reactor checkpoint (set: running; clear: paused by a local request). Its pass
    calls ``wait()`` right before it looks for a DIMSE message and for the peer's release or abort
    request: this first waits, up to :data:`DUL_IDLE_S`, for a message or a primitive from the DUL
    (both queues wake it; so does ``set()``, which pynetdicom calls when it kills the association),
    then keeps pynetdicom's meaning (blocks while paused). What arrives by neither (the DUL thread
    ending, the network timeout) is seen within that wait."""

    def __init__(self, messages: queue.Queue, received: queue.Queue, running: bool):
        super().__init__()
        self._messages = messages
        self._received = received
        if running:
            self.set()

    def wait(self, timeout=None):
        with self._messages.not_empty:
            if not self._messages.queue and not self._received.queue and self.is_set():
                self._messages.not_empty.wait(DUL_IDLE_S)
        return super().wait(timeout)

    def set(self):
        super().set()
        _notify(self._messages)


def _quick_ack(sock) -> None:
    """Acknowledge the peer's next segments at once (Linux ``TCP_QUICKACK``; the kernel drops back to
    delayed ACKs by itself, hence set again before every wait). A console whose stack keeps Nagle's
    algorithm on (dcmtk's default) holds the second small write of a PDU until the first is
    acknowledged; with the node's ACK delayed that stalls a C-STORE for ~40 ms (over 10 % of images with
    ``storescu`` once the node answers without polling delays; now and then before)."""
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
