"""End to end over a real server on a loopback port with the real demo bundle: gamguard.v1.Guard
(unary + streaming + model info), the Open Inference Protocol through tritonclient, reflection,
bad inputs, fault injection, batching, DICOM and the audit log.

One server for the whole module (loading a bundle costs a second or two)."""

from __future__ import annotations

import base64
import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from testlib import ThreadedServer, demo_bundle_path, dicom_bytes, multiframe_dicom, ood, phantom, png16, png_bomb

from gamguard.proto import guard_pb2, guard_pb2_grpc
from gamguard.runtime.server.config import ServeConfig

NOISE_SEED = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    bundle = demo_bundle_path()
    tmp = tmp_path_factory.mktemp("grpc")
    audit = tmp / "audit.jsonl"
    # A long batching window makes the batching test deterministic on a busy 2-core machine.
    cfg = ServeConfig(
        bundle=str(bundle),
        host="127.0.0.1",
        port=0,
        insecure=True,
        metrics_port=0,
        audit_log=str(audit),
        max_batch_size=8,
        max_queue_delay_ms=40.0,
    )
    server = ThreadedServer(cfg).start()
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)])
    from gamguard.runtime.guard import Guard

    offline = Guard.from_bundle(bundle)  # the same bundle, called directly, as the reference
    yield {
        "server": server,
        "stub": guard_pb2_grpc.GuardStub(channel),
        "channel": channel,
        "audit": audit,
        "offline": offline,
        "tmp": tmp,
    }
    channel.close()
    server.stop()


@pytest.fixture(scope="module")
def accepted_phantom(env):
    """Some in-distribution phantom the guard accepts (found by the offline guard, not assumed)."""
    for seed in range(12):
        img = phantom(seed % 4, seed)
        v = env["offline"].verify_images([img])[0]
        if v.accepted:
            return img, v
    pytest.fail("the demo bundle accepted none of 12 in-distribution phantoms")


def verify(env, data: bytes = None, **kw):
    req = guard_pb2.VerifyRequest(**kw)
    if data is not None:
        req.image = data
    return env["stub"].Verify(req, timeout=60)


# ---------------------------------------------------------------------------- gamguard.v1.Guard


def test_verify_accepted_phantom_matches_offline_guard(env, accepted_phantom):
    img, ref = accepted_phantom
    v = verify(env, png16(img), request_id="r-accept", heatmap_png=True, heatmap_values=True)
    assert v.accepted and v.decision == guard_pb2.ACCEPTED and not v.reasons
    assert v.request_id == "r-accept"
    assert v.prediction.label == ref.label and v.prediction.index == ref.label_index
    assert set(v.prediction.probabilities) == set(ref.probabilities)
    assert abs(sum(v.prediction.probabilities.values()) - 1.0) < 1e-4
    for k, s in ref.scores.items():  # same numbers as the in-process guard (16-bit PNG round trip)
        if np.isfinite(s):
            assert v.scores[k] == pytest.approx(s, rel=1e-3, abs=1e-3), k
    assert set(v.thresholds) == set(ref.thresholds)
    assert v.model.bundle_hash == env["offline"].bundle_hash
    assert v.heatmap.png.startswith(b"\x89PNG")
    assert len(v.heatmap.values) == v.heatmap.height * v.heatmap.width > 0
    assert v.input_format == "png" and v.bit_depth == 16
    assert v.timing.total_ms > 0 and v.timing.engine_ms > 0 and v.timing.batch_size >= 1


def test_verify_noise_rejected_without_prediction(env):
    v = verify(env, png16(ood("noise", NOISE_SEED)))
    assert not v.accepted and v.decision == guard_pb2.REJECTED
    assert v.reasons and set(v.reasons) <= {"GARBAGE_CLASS", "ATTENTION_MISMATCH", "FEATURE_MISMATCH"}
    assert not v.HasField("prediction")
    assert "garbage_prob" in v.scores


