"""Verdicts as DICOM objects, built with highdicom, in the source image's patient and study.

Two objects per received image, each in its own new series of the source study:

* :func:`verdict_sr` — a Comprehensive SR following TID 1500 (Measurement Report) with one TID 1501
  measurement group: the source image (by SOP Instance UID) as the group's source image, the model as
  the algorithm (name, version and the bundle's SHA-256 as an algorithm parameter), a qualitative
  evaluation "Guard verdict" = accepted / rejected, one "Rejection reason" per reason and one "Failed
  measure" per failed attention measure, every check's score and p-value as a numeric measurement
  (unit ``1``), and — only when accepted — "Predicted class" and one probability per class. Concepts
  that no standard terminology names use the local coding scheme :data:`CODING_SCHEME` (``99`` prefix,
  PS3.16 8.2); they are listed in ``docs/dicom-node.md``.
* :func:`overlay_sc` — a Secondary Capture (RGB) of the heatmap overlay: the X-ray with its Grad-CAM
  beside the class's reference map, captions burned in. ``BurnedInAnnotation`` YES, ``ImageType``
  DERIVED\\SECONDARY and comments/descriptions saying it is not for primary diagnosis. For a rejected
  image nothing class-specific is drawn: no class name, no reference map.

UIDs are deterministic (:func:`result_uid`): a function of the bundle hash and the source SOP Instance
(or Study) UID. A console that resends an image after a crash, or a node that re-sends its queue after
a restart, produces objects with the same SOP Instance UIDs, so the archive ends up with one result per
image, not duplicates.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import uuid
from dataclasses import dataclass

import numpy as np

CODING_SCHEME = "99GAMGUARD"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "gamguard verdict (AI, not for primary diagnosis)"
SC_SERIES_DESCRIPTION = "gamguard heatmap overlay (AI, not for primary diagnosis)"
NOT_FOR_DIAGNOSIS = (
    "Grad-CAM heatmap overlay made by the gamguard guard. Derived image with burned-in "
    "annotations: NOT FOR PRIMARY DIAGNOSIS."
)
MANUFACTURER = "gamguard"

_UID_NAMESPACE = uuid.UUID("5d0c6a36-3c1e-4d8e-9a55-6a0b1f2c9e41")  # fixed: changing it would re-issue every UID

# the source attributes every result needs (the SR's evidence and the SC's study)
REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


_UID_SYNTAX = re.compile(r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*")


class ResultError(ValueError):
    """The received dataset cannot carry a result (e.g. a required UID is missing); no PHI in the message."""


@dataclass(frozen=True)
class ModelIdentity:
    """What the results say about the model that judged the image."""

    name: str
    version: str
    bundle_hash: str
    class_names: tuple[str, ...]  # all classes, garbage included (indices of the verdict)


def result_uid(kind: str, bundle_hash: str, source_uid: str) -> str:
    """A UID that is a pure function of its arguments: ``2.25.`` + a name-based (version 5) UUID as an
    integer (PS3.5 B.2).

    ``kind`` names the object (``"sr"``, ``"sc"``, ``"sr-series"``, ...), ``source_uid`` the source SOP
    Instance UID (Study Instance UID for a series). Same image, same bundle → same UID, so a resend is
    an idempotent store at the archive; another bundle (a new model version) gives new objects.
    """
    name = "\x1f".join(("gamguard-dicom-node", kind, bundle_hash, str(source_uid).strip()))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def is_own_result(ds) -> bool:
    """Whether ``ds`` is a result this node (any gamguard node) wrote: its verdict SR or overlay series.
    A PACS that routes new objects back to the node would otherwise have them judged again, forever."""
    try:
        series = int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return False
    return str(ds.get("Manufacturer") or "") == MANUFACTURER and series in (SR_SERIES_NUMBER, SC_SERIES_NUMBER)


def check_source(ds) -> None:
    """Raise :class:`ResultError` when ``ds`` lacks what the results need: the UIDs the results reference
    (present and valid UIDs — a result naming an invalid one would not validate, and could not be filed)."""
    missing = [k for k in REQUIRED_SOURCE_ATTRIBUTES if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise ResultError(f"the dataset has no {', '.join(missing)}")
    # syntax only: digits and dots, at most 64 characters; components with leading zeros, which older
    # devices write, are let through (the archive already holds such studies)
    invalid = [k for k in REQUIRED_SOURCE_ATTRIBUTES if not _UID_SYNTAX.fullmatch(str(ds.get(k)).strip())]
    if invalid:
        raise ResultError(f"the dataset's {', '.join(invalid)} is not a valid UID")


# Type 2 attributes of the Patient and General Study modules: the results must carry them (empty when
# unknown); consoles do leave some out, and highdicom copies them from the source.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}


def _conformant_date(value: str) -> str:
    """A DA value (``YYYYMMDD``), from itself or from the ISO forms consoles write (``YYYY-MM-DD``,
    ``YYYY/MM/DD``, ``YYYY.MM.DD``); ``""`` (unknown) for anything else."""
    m = re.fullmatch(r"(\d{4})[-/.]?(\d{2})[-/.]?(\d{2})", value.strip())
    if not m:
        return ""
    try:
        datetime.date(*(int(g) for g in m.groups()))  # a real day (no 30 February)
    except ValueError:
        return ""
    return "".join(m.groups())


def _conformant_time(value: str) -> str:
    """A TM value (``HH[MM[SS[.F]]]``), also from ``HH:MM[:SS[.F]]``; ``""`` for anything else."""
    m = re.fullmatch(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?", value.strip())
    if not m:
        return ""
    hh, mm, ss, frac = m.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 59):
        return ""
    return hh + (mm or "") + (ss or "") + (frac or "")


def result_source(source):
    """The received dataset as the results copy it from: a copy (the received image is never changed)
    whose text is decoded with the source's character set and re-declared UTF-8, with the Type 2
    patient/study attributes present (empty when the source has none), and with values that break the
    rules highdicom enforces made conformant or empty (unknown): dates and times in other notations,
    a patient sex other than M/F/O, an instance number out of range, a missing modality. Consoles send
    such values; an acknowledged image must still get its results."""
    import copy
    import warnings

    out = copy.deepcopy(source)
    with warnings.catch_warnings():  # an unknown character set falls back to the default repertoire
        warnings.simplefilter("ignore")
        out.decode()  # every text value to str, with the source's (possibly code-extended) character sets
    out.SpecificCharacterSet = "ISO_IR 192"  # the results are written in UTF-8
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in out:
            setattr(out, keyword, "")
    for elem in out:  # top level: the patient, study and series attributes the results copy
        if elem.VR in ("DA", "TM") and elem.VM == 1 and elem.value not in (None, ""):
            text = str(elem.value)
            elem.value = _conformant_date(text) if elem.VR == "DA" else _conformant_time(text)
        elif elem.VR in ("DA", "TM", "DT") and elem.VM > 1:
            elem.value = ""
    out.PatientSex = _SEX.get(str(out.get("PatientSex") or "").strip().upper(), "")
    if not str(out.get("Modality") or "").strip():
        out.Modality = "OT"
    return out


def _instance_number(source) -> int:
    """The source's Instance Number where it is one a result may carry (1 .. 2^31 - 1), else 1."""
    try:
        n = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return n if 1 <= n <= 2**31 - 1 else 1


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning[:64])


