"""gamguard dicom-node: results as DICOM, the on-disk queues, and the node driven by real DICOM tools.

The tool tests use third-party software only on the DICOM side: dcmtk's echoscu/storescu send, Orthanc
(its own config, loopback ports, a temporary storage folder) is the PACS, dicom3tools' dciodvfy
validates. Each skips naming the package when it is missing. The node itself is real: the demo bundle,
the data plane, pynetdicom on a loopback port.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomlib import (
    Orthanc,
    dciodvfy_errors,
    free_port,
    phantom_dicom,
    pixelmed,
    pixelmed_sr_findings,
    relabelled,
    require_tool,
    rgb_secondary_capture,
    truncated_pixels,
)
from pydicom.uid import DigitalXRayImageStorageForPresentation as DX

from gamguard.runtime.demo.phantoms import CLASS_NAMES
from gamguard.runtime.dicomnode.archive import ReceivingArchive
from gamguard.runtime.dicomnode.config import DicomNodeConfig, parse_destination
from gamguard.runtime.dicomnode.node import BackgroundNode
from gamguard.runtime.dicomnode.results import (
    NOT_FOR_DIAGNOSIS,
    ModelIdentity,
    ResultError,
    check_source,
    overlay_sc,
    read_verdict_sr,
    result_uid,
    verdict_sr,
)
from gamguard.runtime.server.config import ConfigError, ServeConfig

SEED = 7_140_001


@pytest.fixture(scope="module")
def guard(demo_bundle):
    from gamguard.runtime.guard import Guard

    return Guard.from_bundle(demo_bundle)


def model_identity(guard) -> ModelIdentity:
    m = guard.manifest["model"]
    return ModelIdentity(str(m["name"]), str(m["version"]), guard.bundle_hash, tuple(guard.class_names))


def judged(guard, path: Path):
    from gamguard.runtime.decode import decode_file

    decoded = decode_file(path)
    return decoded, guard.verify_images([decoded.pixels])[0]


def accepted_phantoms(guard, folder: Path, n: int, *, start_seed: int = SEED) -> dict[Path, str]:
    """``n`` phantom DICOMs the guard accepts with their true class (seeds tried in order, classes in turn)."""
    out: dict[Path, str] = {}
    seed = start_seed
    while len(out) < n:
        stage = len(out) % len(CLASS_NAMES)
        path = phantom_dicom(folder / f"id_{seed}.dcm", stage, seed)
        _, v = judged(guard, path)
        if v.accepted and v.label == CLASS_NAMES[stage]:
            out[path] = CLASS_NAMES[stage]
        else:
            path.unlink()
        seed += 1
        assert seed < start_seed + 50 * n, "the demo model accepts too few of its own phantoms"
    return out


# ---------------------------------------------------------------------------------- results as DICOM


def test_result_uids_are_deterministic_per_image_kind_and_bundle():
    a = result_uid("sr", "hash1", "1.2.3.4")
    assert a == result_uid("sr", "hash1", "1.2.3.4")
    assert (
        len(
            {
                a,
                result_uid("sc", "hash1", "1.2.3.4"),
                result_uid("sr", "hash2", "1.2.3.4"),
                result_uid("sr", "hash1", "1.2.3.5"),
            }
        )
        == 4
    )
    assert a.startswith("2.25.") and len(a) <= 64


def test_accepted_sr_and_overlay_carry_label_source_and_study(guard, tmp_path):
    import highdicom as hd

    ((path, truth),) = accepted_phantoms(guard, tmp_path, 1).items()
    decoded, verdict = judged(guard, path)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    model = model_identity(guard)
    sr = verdict_sr(source, verdict, model)
    back = pydicom.dcmread(io.BytesIO(_encode(sr)))
    assert back.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SOPInstanceUID == result_uid("sr", guard.bundle_hash, source.SOPInstanceUID)
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    hd.sr.ComprehensiveSR.from_dataset(back)  # highdicom reads it back as a valid SR document
    assert "99GAMGUARD" in {c.CodingSchemeDesignator for c in back.CodingSchemeIdentificationSequence}
    said = read_verdict_sr(back)
    assert said["accepted"] is True and said["label"] == truth == verdict.label and not said["reasons"]
    assert said["source_sop_instance_uid"] == source.SOPInstanceUID
    assert set(said["probabilities"]) == set(verdict.probabilities)
    finite = {k for k, v in verdict.scores.items() if np.isfinite(v)}
    assert set(said["scores"]) == finite and {"feature.p", "combined_p", "attention.p"} <= finite
    assert said["algorithm"]["name"] == model.name and said["algorithm"]["version"] == model.version
    assert f"bundle_sha256={guard.bundle_hash}" in said["algorithm"]["parameters"]

    sc = pydicom.dcmread(io.BytesIO(_encode(overlay_sc(source, decoded.pixels, verdict, model))))
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientName == source.PatientName
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.ImageComments == NOT_FOR_DIAGNOSIS and "not for primary diagnosis" in sc.SeriesDescription.lower()
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.std() > 5  # a picture, not a blank


def test_rejected_sr_has_reasons_and_no_label_or_probabilities(guard, tmp_path):
    from gamguard.runtime.demo.phantoms import ood_image
    from gamguard.runtime.demo.synth import write_dicom

    path = write_dicom(tmp_path / "knee.dcm", ood_image("knee", np.random.default_rng(SEED)))
    decoded, verdict = judged(guard, path)
    assert not verdict.accepted
    source = pydicom.dcmread(path, stop_before_pixels=True)
    said = read_verdict_sr(pydicom.dcmread(io.BytesIO(_encode(verdict_sr(source, verdict, model_identity(guard))))))
    assert said["accepted"] is False and said["label"] is None and said["probabilities"] == {}
    assert said["reasons"] == list(verdict.reasons) and said["failed_measures"] == list(verdict.failed_measures)
    assert said["scores"]  # every check's score and p-value, also when rejected


# What consoles put in headers that the DICOM rules (and highdicom) do not allow in results, or that a
# naive copy gets wrong: each must still give an SR and an overlay (an acknowledged image always gets its
# results), with the value made conformant or left empty (unknown), and the name kept.
ODD_HEADERS = {
    "japanese (ISO 2022 IR 87, code extensions)": dict(
        SpecificCharacterSet=["", "ISO 2022 IR 87"],
        PatientName=b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
    ),
    "korean (ISO 2022 IR 149)": dict(
        SpecificCharacterSet=["", "ISO 2022 IR 149"], PatientName=b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce"
    ),
    "empty character set": dict(SpecificCharacterSet=""),
    "misspelled character set": dict(SpecificCharacterSet="utf-8"),
    "ISO dates and times": dict(PatientBirthDate="1961-07-04", StudyDate="2023/01/01", StudyTime="10:30"),
    "unparseable date": dict(StudyDate="yesterday"),
    "impossible date": dict(PatientBirthDate="1961-02-30", StudyTime="10:30:60"),
    "sex spelled out": dict(PatientSex="female"),
    "negative instance number": dict(InstanceNumber=-5),
    "no modality": dict(Modality=None),
}


@pytest.mark.parametrize("case", list(ODD_HEADERS))
def test_results_are_built_for_headers_consoles_really_send(guard, tmp_path, case, caplog):
    import logging

    from gamguard.runtime.server.quietlog import quiet_input_libraries

    quiet_input_libraries()  # as the node and the server do at start
    caplog.set_level(logging.DEBUG)
    ((path, _),) = accepted_phantoms(guard, tmp_path, 1).items()
    decoded, verdict = judged(guard, path)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword, value in ODD_HEADERS[case].items():
        if value is None:
            delattr(source, keyword)
        elif isinstance(value, bytes):  # raw, in the declared character set, as a console sends it
            tag = pydicom.datadict.tag_for_keyword(keyword)
            source[tag] = pydicom.DataElement(tag, pydicom.datadict.dictionary_VR(tag), value)
        else:
            setattr(source, keyword, value)
    received = _encode(source)
    model = model_identity(guard)
    sr, sc = verdict_sr(source, verdict, model), overlay_sc(source, decoded.pixels, verdict, model)
    assert _encode(source) == received  # the received dataset is never changed
    for result in (sr, sc):
        back = pydicom.dcmread(io.BytesIO(_encode(result)))
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == str(pydicom.dcmread(io.BytesIO(received)).PatientName)
        assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
        assert back.get("PatientBirthDate", "") in ("", "19610704", source.get("PatientBirthDate"))
        assert str(back.PatientSex) in ("", "M", "F", "O") and int(back.InstanceNumber) >= 1
    said = read_verdict_sr(pydicom.dcmread(io.BytesIO(_encode(sr))))
    assert said["accepted"] is True and said["label"] == verdict.label
    if case == "ISO dates and times":
        assert (sr.PatientBirthDate, sr.StudyDate, sr.StudyTime) == ("19610704", "20230101", "1030")
    if case == "impossible date":
        assert (sr.PatientBirthDate, sr.StudyTime) == ("", "")
    # no header value reaches a log line (pydicom's value warnings quote them)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for value in ODD_HEADERS[case].values():
        if isinstance(value, str) and len(value) >= 4:
            assert value not in logged, value
    if shutil.which("dciodvfy"):
        for kind, result in (("sr", sr), ("sc", sc)):
            out = tmp_path / f"{kind}.dcm"
            out.write_bytes(_encode(result))
            assert dciodvfy_errors(out) == [], (case, kind)


def test_pixelmed_validates_the_sr_against_tid_1500(guard, tmp_path):
    """PixelMed's DicomSRValidator, a second validator that checks the content tree against the templates
    (dciodvfy checks the IOD): the SR of an accepted and of a rejected image are TID 1500 Measurement
    Reports without errors (PixelMed held "Procedure reported" to its edition of CID 100)."""
    from gamguard.runtime.demo.phantoms import ood_image
    from gamguard.runtime.demo.synth import write_dicom

    ((accepted, _),) = accepted_phantoms(guard, tmp_path, 1).items()
    rejected = write_dicom(tmp_path / "knee.dcm", ood_image("knee", np.random.default_rng(SEED)))
    for path, want in ((accepted, True), (rejected, False)):
        decoded, verdict = judged(guard, path)
        assert verdict.accepted is want
        sr = tmp_path / f"sr_{want}.dcm"
        sr.write_bytes(
            _encode(verdict_sr(pydicom.dcmread(path, stop_before_pixels=True), verdict, model_identity(guard)))
        )
        errors, text = pixelmed_sr_findings(sr)
        assert "Found Root Template TID_1500" in text and "Root Template Validation Complete" in text, text
        assert errors == [], text


def test_a_dataset_whose_uids_a_result_cannot_reference_is_refused():
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DX, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.abc", "1.2.3.5"
    with pytest.raises(ResultError, match="StudyInstanceUID is not a valid UID") as err:
        check_source(ds)
    assert "abc" not in str(err.value)  # the message names the attribute, never its value
    ds.StudyInstanceUID = "1.2.3.6"
    check_source(ds)


def _encode(ds) -> bytes:
    from gamguard.runtime.dicomnode.results import encode

    return encode(ds)


# ----------------------------------------------------------------------------------- queues, config


def test_journal_and_outbox_survive_reopening(guard, tmp_path):
    from gamguard.runtime.dicomnode.journal import Journal
    from gamguard.runtime.dicomnode.outbox import Outbox

    ((path, _),) = accepted_phantoms(guard, tmp_path, 1).items()
    data = path.read_bytes()
    uid = pydicom.dcmread(path).SOPInstanceUID
    Journal(tmp_path / "q" / "journal").put(uid, data)
    (tmp_path / "q" / "journal" / ".tmp-leftover-of-a-crash").write_bytes(b"partial")
    Journal(tmp_path / "q" / "journal").put_source("1.2.99", data)  # a crash before its C-STORE was answered
    cut = Journal(tmp_path / "q" / "journal").put_source("1.2.98", data)  # a crash in the middle of its write:
    cut.write_bytes(data[: len(data) // 2])  # never acknowledged, so dropped at the restart
    journal = Journal(tmp_path / "q" / "journal")  # a restarted node
    assert (journal.folder.stat().st_mode & 0o777) == 0o700  # received images are patient data: owner only
    assert {p.stat().st_mode & 0o777 for p in journal.folder.iterdir() if p.is_file()} == {0o600}
    assert not list(journal.folder.glob(".tmp-*")) and not list(journal.folder.glob("1.2.98*")) and len(journal) == 2
    jobs = {journal.load(p).sop_instance_uid: journal.load(p) for p in journal.pending()}
    assert jobs[uid].source == data and jobs["1.2.99"].source == data
    # entries are named after the UID and the digest of the content (other content is another entry)
    assert all(
        Path(p).name.startswith(f"{k}.") and len(Path(p).name) == len(k) + 69 for k, p in zip(jobs, journal.pending())
    )
    assert all(job.verdict is None for job in jobs.values())  # verdicts are derived again after a restart
    journal.done(journal.pending()[0])
    assert len(journal) == 1 and len(list(journal.folder.iterdir())) == 1

    outbox = Outbox(tmp_path / "q" / "outbox", ["PACS@h_104", "VNA@h_11112"])
    outbox.put("1.2.3", b"x")
    outbox.put("1.2.3", b"y")  # the same object again (a resend): replaced, not duplicated
    again = Outbox(tmp_path / "q" / "outbox", ["PACS@h_104", "VNA@h_11112"])
    assert again.depth("PACS@h_104") == again.depth("VNA@h_11112") == 1
    # results hold patient data too: the outbox and every folder it created are owner only
    assert {(f.stat().st_mode & 0o777) for f in (outbox.folder, *outbox.folder.iterdir())} == {0o700}
    again.delivered(again.pending("PACS@h_104")[0])
    assert again.depth("PACS@h_104") == 0 and again.pending("VNA@h_11112")[0].read_bytes() == b"y"
    with pytest.raises(ValueError):
        outbox.put("../../etc/passwd", b"x")


def test_a_journaled_image_without_its_verdict_gets_results_after_a_restart(guard, demo_bundle, tmp_path):
    from gamguard.runtime.dicomnode.journal import Journal

    ((path, label),) = accepted_phantoms(guard, tmp_path, 1).items()
    uid = pydicom.dcmread(path).SOPInstanceUID
    Journal(tmp_path / "queue" / "journal").put_source(uid, path.read_bytes())  # acknowledged, then a crash
    with _node(tmp_path, demo_bundle, []) as node:
        assert node.node.wait_results_built(60)
    kept = [pydicom.dcmread(p) for p in (tmp_path / "queue" / "outbox" / "kept").glob("*.dcm")]
    said = [read_verdict_sr(d) for d in kept if d.Modality == "SR"]
    assert len(kept) == 2 and said[0]["source_sop_instance_uid"] == uid and said[0]["label"] == label


def test_the_console_is_answered_before_the_verdict_and_the_results_follow(demo_bundle, tmp_path):
    """A C-STORE is answered once the image is durable and queued for the engine, not after the engine:
    with the engine held, the console still gets Success for every image, and the SRs (right labels)
    follow once the engine runs."""
    import threading

    from pynetdicom import AE, StoragePresentationContexts

    from gamguard.runtime.guard import Guard

    held = Guard.from_bundle(demo_bundle, threads=1)
    phantoms = accepted_phantoms(held, tmp_path, 3)
    holding, release, entered = threading.Event(), threading.Event(), threading.Event()
    run = held.engine.run

    def held_run(x):
        if holding.is_set():
            entered.set()
            if not release.wait(60):
                raise RuntimeError("the test never released the engine")
        return run(x)

    held.engine.run = held_run
    cfg = DicomNodeConfig(
        host="127.0.0.1", port=0, allow_ae=["TESTSCU"], queue_dir=str(tmp_path / "queue"), build_backlog=10**6
    )
    serve = ServeConfig(bundle=str(demo_bundle), insecure=True, port=0)
    with BackgroundNode(cfg.validate(), serve, guard_factory=lambda: held) as node:
        holding.set()  # from here (the node's self-test is behind it) the engine waits for release
        ae = AE(ae_title="TESTSCU")
        ae.requested_contexts = StoragePresentationContexts[:120]
        ae.dimse_timeout = 20  # an answer that waited for the engine would time out here
        assoc = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
        try:
            statuses = [int(assoc.send_c_store(p).Status) for p in phantoms]
        finally:
            assoc.release()
        assert statuses == [0, 0, 0]
        assert entered.wait(30) and node.node.scp.finishing == 3  # answered, verdicts still to come
        release.set()
        assert node.node.wait_results_built(60)
    kept = [pydicom.dcmread(p) for p in (tmp_path / "queue" / "outbox" / "kept").glob("*.dcm")]
    said = {
        d["source_sop_instance_uid"]: d["label"] for d in map(read_verdict_sr, (k for k in kept if k.Modality == "SR"))
    }
    assert said == {pydicom.dcmread(p).SOPInstanceUID: label for p, label in phantoms.items()}


@pytest.mark.parametrize("receivers", [0, 2])
def test_a_console_waits_for_verdicts_instead_of_filling_the_engine_queue(demo_bundle, tmp_path, receivers):
    """Answering before the verdict must not let one console fill the engine's queue (shared with gRPC
    clients) and get 0xA700: with the engine held and a queue of 4, eight images are all stored, because
    beyond two outstanding verdicts each answer waits for its own."""
    import concurrent.futures
    import threading

    from gamguard.runtime.guard import Guard

    held = Guard.from_bundle(demo_bundle, threads=1)
    paths = list(accepted_phantoms(held, tmp_path, 8))
    holding, release = threading.Event(), threading.Event()
    run = held.engine.run

    def held_run(x):
        if holding.is_set() and not release.wait(60):
            raise RuntimeError("the test never released the engine")
        return run(x)

    held.engine.run = held_run
    cfg = DicomNodeConfig(
        host="127.0.0.1",
        port=0,
        allow_ae=["TESTSCU"],
        queue_dir=str(tmp_path / "queue"),
        build_backlog=10**6,
        receivers=receivers,
    )
    serve = ServeConfig(bundle=str(demo_bundle), insecure=True, port=0, max_queue_size=4, max_batch_size=1)
    with BackgroundNode(cfg.validate(), serve, guard_factory=lambda: held) as node:
        holding.set()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sending = pool.submit(_scu_store, node.port, paths)
            deadline = time.monotonic() + 30
            while node.node.scp.finishing < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # a node that answered regardless would now run into the full queue
            assert node.node.scp.finishing == 3 and not sending.done()  # the third answer waits
            release.set()
            assert sending.result(60) == [0] * 8
        assert node.node.wait_results_built(60)
    assert len(list((tmp_path / "queue" / "outbox" / "kept").glob("*.dcm"))) == 16  # an SR and overlay each


def results_builder(guard, folder: Path, reverify=None, *, workers: int = 0, model=None):
    """A journal in ``folder/journal`` and a results builder from it into ``folder/outbox`` (no destination)."""
    from gamguard.runtime.dicomnode.journal import Journal
    from gamguard.runtime.dicomnode.node import ResultsBuilder
    from gamguard.runtime.dicomnode.outbox import Outbox

    journal = Journal(folder / "journal")
    builder = ResultsBuilder(
        journal,
        Outbox(folder / "outbox", []),
        model or model_identity(guard),
        reverify=reverify,
        forward_originals="none",
        is_busy=lambda: False,
        backlog=1,
        workers=workers,
    )
    return journal, builder


class _KillsItsWorker:
    """Unpickled in a results worker process, ends that process at once (a worker killed mid-build)."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_results_built_in_worker_processes_match_and_a_dead_worker_loses_nothing(guard, tmp_path):
    """Worker processes build the same SR as the node's own process; a worker that dies while building
    leaves the job in the journal for one more try, then moves it to failed/ (one image that kills its
    worker cannot hold up the others), and the next job gets new workers."""
    from gamguard.runtime.dicomnode.journal import thumbnail

    phantoms = accepted_phantoms(guard, tmp_path, 3)

    def receive(journal, builder, path):
        uid = pydicom.dcmread(path).SOPInstanceUID
        incoming = journal.put_source(uid, path.read_bytes())
        decoded, verdict = judged(guard, path)
        builder.keep_verdict(journal.incoming_key(incoming), verdict, thumbnail(decoded.pixels))
        journal.release_source(incoming)

    def srs(folder):
        kept = [pydicom.dcmread(p) for p in (folder / "outbox" / "kept").glob("*.dcm")]
        return {str(d.SOPInstanceUID): read_verdict_sr(d) for d in kept if d.Modality == "SR"}

    inline = tmp_path / "inline"
    journal, builder = results_builder(guard, inline)
    for path in phantoms:
        receive(journal, builder, path)
    builder._build_all(journal.pending())
    assert len(journal) == 0 and builder.built == 3

    pooled = tmp_path / "pooled"
    journal, builder = results_builder(guard, pooled, workers=2)
    try:
        for path in phantoms:
            receive(journal, builder, path)
        builder._build_all(journal.pending())  # three jobs, two workers: handed over while others build
        assert len(journal) == 0 and builder.built == 3
        assert srs(pooled) == srs(inline) and sorted(r["label"] for r in srs(pooled).values()) == sorted(
            phantoms.values()
        )
    finally:
        builder.stop()

    # one image among others kills the worker building it (here: its verdict, unpickled in the worker)
    good = list(phantoms)[:2]
    (tmp_path / "poison").mkdir()
    (poison,) = accepted_phantoms(guard, tmp_path / "poison", 1, start_seed=SEED + 50)
    verdicts = {p.read_bytes(): p for p in [*good, poison]}

    def reverify(data: bytes):
        decoded, verdict = judged(guard, verdicts[data])
        return (_KillsItsWorker() if verdicts[data] == poison else verdict), thumbnail(decoded.pixels)

    dying = tmp_path / "dying"
    journal, builder = results_builder(guard, dying, reverify, workers=2)
    try:
        for path in [good[0], poison, good[1]]:  # answered; no verdict kept: derived again (reverify)
            journal.release_source(journal.put_source(pydicom.dcmread(path).SOPInstanceUID, path.read_bytes()))
        for _ in range(3):  # the pass where the worker died, then each job that was in flight alone
            builder._build_all(journal.pending())
        assert len(journal) == 0  # nothing left behind, nothing lost:
        assert sorted(r["label"] for r in srs(dying).values()) == sorted(phantoms[p] for p in good)
        (failed,) = (dying / "journal" / "failed").iterdir()  # only the image that killed its worker
        assert pydicom.dcmread(failed).SOPInstanceUID == pydicom.dcmread(poison).SOPInstanceUID
    finally:
        builder.stop()

    # built by itself (build()), an image whose worker dies is kept for one more try, then set aside
    single = tmp_path / "single"
    journal, builder = results_builder(guard, single, workers=1, model=_KillsItsWorker())
    try:
        receive(journal, builder, good[0])
        (path,) = journal.pending()
        assert builder.build(path) is False and journal.pending() == [path]
        assert builder.build(path) is True and len(journal) == 0
        assert [p.name for p in (single / "journal" / "failed").iterdir()] == [path.name]
        builder.model = model_identity(guard)
        receive(journal, builder, good[0])
        assert builder.build(journal.pending()[0]) is True and len(srs(single)) == 1  # new workers
    finally:
        builder.stop()