def test_verify_stream_in_order_and_survives_bad_image(env, accepted_phantom):
    img, ref = accepted_phantom
    items = [
        ("a", png16(img)),
        ("b", png16(ood("noise", NOISE_SEED))),
        ("bad", b"not an image at all"),
        ("c", png16(img)),
    ]
    reqs = (guard_pb2.VerifyRequest(request_id=rid, image=data) for rid, data in items)
    out = list(env["stub"].VerifyStream(reqs, timeout=60))
    assert [v.request_id for v in out] == ["a", "b", "bad", "c"]
    assert out[0].accepted and out[0].prediction.label == ref.label
    assert not out[1].accepted and not out[1].HasField("prediction")
    assert out[2].reasons == ["INVALID_INPUT"] and out[2].detail
    assert out[3].accepted and out[3].prediction.label == ref.label


def test_model_info(env):
    info = env["stub"].GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=10)
    g = env["offline"]
    assert list(info.class_names) == g.class_names
    assert info.garbage_class == g.manifest["garbage_class"]
    assert info.model.bundle_hash == g.bundle_hash
    assert dict(info.file_hashes) == g.manifest["files"]
    assert (info.input.height, info.input.width, info.input.channels) == (g.spec.height, g.spec.width, g.spec.channels)
    assert info.calibration.alpha == pytest.approx(g.alpha)
    assert info.enforced_checks and info.policy
    assert json.loads(info.info_json)["bundle_hash"] == g.bundle_hash


def test_reflection_lists_services(env):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(env["channel"])
    services = set(db.get_services())
    assert {"gamguard.v1.Guard", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    # and a client can resolve a method's message types through it (what grpcurl does)
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    method = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name["ModelInfer"]
    assert method.input_type.full_name == "inference.ModelInferRequest"
    assert "raw_input_contents" in method.input_type.fields_by_name


# ------------------------------------------------------------------------ Open Inference Protocol


@pytest.fixture(scope="module")
def triton(env):
    tc = pytest.importorskip("tritonclient.grpc")
    client = tc.InferenceServerClient(url=env["server"].target)
    yield tc, client
    client.close()


def _infer_bytes(tc, client, model, data: bytes, outputs=None):
    inp = tc.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([data], dtype=np.object_))
    outs = [tc.InferRequestedOutput(n) for n in outputs] if outputs else None
    return client.infer(model, [inp], outputs=outs)


def test_tritonclient_health_and_metadata(env, triton):
    tc, client = triton
    g = env["offline"]
    name = g.manifest["model"]["name"]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert meta.name == name and meta.inputs[0].name == "image" and meta.inputs[0].datatype == "BYTES"
    assert {o.name for o in meta.outputs} >= {"accepted", "reasons", "label", "probabilities", "verdict"}
    assert client.get_server_metadata().name == "gamguard"
    index = client.get_model_repository_index()
    assert [(m.name, m.state) for m in index.models] == [(name, "READY")]
    with pytest.raises(tc.InferenceServerException):
        client.get_model_metadata("no-such-model")


def test_tritonclient_infer_accepted_and_rejected(env, triton, accepted_phantom):
    tc, client = triton
    name = env["offline"].manifest["model"]["name"]
    img, ref = accepted_phantom
    res = _infer_bytes(tc, client, name, png16(img))
    assert res.as_numpy("accepted").tolist() == [True]
    assert res.as_numpy("label")[0].decode() == ref.label
    probs = res.as_numpy("probabilities")
    assert probs.shape == (1, len(ref.probabilities)) and abs(float(probs.sum()) - 1) < 1e-4
    params = res.get_response().parameters
    assert params["accepted"].bool_param is True and params["bundle_hash"].string_param == env["offline"].bundle_hash
    verdict = json.loads(res.as_numpy("verdict")[0])
    assert verdict["label"] == ref.label and verdict["scores"]

    res = _infer_bytes(tc, client, name, png16(ood("noise", NOISE_SEED)))
    assert res.as_numpy("accepted").tolist() == [False]
    assert (
        res.as_numpy("label") is None and res.as_numpy("probabilities") is None and res.as_numpy("label_index") is None
    )
    reasons = res.as_numpy("reasons")[0].decode().split(",")
    assert reasons and set(reasons) <= {"GARBAGE_CLASS", "ATTENTION_MISMATCH", "FEATURE_MISMATCH"}
    params = res.get_response().parameters
    assert params["accepted"].bool_param is False and params["reasons"].string_param.split(",") == reasons
    assert "garbage_prob" in json.loads(params["scores"].string_param)
    # asking for a class output explicitly does not produce one for a rejected input
    res = _infer_bytes(tc, client, name, png16(ood("noise", NOISE_SEED)), outputs=["label", "accepted"])
    assert res.as_numpy("label") is None and res.as_numpy("accepted").tolist() == [False]


