"""Regression tests of the hardening review (issue 10) over a real server on a loopback port: every
call ends with a documented status and one audit line, a stream survives its bad items, admission
control before decoding, nothing class-specific in a rejected verdict, no paths in model info, one
authorization header, loopback-only side ports and a quiet log.

One server for the module: a bearer token, a small queue (8) and a small decode budget (128 MiB,
96 MiB per image) so the limits are reached with small test images."""

from __future__ import annotations

import json
import logging
import struct
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import numpy as np
import pytest
from testlib import ThreadedServer, demo_bundle_path, ood_images, phantom, png16

from gamguard.proto import grpc_predict_v2_pb2 as pb
from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from gamguard.proto import guard_pb2, guard_pb2_grpc
from gamguard.runtime.guard import CLASS_SPECIFIC_THRESHOLDS
from gamguard.runtime.server.config import ServeConfig

TOKEN = "s3cret-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
QUEUE = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    (tmp / "token").write_text(TOKEN)
    audit = tmp / "audit.jsonl"
    cfg = ServeConfig(
        bundle=str(demo_bundle_path()),
        port=0,
        insecure=True,
        auth_token_file=str(tmp / "token"),
        audit_log=str(audit),
        metrics_port=0,
        health_port=0,
        max_queue_size=QUEUE,
        max_batch_size=4,
        max_decode_mb=96,
        decode_memory_mb=128,
    )
    server = ThreadedServer(cfg).start()
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)])
    yield {
        "server": server,
        "channel": channel,
        "stub": guard_pb2_grpc.GuardStub(channel),
        "oip": pb_grpc.GRPCInferenceServiceStub(channel),
        "audit": audit,
        "plane": server.server.state.plane,
    }
    channel.close()
    server.stop()


def audit_lines(env) -> list[dict]:
    return [json.loads(line) for line in env["audit"].read_text().splitlines()]


def status_of(call, *args, **kw):
    try:
        return "OK", call(*args, **kw)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def oip_request(env, items: list[bytes], **params) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=env["plane"].model_name)
    tensor = req.inputs.add(name="image", datatype="BYTES", shape=[len(items)])
    for key, value in params.items():
        setattr(tensor.parameters[key], "double_param" if isinstance(value, float) else "int64_param", value)
    req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in items))
    return req


def small_png() -> bytes:
    return png16(phantom(1, 21))


# ----------------------------------------------------------------- 4. rejected verdicts


def test_rejected_verdicts_reveal_nothing_class_specific(env):
    images, _ = ood_images(3)
    rejected = []
    for img in images:
        v = env["stub"].Verify(
            guard_pb2.VerifyRequest(image=png16(img), heatmap_values=True), metadata=AUTH, timeout=60
        )
        if not v.accepted:
            rejected.append(v)
            assert not v.heatmap.reference_values and not v.HasField("prediction")
            assert not CLASS_SPECIFIC_THRESHOLDS & set(v.thresholds) and v.thresholds
            assert len(v.heatmap.values) > 0  # the input's own map stays (it explains the rejection)
    assert len(rejected) >= 6
    assert len({json.dumps(dict(v.thresholds), sort_keys=True) for v in rejected}) == 1

    resp = env["oip"].ModelInfer(oip_request(env, [png16(images[0])]), metadata=AUTH, timeout=60)
    verdict_raw = resp.raw_output_contents[[o.name for o in resp.outputs].index("verdict")]
    doc = json.loads(verdict_raw[4:])
    if not doc["accepted"]:
        assert not CLASS_SPECIFIC_THRESHOLDS & set(doc["thresholds"]) and doc["label"] is None


# -------------------------------------------------- 6. every call: documented status + one audit line


