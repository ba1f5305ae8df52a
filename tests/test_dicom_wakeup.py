"""The node's associations wake on events (runtime/dicomnode/wakeup.py): still pynetdicom underneath,
with real associations over loopback."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import time

import pytest
from dicomlib import phantom_dicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from gamguard.runtime.dicomnode import wakeup


@pytest.fixture
def acceptor():
    """A pynetdicom Storage SCP whose associations are made to wake on events; yields (port, hooked results,
    stored SOP Instance UIDs, server)."""
    hooked: list[bool] = []
    stored: list[str] = []

    def on_store(event):
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="WAKETEST")
    ae.add_supported_context(DigitalXRayImageStorageForPresentation)
    ae.add_supported_context(Verification)
    handlers = [
        (evt.EVT_CONN_OPEN, lambda e: hooked.append(wakeup.wake_on_events(e.assoc))),
        (evt.EVT_C_STORE, on_store),
    ]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        yield server.server_address[1], hooked, stored, server
    finally:
        server.shutdown()


def _associate(port: int):
    ae = AE(ae_title="WAKESCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="WAKETEST")
    assert assoc.is_established
    return assoc


def _until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_an_event_driven_association_echoes_stores_and_releases(acceptor, tmp_path):
    port, hooked, stored, server = acceptor
    files = [phantom_dicom(tmp_path / f"p{i}.dcm", stage=i % 3, seed=i) for i in range(5)]
    assoc = _associate(port)
    try:
        assert int(assoc.send_c_echo().Status) == 0x0000
        statuses = [int(assoc.send_c_store(str(p)).Status) for p in files]
        assert int(assoc.send_c_echo().Status) == 0x0000
    finally:
        assoc.release()
    assert hooked == [True]  # this pynetdicom is the one the hook knows: CI notices an upgrade that is not
    assert statuses == [0x0000] * 5
    assert len(stored) == 5
    assert assoc.is_released
    assert _until(lambda: not server.active_associations)  # the acceptor's threads end after the release


def test_an_idle_association_waits_for_news_instead_of_polling():
    """Held open with nothing to do, the association thread passes its reactor loop a few dozen times a
    second (every DUL_IDLE_S), not every millisecond or two as pynetdicom's polling does; a release
    still ends it."""
    passes: list[int] = []

    def hook(event):
        assert wakeup.wake_on_events(event.assoc)
        checkpoint = event.assoc._reactor_checkpoint
        wait = checkpoint.wait

        def counted(timeout=None):
            passes.append(1)
            return wait(timeout)

        checkpoint.wait = counted

    ae = AE(ae_title="WAKETEST")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, hook)])
    try:
        scu = AE(ae_title="WAKESCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="WAKETEST")
        assert assoc.is_established
        time.sleep(0.2)
        before = len(passes)
        time.sleep(1.0)
        idle_passes = len(passes) - before
        assert int(assoc.send_c_echo().Status) == 0x0000  # a message still wakes it
        assoc.release()
        assert assoc.is_released
        assert _until(lambda: not server.active_associations)
    finally:
        server.shutdown()
    # event-driven: about 1 / DUL_IDLE_S = 50 passes; pynetdicom's polling: 500 or more
    assert 0 < idle_passes < 200, idle_passes


def test_the_wake_up_pipes_are_closed_when_associations_end(acceptor):
    port, hooked, _, server = acceptor

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux) to count open files")
    for _ in range(2):  # warm: whatever pynetdicom opens once
        _associate(port).release()
    assert _until(lambda: not server.active_associations)
    gc.collect()
    before = open_fds()
    for _ in range(12):
        _associate(port).release()
    assert _until(lambda: not server.active_associations)
    gc.collect()
    assert all(hooked)
    assert open_fds() - before < 12  # two pipe ends per association would leave 24 behind


@pytest.mark.skipif(shutil.which("storescu") is None, reason="needs dcmtk's storescu: apt-get install dcmtk")
def test_dcmtk_storescu_with_nagle_on_stores_every_file(acceptor, tmp_path):
    """dcmtk's storescu keeps Nagle's algorithm on (its default): the case the quick ACKs are for. Every
    file is stored and the process exits cleanly (a hang would time out)."""
    port, hooked, stored, _ = acceptor
    files = [str(phantom_dicom(tmp_path / f"s{i}.dcm", stage=i % 3, seed=10 + i)) for i in range(8)]
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    done = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "WAKETEST", "127.0.0.1", str(port), *files],
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]
    assert len(stored) == 8
    assert hooked and all(hooked)


def test_an_association_unlike_pynetdicoms_keeps_polling_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(wakeup, "_warned", False)

    class NotAnAssociation:
        dul = None

    with caplog.at_level(logging.WARNING, logger=wakeup.__name__):
        assert wakeup.wake_on_events(NotAnAssociation()) is False
        assert wakeup.wake_on_events(NotAnAssociation()) is False
    assert [r.getMessage() for r in caplog.records].count(
        "pynetdicom's reactors are not as this node expects: its associations poll every 1 ms"
    ) == 1
