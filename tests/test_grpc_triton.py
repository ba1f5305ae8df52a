"""The Open Inference Protocol as Triton's clients use it, over a real server on a loopback port:
``tritonclient.grpc`` model config, statistics, streaming, model load / unload, every input form in
the metadata, gRPC reflection v1, and the KServe SDK's gRPC client (in a subprocess: it registers its
own copy of package ``inference`` in protobuf's default pool, as tritonclient does)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from testlib import ThreadedServer, demo_bundle_path, ood, phantom, png16

from gamguard.runtime.server.config import ServeConfig

tc = pytest.importorskip("tritonclient.grpc")

MAX_BATCH, DELAY_MS, QUEUE = 8, 30.0, 48


def _start(**kw) -> ThreadedServer:
    cfg = ServeConfig(
        bundle=str(demo_bundle_path()),
        host="127.0.0.1",
        port=0,
        insecure=True,
        max_batch_size=MAX_BATCH,
        max_queue_delay_ms=DELAY_MS,
        max_queue_size=QUEUE,
        **kw,
    )
    return ThreadedServer(cfg).start()


@pytest.fixture(scope="module")
def env():
    from gamguard.runtime.guard import Guard

    server = _start()
    client = tc.InferenceServerClient(url=server.target)
    offline = Guard.from_bundle(demo_bundle_path())
    accepted = None
    for seed in range(12):  # an in-distribution phantom the guard accepts (found, not assumed)
        img = phantom(seed % 4, seed)
        v = offline.verify_images([img])[0]
        if v.accepted:
            accepted = (img, v)
            break
    if accepted is None:
        pytest.fail("the demo bundle accepted none of 12 in-distribution phantoms")
    yield {
        "server": server,
        "client": client,
        "offline": offline,
        "name": offline.manifest["model"]["name"],
        "accepted": accepted,
    }
    client.close()
    server.stop()


def _bytes_input(data: bytes, name: str = "image"):
    inp = tc.InferInput(name, [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    return inp


# ---------------------------------------------------------------------------------- ModelConfig


def test_model_config_describes_inputs_outputs_and_batching(env):
    cfg = env["client"].get_model_config(env["name"]).config
    assert cfg.name == env["name"] and cfg.max_batch_size == MAX_BATCH
    types = {i.name: (tc.model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input}
    assert types == {
        "image": ("TYPE_STRING", [1], True),
        "image_uint8": ("TYPE_UINT8", [-1, -1], True),
        "image_uint16": ("TYPE_UINT16", [-1, -1], True),
        "image_fp32": ("TYPE_FP32", [-1, -1], True),
    }
    outputs = {o.name: (tc.model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output}
    spec = env["offline"].spec
    n_real = len([c for c in env["offline"].class_names if c != "garbage"])
    # every output has dims (Triton's config validator requires them): a scalar per image is [1] → []
    assert all(list(o.dims) for o in cfg.output)
    scalars = {o.name for o in cfg.output if o.HasField("reshape") and list(o.reshape.shape) == []}
    assert scalars == {"accepted", "reasons", "verdict", "label", "label_index"}
    assert outputs["accepted"] == ("TYPE_BOOL", [1]) and outputs["verdict"] == ("TYPE_STRING", [1])
    assert outputs["probabilities"] == ("TYPE_FP32", [n_real])
    assert outputs["heatmap"] == ("TYPE_FP32", [spec.height, spec.width])
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert cfg.dynamic_batching.max_queue_delay_microseconds == int(DELAY_MS * 1000)
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == QUEUE
    assert cfg.parameters["bundle_hash"].string_value == env["offline"].bundle_hash
    assert cfg.instance_group[0].kind == tc.model_config_pb2.ModelInstanceGroup.KIND_CPU
    # the JSON form tritonclient offers parses too, and metadata shapes are [-1] + dims
    assert json.loads(json.dumps(env["client"].get_model_config(env["name"], as_json=True)))["config"]["name"]
    meta = env["client"].get_model_metadata(env["name"])
    assert {i.name: (i.datatype, list(i.shape)) for i in meta.inputs} == {
        "image": ("BYTES", [-1, 1]),
        "image_uint8": ("UINT8", [-1, -1, -1]),
        "image_uint16": ("UINT16", [-1, -1, -1]),
        "image_fp32": ("FP32", [-1, -1, -1]),
    }
    with pytest.raises(tc.InferenceServerException, match="unknown model"):
        env["client"].get_model_config("no-such-model")


def test_requests_triton_refuses_are_refused(env):
    """What Triton answers with an error is an error here too, never silently served or ignored."""
    client, name = env["client"], env["name"]
    img, _ = env["accepted"]
    png = png16(img)
    # a model or version this server does not have is not ready (Triton answers ready=false, no error)
    assert client.is_model_ready("no-such-model") is False
    assert client.is_model_ready(name, "999") is False and client.is_model_ready(name) is True
    # an input the model does not declare, alone or beside a declared one
    with pytest.raises(tc.InferenceServerException, match="unexpected inference input"):
        client.infer(name, [_bytes_input(png, name="imgae")])
    with pytest.raises(tc.InferenceServerException, match="unexpected inference input"):
        client.infer(name, [_bytes_input(png), _bytes_input(png, name="extra")])
    # more images than the config's max_batch_size
    many = tc.InferInput("image", [MAX_BATCH + 1, 1], "BYTES")
    many.set_data_from_numpy(np.array([[png]] * (MAX_BATCH + 1), dtype=np.object_))
    with pytest.raises(tc.InferenceServerException, match=f"batch-size must be <= {MAX_BATCH}"):
        client.infer(name, [many])
    # Triton's classification extension (class_count) is not offered: refused, not ignored
    with pytest.raises(tc.InferenceServerException, match="class_count"):
        client.infer(name, [_bytes_input(png)], outputs=[tc.InferRequestedOutput("probabilities", class_count=2)])
    # the server is still serving, and a full batch is fine
    full = tc.InferInput("image", [MAX_BATCH, 1], "BYTES")
    full.set_data_from_numpy(np.array([[png]] * MAX_BATCH, dtype=np.object_))
    assert client.infer(name, [full]).as_numpy("accepted").shape == (MAX_BATCH,)


def test_health_watch_on_the_main_port(env):
    """grpc.health.v1 Watch (what gRPC client-side health checking calls) streams the status."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(env["server"].target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = []
        with pytest.raises(grpc.RpcError) as err:  # the stream stays open until the deadline
            for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=1.5):
                statuses.append(reply.status)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert statuses[:1] == [health_pb2.HealthCheckResponse.SERVING]
        # a channel that uses client-side health checking connects and is served
        config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}})
    with grpc.insecure_channel(env["server"].target, options=[("grpc.service_config", config)]) as channel:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live