def test_malformed_messages_are_invalid_argument_with_one_audit_line(env):
    ch = env["channel"]
    before = len(audit_lines(env))
    bad = {
        "/gamguard.v1.Guard/Verify": [b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x02\xc3\x28" + b"\x12\x01x"],
        "/inference.GRPCInferenceService/ModelInfer": [b"\x0a\x02\xc3\x28", b"\x32\x05\x0a\x03ab"],
    }
    for method, payloads in bad.items():
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        for payload in payloads:
            code, details = status_of(call, payload, metadata=AUTH, timeout=10)
            assert code == "INVALID_ARGUMENT" and "malformed request" in details, (method, payload, details)
            assert "Traceback" not in details and "google.protobuf" not in details
            # without the token the caller learns nothing about its message
            assert status_of(call, payload, timeout=10)[0] == "UNAUTHENTICATED"
    lines = audit_lines(env)[before:]
    assert len(lines) == 4 and all(rec["decision"] == "invalid" for rec in lines)


def test_overflowing_shapes_and_non_finite_frame_are_invalid_argument(env):
    before = len(audit_lines(env))
    huge = guard_pb2.Tensor(dtype="uint8", shape=[2**32, 2**32], data=b"")
    cases = [status_of(env["stub"].Verify, guard_pb2.VerifyRequest(tensor=huge), metadata=AUTH, timeout=10)]
    req = pb.ModelInferRequest(model_name=env["plane"].model_name)
    req.inputs.add(name="image", datatype="UINT8", shape=[2**32, 2**32])
    req.raw_input_contents.append(b"")
    cases.append(status_of(env["oip"].ModelInfer, req, metadata=AUTH, timeout=10))
    req = pb.ModelInferRequest(model_name=env["plane"].model_name)
    req.inputs.add(name="image", datatype="BYTES", shape=[2**62, 4])
    req.raw_input_contents.append(b"")
    cases.append(status_of(env["oip"].ModelInfer, req, metadata=AUTH, timeout=10))
    for frame in (float("inf"), float("-inf"), float("nan"), 1.5):
        cases.append(status_of(env["oip"].ModelInfer, oip_request(env, [small_png()], frame=frame), metadata=AUTH))
    for code, details in cases:
        assert code == "INVALID_ARGUMENT", details
    assert len(audit_lines(env)) - before == len(cases)


def test_verify_stream_answers_every_item_and_goes_on(env):
    good = [guard_pb2.VerifyRequest(image=small_png(), request_id=f"good-{i}").SerializeToString() for i in range(3)]
    overflow = guard_pb2.VerifyRequest(
        tensor=guard_pb2.Tensor(dtype="uint8", shape=[2**32, 2**32]), request_id="overflow"
    ).SerializeToString()
    undecodable = guard_pb2.VerifyRequest(image=b"\x89PNG\r\n\x1a\nbroken", request_id="broken").SerializeToString()
    malformed = b"\x0a\xff\xff\xff\xff\x0f"
    items = [good[0], overflow, malformed, good[1], undecodable, good[2]]
    stream = env["channel"].stream_stream(
        "/gamguard.v1.Guard/VerifyStream", request_serializer=None, response_deserializer=guard_pb2.Verdict.FromString
    )
    before = len(audit_lines(env))
    answers = list(stream(iter(items), metadata=AUTH, timeout=60))
    assert len(answers) == len(items)
    ids = [a.request_id for a in answers]
    assert ids[0] == "good-0" and ids[1] == "overflow" and ids[3] == "good-1" and ids[4] == "broken"
    assert ids[5] == "good-2"
    for i in (1, 2, 4):
        assert not answers[i].accepted and list(answers[i].reasons) == ["INVALID_INPUT"] and answers[i].detail
    assert all("GUARD_ERROR" not in a.reasons and "INVALID_INPUT" not in a.reasons for a in answers[::3])
    assert len(audit_lines(env)) - before == len(items)


def test_oip_stream_answers_a_malformed_item_and_goes_on(env):
    good = [oip_request(env, [small_png()]) for _ in range(2)]
    for i, req in enumerate(good):
        req.id = f"good-{i}"
    items = [good[0].SerializeToString(), b"\x0a\xff\xff\xff\xff\x0f", good[1].SerializeToString()]
    stream = env["channel"].stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=None,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    before = len(audit_lines(env))
    answers = list(stream(iter(items), metadata=AUTH, timeout=60))
    assert len(answers) == 3
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == 1 and "malformed request" in errors[0]
    assert sorted(a.infer_response.id for a in answers if not a.error_message) == ["good-0", "good-1"]
    assert len(audit_lines(env)) - before == 3


# ----------------------------------------------------------------- 7. requests beyond the queue


def test_oip_request_larger_than_the_batch_or_the_queue_is_invalid_argument_naming_the_limit(env):
    png = small_png()
    # the model config's max_batch_size (4 here) bounds one request, as in Triton
    code, details = status_of(env["oip"].ModelInfer, oip_request(env, [png] * (QUEUE + 1)), metadata=AUTH, timeout=60)
    assert code == "INVALID_ARGUMENT" and "batch-size must be <= 4" in details
    code, resp = status_of(env["oip"].ModelInfer, oip_request(env, [png] * 4), metadata=AUTH, timeout=120)
    assert code == "OK" and resp.outputs[0].shape == [4]
    # and so does the queue, where it is the smaller limit
    plane = env["plane"]
    batch, plane.config.max_batch_size = plane.config.max_batch_size, QUEUE + 4
    try:
        code, details = status_of(
            env["oip"].ModelInfer, oip_request(env, [png] * (QUEUE + 1)), metadata=AUTH, timeout=60
        )
    finally:
        plane.config.max_batch_size = batch
    assert code == "INVALID_ARGUMENT" and f"at most {QUEUE}" in details and "--max-queue-size" in details


# ------------------------------------------------------- 2./3. decode memory, admission control


def test_image_needing_more_than_the_decode_limit_is_invalid_argument(env):
    data = cv2.imencode(".png", np.zeros((4000, 4000), np.uint8))[1].tobytes()  # 16 MP in ~20 KB
    assert len(data) < 100_000
    code, details = status_of(env["stub"].Verify, guard_pb2.VerifyRequest(image=data), metadata=AUTH, timeout=30)
    assert code == "INVALID_ARGUMENT" and "per-request limit of 96 MiB" in details


def test_decode_memory_budget_bounds_concurrent_decodes(env):
    rng = np.random.default_rng(5)
    big = cv2.imencode(".png", rng.integers(0, 255, (1500, 2000), np.uint8))[1].tobytes()  # ~3 MB, ~40 MB to decode
    plane = env["plane"]
    plane.decode_budget.peak = 0
    before = len(audit_lines(env))

    def one(_):
        return status_of(env["stub"].Verify, guard_pb2.VerifyRequest(image=big), metadata=AUTH, timeout=120)[0]

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(24)))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes
    assert 0 < plane.decode_budget.peak <= plane.decode_budget.limit
    assert plane.decode_budget.used == 0  # every claim returned
    lines = audit_lines(env)[before:]
    assert len(lines) == 24  # one line per call, refused ones included
    assert sum(rec["decision"] == "refused" for rec in lines) == codes.count("RESOURCE_EXHAUSTED")