def _score_meaning(key: str) -> str:
    if key.endswith(".p") or key.endswith("_p"):
        return f"p-value {key}"
    return f"score {key}"


def verdict_sr(source, verdict, model: ModelIdentity):
    """The Comprehensive SR (TID 1500) of one verdict; ``source`` is the received dataset (pixels not needed)."""
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        ComprehensiveSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    check_source(source)
    source = result_source(source)
    unitless = CodedConcept("1", "UCUM", "no units")
    algorithm = AlgorithmIdentification(
        name=model.name, version=model.version, parameters=[f"bundle_sha256={model.bundle_hash}"]
    )
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", model.bundle_hash, model.name),
            name="gamguard",
            manufacturer_name=MANUFACTURER,
            model_name=model.name[:64],
        ),
    )
    measurements = [
        Measurement(name=_code(k, _score_meaning(k)), value=float(v), unit=unitless)
        for k, v in (verdict.scores or {}).items()
        if v is not None and math.isfinite(float(v))
    ]
    evaluations = [
        QualitativeEvaluation(
            _code("verdict", "Guard verdict"),
            _code("accepted", "Accepted") if verdict.accepted else _code("rejected", "Rejected"),
        )
    ]
    if verdict.accepted:  # a label and probabilities leave the node only for accepted images
        evaluations.append(
            QualitativeEvaluation(
                _code("label", "Predicted class"), _code(f"class:{verdict.label}", str(verdict.label))
            )
        )
        measurements += [
            Measurement(name=_code(f"probability:{k}", f"probability of {k}"), value=float(v), unit=unitless)
            for k, v in (verdict.probabilities or {}).items()
        ]
    else:
        evaluations += [
            QualitativeEvaluation(_code("reason", "Rejection reason"), _code(r, r.replace("_", " ").lower()))
            for r in verdict.reasons
        ]
        evaluations += [
            QualitativeEvaluation(_code("failed-measure", "Failed attention measure"), _code(m, m))
            for m in verdict.failed_measures or ()
        ]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=result_uid("tracking", model.bundle_hash, source.SOPInstanceUID), identifier="gamguard verdict"
        ),
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    # No image library (TID 1600): highdicom derives its descriptors from optional attributes (e.g. Patient
    # Orientation) that radiographs often leave empty; the group's source image already references the image.
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        # TID 1500 takes the procedure from CID 100. Its generic member, in every edition: validators with
        # an older CID 100 (PixelMed's DicomSRValidator, 2022) reject the newer "XR unspecified body region"
        procedure_reported=codes.CID100.ImagingProcedure,
        imaging_measurements=[group],
    )
    sr = ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=result_uid("sr-series", model.bundle_hash, source.StudyInstanceUID),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid("sr", model.bundle_hash, source.SOPInstanceUID),
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
    )
    from pydicom.dataset import Dataset

    scheme = Dataset()  # the private scheme's codes are ours: say so (SOP Common, Coding Scheme Identification)
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "gamguard guard verdict concepts"
    scheme.CodingSchemeResponsibleOrganization = "gamguard"
    sr.CodingSchemeIdentificationSequence = [*(sr.get("CodingSchemeIdentificationSequence") or []), scheme]
    return sr