def test_tritonclient_numeric_tensor_input(env, triton, accepted_phantom):
    tc, client = triton
    name = env["offline"].manifest["model"]["name"]
    img, ref = accepted_phantom
    u16 = np.rint(img * 65535).astype(np.uint16)
    inp = tc.InferInput("image", list(u16.shape), "UINT16")
    inp.set_data_from_numpy(u16)
    res = client.infer(name, [inp], outputs=[tc.InferRequestedOutput(n) for n in ("accepted", "label", "heatmap")])
    assert res.as_numpy("accepted").tolist() == [True] and res.as_numpy("label")[0].decode() == ref.label
    assert res.as_numpy("heatmap").shape == (1, env["offline"].spec.height, env["offline"].spec.width)
    bad = tc.InferInput("image", [2, 3, 4, 5, 6], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 3, 4, 5, 6), np.float32))
    with pytest.raises(tc.InferenceServerException, match="shape"):
        client.infer(name, [bad])


def test_oip_base64_bytes_as_mlserver_base64codec_sends_them(env, accepted_phantom):
    """MLServer's Base64Codec sends each file base64-encoded with the input parameter content_type=base64."""
    from gamguard.proto import grpc_predict_v2_pb2 as pb
    from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc
    from gamguard.runtime.server.codecs import deserialize_bytes

    stub = pb_grpc.GRPCInferenceServiceStub(env["channel"])
    model = env["offline"].manifest["model"]["name"]
    img, ref = accepted_phantom

    def infer(data: bytes, content_type: str | None):
        req = pb.ModelInferRequest(model_name=model)
        tensor = req.inputs.add(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(data)
        if content_type is not None:
            tensor.parameters["content_type"].string_param = content_type
        return stub.ModelInfer(req, timeout=60)

    encoded = base64.b64encode(png16(img))
    res = infer(encoded, "base64")
    assert res.parameters["accepted"].bool_param is True
    assert infer(base64.encodebytes(png16(img)), "base64").parameters["accepted"].bool_param  # MIME-wrapped
    names = [o.name for o in res.outputs]
    assert deserialize_bytes(res.raw_output_contents[names.index("label")]) == [ref.label.encode()]
    # another codec's content type leaves the bytes as they are (MLServer's NumpyCodec says "np")
    assert infer(png16(img), "np").parameters["accepted"].bool_param is True
    # not base64 although it says so, and base64 sent without saying so: clear errors, nothing served
    with pytest.raises(grpc.RpcError) as info:
        infer(b"not*base64", "base64")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not valid base64" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        infer(encoded, None)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "base64 text of a PNG file" in info.value.details()


# -------------------------------------------------------------------------------------- bad input


def _tensor(arr: np.ndarray, dtype: str) -> guard_pb2.Tensor:
    return guard_pb2.Tensor(dtype=dtype, shape=list(arr.shape), data=arr.tobytes())


def test_bad_inputs_are_invalid_argument_while_valid_requests_succeed(env, accepted_phantom, tmp_path):
    img, ref = accepted_phantom
    good_png = png16(img)
    nan = np.full((64, 64), np.nan, np.float32)
    bad = {
        "empty": dict(image=b""),
        "truncated png": dict(image=good_png[: len(good_png) // 2]),
        "garbage bytes": dict(image=np.random.default_rng(0).bytes(5000)),
        "unsupported format (GIF)": dict(image=b"GIF89a" + b"\x00" * 200),
        "decompression bomb": dict(image=png_bomb()),
        "multi-frame DICOM without frame": dict(image=multiframe_dicom(tmp_path, img)),
        "wrong tensor shape": dict(tensor=_tensor(np.zeros((2, 32, 32), np.float32), "float32")),
        "wrong tensor dtype": dict(tensor=guard_pb2.Tensor(dtype="int32", shape=[32, 32], data=b"\0" * 4096)),
        "tensor size mismatch": dict(tensor=guard_pb2.Tensor(dtype="uint8", shape=[32, 32], data=b"\0" * 10)),
        "NaN tensor": dict(tensor=_tensor(nan, "float32")),
        "Inf tensor": dict(tensor=_tensor(np.full((64, 64), np.inf, np.float32), "float32")),
        "no input": dict(),
        "10 MB of junk (above gRPC's 4 MB default)": dict(image=b"\x01" * (10 << 20)),
    }

    def valid():
        return env["stub"].Verify(guard_pb2.VerifyRequest(image=good_png), timeout=60)

    with ThreadPoolExecutor(4) as pool:
        for what, fields in bad.items():
            ok = pool.submit(valid)
            with pytest.raises(grpc.RpcError) as info:
                env["stub"].Verify(guard_pb2.VerifyRequest(**fields), timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, info.value.details())
            assert info.value.details(), what
            v = ok.result(60)
            assert v.accepted and v.prediction.label == ref.label, what
    # a multi-frame DICOM with a frame chosen is fine
    v = verify(env, multiframe_dicom(tmp_path, img), frame=1)
    assert v.accepted and v.prediction.label == ref.label


def test_engine_fault_yields_rejection_never_label(env, accepted_phantom):
    """Faults injected into the real engine (wrapped, not replaced) → GUARD_ERROR, never a label."""
    img, _ = accepted_phantom
    guard = env["server"].server.state.plane.guard
    real = guard.engine

    class Faulty:
        def __init__(self, mode):
            self.mode = mode
            self.name, self.providers = real.name, real.providers

        def describe(self):
            return real.describe()

        def run(self, batch):
            out = real.run(batch)
            if self.mode == "raise":
                raise RuntimeError("injected engine fault")
            if self.mode == "nan":
                out.logits[:] = np.nan
                out.cam[:] = np.nan
            if self.mode == "shape":
                out.logits = out.logits[:, :2]
            return out

    try:
        for mode in ("raise", "nan", "shape"):
            guard.engine = Faulty(mode)
            v = verify(env, png16(img))
            assert not v.accepted and not v.HasField("prediction"), mode
            assert v.reasons, mode
            if mode != "nan":
                assert "GUARD_ERROR" in v.reasons, (mode, list(v.reasons))
    finally:
        guard.engine = real
    assert verify(env, png16(img)).accepted  # and the server keeps serving


def test_inputs_refused_by_the_adapters_are_counted_and_audited(env):
    """A request the gRPC adapters refuse while parsing it (before the data plane's verify) is still an
    INVALID_ARGUMENT with an audit line and one more ``invalid`` verdict in the metrics."""
    from gamguard.proto import grpc_predict_v2_pb2 as pb
    from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    url = f"http://127.0.0.1:{env['server'].server.metrics_port}/metrics"
    series = 'gamguard_verdicts_total{decision="invalid"}'

    def invalid_count() -> float:
        return _metric(urllib.request.urlopen(url, timeout=10).read().decode(), series)

    int32 = guard_pb2.Tensor(dtype="int32", shape=[32, 32], data=b"\0" * 4096)
    before = invalid_count()
    for rid, fields in (("adapter-int32", dict(tensor=int32)), ("adapter-empty", dict())):
        with pytest.raises(grpc.RpcError) as info:
            env["stub"].Verify(guard_pb2.VerifyRequest(request_id=rid, **fields), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rid
    # in a stream the bad request is an INVALID_INPUT rejection, counted and audited all the same
    (v,) = list(env["stub"].VerifyStream(iter([guard_pb2.VerifyRequest(request_id="adapter-stream")]), timeout=60))
    assert not v.accepted and list(v.reasons) == ["INVALID_INPUT"]
    # OIP: an unsupported datatype is refused by request_inputs
    stub = pb_grpc.GRPCInferenceServiceStub(env["channel"])
    meta = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=60)
    model = meta.models[0].name
    req = pb.ModelInferRequest(model_name=model, id="adapter-oip")
    req.inputs.add(name="image", datatype="INT32", shape=[32, 32])
    req.raw_input_contents.append(b"\0" * 4096)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_count() - before == 4
    lines = [json.loads(line) for line in env["audit"].read_text().splitlines()]
    for rid in ("adapter-int32", "adapter-empty", "adapter-stream", "adapter-oip"):
        mine = [r for r in lines if r["request_id"] == rid]
        assert len(mine) == 1 and mine[0]["decision"] == "invalid" and mine[0].get("detail"), (rid, mine)


# --------------------------------------------------------------------------------------- batching


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_concurrent_requests_share_batches_with_identical_results(env, accepted_phantom):
    imgs = [phantom(i % 4, 100 + i) for i in range(10)] + [ood(k, 5) for k in ("noise", "blobs", "chest", "texture")]
    data = [png16(im) for im in imgs]
    single = [verify(env, d) for d in data]  # one by one

    url = f"http://127.0.0.1:{env['server'].server.metrics_port}/metrics"
    before = urllib.request.urlopen(url, timeout=10).read().decode()
    with ThreadPoolExecutor(len(data)) as pool:
        together = list(pool.map(lambda d: verify(env, d), data))
    after = urllib.request.urlopen(url, timeout=10).read().decode()

    calls = _metric(after, "gamguard_batch_size_count") - _metric(before, "gamguard_batch_size_count")
    items = _metric(after, "gamguard_batch_size_sum") - _metric(before, "gamguard_batch_size_sum")
    assert items == len(data)
    assert calls < len(data), f"{len(data)} concurrent requests took {calls} engine calls"
    assert max(v.timing.batch_size for v in together) > 1
    for a, b in zip(single, together):
        assert (a.accepted, a.prediction.label, list(a.reasons)) == (b.accepted, b.prediction.label, list(b.reasons))
        for k in a.scores:
            if np.isfinite(a.scores[k]):
                assert b.scores[k] == pytest.approx(a.scores[k], rel=1e-4, abs=1e-5), k
    # the other metrics are there too
    for series in (
        "gamguard_verdicts_total",
        "gamguard_rejections_total",
        "gamguard_stage_seconds_bucket",
        "gamguard_queue_depth",
        "gamguard_requests_total",
    ):
        assert series in after, series
    assert 'gamguard_stage_seconds_count{stage="engine"}' in after


# ------------------------------------------------------------------------------------ DICOM, audit


def test_dicom_monochrome1_and_2_same_verdict(env, accepted_phantom, tmp_path):
    img, ref = accepted_phantom
    v1 = verify(env, dicom_bytes(tmp_path, img, "m1.dcm", photometric="MONOCHROME1"))
    v2 = verify(env, dicom_bytes(tmp_path, img, "m2.dcm", photometric="MONOCHROME2"))
    assert v1.input_format == v2.input_format == "dicom"
    assert (v1.accepted, v1.prediction.label, list(v1.reasons)) == (v2.accepted, v2.prediction.label, list(v2.reasons))
    assert v1.accepted and v1.prediction.label == ref.label
    for k in v1.scores:
        if np.isfinite(v1.scores[k]):
            assert v2.scores[k] == pytest.approx(v1.scores[k], abs=1e-6), k


def test_pydicom_ct_rejected(env):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom test files not installed")
    v = verify(env, open(path, "rb").read())
    assert not v.accepted and not v.HasField("prediction") and v.reasons
    assert v.sop_instance_uid


def test_audit_log_has_verdicts_and_no_phi(env, accepted_phantom, tmp_path):
    img, _ = accepted_phantom
    phi = {
        "PatientName": "Doe^Janet^Q",
        "PatientID": "MRN-99887766",
        "PatientBirthDate": "19610203",
        "PatientAddress": "12 Elm Street",
        "OtherPatientIDs": "ALT-55443322",
    }
    from gamguard.runtime.demo.synth import write_dicom

    path = write_dicom(tmp_path / "phi.dcm", img, patient=phi)
    import pydicom

    ds = pydicom.dcmread(path)
    assert str(ds.PatientName) == phi["PatientName"]  # the fields really are in the file
    v = verify(env, path.read_bytes(), request_id="audit-phi")
    with pytest.raises(grpc.RpcError):
        verify(env, b"garbage", request_id="audit-invalid")
    text = env["audit"].read_text()
    for value in ("Doe", "Janet", "MRN-99887766", "Elm Street", "ALT-55443322", "PatientName", "PatientID"):
        assert value not in text, value
    lines = [json.loads(line) for line in text.splitlines()]

    def strings(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    for rec in lines:  # digits-only PHI (birth date, ID) checked in string fields, not inside floats
        for value in strings(rec):
            assert not any(p in value for p in ("19610203", "99887766", "55443322")), value
    mine = [r for r in lines if r["request_id"] == "audit-phi"]
    assert len(mine) == 1
    rec = mine[0]
    assert rec["sop_instance_uid"] == str(ds.SOPInstanceUID) == v.sop_instance_uid
    assert rec["bundle_hash"] == env["offline"].bundle_hash
    assert rec["decision"] == ("accepted" if v.accepted else "rejected") and rec["scores"]
    assert {"time", "model", "version", "reasons"} <= set(rec)
    invalid = [r for r in lines if r["request_id"] == "audit-invalid"]
    assert invalid and invalid[0]["decision"] == "invalid"


# ------------------------------------------------------------------------------------------ CLI


def test_predict_cli_table_json_and_overlays(env, accepted_phantom, tmp_path):
    import subprocess
    import sys

    img, ref = accepted_phantom
    good = tmp_path / "good.png"
    good.write_bytes(png16(img))
    noise = tmp_path / "noise.png"
    noise.write_bytes(png16(ood("noise", NOISE_SEED)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(png16(img)[:100])
    cmd = [sys.executable, "-m", "gamguard.runtime.cli", "predict", "--server", env["server"].target]
    out = subprocess.run(
        cmd + ["--json", "--overlays", str(tmp_path / "ov"), str(good), str(noise), str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr  # one file refused
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(good), str(noise), str(broken)]
    assert rows[0]["accepted"] and rows[0]["label"] == ref.label
    assert not rows[1]["accepted"] and rows[1]["label"] is None and rows[1]["reasons"]
    assert rows[2]["status"] == "INVALID_ARGUMENT" and rows[2]["label"] is None
    import cv2

    for r in rows[:2]:
        overlay = cv2.imread(r["overlay"])
        assert overlay is not None and overlay.shape[0] > 100
    out = subprocess.run(cmd + [str(good), str(noise)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["file", "decision", "label"]
    assert "ACCEPTED" in lines[2] and ref.label in lines[2] and "REJECTED" in lines[3]


def test_full_queue_answers_resource_exhausted_and_recovers(env):
    """A slowed-down (wrapped real) engine and a queue of 2: the surplus is refused at once with
    RESOURCE_EXHAUSTED, the rest is served, and the server recovers."""
    import time

    plane = env["server"].server.state.plane
    guard, batcher = plane.guard, plane.batcher
    real_engine, real_limits = guard.engine, (batcher.max_queue_size, batcher.max_batch_size)

    class Slow:
        name, providers = real_engine.name, real_engine.providers

        def describe(self):
            return real_engine.describe()

        def run(self, batch):
            time.sleep(1.0)  # long enough that all 10 callers arrive while the queue is full, even under load
            return real_engine.run(batch)

    data = png16(ood("noise", NOISE_SEED))

    def call(_):
        try:
            return verify(env, data).reasons[0]
        except grpc.RpcError as exc:
            return exc.code()

    try:
        guard.engine = Slow()
        batcher.max_queue_size, batcher.max_batch_size = 2, 1
        with ThreadPoolExecutor(10) as pool:
            outcomes = list(pool.map(call, range(10)))
    finally:
        guard.engine = real_engine
        batcher.max_queue_size, batcher.max_batch_size = real_limits
    refused = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [o for o in outcomes if isinstance(o, str)]
    assert refused and served and len(refused) + len(served) == 10, outcomes
    assert not verify(env, data).accepted  # back to normal
