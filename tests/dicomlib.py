"""Helpers of the DICOM node tests: input DICOMs, an Orthanc started on loopback with its own config and
storage, and the third-party tools (dcmtk, dicom3tools), each test skipping with the package to install."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

APT_HINT = "apt-get install dcmtk orthanc dicom3tools pixelmed-apps ctn"


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {package}; {APT_HINT})")
    return path


def orthanc_binary() -> str:
    for name in ("Orthanc", "orthanc"):
        path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        if path:
            return path
    pytest.skip(f"Orthanc not installed (Debian package orthanc; {APT_HINT})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """Orthanc with its own config, storage folder and loopback HTTP port (no system service, no plugins)."""

    def __init__(
        self, folder: Path, *, dicom_port: int | None = None, ae_title: str = "ARCHIVE", tls: dict | None = None
    ):
        """``tls``: DICOM TLS on the DICOM port, ``{"cert", "key", "ca"}`` PEM paths (Orthanc then requires
        a client certificate signed by ``ca``)."""
        self.tls = tls
        self.folder = Path(folder)
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"

    def start(self) -> "Orthanc":
        binary = orthanc_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "gamguard-test-archive",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
        }
        if self.tls:
            config.update(
                DicomTlsEnabled=True,
                DicomTlsCertificate=str(self.tls["cert"]),
                DicomTlsPrivateKey=str(self.tls["key"]),
                DicomTlsTrustedCertificates=str(self.tls["ca"]),
                DicomTlsRemoteCertificateRequired=True,
            )
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.folder / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def put(self, path: str, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), method="PUT")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def post_bytes(self, path: str, data: bytes):
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def instance_ids(self, modality: str) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": {"Modality": modality}})

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def datasets(self, modality: str) -> list:
        import io

        import pydicom

        return [pydicom.dcmread(io.BytesIO(self.file(i))) for i in self.instance_ids(modality)]

    def wait_for(self, modality: str, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            count = len(self.instance_ids(modality))
            if count >= n or time.monotonic() > deadline:
                return count
            time.sleep(0.5)


# ------------------------------------------------------------------------------------------ inputs


def phantom_dicom(path: Path, stage: int, seed: int, **kw) -> Path:
    from gamguard.runtime.demo import phantoms
    from gamguard.runtime.demo.synth import write_dicom

    image = phantoms.hand_phantom(stage, np.random.default_rng(seed)).image
    return write_dicom(path, image, patient=dict(PatientName="Test^Patient", PatientID="GG-TEST-1"), **kw)


def relabelled(src: Path, dst: Path, sop_class: str) -> Path:
    """A file stored under another SOP class (e.g. a CT slice sent as a DX by a misconfigured console)."""
    import pydicom

    ds = pydicom.dcmread(src)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(dst, enforce_file_format=True)
    return dst


def rgb_secondary_capture(path: Path, rgb: np.ndarray) -> Path:
    """An RGB photo as a Secondary Capture image (what a phone snapshot on the console would be)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName, ds.PatientID = "Test^Photo", "GG-TEST-2"
    ds.set_pixel_data(np.ascontiguousarray(rgb, np.uint8), photometric_interpretation="RGB", bits_stored=8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def truncated_pixels(src: Path, dst: Path) -> Path:
    """A DX whose pixel data is a fraction of what Rows x Columns x Bits Allocated need."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    ds.PixelData = ds.PixelData[:1000]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")


def pixelmed(main_class: str) -> list[str]:
    """The command line of a PixelMed (Debian pixelmed-apps, Java) program, or a skip saying what to
    install. The JDK's XPath limits are lifted: its defaults are below what PixelMed's compiled SR
    templates need."""
    require_tool("java", "default-jre-headless")
    if not PIXELMED_JAR.is_file():
        pytest.skip(f"{PIXELMED_JAR} missing (Debian package pixelmed-apps; {APT_HINT})")
    limits = [f"-Djdk.xml.{k}=0" for k in ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]
    return ["java", *limits, "-cp", str(PIXELMED_JAR), main_class]


def pixelmed_sr_findings(path: Path) -> tuple[list[str], str]:
    """PixelMed's DicomSRValidator (an SR validator independent of dicom3tools, checking the content tree
    against the templates) on one SR: its ``Error`` lines and its whole output."""
    out = subprocess.run(
        [*pixelmed("com.pixelmed.validate.DicomSRValidator"), str(path)], capture_output=True, text=True, timeout=300
    )
    text = out.stdout + out.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