def _withheld(verdict):
    """The verdict as the overlay may show it: nothing class-specific for a rejected image — neither
    the predicted class nor its reference map (which would identify it); the image's own map stays."""
    if verdict.accepted:
        return verdict
    return dataclasses.replace(verdict, predicted_index=None, reference_index=None, reference_cam=None)


def overlay_sc(source, image: np.ndarray, verdict, model: ModelIdentity):
    """The Secondary Capture of the heatmap overlay; ``image`` is the decoded X-ray (float [0, 1])."""
    import highdicom as hd

    from gamguard.runtime.overlays import overlay_image

    check_source(source)
    source = result_source(source)
    bgr = overlay_image(image, _withheld(verdict), list(model.class_names), title="gamguard: NOT FOR DIAGNOSIS")
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    # The overlay keeps the source's row/column directions (resized, never flipped), so the source's
    # orientation holds; highdicom needs a value, and when the source has none the result has none either.
    known = len(orientation) == 2 and all(orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        source,
        rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid("sc-series", model.bundle_hash, source.StudyInstanceUID),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid("sc", model.bundle_hash, source.SOPInstanceUID),
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        patient_orientation=tuple(orientation) if known else ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if not known:
        sc.PatientOrientation = ""  # Type 2: empty = unknown, rather than a made-up direction
    laterality = str(source.get("ImageLaterality") or source.get("Laterality") or "").strip().upper()
    # Type 2C (paired body parts): the source's laterality, else present and empty = unknown
    sc.Laterality = laterality if laterality in ("R", "L") else ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = NOT_FOR_DIAGNOSIS
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    from pydicom.dataset import Dataset

    src_item = Dataset()
    src_item.ReferencedSOPClassUID = source.SOPClassUID
    src_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [src_item]
    return sc


def encode(ds) -> bytes:
    """A dataset as DICOM Part 10 bytes (preamble, file meta), as it is queued and sent."""
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- reading back


def _concept(item, attr: str = "ConceptNameCodeSequence"):
    seq = item.get(attr)
    if not seq:
        return None, None
    code = seq[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return str(value), str(code.get("CodingSchemeDesignator", ""))


def read_verdict_sr(ds) -> dict:
    """What a gamguard SR says: ``accepted``, ``label``, ``reasons``, ``failed_measures``, ``scores``,
    ``probabilities``, ``source_sop_instance_uid``, ``algorithm`` (name/version/parameters).

    Reads any gamguard SR by walking its content tree (used by the demo, the tests and anyone checking
    an archive); raises :class:`ValueError` for an SR that is not one of ours.
    """
    out = {
        "accepted": None,
        "label": None,
        "reasons": [],
        "failed_measures": [],
        "scores": {},
        "probabilities": {},
        "source_sop_instance_uid": None,
        "algorithm": {},
    }

    def walk(items):
        for item in items or ():
            name, scheme = _concept(item)
            vtype = item.get("ValueType")
            if vtype == "CODE" and scheme == CODING_SCHEME:
                value, _ = _concept(item, "ConceptCodeSequence")
                if name == "verdict":
                    out["accepted"] = value == "accepted"
                elif name == "label":
                    out["label"] = value.split(":", 1)[1] if value and value.startswith("class:") else value
                elif name == "reason":
                    out["reasons"].append(value)
                elif name == "failed-measure":
                    out["failed_measures"].append(value)
            elif vtype == "NUM" and scheme == CODING_SCHEME:
                mv = item.MeasuredValueSequence[0]
                number = float(mv.NumericValue)
                if name.startswith("probability:"):
                    out["probabilities"][name.split(":", 1)[1]] = number
                else:
                    out["scores"][name] = number
            elif vtype == "IMAGE" and name == "121112":  # "Source of Measurement" (DCM), TID 1501
                out["source_sop_instance_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            elif vtype == "TEXT" and name in ("111001", "111003", "111002"):  # Algorithm Name/Version/Parameters
                key = {"111001": "name", "111003": "version", "111002": "parameters"}[name]
                if key == "parameters":
                    out["algorithm"].setdefault(key, []).append(str(item.TextValue))
                else:
                    out["algorithm"][key] = str(item.TextValue)
            walk(item.get("ContentSequence"))

    walk(ds.get("ContentSequence"))
    if out["accepted"] is None:
        raise ValueError("not a gamguard verdict SR (no 'Guard verdict' item)")
    return out
