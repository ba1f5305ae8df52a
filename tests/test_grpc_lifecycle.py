"""Server lifecycle and transport security over real servers on loopback ports: health state
transitions, TLS and mutual TLS, the bearer token, and `gamguard serve` draining on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from testlib import ThreadedServer, demo_bundle_path, make_ca, make_cert, ood, phantom, png16

from gamguard.proto import guard_pb2, guard_pb2_grpc
from gamguard.runtime.server.config import ServeConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_not_serving_until_loaded_and_while_draining():
    bundle = demo_bundle_path()
    from gamguard.runtime.guard import Guard

    release = threading.Event()

    def slow_load():  # the real Guard, loaded only when the test says so
        assert release.wait(60)
        return Guard.from_bundle(bundle)

    cfg = ServeConfig(bundle=str(bundle), host="127.0.0.1", port=0, insecure=True, drain_delay_s=1.5)
    server = ThreadedServer(cfg, guard_factory=slow_load).start(wait=False)
    channel = grpc.insecure_channel(server.target)
    try:
        for service in ("", "gamguard.v1.Guard", "inference.GRPCInferenceService"):
            assert _health(channel, service) == NOT_SERVING
        stub = guard_pb2_grpc.GuardStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Verify(guard_pb2.VerifyRequest(image=png16(phantom(0, 1))), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        server.call(server.server.wait_ready(60))
        assert _health(channel) == SERVING and _health(channel, "gamguard.v1.Guard") == SERVING
        assert stub.Verify(guard_pb2.VerifyRequest(image=png16(ood("noise"))), timeout=30).reasons
        # draining: NOT_SERVING during the drain delay, before calls are refused
        import asyncio

        fut = asyncio.run_coroutine_threadsafe(server.server.stop(5), server.loop)
        time.sleep(0.5)
        assert _health(channel) == NOT_SERVING
        fut.result(30)
    finally:
        channel.close()
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)


def test_broken_bundle_never_serves(tmp_path):
    bundle = demo_bundle_path()
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    with open(bad / "model.onnx", "ab") as fh:  # tampered: hash no longer matches
        fh.write(b"\0")
    server = ThreadedServer(ServeConfig(bundle=str(bad), host="127.0.0.1", port=0, insecure=True)).start(wait=False)
    try:
        with pytest.raises(RuntimeError, match="SHA-256|modified"):
            server.call(server.server.wait_ready(60))
        channel = grpc.insecure_channel(server.target)
        assert _health(channel) == NOT_SERVING
        channel.close()
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    other_ca = make_ca(d, "other-ca")
    return {
        "ca": ca,
        "server": make_cert(d, "server", ca, server=True),
        "client": make_cert(d, "client", ca, server=False),
        "stranger": make_cert(d, "stranger", other_ca, server=False),
        "dir": d,
    }


def test_mutual_tls_and_bearer_token(certs):
    bundle = demo_bundle_path()
    token_file = certs["dir"] / "token"
    token_file.write_text("s3cret-token\n")
    cfg = ServeConfig(
        bundle=str(bundle),
        host="127.0.0.1",
        port=0,
        tls_cert=str(certs["server"][0]),
        tls_key=str(certs["server"][1]),
        tls_client_ca=str(certs["ca"][0]),
        auth_token_file=str(token_file),
    ).validate()
    server = ThreadedServer(cfg).start()
    from gamguard.runtime.server.client import GuardClient

    data = png16(ood("noise"))
    try:
        common = dict(ca_cert=certs["ca"][0], server_name="localhost", timeout=30)
        with GuardClient(
            server.target, client_cert=certs["client"][0], client_key=certs["client"][1], token="s3cret-token", **common
        ) as c:
            v = c.verify(data)
            assert not v.accepted and v.reasons
        with GuardClient(
            server.target, client_cert=certs["client"][0], client_key=certs["client"][1], token="wrong", **common
        ) as c:
            with pytest.raises(grpc.RpcError) as info:
                c.verify(data)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the refused call is counted (the metrics interceptor is the outermost one); the server counts
        # it just after the client has its answer, hence the short wait
        labels = {"service": "gamguard.v1.Guard", "method": "Verify", "code": "UNAUTHENTICATED"}
        for _ in range(100):
            refused = server.server.metrics.registry.get_sample_value("gamguard_requests_total", labels)
            if refused:
                break
            time.sleep(0.05)
        assert refused == 1
        with GuardClient(
            server.target, client_cert=certs["client"][0], client_key=certs["client"][1], **common
        ) as c:  # health is exempt from the token (orchestrator probes)
            assert _health(c.channel) == SERVING
        for who in ("stranger", None):  # wrong CA / no client certificate → handshake refused
            kw = dict(client_cert=certs[who][0], client_key=certs[who][1]) if who else {}
            with GuardClient(server.target, token="s3cret-token", **kw, **common) as c:
                with pytest.raises(grpc.RpcError) as info:
                    c.verify(data, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, who
        with GuardClient(server.target, timeout=10) as c:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError):
                c.verify(data, timeout=10)
    finally:
        server.stop()


def test_tls_without_client_auth_and_plaintext_health_port(certs):
    bundle = demo_bundle_path()
    cfg = ServeConfig(
        bundle=str(bundle),
        host="127.0.0.1",
        port=0,
        tls_cert=str(certs["server"][0]),
        tls_key=str(certs["server"][1]),
        health_port=0,
    ).validate()
    server = ThreadedServer(cfg).start()
    from gamguard.runtime.server.client import GuardClient

    try:
        # the extra health port speaks plaintext (kubelet probes) and serves nothing but health
        with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as ch:
            assert _health(ch) == SERVING and _health(ch, "gamguard.v1.Guard") == SERVING
            with pytest.raises(grpc.RpcError) as info:
                guard_pb2_grpc.GuardStub(ch).GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with GuardClient(server.target, ca_cert=certs["ca"][0], server_name="localhost", timeout=30) as c:
            assert c.model_info().class_names
        _other_ca = certs["dir"] / "other-ca.crt"
        with GuardClient(server.target, ca_cert=_other_ca, server_name="localhost", timeout=10) as c:
            with pytest.raises(grpc.RpcError) as info:  # the client does not trust this server
                c.model_info()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_serve_cli_drains_in_flight_stream_on_sigterm(tmp_path):
    """`gamguard serve` as a process: a stream in flight when SIGTERM arrives still gets every answer,
    then the process exits 0."""
    bundle = demo_bundle_path()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"bundle: {bundle}\ninsecure: true\nport: 0\nmax-batch-size: 4\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gamguard.runtime.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        line = proc.stdout.readline()
        if "serving on" not in line:
            proc.kill()
            pytest.fail(f"`gamguard serve` did not start: {line!r}\n{proc.communicate(timeout=30)[1][-3000:]}")
        target = line.split("serving on ")[1].split(",")[0].strip()
        channel = grpc.insecure_channel(target)
        stub = guard_pb2_grpc.GuardStub(channel)
        first_answered = threading.Event()
        data = [png16(ood(k)) for k in ("noise", "blobs", "text", "geometric")]

        def requests():
            yield guard_pb2.VerifyRequest(request_id="0", image=data[0])
            assert first_answered.wait(30)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the server is draining now
            for i, d in enumerate(data[1:], 1):
                yield guard_pb2.VerifyRequest(request_id=str(i), image=d)

        got = []
        for v in stub.VerifyStream(requests(), timeout=60):
            got.append(v.request_id)
            first_answered.set()
        assert got == ["0", "1", "2", "3"]
        channel.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