@pytest.mark.parametrize(
    "name, dtype, scale",
    [("image_uint8", np.uint8, 255), ("image_uint16", np.uint16, 65535), ("image_fp32", np.float32, None)],
)
def test_every_declared_input_form_gets_the_same_verdict(env, name, dtype, scale):
    img, ref = env["accepted"]
    arr = (img if scale is None else np.rint(img * scale)).astype(dtype)[None]
    inp = tc.InferInput(name, list(arr.shape), tc.np_to_triton_dtype(dtype))
    inp.set_data_from_numpy(arr)
    res = env["client"].infer(env["name"], [inp])
    assert res.as_numpy("accepted").tolist() == [True] and res.as_numpy("label")[0].decode() == ref.label
    wrong = tc.InferInput(name, [1, 4, 4], "INT32")
    wrong.set_data_from_numpy(np.zeros((1, 4, 4), np.int32))
    with pytest.raises(tc.InferenceServerException, match=f"'{name}' must be"):
        env["client"].infer(env["name"], [wrong])
    with pytest.raises(tc.InferenceServerException, match="exactly one"):
        env["client"].infer(env["name"], [inp, _bytes_input(png16(img))])


# ------------------------------------------------------------------------------ ModelStatistics


def _stats(env):
    (s,) = env["client"].get_inference_statistics(env["name"]).model_stats
    return s


def test_statistics_count_real_work(env):
    assert "statistics" in env["client"].get_server_metadata().extensions
    before = _stats(env)
    img, _ = env["accepted"]
    n_ok = 3
    for k in range(n_ok):
        env["client"].infer(env["name"], [_bytes_input(png16(phantom(k % 4, 20 + k)))])
    with pytest.raises(tc.InferenceServerException):
        env["client"].infer(env["name"], [_bytes_input(b"not an image")])
    after = _stats(env)
    d = lambda field: getattr(after.inference_stats, field).count - getattr(before.inference_stats, field).count  # noqa: E731
    assert after.inference_count - before.inference_count == n_ok
    assert d("success") == d("queue") == d("compute_input") == d("compute_infer") == d("compute_output") == n_ok
    assert d("fail") == 1
    for field in ("success", "compute_input", "compute_infer", "compute_output"):
        assert getattr(after.inference_stats, field).ns > getattr(before.inference_stats, field).ns, field
    executions = after.execution_count - before.execution_count
    assert 1 <= executions <= n_ok
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in after.batch_stats) >= after.inference_count
    assert after.last_inference > 0 and after.name == env["name"]
    # as in Triton, a request of several images counts once; its images count in inference_count
    pngs = [png16(phantom(k % 4, 40 + k)) for k in range(3)]
    several = tc.InferInput("image", [3, 1], "BYTES")
    several.set_data_from_numpy(np.array([[p] for p in pngs], dtype=np.object_))
    env["client"].infer(env["name"], [several])
    broken = tc.InferInput("image", [2, 1], "BYTES")
    broken.set_data_from_numpy(np.array([[pngs[0]], [b"not an image"]], dtype=np.object_))
    with pytest.raises(tc.InferenceServerException):
        env["client"].infer(env["name"], [broken])
    last = _stats(env)
    d = lambda field: getattr(last.inference_stats, field).count - getattr(after.inference_stats, field).count  # noqa: E731
    assert last.inference_count - after.inference_count == 3
    assert d("success") == d("queue") == d("compute_infer") == 1 and d("fail") == 1
    # its stages (those of its last image to finish) fit within its time: perf_analyzer subtracts them
    ns = lambda field: getattr(last.inference_stats, field).ns - getattr(after.inference_stats, field).ns  # noqa: E731
    stages = ("queue", "compute_input", "compute_infer", "compute_output")
    assert 0 < sum(ns(f) for f in stages) <= ns("success")
    # all models (empty name) is the same one model
    assert [m.name for m in env["client"].get_inference_statistics().model_stats] == [env["name"]]
    with pytest.raises(tc.InferenceServerException, match="unknown model"):
        env["client"].get_inference_statistics("no-such-model")