def test_result_workers_end_when_their_node_is_killed_outright(tmp_path):
    """A node killed with SIGKILL cannot stop its result workers; they notice and end by themselves
    (else each would wait for jobs forever, ~190 MB apiece)."""
    script = tmp_path / "node.py"
    script.write_text(
        "import os, signal, sys\n"
        "from gamguard.runtime.dicomnode.resultpool import ResultMaker\n"
        "if __name__ == '__main__':\n"
        "    maker = ResultMaker(2)\n"
        "    maker.submit(b'not DICOM', None, None, None).exception(120)  # the workers are up\n"
        "    print(' '.join(str(p) for p in maker._pool._processes), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    # output to files, not pipes: an orphaned worker would hold a pipe open and keep run() waiting
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        code = subprocess.run([sys.executable, str(script)], stdout=out, stderr=err, timeout=180).returncode
    assert code == -signal.SIGKILL, (tmp_path / "err").read_text()[-2000:]
    workers = [int(p) for p in (tmp_path / "out").read_text().split()]
    assert workers
    assert _all_end(workers), "result workers outlived their killed node"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _all_end(pids, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


def test_receiver_processes_end_when_their_node_is_killed_outright(demo_bundle, tmp_path):
    """Receivers hold the node's port: a node killed with SIGKILL must not leave them listening on it."""
    script = tmp_path / "node.py"
    script.write_text(
        "import os, signal, sys\n"
        "from gamguard.runtime.dicomnode.config import DicomNodeConfig\n"
        "from gamguard.runtime.dicomnode.node import BackgroundNode\n"
        "from gamguard.runtime.server.config import ServeConfig\n"
        "if __name__ == '__main__':\n"
        "    cfg = DicomNodeConfig(host='127.0.0.1', port=0, allow_any_ae=True, queue_dir=sys.argv[1],\n"
        "                          receivers=2, result_workers=0).validate()\n"
        "    node = BackgroundNode(cfg, ServeConfig(bundle=sys.argv[2], insecure=True, port=0)).start()\n"
        "    print(node.port, ' '.join(map(str, node.node.scp.pids())), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        args = [sys.executable, str(script), str(tmp_path / "queue"), str(demo_bundle)]
        code = subprocess.run(args, stdout=out, stderr=err, timeout=180).returncode
    assert code == -signal.SIGKILL, (tmp_path / "err").read_text()[-2000:]
    port, *receivers = (int(p) for p in (tmp_path / "out").read_text().split())
    assert len(receivers) == 2
    assert _all_end(receivers), "receivers outlived their killed node"
    import socket

    socket.create_server(("127.0.0.1", port)).close()  # the port is free again


@pytest.mark.parametrize("receivers", [0, 2])
def test_receivers_or_not_the_node_answers_alike(guard, demo_bundle, tmp_path, receivers):
    """The node receives in its own process (--receivers 0) or in receiver processes, with the same
    answers, association limit and results; a receiver that dies is started again, and every receiver
    ends with the node."""
    import cv2
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from gamguard.runtime.bench.common import phantom_images
    from gamguard.runtime.demo.synth import write_dicom
    from gamguard.runtime.dicomnode.receiver import DECODE_IN_RECEIVER_MIN_BYTES

    paths = list(accepted_phantoms(guard, tmp_path, 2))
    bad = truncated_pixels(paths[0], tmp_path / "bad.dcm")
    # a radiograph-size image (decoded by its receiver, not the node) and one whose pixel data is cut short
    big = write_dicom(tmp_path / "big.dcm", cv2.resize(np.asarray(phantom_images(1)[0], np.float32), (768, 768)))
    assert big.stat().st_size >= DECODE_IN_RECEIVER_MIN_BYTES
    cut = pydicom.dcmread(big)
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 2]
    cut.SOPInstanceUID = cut.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    cut.save_as(tmp_path / "big_cut.dcm", enforce_file_format=True)
    assert (tmp_path / "big_cut.dcm").stat().st_size >= DECODE_IN_RECEIVER_MIN_BYTES
    with _node(tmp_path, demo_bundle, [], receivers=receivers, max_associations=1) as node:
        hub = node.node.scp
        assert _scu_store(node.port, [bad, paths[0]]) == [0xC000, 0]
        assert _scu_store(node.port, [tmp_path / "big_cut.dcm", big]) == [0xC000, 0]
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
        others = [ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD") for _ in range(3)]
        # one slot over all receivers. (The node rejects each; once in a full-suite run, on a loaded machine,
        # pynetdicom's requestor saw two of the three rejections as a closed connection: none gets in.)
        states = [(a.is_established, a.is_rejected, a.is_aborted) for a in others]
        assert first.is_established and not any(a.is_established for a in others), states
        assert any(a.is_rejected for a in others), states
        first.release()
        if receivers:
            pids = hub.pids()
            assert len(pids) == receivers and os.getpid() not in pids
            os.kill(pids[0], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while (pids[0] in hub.pids() or len(hub.pids()) < receivers) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(hub.pids()) == receivers and pids[0] not in hub.pids()  # started again
            live = hub.pids()
        for _ in range(3):  # whichever receiver takes the association
            assert _scu_store(node.port, [paths[1]]) == [0]
        assert node.node.wait_results_built(60)
        assert hub.finishing == 0 and hub.active_associations == 0
    kept = list((tmp_path / "queue" / "outbox" / "kept").glob("*.dcm"))
    assert len(kept) == 6  # an SR and an overlay for each of the three images (sent again: same results)
    if receivers:
        assert _all_end(live), "receivers outlived their node"


def test_images_answered_by_a_receiver_that_dies_get_their_results(demo_bundle, tmp_path):
    """A receiver answers Success before the verdict; if it dies before handing its images over, the node
    takes them from the journal (by the receiver's writer tag) and builds their results, without a restart."""
    import threading

    from gamguard.runtime.guard import Guard

    held = Guard.from_bundle(demo_bundle, threads=1)
    paths = list(accepted_phantoms(held, tmp_path, 2))
    holding, release = threading.Event(), threading.Event()
    run = held.engine.run

    def held_run(x):  # the verdicts wait while the receiver is killed
        if holding.is_set():
            release.wait(60)
        return run(x)

    held.engine.run = held_run
    cfg = DicomNodeConfig(
        host="127.0.0.1", port=0, allow_ae=["TESTSCU"], queue_dir=str(tmp_path / "queue"), receivers=2, result_workers=0
    ).validate()
    serve = ServeConfig(bundle=str(demo_bundle), insecure=True, port=0)
    with BackgroundNode(cfg, serve, guard_factory=lambda: held) as node:
        hub = node.node.scp
        holding.set()
        assert _scu_store(node.port, paths) == [0, 0]  # answered, verdicts outstanding
        with hub._lock:
            owners = {image.receiver.process.pid for image in hub._images.values()}
        assert len(owners) == 1 and hub.finishing == 2
        os.kill(owners.pop(), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while hub.finishing and time.monotonic() < deadline:
            time.sleep(0.05)
        release.set()
        assert hub.finishing == 0
        assert node.node.wait_results_built(60)
    journal = tmp_path / "queue" / "journal"
    assert not list(journal.glob("*.incoming")) and not list(journal.glob("*.dcm"))
    kept = list((tmp_path / "queue" / "outbox" / "kept").glob("*.dcm"))
    assert len(kept) == 4  # an SR and an overlay for each answered image


def test_an_image_answered_before_its_decode_gets_its_results_if_the_decode_fails(demo_bundle, tmp_path, monkeypatch):
    """With receivers, a grey uncompressed image is admitted, and answered, once its header shows it
    decodable, before the node decodes its pixels. Should that decode fail all the same (made to here,
    right after the promise), the answered image is not lost: the node forgets it (nothing left in
    flight) and the results builder derives its verdict again from the journal."""
    import gamguard.runtime.decode as decode
    from gamguard.runtime.guard import Guard

    guard = Guard.from_bundle(demo_bundle, threads=1)
    paths = list(accepted_phantoms(guard, tmp_path, 2))
    real = decode._decode_dicom
    broken = []

    def decode_dicom(data, frame, max_pixels, memory, on_decodable=None):
        if on_decodable is None:  # the results builder's decode (and any other) works
            return real(data, frame, max_pixels, memory)

        def promised(height, width):
            on_decodable(height, width)
            broken.append((height, width))
            raise RuntimeError("the decode fails after its promise")

        return real(data, frame, max_pixels, memory, promised)

    monkeypatch.setattr(decode, "_decode_dicom", decode_dicom)
    with _node(tmp_path, demo_bundle, [], receivers=2) as node:
        hub = node.node.scp
        assert _scu_store(node.port, paths) == [0, 0]
        assert len(broken) == 2  # both answered before their decode, which failed
        assert node.node.wait_results_built(60)
        assert hub.finishing == 0 and not hub._images
    kept = list((tmp_path / "queue" / "outbox" / "kept").glob("*.dcm"))
    assert len(kept) == 4  # an SR and an overlay for each answered image
    assert not list((tmp_path / "queue" / "journal").glob("failed/*"))


def test_a_receiver_that_stops_leaves_the_port_to_the_others(demo_bundle, tmp_path):
    """The receivers share the node's listening socket: one that ends (here told to stop on its own) must
    close only its handle, not shut the socket down under the others; it is started again."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)

    def echo(port: int) -> bool:
        assoc = ae.associate("127.0.0.1", port, ae_title="GAMGUARD")
        if not assoc.is_established:
            return False
        ok = assoc.send_c_echo().Status == 0
        assoc.release()
        return ok

    with _node(tmp_path, demo_bundle, [], receivers=2) as node:
        hub = node.node.scp
        first = hub._receivers[0]
        first.link.send(("stop",))  # not through close(): the hub restarts it
        deadline = time.monotonic() + 30  # (the hub joins it: a second join here could race it)
        while first.process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not first.process.is_alive()
        assert all(echo(node.port) for _ in range(6))  # the other receiver still accepts
        deadline = time.monotonic() + 30
        while (hub._receivers[0] is first or len(hub.pids()) < 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(hub.pids()) == 2 and first.process.pid not in hub.pids()
        assert all(echo(node.port) for _ in range(6))


def test_receivers_stop_without_being_killed(demo_bundle, tmp_path, caplog):
    """Every receiver's select wakes on a new connection and one accept wins: the others must not be left
    blocked in accept (the listening socket is non-blocking), or stopping the node has to kill them."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    with caplog.at_level("WARNING", logger="gamguard.runtime.dicomnode.receiver"):
        with _node(tmp_path, demo_bundle, [], receivers=2) as node:
            pids = node.node.scp.pids()
            for _ in range(12):
                assoc = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
                assert assoc.is_established
                assoc.release()
        assert "did not stop in time" not in caplog.text
    assert _all_end(pids)


def test_a_dead_receivers_journal_entries_are_told_apart_by_writer(tmp_path):
    """Journal.take_incoming takes one writer's incoming images (complete: ready; cut short: deleted),
    leaves other writers' and the ones being handed over."""
    from gamguard.runtime.dicomnode.journal import Journal

    node = Journal(tmp_path / "j")
    dead, alive = (
        Journal(tmp_path / "j", recover=False, writer="r0g1x"),
        Journal(tmp_path / "j", recover=False, writer="r1g2x"),
    )
    kept = dead.put_source("1.2.3", b"first")
    handing = dead.put_source("1.2.4", b"second")
    cut = dead.put_source("1.2.5", b"third")
    cut.write_bytes(b"thi")  # cut short by the crash
    other = alive.put_source("1.2.6", b"fourth")
    assert node.take_incoming("r0g1x", skip={handing}) == 1
    assert not kept.exists() and (tmp_path / "j" / (Journal.incoming_key(kept) + ".dcm")).exists()
    assert handing.exists() and other.exists() and not cut.exists()
    with pytest.raises(ValueError):  # not a tag: it would read as the start of r0g1x's names
        node.take_incoming("r0g1")
    with pytest.raises(ValueError):
        Journal(tmp_path / "j", recover=False, writer="r0g1").put_source("1.2.7", b"fifth")


def test_an_image_given_up_after_its_verdict_is_dropped_by_the_node():
    """A receiver whose answer fails after the node's verdict came (its journal write failed) tells the
    node to drop the image (a cancelled future no longer does), and forgets it itself."""
    from gamguard.runtime.dicomnode.receiver import _RemotePlane

    class Link:
        def __init__(self):
            self.sent = []

        def send(self, message):
            self.sent.append(message[:2])
            return True

    link = Link()
    plane = _RemotePlane(link, decoder=None, decode_here_min_bytes=1 << 30)
    verifying = plane.submit(b"image", "rid-1", 120.0, lambda: None)
    plane.admitted("rid-1", False)
    plane.finished("rid-1", None)
    plane.abandon("rid-1", tell=not verifying.cancel())
    assert ("cancel", "rid-1") in link.sent and not plane._must_wait
    plane.admitted("rid-1", True)  # a late answer for a forgotten image leaves nothing behind
    assert not plane._must_wait


def test_a_result_that_fails_in_a_worker_is_logged_by_place_not_by_message():
    """An exception raised while a worker builds results reaches the node as the worker raised it; the log
    says where (file, line, function in the worker), never its text, which can quote a header value."""
    from gamguard.runtime.dicomnode.resultpool import ResultMaker
    from gamguard.runtime.server.quietlog import where_raised

    maker = ResultMaker(1)
    try:
        with pytest.raises(Exception) as raised:
            maker.submit(b"DICM? no: PatientName=DOE^JOHN", None, None, None).result(120)
    finally:
        maker.close()
    where = where_raised(raised.value)
    assert where.endswith("(in a worker process)") and " at " in where and ".py:" in where, where
    assert "DOE" not in where
    with pytest.raises(RuntimeError, match="stopped"):
        maker.submit(b"", None, None, None).result(10)  # closed: the node is stopping


def test_a_verdict_that_cannot_be_derived_now_is_retried_not_given_up(guard, tmp_path):
    """The results builder derives a missing verdict through the data plane; a busy data plane (queue
    full) is a reason to try again later, not to move the image to failed/."""
    from gamguard.runtime.dicomnode.journal import thumbnail
    from gamguard.runtime.server.errors import Overloaded

    ((path, label),) = accepted_phantoms(guard, tmp_path, 1).items()
    uid = pydicom.dcmread(path).SOPInstanceUID
    calls = []

    def reverify(data: bytes):
        calls.append(len(data))
        if len(calls) == 1:
            raise Overloaded("request queue full")
        decoded, verdict = judged(guard, path)
        return verdict, thumbnail(decoded.pixels)

    journal, builder = results_builder(guard, tmp_path, reverify)
    journal.release_source(journal.put_source(uid, path.read_bytes()))  # answered; no verdict kept
    assert builder.build(journal.pending()[0]) is False  # busy: the job stays
    assert len(journal) == 1 and not (tmp_path / "journal" / "failed").exists()
    assert builder.build(journal.pending()[0]) is True and len(journal) == 0 and len(calls) == 2
    kept = [pydicom.dcmread(p) for p in (tmp_path / "outbox" / "kept").glob("*.dcm")]
    assert [read_verdict_sr(d)["label"] for d in kept if d.Modality == "SR"] == [label]


def test_other_content_under_a_uid_sent_before_gets_the_results_of_its_own_bytes(guard, tmp_path, caplog):
    """A console sends an image, then other pixels under the same SOP Instance UID before the results are
    built: both are kept (neither written over nor deleted with the other) and each one's results carry the
    verdict of its own bytes; a verdict is never used with other bytes than it was computed on."""
    import logging

    from gamguard.runtime.dicomnode.journal import thumbnail

    caplog.set_level(logging.WARNING)
    (first, first_label), (second, second_label) = accepted_phantoms(guard, tmp_path, 2).items()
    assert first_label != second_label  # classes in turn
    uid = pydicom.dcmread(first).SOPInstanceUID
    ds = pydicom.dcmread(second)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(second)
    content = {first.read_bytes(): first, second.read_bytes(): second}
    rederived = []

    def reverify(data: bytes):
        rederived.append(content[data])
        decoded, verdict = judged(guard, content[data])
        return verdict, thumbnail(decoded.pixels)

    def receive(journal, builder, path, keep=True):  # as the C-STORE handler: journal, verdict, release
        incoming = journal.put_source(uid, path.read_bytes())
        if keep:
            decoded, verdict = judged(guard, path)
            builder.keep_verdict(journal.incoming_key(incoming), verdict, thumbnail(decoded.pixels))
        journal.release_source(incoming)

    def labels(name):
        kept = [pydicom.dcmread(p) for p in (tmp_path / name / "outbox" / "kept").glob("*.dcm")]
        return [read_verdict_sr(d)["label"] for d in kept if d.Modality == "SR"]

    # both contents wait for their results: two entries, each built with its own kept verdict
    journal, builder = results_builder(guard, tmp_path / "both", reverify)
    receive(journal, builder, first)
    receive(journal, builder, second)
    assert any("received with other content" in r.getMessage() for r in caplog.records)
    assert len(journal.pending()) == 2
    built = []
    for path in journal.pending():
        assert builder.build(path) is True
        built += labels("both")
    assert rederived == [] and len(journal) == 0
    assert sorted(set(built)) == sorted([first_label, second_label])  # same result UIDs: the outbox keeps the last

    # the later content arrives while the first one's results are being built: it is not deleted with them
    journal, builder = results_builder(guard, tmp_path / "during", reverify)
    receive(journal, builder, first)
    (path,) = journal.pending()
    receive(journal, builder, second, keep=False)  # its verification failed after the answer: no verdict kept
    assert builder.build(path) is True and labels("during") == [first_label]
    assert len(journal) == 1 and builder.build(journal.pending()[0]) is True
    assert rederived == [second] and labels("during") == [second_label]

    # an entry whose bytes are not the ones its name says: its kept verdict is not used
    journal, builder = results_builder(guard, tmp_path / "edited", reverify)
    receive(journal, builder, first)
    (path,) = journal.pending()
    path.write_bytes(second.read_bytes())
    assert builder.build(path) is True and labels("edited") == [second_label] and rederived[-1] == second


def test_the_overlay_panel_is_the_area_average_of_the_image_and_never_invalid():
    """journal.thumbnail: a radiograph-size image shrinks to the area average (to one grey level), a small
    one grows, and values the decoder never gives (NaN, ±Inf, out of [0, 1]) still make a valid panel."""
    import warnings

    from gamguard.runtime.dicomnode.journal import THUMBNAIL_SIDE, thumbnail

    rng = np.random.default_rng(3)
    big = rng.random((2048, 2048)).astype(np.float32)
    panel = thumbnail(big)
    assert panel.shape == (THUMBNAIL_SIDE, THUMBNAIL_SIDE) and panel.dtype == np.uint8
    expected = big.reshape(THUMBNAIL_SIDE, 8, THUMBNAIL_SIDE, 8).mean(axis=(1, 3)) * 255.0
    assert np.abs(panel - expected).max() <= 0.5 + 1e-3
    assert thumbnail(np.ones((100, 60), np.float32)).min() == 255
    odd = rng.random((300, 300)).astype(np.float32)
    odd[5, 5], odd[200, 200] = np.nan, -np.inf
    odd[100:140, 100:140], odd[250:260, :50] = np.inf, 7.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast"
        panel = thumbnail(odd)
    assert panel.dtype == np.uint8 and panel[(100 * 256) // 300 + 5, (100 * 256) // 300 + 5] == 255


def test_kept_verdicts_make_room_oldest_first(guard, tmp_path):
    from gamguard.runtime.dicomnode.journal import Job, entry_key

    _, builder = results_builder(guard, tmp_path)
    builder.KEPT_VERDICTS = 3
    uids = [f"1.2.{i}" for i in range(5)]
    kept = {uid: object() for uid in uids}
    for uid in uids:
        builder.keep_verdict(entry_key(uid, b"x"), kept[uid], None)
    # the newest are kept; the oldest are derived again if needed
    assert list(builder._verdicts) == uids[2:]
    for uid in uids:
        taken = builder._take_verdict(Job(uid, entry_key(uid, b"x"), b"x"))
        assert (taken is not None and taken[0] is kept[uid]) == (uid in uids[2:])
    assert builder._verdicts == {}


def test_the_same_instance_from_concurrent_associations_is_stored_once(guard, demo_bundle, tmp_path):
    import concurrent.futures

    ((path, _),) = accepted_phantoms(guard, tmp_path, 1).items()
    with _node(tmp_path, demo_bundle, []) as node:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _scu_store(node.port, [path] * 6), range(3)))
        assert answers == [[0] * 6] * 3
        assert node.node.wait_results_built(60)
    assert len(list((tmp_path / "queue" / "outbox" / "kept").glob("*.dcm"))) == 2  # one SR, one overlay
    assert not list((tmp_path / "queue" / "journal").iterdir())


def test_outbox_puts_junk_aside_warns_of_orphans_and_leaves_no_temporaries(tmp_path, caplog, monkeypatch):
    """What an operator's mistakes or a full disk leave in the outbox is handled, not spun on or hidden."""
    import logging

    from gamguard.runtime.dicomnode import durable
    from gamguard.runtime.dicomnode.forwarder import Forwarder
    from gamguard.runtime.dicomnode.outbox import Outbox

    caplog.set_level(logging.WARNING)
    root = tmp_path / "outbox"
    (root / "OLD@10.0.0.9_104").mkdir(parents=True)  # the --forward address was corrected since
    (root / "OLD@10.0.0.9_104" / "1.2.3.dcm").write_bytes(b"queued for the old address")
    pacs = parse_destination("PACS@127.0.0.1:9")
    outbox = Outbox(root, [pacs.name])
    assert any("OLD@10.0.0.9_104 holds 1 object" in r.getMessage() for r in caplog.records)
    # an entry that is not a DICOM file: moved aside once, not retried in a loop
    (root / pacs.name / "9.9.9.dcm").write_bytes(b"not dicom")
    (root / pacs.name / "9.9.8.dcm").mkdir()
    forwarder = Forwarder(pacs, outbox, calling_ae="GAMGUARD")
    due, _ = forwarder._due()
    forwarder._send_pass(due)
    assert outbox.pending(pacs.name) == [] and forwarder._due() == ([], None)
    assert sorted(p.name for p in (root / "unreadable" / pacs.name).iterdir()) == ["9.9.8.dcm", "9.9.9.dcm"]

    # a write that fails (a full disk) leaves no temporary behind to pile up at every retry
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        outbox.put("1.2.4", b"x")
    assert list((root / pacs.name).iterdir()) == []


def test_a_destination_that_aborts_is_backed_off_not_hammered(tmp_path):
    """A PACS that aborts mid-transfer: the destination waits (backoff) before the next association,
    instead of one new association per queued object."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    from gamguard.runtime.dicomnode.forwarder import Forwarder
    from gamguard.runtime.dicomnode.outbox import Outbox

    associations = []

    def on_store(event):
        event.assoc.abort()
        return 0xC000

    scp = AE(ae_title="PACS")
    scp.add_supported_context(SecondaryCaptureImageStorage, "1.2.840.10008.1.2.1")
    server = scp.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, lambda e: associations.append(1))],
    )
    try:
        pacs = parse_destination(f"PACS@127.0.0.1:{server.server_address[1]}")
        outbox = Outbox(tmp_path / "outbox", [pacs.name])
        ds = rgb_secondary_capture(tmp_path / "sc.dcm", np.zeros((8, 8, 3), np.uint8))
        for i in range(5):
            src = pydicom.dcmread(ds)
            src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.{i + 1}"
            buf = io.BytesIO()
            src.save_as(buf, enforce_file_format=True)
            outbox.put(src.SOPInstanceUID, buf.getvalue())
        forwarder = Forwarder(pacs, outbox, calling_ae="GAMGUARD", retry_initial_s=30.0, timeout_s=5.0)
        forwarder.start()
        time.sleep(4)
        forwarder.stop()
        assert len(associations) == 1  # one association, then the destination waits
        assert forwarder._not_before > time.monotonic() and outbox.depth(pacs.name) == 5  # nothing lost
    finally:
        server.shutdown()


def test_backoff_doubles_up_to_the_cap_and_warnings_count_as_stored():
    from gamguard.runtime.dicomnode.forwarder import backoff_s, is_stored

    assert [backoff_s(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert is_stored(0x0000) and is_stored(0xB000) and is_stored(0xB007)
    assert not is_stored(0xA700) and not is_stored(0xC000) and not is_stored(0x0110)


def test_config_file_dicom_section_flags_and_errors(tmp_path):
    import argparse

    from gamguard.runtime.dicomnode.config import add_dicom_node_arguments, node_config_from_args
    from gamguard.runtime.server.config import add_serve_arguments, config_from_args

    cfg_file = tmp_path / "gamguard.yaml"
    cfg_file.write_text(
        "max-batch-size: 4\nport: 8001\ninsecure: true\n"
        "dicom:\n  port: 11112\n  ae-title: NODE1\n  allow-ae: [DX1, CR2@127.0.0.1]\n"
        "  forward: [PACS@10.0.0.5:104]\n"
    )
    p = argparse.ArgumentParser()
    add_dicom_node_arguments(p)
    node, serve = node_config_from_args(p.parse_args(["--config", str(cfg_file), "--port", "104"]))
    assert (node.port, node.ae_title, node.allow_ae) == (104, "NODE1", ["DX1", "CR2@127.0.0.1"])
    assert [str(d) for d in node.destinations] == ["PACS@10.0.0.5:104"] and serve.max_batch_size == 4
    allow = node.allow_list()
    assert allow.admits("DX1", "10.9.9.9") and allow.admits("CR2", "127.0.0.1")
    assert not allow.admits("CR2", "10.9.9.9") and not allow.admits("dx1", "10.9.9.9")
    # the same file still configures `gamguard serve` (the dicom section is the node's)
    s = argparse.ArgumentParser()
    add_serve_arguments(s)
    assert config_from_args(s.parse_args(["--config", str(cfg_file)])).port == 8001
    with pytest.raises(ConfigError, match="allow-ae"):
        DicomNodeConfig().validate()
    for bad in ("PACS@host", "PACS:104", "A_TITLE_LONGER_THAN_16@h:104", "PACS@h:0"):
        with pytest.raises(ConfigError):
            parse_destination(bad)
    with pytest.raises(SystemExit):  # argparse refuses a non-integer port
        p.parse_args(["--port", "x"])
    (tmp_path / "workers.yaml").write_text("dicom:\n  allow-any-ae: true\n  result-workers: 3\n")
    node, _ = node_config_from_args(p.parse_args(["--config", str(tmp_path / "workers.yaml")]))
    assert node.result_workers == 3 and DicomNodeConfig(allow_any_ae=True).result_workers is None  # None: auto
    with pytest.raises(ConfigError, match="result-workers must be >= 0"):
        node_config_from_args(p.parse_args(["--config", str(tmp_path / "workers.yaml"), "--result-workers", "-1"]))
    (tmp_path / "typed.yaml").write_text("dicom:\n  allow-any-ae: true\n  max-associations: many\n")
    with pytest.raises(ConfigError, match="max-associations must be an integer, got 'many'"):
        node_config_from_args(p.parse_args(["--config", str(tmp_path / "typed.yaml")]))
    # TLS towards the destinations: flags or config keys, each refusal names what is missing
    pem = tmp_path / "ca.pem"
    pem.write_text("not checked here: loaded when the node starts")
    (tmp_path / "tls.yaml").write_text(
        f"dicom:\n  allow-any-ae: true\n  forward: [PACS@pacs:2762]\n  forward-tls-ca: {pem}\n"
    )
    node, _ = node_config_from_args(p.parse_args(["--config", str(tmp_path / "tls.yaml")]))
    assert node.forward_tls_ca == str(pem) and node.forward_tls_cert is None
    base = dict(allow_any_ae=True, forward=["PACS@pacs:2762"])
    for kw, message in (
        (dict(forward_tls_cert=str(pem)), "--forward-tls-key"),
        (dict(forward_tls_cert=str(pem), forward_tls_key=str(pem)), "need --forward-tls-ca"),
        (dict(forward_tls_ca=str(tmp_path / "missing.pem")), "missing.pem: no such file"),
        (dict(forward_tls_ca=str(pem), forward=[]), "without a --forward destination"),
    ):
        with pytest.raises(ConfigError, match=message):
            DicomNodeConfig(**{**base, **kw}).validate()


# ------------------------------------------------------------- the node with pynetdicom (no apt tools)


def _node(tmp_path, demo_bundle, forward: list[str], audit_log: str | None = None, **kw) -> BackgroundNode:
    kw.setdefault("allow_ae", ["TESTSCU", "STORESCU", "ECHOSCU"])
    cfg = DicomNodeConfig(
        host="127.0.0.1",
        port=0,
        ae_title="GAMGUARD",
        forward=forward,
        queue_dir=str(tmp_path / "queue"),
        retry_initial_s=0.2,
        retry_max_s=1.0,
        **kw,
    )
    serve = ServeConfig(bundle=str(demo_bundle), insecure=True, port=0, audit_log=audit_log)
    return BackgroundNode(cfg.validate(), serve)


def _scu_store(port: int, paths: list[Path], *, calling: str = "TESTSCU") -> list[int | None]:
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts[:120]
    assoc = ae.associate("127.0.0.1", port, ae_title="GAMGUARD")
    if not assoc.is_established:
        return [None] * len(paths)
    statuses = []
    for p in paths:
        rsp = assoc.send_c_store(p)
        statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
    assoc.release()
    return statuses


def test_node_stores_forwards_and_a_resend_does_not_duplicate(guard, demo_bundle, tmp_path):
    phantoms = accepted_phantoms(guard, tmp_path, 2)
    paths = list(phantoms)
    ct = relabelled(Path(pydicom.data.get_testdata_file("CT_small.dcm")), tmp_path / "ct_as_dx.dcm", DX)
    with ReceivingArchive(tmp_path / "archive") as archive, _node(tmp_path, demo_bundle, [archive.address]) as node:
        assert _scu_store(node.port, paths + [ct]) == [0, 0, 0]
        assert archive.wait_for(6, timeout=60), f"only {len(archive.instances())} objects arrived"
        first = sorted(p.name for p in archive.instances())
        assert _scu_store(node.port, paths[:1]) == [0]  # the console resends an image
        assert node.node.wait_results_built(30)
        time.sleep(1.0)
        assert sorted(p.name for p in archive.instances()) == first  # same SOP Instance UIDs: no duplicates
        assert archive.stores >= 7
        # a PACS routing the node's own overlay back: refused, not judged again (no result about a result)
        overlay = next(p for p in archive.instances() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "OT")
        assert _scu_store(node.port, [overlay]) == [0xC000]
        assert node.node.wait_results_built(30)
        time.sleep(0.5)
        assert sorted(p.name for p in archive.instances()) == first
        srs = [pydicom.dcmread(p) for p in archive.instances()]
        verdicts = {
            d.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID: read_verdict_sr(d)
            for d in srs
            if d.Modality == "SR"
        }
        by_uid = {pydicom.dcmread(p).SOPInstanceUID: label for p, label in phantoms.items()}
        for uid, label in by_uid.items():
            assert verdicts[uid]["accepted"] and verdicts[uid]["label"] == label
        ct_uid = pydicom.dcmread(ct).SOPInstanceUID
        assert verdicts[ct_uid]["accepted"] is False and verdicts[ct_uid]["label"] is None
        metrics = node.node.metrics.exposition().decode()
        assert 'gamguard_dicom_requests_total{service="store",status="success"} 4.0' in metrics
        assert "gamguard_dicom_forwarded_total" in metrics and "Test^Patient" not in metrics


def test_originals_forwarded_association_limit_and_an_audit_without_phi(guard, demo_bundle, tmp_path):
    import json

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ((path, _),) = accepted_phantoms(guard, tmp_path, 1).items()
    audit = tmp_path / "audit.jsonl"
    with (
        ReceivingArchive(tmp_path / "archive") as archive,
        _node(
            tmp_path,
            demo_bundle,
            [archive.address],
            audit_log=str(audit),
            forward_originals="accepted",
            max_associations=1,
        ) as node,
    ):
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
        second = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
        assert first.is_established and second.is_rejected  # beyond --max-associations
        first.release()
        assert _scu_store(node.port, [path]) == [0]
        assert archive.wait_for(3, timeout=60)  # SR, overlay and the accepted original
        uid = pydicom.dcmread(path).SOPInstanceUID
        forwarded = pydicom.dcmread(archive.folder / f"{uid}.dcm")
        assert forwarded.PixelData == pydicom.dcmread(path).PixelData  # the original, as received
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert any(
        x.get("decision") == "accepted" and x["sop_instance_uid"] == uid and x["protocol"] == "dicom" for x in lines
    )
    assert any(x.get("event") == "association_accepted" and x["calling_ae"] == "TESTSCU" for x in lines)
    text = audit.read_text()
    assert "Test^Patient" not in text and "GG-TEST-1" not in text


def test_the_association_limit_counts_associations_not_connections(demo_bundle, tmp_path):
    """Connections that never associate (a port scan, a TCP health check, garbage) hold no console's slot,
    and consoles associating at the same instant get every slot there is."""
    import socket
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    limit = 3
    with _node(tmp_path, demo_bundle, [], max_associations=limit) as node:
        idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(limit + 2)]  # say nothing
        for s in idle[:2]:
            s.sendall(b"\x01\x00garbage")
        try:
            results: list[bool] = []
            held = threading.Event()

            def console():
                ae = AE(ae_title="TESTSCU")
                ae.add_requested_context(Verification)
                assoc = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
                results.append(assoc.is_established)
                if assoc.is_established:
                    held.wait(10)
                    assoc.release()

            threads = [threading.Thread(target=console) for _ in range(limit + 2)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while len(results) < len(threads) and time.monotonic() < deadline:
                time.sleep(0.05)
            held.set()
            for t in threads:
                t.join(30)
            assert sorted(results) == [False] * 2 + [True] * limit  # every slot used, none more
        finally:
            for s in idle:
                s.close()


def _association_request() -> bytes:
    """A real A-ASSOCIATE-RQ (TESTSCU → GAMGUARD, Verification), captured from pynetdicom's SCU by a
    listener that answers nothing."""
    import socket
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    listener = socket.create_server(("127.0.0.1", 0))
    captured = {}

    def grab():
        conn, _ = listener.accept()
        captured["rq"] = conn.recv(65536)
        conn.close()

    threading.Thread(target=grab, daemon=True).start()
    scu = AE(ae_title="TESTSCU")
    scu.add_requested_context(Verification)
    scu.acse_timeout = 1
    scu.associate("127.0.0.1", listener.getsockname()[1], ae_title="GAMGUARD")
    listener.close()
    return captured["rq"]


def test_a_pdu_larger_than_max_pdu_is_not_read(demo_bundle, tmp_path):
    """An associated peer announcing a P-DATA PDU far beyond --max-pdu is cut off before its body is read
    (pynetdicom alone would buffer the whole of it), and the node goes on serving."""
    import socket
    import struct

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with _node(tmp_path, demo_bundle, []) as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
            s.sendall(_association_request())
            assert s.recv(1)[:1] == b"\x02"  # A-ASSOCIATE-AC
            announced = 512 << 20
            s.sendall(struct.pack(">BBI", 4, 0, announced) + struct.pack(">IB", announced - 4, 1) + b"\x02")
            # pynetdicom alone reads all of it; the node stops reading (and closes) long before 64 MiB
            with pytest.raises(OSError):
                for _ in range(64):
                    s.sendall(b"\0" * (1 << 20))
        scu = AE(ae_title="TESTSCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()


def test_a_pdu_body_is_read_whole_in_few_calls_and_a_close_returns_what_came():
    """pdulimit.read_whole: a 2 MB PDU body arrives byte-exact in far fewer calls than pynetdicom's 4 KiB
    steps (512 here); a peer closing early leaves the bytes read so far, as pynetdicom returns them."""
    import socket
    import threading

    from gamguard.runtime.dicomnode.pdulimit import read_whole

    class Counting:
        def __init__(self, sock):
            self.sock, self.calls = sock, 0

        def recv_into(self, view, n):
            self.calls += 1
            return self.sock.recv_into(view, n)

    body = np.random.default_rng(5).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=a.sendall, args=(body,))
        sender.start()
        reader = Counting(b)
        assert read_whole(reader, len(body)) == body
        sender.join()
        assert reader.calls < 512 // 4
        a.sendall(body[:1000])
        a.shutdown(socket.SHUT_WR)
        assert read_whole(b, 5000) == body[:1000]


@pytest.mark.filterwarnings("ignore:.*VR UI")  # pydicom, on the malformed UIDs pynetdicom encodes
def test_the_received_dataset_is_the_file_pynetdicom_would_write():
    """filemeta.encoded_dataset (the File Meta Information encoded once per class, syntax and UID length)
    gives exactly pynetdicom's event.encoded_dataset() bytes for every UID length, odd and even, for
    several classes and transfer syntaxes, and a malformed UID takes pynetdicom's own path."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.presentation import PresentationContext

    from gamguard.runtime.dicomnode.filemeta import encoded_dataset

    rng = np.random.default_rng(11)
    classes = [DX, "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.1"]
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    uids = ["".join(rng.choice(list("0123456789."), n)) for n in range(1, 65)] + ["1.2.3", "9" * 64]
    for i, uid in enumerate([*uids, "1.2.Ü", "x" * 70, ""]):
        request = C_STORE()
        request.AffectedSOPClassUID = classes[i % 3]
        request._affected_sop_instance_uid = uid  # as a peer may send it: no validation
        request.DataSet = io.BytesIO(rng.integers(0, 256, 100 + i, dtype=np.uint8).tobytes())
        context = PresentationContext()
        context.context_id, context.abstract_syntax = 1, classes[i % 3]
        context.transfer_syntax = [syntaxes[i % 3]]
        event = Event(None, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        if not uid:  # pynetdicom refuses to encode it: so does the node (a processing failure)
            with pytest.raises(AttributeError, match="Media Storage SOP Instance UID"):
                encoded_dataset(event)
            continue
        assert encoded_dataset(event) == event.encoded_dataset(), uid


def test_peers_that_request_and_vanish_leave_no_slot_taken(demo_bundle, tmp_path):
    """pynetdicom may report a connection's close before its association request: such a peer must not
    keep its slot (else a few of them lock every console out for good)."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    scu = AE(ae_title="TESTSCU")
    scu.add_requested_context(Verification)
    request = _association_request()
    with _node(tmp_path, demo_bundle, [], max_associations=2) as node:
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", node.port)) as s:
                s.sendall(request)
        deadline = time.monotonic() + 10  # receivers report what pynetdicom closed unseen within a second
        while node.node.scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.node.scp.active_associations == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the vanished peers' associations end by themselves
            assoc = scu.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
            if assoc.is_established:
                assoc.release()
                break
            time.sleep(0.5)
        else:
            pytest.fail("the node still refuses a console 30 s after 100 peers requested and vanished")


def test_node_refuses_other_sop_classes_unknown_callers_and_bad_pixel_data(guard, demo_bundle, tmp_path):
    import json

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    ((good, _),) = accepted_phantoms(guard, tmp_path, 1).items()
    bad = truncated_pixels(good, tmp_path / "bad.dcm")
    audit = tmp_path / "audit.jsonl"
    with _node(tmp_path, demo_bundle, [], audit_log=str(audit)) as node:
        assert _scu_store(node.port, [good], calling="INTRUDER") == [None]  # association rejected
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD")
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]  # CT refused
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert _scu_store(node.port, [bad, good]) == [0xC000, 0]  # the node carries on after bad data
        assert node.node.wait_results_built(30)
        kept = list((tmp_path / "queue" / "outbox" / "kept").glob("*.dcm"))
        assert len(kept) == 2  # no forward destination: SR + SC of the good image kept on disk
    records = [json.loads(x) for x in audit.read_text().splitlines()]
    dicom = [r for r in records if r.get("protocol") == "dicom" and "request_id" in r]
    # the undecodable image (decoded in its association's thread) is audited once, the good one once
    assert sorted(r["decision"] for r in dicom) == ["accepted", "invalid"], dicom


# ----------------------------------------------------------------- third-party tools: dcmtk, Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    archive = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield archive
    archive.stop()


@pytest.fixture(scope="module")
def tool_node(demo_bundle, orthanc, tmp_path_factory):
    require_tool("storescu", "dcmtk")
    with _node(tmp_path_factory.mktemp("node"), demo_bundle, [orthanc.address]) as node:
        yield node


def _storescu(port: int, paths, *, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", "GAMGUARD", "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _orthanc_verdicts(orthanc) -> dict[str, dict]:
    out = {}
    for ds in orthanc.datasets("SR"):
        said = read_verdict_sr(ds)
        out[said["source_sop_instance_uid"]] = said
    return out


def test_echoscu_succeeds_and_an_unknown_calling_ae_is_rejected(tool_node):
    echoscu = require_tool("echoscu", "dcmtk")
    ok = subprocess.run(
        [echoscu, "-aet", "ECHOSCU", "-aec", "GAMGUARD", "127.0.0.1", str(tool_node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    no = subprocess.run(
        [echoscu, "-aet", "STRANGER", "-aec", "GAMGUARD", "127.0.0.1", str(tool_node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no.returncode != 0 and "Calling AE Title Not Recognized" in no.stderr


def test_storescu_phantoms_arrive_in_orthanc_as_accepted_srs_with_label_and_overlay(
    guard, tool_node, orthanc, tmp_path
):
    phantoms = accepted_phantoms(guard, tmp_path, 4)
    run = _storescu(tool_node.port, phantoms)
    assert run.returncode == 0, run.stderr
    uids = {pydicom.dcmread(p).SOPInstanceUID: label for p, label in phantoms.items()}
    deadline = time.monotonic() + 90
    while not set(uids) <= set(verdicts := _orthanc_verdicts(orthanc)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for uid, label in uids.items():
        assert verdicts[uid]["accepted"] is True and verdicts[uid]["label"] == label
        assert verdicts[uid]["reasons"] == [] and set(verdicts[uid]["probabilities"]) == set(CLASS_NAMES)
    while True:  # the overlay is queued right after its SR: it may still be on its way
        overlays = {ds.SourceImageSequence[0].ReferencedSOPInstanceUID: ds for ds in orthanc.datasets("OT")}
        if set(uids) <= set(overlays) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for uid in uids:
        assert overlays[uid].BurnedInAnnotation == "YES"


@pytest.mark.parametrize(
    "tool, syntax, propose",
    [
        ("dcmcjpeg", "1.2.840.10008.1.2.4.70", "-xs"),  # JPEG lossless, first-order prediction (SV1)
        ("dcmcjpls", "1.2.840.10008.1.2.4.80", "-xt"),  # JPEG-LS lossless
        ("dcmcrle", "1.2.840.10008.1.2.5", "-xr"),  # RLE lossless
    ],
    ids=["jpeg-lossless", "jpeg-ls", "rle"],
)
def test_losslessly_compressed_images_from_a_console_get_the_same_verdict(
    guard, tool_node, orthanc, tmp_path, tool, syntax, propose
):
    """Consoles often send JPEG lossless (or JPEG-LS, RLE): compressed by dcmtk's own encoders and sent
    in that transfer syntax by its storescu (which proposes only it), each image gets the verdict of its
    uncompressed original."""
    encoder = require_tool(tool, "dcmtk")
    phantoms = accepted_phantoms(guard, tmp_path, 2, start_seed=SEED + 700 + len(tool))
    sent = {}
    for path, label in phantoms.items():
        packed = tmp_path / f"{path.stem}.{tool}.dcm"
        done = subprocess.run([encoder, str(path), str(packed)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        ds = pydicom.dcmread(packed)
        assert ds.file_meta.TransferSyntaxUID == syntax
        sent[ds.SOPInstanceUID] = label
        # lossless: the pixels a decoder gets back are the original's
        np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(path).pixel_array)
    files = [str(tmp_path / f"{p.stem}.{tool}.dcm") for p in phantoms]
    cmd = ["storescu", "-R", propose, "-aet", "STORESCU", "-aec", "GAMGUARD", "127.0.0.1", str(tool_node.port)]
    run = subprocess.run([*cmd, *files], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    deadline = time.monotonic() + 90
    while not set(sent) <= set(verdicts := _orthanc_verdicts(orthanc)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for uid, label in sent.items():
        assert verdicts[uid]["accepted"] is True and verdicts[uid]["label"] == label, verdicts.get(uid)


def test_a_pacs_routes_an_image_to_the_node_and_gets_the_verdict_in_the_same_study(
    guard, demo_bundle, orthanc, tmp_path
):
    """The other way a site wires it: the PACS (Orthanc, its own DICOM stack as the SCU) sends a stored
    image to the node (REST ``/modalities/{id}/store``), and the SR comes back into the image's study."""
    ((path, label),) = accepted_phantoms(guard, tmp_path, 1, start_seed=SEED + 500).items()
    source = pydicom.dcmread(path)
    with _node(tmp_path / "routed", demo_bundle, [orthanc.address], allow_ae=[orthanc.ae_title]) as node:
        uploaded = orthanc.post_bytes("/instances", path.read_bytes())
        modality = {"AET": "GAMGUARD", "Host": "127.0.0.1", "Port": node.port}
        orthanc.put("/modalities/gamguard", modality)
        sent = orthanc.post("/modalities/gamguard/store", {"Resources": [uploaded["ID"]], "Synchronous": True})
        assert sent.get("FailedInstancesCount", 0) == 0 and sent.get("InstancesCount") == 1, sent
        deadline = time.monotonic() + 90
        while source.SOPInstanceUID not in (verdicts := _orthanc_verdicts(orthanc)) and time.monotonic() < deadline:
            time.sleep(0.5)
    said = verdicts[source.SOPInstanceUID]
    assert said["accepted"] is True and said["label"] == label
    (sr,) = [
        d for d in orthanc.datasets("SR") if read_verdict_sr(d)["source_sop_instance_uid"] == source.SOPInstanceUID
    ]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID


def test_off_distribution_dicoms_get_rejected_srs_with_reasons_and_no_label(tool_node, orthanc, tmp_path):
    from pydicom.data import get_testdata_file
    from skimage.data import astronaut

    ct = Path(get_testdata_file("CT_small.dcm"))
    files = [
        relabelled(ct, tmp_path / "ct_as_dx.dcm", DX),
        relabelled(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr_as_dx.dcm", DX),
        rgb_secondary_capture(tmp_path / "photo_sc.dcm", astronaut()),
    ]
    run = _storescu(tool_node.port, files)
    assert run.returncode == 0, run.stderr
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in files]
    deadline = time.monotonic() + 90
    while not set(uids) <= set(verdicts := _orthanc_verdicts(orthanc)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for uid in uids:
        said = verdicts[uid]
        assert said["accepted"] is False and said["reasons"] and said["label"] is None and not said["probabilities"]
    # the CT file as it is (CT Image Storage) is refused at association: no presentation context, no result
    refused = _storescu(tool_node.port, [ct])
    assert refused.returncode != 0 and "presentation context" in refused.stderr.lower()


def test_malformed_dataset_gets_a_failure_status_and_the_node_stays_up(guard, tool_node, tmp_path):
    ((good, _),) = accepted_phantoms(guard, tmp_path, 1, start_seed=SEED + 500).items()
    bad = truncated_pixels(good, tmp_path / "truncated.dcm")
    run = subprocess.run(
        ["storescu", "-v", "-aec", "GAMGUARD", "127.0.0.1", str(tool_node.port), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "CannotUnderstand" in run.stdout + run.stderr
    assert _storescu(tool_node.port, [good]).returncode == 0  # still serving


@pytest.fixture
def fresh_log_limits(caplog):
    """caplog's handler with no rate limiter left from earlier tests: the node installs its own when it
    starts, so a library record logged by an earlier test within 10 s cannot hide this test's first one."""
    from gamguard.runtime.server.quietlog import RateLimitFilter

    for f in [f for f in caplog.handler.filters if isinstance(f, RateLimitFilter)]:
        caplog.handler.removeFilter(f)
    return caplog


def _ctn_send_image(port: int, files: list[Path]) -> None:
    """The RSNA Central Test Node's Storage SCU (C): one association for all files, closed with a TCP
    reset once released."""
    run = subprocess.run(
        [require_tool("send_image", "ctn"), "-q", "-r", "-a", "CTNSCU", "-c", "GAMGUARD", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _pixelmed_storescu(port: int, files: list[Path]) -> None:
    """PixelMed's Storage SCU (Java): one association per file."""
    cmd = [*pixelmed("com.pixelmed.network.StorageSOPClassSCU"), "127.0.0.1", str(port), "GAMGUARD", "PIXELMED"]
    for f in files:
        run = subprocess.run([*cmd, str(f), "0"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "Exception" not in run.stdout + run.stderr, run.stdout + run.stderr


def _odil_store(port: int, files: list[Path]) -> None:
    """Odil's Storage SCU (C++11, its own DICOM stack): one association for all files."""
    cmd = [require_tool("odil", "odil"), "store", "127.0.0.1", str(port), "ODIL", "GAMGUARD"]
    run = subprocess.run(cmd + [str(f) for f in files], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    "send", [_ctn_send_image, _pixelmed_storescu, _odil_store], ids=["ctn-send_image", "pixelmed", "odil"]
)
def test_other_dicom_stacks_send_to_the_node(send, guard, demo_bundle, tmp_path, fresh_log_limits):
    """More independent Storage SCUs as consoles and PACS gateways embed them — the RSNA Central Test
    Node (C), PixelMed (Java) and Odil (C++): an accepted phantom's SR has its label, a knee's SR is rejected without
    one, and the node logs no error: CTN resets the TCP connection after every released association,
    which pynetdicom reports as an ERROR with a traceback unless the node filters it (.peerlog)."""
    from gamguard.runtime.demo.phantoms import ood_image
    from gamguard.runtime.demo.synth import write_dicom

    ((accepted, label),) = accepted_phantoms(guard, tmp_path, 1).items()
    knee = write_dicom(tmp_path / "knee.dcm", ood_image("knee", np.random.default_rng(SEED)))
    want = {pydicom.dcmread(accepted).SOPInstanceUID: label, pydicom.dcmread(knee).SOPInstanceUID: None}
    with _node(tmp_path, demo_bundle, [], allow_ae=["CTNSCU", "PIXELMED", "ODIL"]) as node:
        send(node.port, [accepted, knee])
        assert node.node.wait_results_built(60)
        time.sleep(0.5)  # the last association's close reaches the node
    kept = [pydicom.dcmread(p) for p in (tmp_path / "queue" / "outbox" / "kept").glob("*.dcm")]
    said = {d["source_sop_instance_uid"]: d for d in map(read_verdict_sr, (k for k in kept if k.Modality == "SR"))}
    assert {uid: d["label"] for uid, d in said.items()} == want
    assert [said[uid]["accepted"] for uid in want] == [True, False]
    errors = [r for r in fresh_log_limits.records if r.levelno >= 30 and r.name.startswith("pynetdicom")]
    assert errors == [], [r.getMessage() for r in errors]


def test_a_connection_reset_mid_association_is_logged_once_without_a_traceback(demo_bundle, tmp_path, fresh_log_limits):
    caplog = fresh_log_limits
    """The filter that drops a reset after release (.peerlog) keeps a reset *during* an association (a
    console powered off mid-transfer): logged, without pynetdicom's traceback, and counted as aborted."""
    import socket
    import struct

    with _node(tmp_path, demo_bundle, []) as node:
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            s.sendall(_association_request())
            assert s.recv(1)[:1] == b"\x02"  # A-ASSOCIATE-AC: the association is established
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r.name == "pynetdicom.dul" for r in caplog.records):
            time.sleep(0.05)
        aborted = node.node.dicom_metrics.associations.labels("aborted")._value.get()
    dul = [r for r in caplog.records if r.name == "pynetdicom.dul"]
    assert dul and dul[0].levelno == 40 and "Connection closed" in dul[0].getMessage()
    assert all(r.exc_info is None for r in dul), "pynetdicom's traceback reached the log"
    assert aborted >= 1


def test_dciodvfy_passes_every_sr_and_overlay_in_orthanc(guard, tool_node, orthanc, tmp_path):
    require_tool("dciodvfy", "dicom3tools")
    if len(orthanc.instance_ids("SR")) < 2:  # run alone: store an accepted and a rejected image first
        from gamguard.runtime.demo.phantoms import ood_image
        from gamguard.runtime.demo.synth import write_dicom

        files = [
            *accepted_phantoms(guard, tmp_path, 1),
            write_dicom(tmp_path / "knee.dcm", ood_image("knee", np.random.default_rng(SEED))),
        ]
        assert _storescu(tool_node.port, files).returncode == 0
        assert orthanc.wait_for("SR", 2, timeout=90) >= 2
    checked = 0
    for modality in ("SR", "OT"):
        for i, instance in enumerate(orthanc.instance_ids(modality)):
            path = tmp_path / f"{modality}_{i}.dcm"
            path.write_bytes(orthanc.file(instance))
            assert dciodvfy_errors(path) == [], f"{modality} instance {instance}"
            checked += 1
    assert checked >= 4


def _start_node_process(tmp_path: Path, demo_bundle: Path, port: int, forward: str, log_name: str):
    cmd = [
        sys.executable,
        "-m",
        "gamguard.runtime.cli",
        "dicom-node",
        "--bundle",
        str(demo_bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ae-title",
        "GAMGUARD",
        "--allow-ae",
        "STORESCU",
        "--allow-ae",
        "ECHOSCU",
        "--forward",
        forward,
        "--queue-dir",
        str(tmp_path / "queue"),
        "--retry-initial-s",
        "0.5",
        "--retry-max-s",
        "2",
    ]
    log = open(tmp_path / log_name, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / log_name).read_text()
            echo = subprocess.run(
                ["echoscu", "-aec", "GAMGUARD", "127.0.0.1", str(port)], capture_output=True, timeout=30
            )
            if echo.returncode == 0:
                return proc
            time.sleep(0.3)
        raise AssertionError("the node did not answer C-ECHO within 90 s")
    except BaseException:
        proc.kill()  # never left running by a failed test
        raise


def test_forwarding_loses_nothing_with_the_archive_down_and_a_node_crash(guard, demo_bundle, tmp_path):
    """200 images while the archive is down, the node killed (SIGKILL) once in between and 10 images resent
    after the crash; then the archive comes up: exactly 200 SRs (one per image) and 200 overlays arrive."""
    require_tool("storescu", "dcmtk")
    require_tool("echoscu", "dcmtk")
    archive = Orthanc(tmp_path / "orthanc")
    base = list(accepted_phantoms(guard, tmp_path, 4))
    files = []
    for i in range(200):  # 200 distinct instances (new UIDs) of a few phantoms
        ds = pydicom.dcmread(base[i % len(base)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        files.append(tmp_path / f"img_{i:03d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    port = free_port()
    node = _start_node_process(tmp_path, demo_bundle, port, archive.address, "node1.log")
    try:
        assert _storescu(port, files[:100]).returncode == 0
        node.send_signal(signal.SIGKILL)  # a crash: whatever was being built or sent is cut off
        node.wait(30)
        node = _start_node_process(tmp_path, demo_bundle, port, archive.address, "node2.log")
        assert _storescu(port, files[100:] + files[:10]).returncode == 0  # + a resend after the crash
        archive.start()
        n_sr = archive.wait_for("SR", 200, timeout=240)
        n_ot = archive.wait_for("OT", 200, timeout=60)
        time.sleep(2.0)  # anything still in flight would show up now
        srs = archive.instance_ids("SR")
        assert (n_sr, n_ot, len(srs), len(archive.instance_ids("OT"))) == (200, 200, 200, 200)
        sources = {read_verdict_sr(ds)["source_sop_instance_uid"] for ds in archive.datasets("SR")}
        assert sources == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
        assert not list((tmp_path / "queue" / "outbox").rglob("*.dcm"))  # the outbox drained
    finally:
        node.terminate()
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
        archive.stop()


# --------------------------------------------------------------------------------------------- deploy


def _deployed_node_commands() -> dict[str, list[str]]:
    import shlex

    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    runs = {"docker-compose.yml": [str(a) for a in compose["services"]["gamguard-dicom"]["command"]]}
    unit = (deploy / "systemd" / "gamguard-dicom-node.service").read_text()
    exec_start = next(line.partition("=")[2] for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/gamguard/bin/gamguard"
    runs["gamguard-dicom-node.service"] = argv[1:]
    docs = [d for d in yaml.safe_load_all((deploy / "k8s/base/dicom-node.yaml").read_text()) if d]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    runs["k8s/base/dicom-node.yaml"] = [str(a) for a in sts["spec"]["template"]["spec"]["containers"][0]["args"]]
    assert "dicom-node.yaml" in (deploy / "k8s/base/kustomization.yaml").read_text()
    return runs


@pytest.mark.parametrize("where", sorted(_deployed_node_commands()))
def test_deployed_dicom_node_command_is_the_real_cli(where):
    import argparse
    import re

    from gamguard.runtime.dicomnode.config import add_dicom_node_arguments, node_config_from_args

    argv = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", a) for a in _deployed_node_commands()[where]]  # compose defaults
    assert argv[0] == "dicom-node"
    parser = argparse.ArgumentParser(prog="gamguard dicom-node")
    add_dicom_node_arguments(parser)
    node, serve = node_config_from_args(parser.parse_args(argv[1:]))
    assert node.host == "0.0.0.0" and node.port == 11112 and node.ae_title == "GAMGUARD"
    assert node.allow_ae and node.destinations and node.queue_dir.startswith("/var/lib/gamguard")
    assert serve.metrics_port and serve.bundle


# ------------------------------------------------------------------------- TLS, gRPC beside, the demo


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_dicom_tls_with_client_certificates(guard, demo_bundle, tmp_path):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    from testlib import make_ca, make_cert

    ca = make_ca(tmp_path, "ca")
    server_crt, server_key = make_cert(tmp_path, "node", ca, server=True)
    client_crt, client_key = make_cert(tmp_path, "console", ca, server=False)
    with _node(
        tmp_path, demo_bundle, [], tls_cert=str(server_crt), tls_key=str(server_key), tls_client_ca=str(ca[0])
    ) as node:

        def echo(with_cert: bool) -> bool:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca[0]))
            if with_cert:
                ctx.load_cert_chain(str(client_crt), str(client_key))
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="GAMGUARD", tls_args=(ctx, "localhost"))
            ok = assoc.is_established and assoc.send_c_echo().Status == 0
            if assoc.is_established:
                assoc.release()
            return ok

        assert echo(with_cert=True)
        assert not echo(with_cert=False)  # mutual TLS: no client certificate, no association
        # and plaintext DICOM does not get through a TLS port
        assert _scu_store(node.port, list(accepted_phantoms(guard, tmp_path, 1))) == [None]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_dcmtk_console_over_dicom_tls(guard, demo_bundle, tmp_path):
    """A console's own TLS stack, not ours: dcmtk's storescu/echoscu with the BCP 195 TLS profile (its
    default) store over mutual TLS; without a client certificate, or in plaintext, nothing gets in (and
    without --tls-client-ca the same certificate-less console does)."""
    require_tool("storescu", "dcmtk")
    from testlib import make_ca, make_cert

    ca = make_ca(tmp_path, "ca")
    server_crt, server_key = make_cert(tmp_path, "node", ca, server=True)
    client_crt, client_key = make_cert(tmp_path, "console", ca, server=False)
    ((path, label),) = accepted_phantoms(guard, tmp_path, 1).items()
    tls = ["+tls", str(client_key), str(client_crt), "+cf", str(ca[0])]

    def dcmtk(tool: str, port: int, *args: str, files=()) -> subprocess.CompletedProcess:
        cmd = [tool, "-aet", "STORESCU", "-aec", "GAMGUARD", *args, "127.0.0.1", str(port), *map(str, files)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    with _node(
        tmp_path, demo_bundle, [], tls_cert=str(server_crt), tls_key=str(server_key), tls_client_ca=str(ca[0])
    ) as node:
        echo = dcmtk("echoscu", node.port, *tls)
        assert echo.returncode == 0, echo.stderr
        stored = dcmtk("storescu", node.port, *tls, "-R", files=[path])  # -R: the file's own SOP class only
        assert stored.returncode == 0, stored.stderr
        assert node.node.wait_results_built(120)
        kept = [pydicom.dcmread(p) for p in (tmp_path / "queue" / "outbox" / "kept").glob("*.dcm")]
        (said,) = [read_verdict_sr(d) for d in kept if d.Modality == "SR"]
        assert said["label"] == label and said["source_sop_instance_uid"] == pydicom.dcmread(path).SOPInstanceUID
        # a console without a client certificate (anonymous TLS), or in plaintext, is not let in
        assert dcmtk("echoscu", node.port, "+tla", "+cf", str(ca[0])).returncode != 0
        assert dcmtk("echoscu", node.port).returncode != 0
        assert node.node.scp.active_associations == 0
    # the refusal above was the missing client certificate: a node that asks for none lets that console in
    with _node(tmp_path / "no-client-ca", demo_bundle, [], tls_cert=str(server_crt), tls_key=str(server_key)) as node:
        assert dcmtk("echoscu", node.port, "+tla", "+cf", str(ca[0])).returncode == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_results_forwarded_to_orthanc_over_dicom_tls(guard, demo_bundle, tmp_path):
    """The PACS speaks DICOM TLS and wants a client certificate: with --forward-tls-ca/-cert/-key the SR
    arrives; a node that does not trust the PACS's certificate sends nothing and keeps the result queued."""
    from testlib import make_ca, make_cert

    ca = make_ca(tmp_path, "ca")
    pacs_crt, pacs_key = make_cert(tmp_path, "pacs", ca, server=True)
    node_crt, node_key = make_cert(tmp_path, "gamguard", ca, server=False)
    other_ca = make_ca(tmp_path, "other-ca")
    archive = Orthanc(tmp_path / "orthanc", tls={"cert": pacs_crt, "key": pacs_key, "ca": ca[0]}).start()
    destination = [f"{archive.ae_title}@localhost:{archive.dicom_port}"]  # the name in the PACS's certificate
    ((path, label),) = accepted_phantoms(guard, tmp_path, 1).items()

    def node_trusting(name: str, trusted_ca):
        return _node(
            tmp_path / name,
            demo_bundle,
            destination,
            forward_tls_ca=str(trusted_ca[0]),
            forward_tls_cert=str(node_crt),
            forward_tls_key=str(node_key),
        )

    try:
        with node_trusting("distrusting", other_ca) as node:
            assert _scu_store(node.port, [path]) == [0]
            node.node.wait_results_built(120)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _forward_failures(node, "connect"):
                time.sleep(0.2)
            assert _forward_failures(node, "connect") >= 1  # the PACS's certificate is not trusted
            assert list((tmp_path / "distrusting" / "queue" / "outbox").rglob("*.dcm"))  # kept for a retry
        assert archive.instance_ids("SR") == []
        with node_trusting("trusting", ca) as node:
            assert _scu_store(node.port, [path]) == [0]
            assert archive.wait_for("SR", 1, timeout=120) == 1
        (sr,) = archive.datasets("SR")
        verdict = read_verdict_sr(sr)
        assert verdict["accepted"] and verdict["label"] == label
    finally:
        archive.stop()


def _forward_failures(node, kind: str) -> float:
    text = node.node.metrics.exposition().decode()  # the node's DICOM metrics share the server's registry
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gamguard_dicom_forward_failures_total") and f'kind="{kind}"' in line
    )


def test_grpc_beside_the_dicom_node_shares_the_data_plane(guard, demo_bundle, tmp_path):
    from gamguard.runtime.server.client import GuardClient

    ((path, label),) = accepted_phantoms(guard, tmp_path, 1).items()
    with _node(tmp_path, demo_bundle, [], grpc_port=0, grpc_insecure=True) as node:
        server = node.node.grpc_server
        assert server is not None and server.state.plane is node.node.plane
        with GuardClient(server.target, timeout=60) as client:
            v = client.verify(path.read_bytes())
        assert v.accepted and v.prediction.label == label
        assert _scu_store(node.port, [path]) == [0]
        assert node.node.wait_results_built(60)  # the answer comes before the verdict: wait for it
        metrics = node.node.metrics.exposition().decode()
        assert 'gamguard_verdicts_total{decision="accepted"} 2.0' in metrics  # one plane, both transports


@pytest.mark.parametrize("runs", [1, 2])
def test_demo_dicom_shows_verdicts_arriving_at_the_archive(demo_bundle, tmp_path, runs):
    """Also run twice into the same folder, as `gamguard demo --dicom` is (a found defect: the second run
    counted the first run's results in the archive and showed its table before its own had arrived)."""
    from gamguard.runtime.dicomnode.demo import format_rows, run_dicom_demo

    for _ in range(runs):
        result = run_dicom_demo(demo_bundle, tmp_path, seed=7, say=lambda *a: None)
    rows = result["rows"]
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    ind = by_group["in-distribution"]
    assert sum(r["sr"] == "accepted" and r["label"] == r["truth"] for r in ind) >= len(ind) - 1
    assert all(r["sr"] == "rejected" and r["label"] is None and r["reasons"] for r in by_group["off-distribution"])
    assert all(r["sr"] is None and not r["c_store"].startswith("0x0000") for r in by_group["malformed"])
    assert by_group["refused at association"][0]["c_store"].startswith("refused")
    assert all(r["overlay"] and Path(r["overlay"]).is_file() for r in rows if r["sr"])
    assert "accepted" in format_rows(rows)