# -------------------------------------------------------------------- 8. / 9. small findings


def test_model_info_discloses_no_filesystem_path(env):
    info = env["stub"].GetModelInfo(guard_pb2.ModelInfoRequest(), metadata=AUTH, timeout=10)
    text = str(info)
    assert "bundle_dir" not in info.info_json and str(demo_bundle_path()) not in text
    assert "/work/" not in text and "site-packages" not in text


def test_duplicate_authorization_header_is_refused(env):
    stub = env["stub"]
    assert status_of(stub.GetModelInfo, guard_pb2.ModelInfoRequest(), metadata=AUTH, timeout=10)[0] == "OK"
    for md in (AUTH + [("authorization", "Bearer wrong")], [("authorization", "Bearer wrong")] + AUTH, AUTH + AUTH):
        assert status_of(stub.GetModelInfo, guard_pb2.ModelInfoRequest(), metadata=md, timeout=10)[0] == (
            "UNAUTHENTICATED"
        )


def test_side_ports_bind_loopback_unless_told(env):
    server = env["server"].server
    assert server.metrics._http.server_address[0] == "127.0.0.1"
    with_tls = ServeConfig(host="0.0.0.0", tls_cert="c", tls_key="k", metrics_port=9090, health_port=8003)
    assert with_tls.bind_host == "0.0.0.0"
    assert with_tls.metrics_bind_host == "127.0.0.1" and with_tls.health_bind_host == "127.0.0.1"
    assert ServeConfig(metrics_host="0.0.0.0").metrics_bind_host == "0.0.0.0"


def test_bad_requests_do_not_flood_the_server_log(env, caplog):
    call = env["channel"].unary_unary("/gamguard.v1.Guard/Verify", request_serializer=None, response_deserializer=None)
    junk = guard_pb2.VerifyRequest(image=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).SerializeToString()
    with caplog.at_level(logging.INFO):
        for _ in range(40):
            status_of(call, b"\x0a\xff\xff\xff\xff\x0f", metadata=AUTH, timeout=10)
            status_of(call, junk, metadata=AUTH, timeout=10)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) <= 2 and not any(r.exc_info for r in noisy)