# ----------------------------------------------------------------------------- ModelStreamInfer


def test_stream_answers_every_request_and_survives_errors(env):
    img, ref = env["accepted"]
    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(url=env["server"].target)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(env["name"], [_bytes_input(png16(img))], request_id="good-1")
        client.async_stream_infer(env["name"], [_bytes_input(b"garbage")], request_id="bad")
        client.async_stream_infer("no-such-model", [_bytes_input(png16(img))], request_id="unknown")
        client.async_stream_infer(env["name"], [_bytes_input(png16(ood("noise", 3)))], request_id="good-2")
        got = [answers.get(timeout=60) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = [str(e) for r, e in got if e is not None]
    assert set(results) == {"good-1", "good-2"}
    assert results["good-1"].as_numpy("label")[0].decode() == ref.label
    assert results["good-2"].as_numpy("accepted").tolist() == [False]
    assert len(errors) == 2 and any("decode" in e or "image" in e for e in errors)
    assert any("unknown model" in e for e in errors)


def test_stream_requests_share_engine_batches(env):
    """One stream's requests are verified concurrently: they batch (fewer engine calls than images). More
    requests than the stream may hold at once (2 batches' worth) are all answered: the bound only delays
    reading."""
    answers: queue.Queue = queue.Queue()
    n = 5 * MAX_BATCH
    payloads = [png16(phantom(k % 4, 40 + k)) for k in range(n)]
    before = _stats(env)
    client = tc.InferenceServerClient(url=env["server"].target)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for k, data in enumerate(payloads):
            client.async_stream_infer(env["name"], [_bytes_input(data)], request_id=f"r{k}")
        got = [answers.get(timeout=60) for _ in range(n)]
    finally:
        client.stop_stream()
        client.close()
    assert all(e is None for _, e in got), [str(e) for _, e in got if e is not None]
    assert sorted(r.get_response().id for r, _ in got) == sorted(f"r{k}" for k in range(n))
    after = _stats(env)
    assert after.inference_count - before.inference_count == n
    assert after.execution_count - before.execution_count < n


# -------------------------------------------------------------------- model load / unload


def test_load_unload_refused_unless_model_control_is_explicit(env):
    with pytest.raises(tc.InferenceServerException, match="--model-control explicit"):
        env["client"].unload_model(env["name"])
    assert env["client"].is_model_ready(env["name"])


def test_unload_then_load_the_configured_bundle(env):
    server = _start(model_control="explicit")
    client = tc.InferenceServerClient(url=server.target)
    name = env["name"]
    img, ref = env["accepted"]
    try:
        client.unload_model(name)
        assert not client.is_model_ready(name) and not client.is_server_ready()
        version = str(env["offline"].manifest["model"]["version"])
        index = client.get_model_repository_index().models
        assert [(m.name, m.version, m.state, m.reason) for m in index] == [(name, version, "UNAVAILABLE", "unloaded")]
        with pytest.raises(tc.InferenceServerException, match="unloaded"):
            client.infer(name, [_bytes_input(png16(img))])
        with pytest.raises(tc.InferenceServerException, match="configured bundle"):
            client.load_model("some-other-model")
        client.load_model(name)
        assert client.is_model_ready(name)
        assert client.infer(name, [_bytes_input(png16(img))]).as_numpy("label")[0].decode() == ref.label
        client.load_model(name)  # a reload while loaded swaps in a fresh copy and keeps serving
        assert client.is_model_ready(name) and _stats({"client": client, "name": name}).inference_count == 0
    finally:
        client.close()
        server.stop()


# ---------------------------------------------------------------------------- reflection v1


def test_reflection_v1_is_served_beside_v1alpha(env):
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf.text_format import Parse

    # grpc.reflection.v1's two messages, written out here as in grpc/reflection/v1/reflection.proto
    # (independent of the server's code), with the fields this test uses
    proto = Parse(
        """
        name: "v1_reflection_subset.proto" package: "grpc.reflection.v1" syntax: "proto3"
        message_type { name: "ServerReflectionRequest"
          field { name: "host" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
          field { name: "file_containing_symbol" number: 4 type: TYPE_STRING label: LABEL_OPTIONAL oneof_index: 0 }
          field { name: "list_services" number: 7 type: TYPE_STRING label: LABEL_OPTIONAL oneof_index: 0 }
          oneof_decl { name: "message_request" } }
        message_type { name: "FileDescriptorResponse"
          field { name: "file_descriptor_proto" number: 1 type: TYPE_BYTES label: LABEL_REPEATED } }
        message_type { name: "ServiceResponse"
          field { name: "name" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL } }
        message_type { name: "ListServiceResponse"
          field { name: "service" number: 1 type: TYPE_MESSAGE label: LABEL_REPEATED
                  type_name: ".grpc.reflection.v1.ServiceResponse" } }
        message_type { name: "ServerReflectionResponse"
          field { name: "file_descriptor_response" number: 4 type: TYPE_MESSAGE label: LABEL_OPTIONAL oneof_index: 0
                  type_name: ".grpc.reflection.v1.FileDescriptorResponse" }
          field { name: "list_services_response" number: 6 type: TYPE_MESSAGE label: LABEL_OPTIONAL oneof_index: 0
                  type_name: ".grpc.reflection.v1.ListServiceResponse" }
          oneof_decl { name: "message_response" } }
    """,
        descriptor_pb2.FileDescriptorProto(),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    Request = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    Response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    with grpc.insecure_channel(env["server"].target) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString,
        )
        listed, symbol = list(
            call(
                iter([Request(list_services=""), Request(file_containing_symbol="inference.GRPCInferenceService")]),
                timeout=30,
            )
        )
    services = {s.name for s in listed.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "gamguard.v1.Guard",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in symbol.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service if s.name == "GRPCInferenceService" for m in s.method}
    assert {"ModelConfig", "ModelStatistics", "ModelStreamInfer", "RepositoryModelLoad"} <= methods
    # the v1 service resolves to v1 messages (what grpcurl needs to call it)
    with grpc.insecure_channel(env["server"].target) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString,
        )
        (answer,) = list(
            call(iter([Request(file_containing_symbol="grpc.reflection.v1.ServerReflection")]), timeout=30)
        )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in answer.file_descriptor_response.file_descriptor_proto
    ]
    (method,) = [m for f in files for s in f.service for m in s.method]
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


