"""A minimal receiving archive: a pynetdicom Storage SCP on loopback that keeps what it is sent.

Stands in for the PACS in ``gamguard demo --dicom`` and ``gamguard bench`` (no network, no Orthanc
needed). It accepts every storage SOP class, writes each object to ``folder/<SOP Instance UID>.dcm``
(a second store of the same UID replaces the first, as a PACS would keep one instance) and can be
stopped and started on the same port to play an archive that is down for a while.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .durable import safe_name


class ReceivingArchive:
    def __init__(self, folder: str | Path, *, ae_title: str = "ARCHIVE", host: str = "127.0.0.1", port: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.stores = 0  # C-STORE requests answered with success (resends included)
        self._server = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)

    @property
    def address(self) -> str:
        """``AET@HOST:PORT``, as ``--forward`` takes it."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    def start(self) -> "ReceivingArchive":
        from pydicom.uid import (
            JPEG2000,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            JPEG2000Lossless,
            JPEGBaseline8Bit,
            JPEGLosslessSV1,
            RLELossless,
        )
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.presentation import build_context

        ae = AE(ae_title=self.ae_title)

        syntaxes = [
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            JPEG2000Lossless,
            JPEG2000,
            JPEGBaseline8Bit,
            JPEGLosslessSV1,
            RLELossless,
        ]
        ae.supported_contexts = [build_context(cx.abstract_syntax, syntaxes) for cx in AllStoragePresentationContexts]
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "ReceivingArchive":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _on_store(self, event) -> int:
        try:
            name = safe_name(str(event.request.AffectedSOPInstanceUID))
        except ValueError:
            return 0xC000
        (self.folder / f"{name}.dcm").write_bytes(event.encoded_dataset())
        with self._arrived:
            self.stores += 1
            self._arrived.notify_all()
        return 0x0000

    def instances(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))

    def wait_for(self, n: int, timeout: float) -> bool:
        """Until at least ``n`` distinct instances are stored (True) or ``timeout`` seconds passed (False)."""
        import time

        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.instances()) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(min(left, 0.5))
        return True
