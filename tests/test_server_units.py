"""Server pieces that need no bundle: the micro-batcher, the fail-closed net, request parsing of both
protocols, and configuration (flags, config file, validation)."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from gamguard.proto import grpc_predict_v2_pb2 as pb
from gamguard.proto import guard_pb2
from gamguard.runtime.server import dataplane as dp
from gamguard.runtime.server import errors
from gamguard.runtime.server.batching import MicroBatcher
from gamguard.runtime.server.codecs import deserialize_bytes, serialize_bytes, tensor_to_array
from gamguard.runtime.server.config import ConfigError, ServeConfig, add_serve_arguments, config_from_args
from gamguard.runtime.server.grpc_inference import request_inputs

# ------------------------------------------------------------------------------------- batcher


def _run(coro):
    return asyncio.run(coro)


def test_batcher_groups_concurrent_requests_and_scatters_in_order():
    calls = []

    def run_batch(xs):
        calls.append(xs.shape[0])
        return [float(x.sum()) for x in xs]

    async def main():
        b = MicroBatcher(run_batch, max_batch_size=4, max_queue_delay_s=0.05, max_queue_size=100)
        await b.start()
        results = await asyncio.gather(*(b.submit(np.full((2,), i, np.float32)) for i in range(10)))
        await b.stop()
        return results, b.stats

    results, stats = _run(main())
    assert [r[0] for r in results] == [2.0 * i for i in range(10)]  # each caller gets its own answer
    assert calls == [4, 4, 2] and stats.batches == 3 and stats.items == 10
    assert [r[1] for r in results] == [4] * 8 + [2] * 2


def test_batcher_zero_delay_still_serves_alone():
    async def main():
        b = MicroBatcher(lambda xs: list(xs[:, 0]), max_batch_size=8, max_queue_delay_s=0.0)
        await b.start()
        r = await b.submit(np.array([7.0]))
        await b.stop()
        return r

    assert _run(main())[0] == 7.0


def test_batcher_bounded_queue_answers_overloaded():
    gate = threading.Event()

    def slow(xs):
        gate.wait(10)
        return list(xs[:, 0])

    async def main():
        b = MicroBatcher(slow, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2)
        await b.start()
        first = asyncio.ensure_future(b.submit(np.array([0.0])))
        await asyncio.sleep(0.05)  # taken by the engine, which now blocks
        queued = [asyncio.ensure_future(b.submit(np.array([float(i)]))) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(errors.Overloaded):
            await b.submit(np.array([3.0]))
        gate.set()
        done = await asyncio.gather(first, *queued)
        await b.stop()
        return [d[0] for d in done]

    assert _run(main()) == [0.0, 1.0, 2.0]


def test_batcher_drops_expired_and_cancelled_requests():
    gate = threading.Event()
    seen = []

    def slow(xs):
        gate.wait(10)
        seen.extend(xs[:, 0].tolist())
        return list(xs[:, 0])

    async def main():
        loop = asyncio.get_running_loop()
        b = MicroBatcher(slow, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=10)
        await b.start()
        first = asyncio.ensure_future(b.submit(np.array([0.0])))
        await asyncio.sleep(0.05)
        expired = asyncio.ensure_future(b.submit(np.array([1.0]), deadline=loop.time() + 0.01))
        cancelled = asyncio.ensure_future(b.submit(np.array([2.0])))
        alive = asyncio.ensure_future(b.submit(np.array([3.0])))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        gate.set()
        with pytest.raises(errors.DeadlineExpired):
            await expired
        await first, await alive
        await b.stop()

    _run(main())
    assert seen == [0.0, 3.0]  # neither the expired nor the cancelled request reached the engine


def test_batcher_stop_drains_then_refuses():
    async def main():
        b = MicroBatcher(lambda xs: list(xs[:, 0]), max_batch_size=2, max_queue_delay_s=0.2)
        await b.start()
        pending = [asyncio.ensure_future(b.submit(np.array([float(i)]))) for i in range(3)]
        await asyncio.sleep(0)
        await b.stop()  # finishes what was queued
        assert [p.result()[0] for p in pending] == [0.0, 1.0, 2.0]
        with pytest.raises(errors.NotReady):
            await b.submit(np.array([9.0]))

    _run(main())


class _FakeVerdict(SimpleNamespace):
    pass


def test_run_guard_batch_fails_closed():
    class Raising:
        def verify_tensor(self, batch):
            raise RuntimeError("boom")

    class Short:
        def verify_tensor(self, batch):
            return []

    class Inconsistent:  # "accepted" with reasons and no label: must not be served
        def verify_tensor(self, batch):
            return [_FakeVerdict(accepted=True, label=None, reasons=["GARBAGE_CLASS"]) for _ in batch]

    x = np.zeros((3, 1, 8, 8), np.float32)
    for guard in (Raising(), Short(), Inconsistent()):
        out = dp.run_guard_batch(guard, x)
        assert len(out) == 3
        for v in out:
            assert v.accepted is False and v.label is None and v.probabilities is None
            assert v.reasons == ["GUARD_ERROR"] and v.detail


# -------------------------------------------------------------------------------- request parsing


def test_guard_tensor_parsing():
    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    t = guard_pb2.Tensor(dtype="uint16", shape=[3, 4], data=a.astype("<u2").tobytes())
    assert np.array_equal(tensor_to_array(t), a)
    for bad in (
        guard_pb2.Tensor(dtype="int32", shape=[3, 4], data=b"\0" * 48),
        guard_pb2.Tensor(dtype="uint8", shape=[3, 4], data=b"\0" * 11),
        guard_pb2.Tensor(dtype="uint8", shape=[], data=b""),
        guard_pb2.Tensor(dtype="uint8", shape=[0, 4], data=b""),
    ):
        with pytest.raises(errors.InvalidRequest):
            tensor_to_array(bad)


def test_oip_bytes_wire_format_roundtrip_and_errors():
    items = [b"", b"abc", b"\x00" * 300]
    assert deserialize_bytes(serialize_bytes(items)) == items
    with pytest.raises(errors.InvalidRequest):
        deserialize_bytes(b"\x05\x00\x00\x00ab")  # says 5, has 2
    with pytest.raises(errors.InvalidRequest):
        deserialize_bytes(b"\x05\x00")


def _req(datatype, shape, raw=None, contents=None, params=None):
    r = pb.ModelInferRequest(model_name="m")
    t = r.inputs.add(name="image", datatype=datatype, shape=shape)
    if contents:
        for k, v in contents.items():
            getattr(t.contents, k).extend(v)
    if raw is not None:
        r.raw_input_contents.append(raw)
    for k, v in (params or {}).items():
        t.parameters[k].int64_param = v
    return r


def test_oip_request_inputs():
    got = request_inputs(_req("BYTES", [2], raw=serialize_bytes([b"png1", b"png2"]), params={"frame": 3}))
    assert got == [{"data": b"png1", "frame": 3}, {"data": b"png2", "frame": 3}]
    got = request_inputs(_req("BYTES", [1, 1], contents={"bytes_contents": [b"x"]}))
    assert got == [{"data": b"x", "frame": None}]
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4) / 24
    got = request_inputs(_req("FP32", [2, 1, 3, 4], raw=a.tobytes()))
    assert len(got) == 2 and np.array_equal(got[1]["array"], a[1, 0])
    got = request_inputs(_req("UINT8", [3, 4], contents={"uint_contents": list(range(12))}))
    assert got[0]["array"].dtype == np.uint8 and got[0]["array"].shape == (3, 4)
    bad = [
        _req("BYTES", [3], raw=serialize_bytes([b"a", b"b"])),  # count mismatch
        _req("BYTES", [2, 2], raw=serialize_bytes([b"a"] * 4)),  # shape
        _req("INT32", [3, 4], raw=b"\0" * 48),  # dtype
        _req("FP32", [3, 4], raw=b"\0" * 47),  # size
        _req("FP32", [1, 2, 3, 4], raw=b"\0" * 96),  # 4-D with 2 channels
        _req("UINT8", [3, 4], contents={"uint_contents": [300] * 12}),  # out of range
        _req("BYTES", [0], raw=b""),  # no images
    ]
    for r in bad:
        with pytest.raises(errors.InvalidRequest):
            request_inputs(r)
    with pytest.raises(errors.InvalidRequest):
        request_inputs(pb.ModelInferRequest(model_name="m"))


# ------------------------------------------------------------------------------------ configuration


def _parse(argv):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_config_defaults_and_loopback_for_insecure():
    cfg = _parse(["--insecure"])
    assert cfg.bind_host == "127.0.0.1" and cfg.port == 8001
    assert cfg.max_message_bytes >= 64 * 1024 * 1024
    assert _parse(["--insecure", "--host", "0.0.0.0"]).bind_host == "0.0.0.0"


def test_config_file_and_flag_precedence(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("insecure: true\nport: 9000\nmax-batch-size: 16\nmax_queue_delay_ms: 2.5\n")
    cfg = _parse(["--config", str(f), "--port", "9100"])
    assert (cfg.port, cfg.max_batch_size, cfg.max_queue_delay_ms, cfg.insecure) == (9100, 16, 2.5, True)
    j = tmp_path / "serve.json"
    j.write_text(json.dumps({"insecure": True, "metrics-port": 9091}))
    assert _parse(["--config", str(j)]).metrics_port == 9091
    f.write_text("insecure: true\nno-such-option: 1\n")
    with pytest.raises(ConfigError, match="unknown option"):
        _parse(["--config", str(f)])
    j.write_text(json.dumps({"insecure": "false"}))  # a string is not a boolean: never plaintext by accident
    with pytest.raises(ConfigError, match="insecure must be true or false"):
        _parse(["--config", str(j)])


def test_verdict_json_is_strict_and_carries_no_class_for_rejections():
    from gamguard.runtime.guard import Verdict

    v = Verdict.rejected("FEATURE_MISMATCH", "", predicted_index=2, reference_index=2)
    v.scores = {"feature": float("inf"), "feature.p": 0.0}
    d = v.to_dict()
    assert d["label"] is None and d["probabilities"] is None
    assert "predicted_index" not in d and "reference_index" not in d
    assert d["scores"]["feature"] is None
    json.dumps(d, allow_nan=False)  # strict JSON: raises on inf/nan


def test_config_requires_tls_or_insecure(tmp_path):
    with pytest.raises(ConfigError, match="--insecure"):
        _parse([])
    with pytest.raises(ConfigError, match="no such file"):
        _parse(["--tls-cert", str(tmp_path / "x.crt"), "--tls-key", str(tmp_path / "x.key")])
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="cannot be combined"):
        _parse(["--insecure", "--tls-cert", str(tmp_path / "c.pem")])
    with pytest.raises(ConfigError):
        ServeConfig(insecure=True, max_batch_size=0).validate()


def test_batcher_waits_for_company_only_when_some_is_arriving():
    import time

    async def lone(arriving):
        b = MicroBatcher(lambda xs: list(xs[:, 0]), max_batch_size=8, max_queue_delay_s=2.0, arriving=arriving)
        await b.start()
        t0 = time.perf_counter()
        await b.submit(np.array([1.0]))
        dt = time.perf_counter() - t0
        await b.stop()
        return dt

    # behaviour, not speed: the 2 s delay dwarfs any scheduling noise
    assert _run(lone(lambda: 0)) < 1.0  # nobody else coming: straight to the engine
    assert _run(lone(lambda: 1)) >= 1.9  # someone is being decoded: wait (up to the delay)


def test_audit_log_reopen_after_rotation(tmp_path):
    from gamguard.runtime.server.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record_invalid("r1", protocol="guard", model="m", version="1", bundle_hash="h", detail="bad")
    path.rename(tmp_path / "audit.jsonl.1")  # what logrotate does
    log.reopen()
    log.record_invalid("r2", protocol="guard", model="m", version="1", bundle_hash="h", detail="bad")
    log.close()
    assert json.loads((tmp_path / "audit.jsonl.1").read_text())["request_id"] == "r1"
    assert json.loads(path.read_text())["request_id"] == "r2"


def test_every_data_plane_error_has_its_own_grpc_status():
    """A new DataPlaneError subclass without a mapping would reach clients as INTERNAL."""
    import grpc

    from gamguard.runtime.server.status import status_for

    kinds = errors.DataPlaneError.__subclasses__()
    codes = {status_for(k("x")) for k in kinds}
    assert len(codes) == len(kinds) and grpc.StatusCode.INTERNAL not in codes
    assert status_for(errors.DataPlaneError("x")) == grpc.StatusCode.INTERNAL


def test_heatmap_png_is_the_overlays_jet_map():
    """The Guard service's heatmap PNG and the overlays draw one colour map: 0 blue, 1 red (BGR)."""
    import cv2

    from gamguard.runtime.overlays import jet_heatmap
    from gamguard.runtime.server.codecs import heatmap_png

    cam = np.array([[0.0, 0.5, 1.0], [np.nan, 2.0, -1.0]], np.float32)
    png = cv2.imdecode(np.frombuffer(heatmap_png(cam), np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (2, 3, 3) and np.array_equal(png, jet_heatmap(cam))
    blue, red = png[0, 0], png[0, 2]
    assert blue[0] > 100 and blue[2] < 50 and red[2] > 100 and red[0] < 50
    assert np.array_equal(png[1, 0], blue) and np.array_equal(png[1, 1], red) and np.array_equal(png[1, 2], blue)