# --------------------------------------------------------------------------------- KServe SDK

_KSERVE_CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    try:
        from kserve import InferenceGRPCClient, InferInput, InferRequest
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    except ImportError as exc:
        print(json.dumps({"skip": f"the KServe SDK does not import: {exc}"})); sys.exit(0)
    target, name, png_path = sys.argv[1:4]
    png = open(png_path, "rb").read()

    async def main():
        client = InferenceGRPCClient(target, timeout=60)
        out = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
               "model_ready": await client.is_model_ready(name)}
        inp = InferInput(name="image", shape=[1], datatype="BYTES", data=[png])
        res = await client.infer(InferRequest(model_name=name, infer_inputs=[inp]))
        outputs = {o.name: o for o in res.outputs}
        out["accepted"] = outputs["accepted"].as_numpy().tolist()
        out["label"] = [x.decode() if isinstance(x, bytes) else x for x in outputs["label"].as_numpy().tolist()]
        meta = await client._client_stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        out["inputs"] = [i.name for i in meta.inputs]
        try:  # the SDK's own stub for the repository extension: wire-compatible, refused by default
            await client._client_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name))
            out["unload"] = "OK"
        except Exception as exc:
            out["unload"] = exc.code().name
        await client.close()
        print(json.dumps(out))

    asyncio.run(main())
""")


def test_kserve_sdk_grpc_client(env, tmp_path):
    img, ref = env["accepted"]
    png = tmp_path / "accepted.png"
    png.write_bytes(png16(img))
    out = subprocess.run(
        [sys.executable, "-c", _KSERVE_CLIENT, env["server"].target, env["name"], str(png)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"] + " (pip install '.[interop]')")
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["accepted"] == [True] and got["label"] == [ref.label]
    assert got["inputs"] == ["image", "image_uint8", "image_uint16", "image_fp32"]
    assert got["unload"] == "FAILED_PRECONDITION"
