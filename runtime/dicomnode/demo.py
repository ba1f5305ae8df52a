"""The DICOM part of ``gamguard demo --dicom``: a console sends DICOMs by C-STORE, an archive gets the SRs.

All in this process, on loopback: a :class:`~.archive.ReceivingArchive` plays the PACS, a
:class:`~.node.BackgroundNode` (the embedded or given bundle) forwards to it, and a pynetdicom Storage
SCU plays the X-ray console (calling AE title ``DEMO_CONSOLE``). Inputs: one DX phantom per maturity
class, a MONOCHROME1 phantom, off-distribution images as DX (held-out generators), a colour photo as
Secondary Capture, pydicom's CT test file as it is (CT is not a radiography SOP class: refused at
association) and a DX with truncated pixel data (refused with 0xC000). The table shows what the console
was told and what the SR that arrived at the archive says; the overlays are also written as PNG.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

CONSOLE_AE = "DEMO_CONSOLE"


def _inputs(folder: Path, seed: int) -> list[tuple[str, str, Path]]:
    """(group, truth, path) of every input."""
    import cv2
    import pydicom

    from gamguard.runtime.demo import phantoms
    from gamguard.runtime.demo.synth import write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patient = dict(PatientName="Demo^Patient", PatientID="GG-DEMO-1")
    items = []
    for stage, cls in enumerate(phantoms.CLASS_NAMES):
        p = write_dicom(folder / f"phantom_{cls}.dcm", phantoms.hand_phantom(stage, rng).image, patient=patient)
        items.append(("in-distribution", cls, p))
    p = write_dicom(
        folder / "phantom_adult_mono1.dcm",
        phantoms.hand_phantom(3, rng).image,
        patient=patient,
        photometric="MONOCHROME1",
    )
    items.append(("in-distribution", "adult", p))
    for kind in phantoms.HELD_OUT_KINDS:
        p = write_dicom(folder / f"ood_{kind}.dcm", phantoms.ood_image(kind, rng), patient=patient)
        items.append(("off-distribution", "reject", p))
    # a colour "photo" as Secondary Capture (RGB)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    grey = (np.clip(phantoms.ood_image("texture", rng), 0, 1) * 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_AUTUMN), cv2.COLOR_BGR2RGB)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.PatientName, ds.PatientID = "Demo^Patient", "GG-DEMO-1"
    ds.set_pixel_data(np.ascontiguousarray(rgb), photometric_interpretation="RGB", bits_stored=8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    p = folder / "photo_secondary_capture.dcm"
    ds.save_as(p, enforce_file_format=True)
    items.append(("off-distribution", "reject", p))
    try:
        from pydicom.data import get_testdata_file

        ct = get_testdata_file("CT_small.dcm")
    except Exception:  # noqa: BLE001 - pydicom's test files are optional data
        ct = None
    if ct:
        p = folder / "pydicom_CT_small.dcm"
        p.write_bytes(Path(ct).read_bytes())
        items.append(("refused at association", "refuse", p))
    bad = pydicom.dcmread(items[0][2])
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 3]
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    p = folder / "malformed_truncated_pixels.dcm"
    bad.save_as(p, enforce_file_format=True)
    items.append(("malformed", "refuse", p))
    return items


def _send(port: int, paths: list[Path]) -> list[str]:
    """C-STORE each file over one association, as a console does; the outcome per file."""
    import pydicom
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=CONSOLE_AE)
    ae.requested_contexts = StoragePresentationContexts[:127]
    assoc = ae.associate("127.0.0.1", port, ae_title="GAMGUARD")
    if not assoc.is_established:
        raise RuntimeError("the DICOM node rejected the demo console's association")
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    out = []
    try:
        for p in paths:
            sop_class = str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
            if sop_class not in accepted:
                out.append("refused: SOP class not accepted")
                continue
            rsp = assoc.send_c_store(p)
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if status == 0:
                out.append("0x0000 success")
            else:
                comment = str(rsp.get("ErrorComment", "")) if rsp is not None else ""
                out.append(f"0x{status:04X} {comment}".strip() if status is not None else "no response")
    finally:
        assoc.release()
    return out


def run_dicom_demo(bundle_dir: Path, out_dir: Path, seed: int, say) -> dict:
    import cv2
    import pydicom

    from gamguard.runtime.server.config import ServeConfig

    from .archive import ReceivingArchive
    from .config import DicomNodeConfig
    from .node import BackgroundNode
    from .results import read_verdict_sr

    root = out_dir / "dicom"
    # the archive, the node's queue and the overlays of an earlier run in this folder: the archive would
    # count its results as this run's, and the queue would forward them again
    for folder in ("archive", "queue", "overlays"):
        shutil.rmtree(root / folder, ignore_errors=True)
    items = _inputs(root / "inputs", seed)
    t0 = time.perf_counter()
    with ReceivingArchive(root / "archive", ae_title="DEMO_PACS") as archive:
        cfg = DicomNodeConfig(
            host="127.0.0.1",
            port=0,
            ae_title="GAMGUARD",
            allow_ae=[CONSOLE_AE],
            forward=[archive.address],
            queue_dir=str(root / "queue"),
        ).validate()
        with BackgroundNode(cfg, ServeConfig(bundle=str(bundle_dir), insecure=True, port=0)) as node:
            say(
                f"dicom: node GAMGUARD on 127.0.0.1:{node.port} forwarding to {archive.address}; "
                f"console {CONSOLE_AE} sends {len(items)} files by C-STORE"
            )
            statuses = _send(node.port, [p for _, _, p in items])
            stored = sum(s.startswith("0x0000") for s in statuses)
            if not archive.wait_for(2 * stored, timeout=180):
                raise RuntimeError(f"only {len(archive.instances())} of {2 * stored} results reached the archive")
    srs, overlays = {}, {}
    overlay_dir = root / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    for path in archive.instances():
        ds = pydicom.dcmread(path)
        if ds.Modality == "SR":
            said = read_verdict_sr(ds)
            srs[said["source_sop_instance_uid"]] = said
        else:
            src = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
            png = overlay_dir / f"{src}.png"
            cv2.imwrite(str(png), cv2.cvtColor(ds.pixel_array, cv2.COLOR_RGB2BGR))
            overlays[src] = png
    rows = []
    for (group, truth, path), status in zip(items, statuses):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        said = srs.get(uid)
        rows.append(
            {
                "file": path.name,
                "group": group,
                "truth": truth,
                "c_store": status,
                "sr": None if said is None else ("accepted" if said["accepted"] else "rejected"),
                "label": None if said is None else said["label"],
                "reasons": [] if said is None else said["reasons"],
                "overlay": str(overlays[uid]) if uid in overlays else None,
            }
        )
    return {
        "rows": rows,
        "archive": str(root / "archive"),
        "overlays": str(overlay_dir),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_rows(rows: list[dict]) -> str:
    head = f"{'file':<34} {'group':<23} {'truth':<11} {'C-STORE':<36} {'SR at archive':<13} {'label':<11} reasons"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['file'][:34]:<34} {r['group']:<23} {r['truth']:<11} {r['c_store'][:36]:<36} "
            f"{r['sr'] or '-':<13} {r['label'] or '-':<11} {', '.join(r['reasons']) or '-'}"
        )
    return "\n".join(lines)
