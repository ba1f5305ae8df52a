"""The server's per-request shortcuts behave exactly like the long way round: small PNGs and tensors
decoded on the event loop when alone (no decode-pool hop), metrics children cached, the metrics interceptor's
per-method wrapper reused (and bounded when calls are refused), Verdict built in one go."""

from __future__ import annotations

import asyncio

import cv2
import grpc
import numpy as np
import pytest
from testlib import demo_bundle_path, phantom

from gamguard.proto import guard_pb2
from gamguard.runtime.server import app
from gamguard.runtime.server import dataplane as dp
from gamguard.runtime.server.batching import MicroBatcher
from gamguard.runtime.server.errors import InvalidRequest
from gamguard.runtime.server.grpc_guard import verdict_message
from gamguard.runtime.server.metrics import Metrics


def _png(h: int, w: int, dtype=np.uint8) -> bytes:
    top = 255 if dtype == np.uint8 else 65535
    img = (np.linspace(0, top, h * w).reshape(h, w)).astype(dtype)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def test_inline_decode_only_for_inputs_known_small_before_decoding():
    limit = 64 * 64
    assert dp.small_enough_to_decode_inline(_png(64, 64), None, limit)
    assert dp.small_enough_to_decode_inline(_png(32, 128, np.uint16), None, limit)
    assert not dp.small_enough_to_decode_inline(_png(65, 64), None, limit)
    ok, jpg = cv2.imencode(".jpg", np.zeros((16, 16), np.uint8))
    assert not dp.small_enough_to_decode_inline(jpg.tobytes(), None, limit)  # size not read: pool
    assert not dp.small_enough_to_decode_inline(b"\x89PNG\r\n\x1a\n", None, limit)  # truncated header
    assert not dp.small_enough_to_decode_inline(b"not an image at all, just text", None, limit)
    assert not dp.small_enough_to_decode_inline(_png(8, 8), None, 0)  # 0 turns the shortcut off
    assert dp.small_enough_to_decode_inline(None, np.zeros((64, 64), np.uint8), limit)
    assert not dp.small_enough_to_decode_inline(None, np.zeros((64, 65), np.uint8), limit)


@pytest.fixture(scope="module")
def guard():
    from gamguard.runtime.guard import Guard

    return Guard.from_bundle(demo_bundle_path(), providers=["CPUExecutionProvider"], threads=1)


def _verify_all(guard, config, payloads):
    async def main():
        plane = dp.DataPlane(guard, config)
        await plane.start()
        try:
            out = []
            for p in payloads:
                try:
                    out.append(await plane.verify(data=p))
                except InvalidRequest as exc:
                    out.append(exc)
            return out, len(plane._decode_pool._threads)
        finally:
            await plane.stop()

    return asyncio.run(main())


def test_inline_and_pool_decoding_give_the_same_verdicts(guard):
    ok, buf = cv2.imencode(".png", np.round(phantom(1, 3) * 255).astype(np.uint8))
    good = buf.tobytes()
    corrupt = good[:60] + bytes(len(good) - 60)  # IHDR intact (small), data destroyed
    payloads = [good, corrupt]
    inline, inline_threads = _verify_all(guard, dp.DataPlaneConfig(), payloads)
    pooled, pool_threads = _verify_all(guard, dp.DataPlaneConfig(inline_decode_max_pixels=0), payloads)
    assert inline_threads == 0, "a small PNG went through the decode pool"
    assert pool_threads >= 1
    a, b = inline[0].verdict, pooled[0].verdict
    assert (a.accepted, a.label, a.reasons) == (b.accepted, b.label, b.reasons)
    assert a.scores == pytest.approx(b.scores)
    assert inline[0].input_format == pooled[0].input_format == "png" and inline[0].decode_ms > 0
    # a bad small image is still the caller's error, whichever thread decoded it
    assert isinstance(inline[1], InvalidRequest) and isinstance(pooled[1], InvalidRequest)


def test_large_png_is_decoded_in_the_pool(guard):
    big = _png(600, 600)  # 360 000 pixels > the 512 x 512 default
    results, threads = _verify_all(guard, dp.DataPlaneConfig(), [big])
    assert threads >= 1
    assert not isinstance(results[0], Exception)


def test_metrics_cached_children_count_every_observation():
    m = Metrics()
    verdict = dp.guard_error_verdicts(1, "x")[0]
    res = dp.Result(
        verdict=verdict,
        request_id="r",
        input_format="png",
        bit_depth=8,
        sop_instance_uid=None,
        decode_ms=1.0,
        queue_ms=2.0,
        total_ms=5.0,
    )
    for _ in range(3):
        m.observe_result(res)
        m.observe_rpc("gamguard.v1.Guard", "Verify", "OK")
    m.observe_invalid()
    r = m.registry
    assert r.get_sample_value("gamguard_verdicts_total", {"decision": "rejected"}) == 3
    assert r.get_sample_value("gamguard_verdicts_total", {"decision": "invalid"}) == 1
    assert r.get_sample_value("gamguard_rejections_total", {"reason": "GUARD_ERROR"}) == 3
    assert (
        r.get_sample_value(
            "gamguard_requests_total", {"service": "gamguard.v1.Guard", "method": "Verify", "code": "OK"}
        )
        == 3
    )
    assert r.get_sample_value("gamguard_stage_seconds_count", {"stage": "decode"}) == 3
    assert r.get_sample_value("gamguard_stage_seconds_sum", {"stage": "total"}) == pytest.approx(0.015)


class _Details:
    def __init__(self, method):
        self.method = method
        self.invocation_metadata = ()


def test_metrics_interceptor_reuses_its_wrapper_and_stays_bounded_when_refusing():
    async def ok(request, context):
        return "answer"

    registered = grpc.unary_unary_rpc_method_handler(ok)
    m = Metrics()
    counting = app._MetricsInterceptor(m)
    auth = app._BearerTokenInterceptor("secret")

    async def main():
        async def found(details):
            return registered

        first = await counting.intercept_service(found, _Details("/gamguard.v1.Guard/Verify"))
        second = await counting.intercept_service(found, _Details("/gamguard.v1.Guard/Verify"))
        assert first is second
        assert await first.unary_unary("req", None) == "answer"

        async def refused(details):  # what the bearer-token interceptor hands on for a bad token
            return await auth.intercept_service(found, details)

        for _ in range(20):
            h = await counting.intercept_service(refused, _Details("/gamguard.v1.Guard/Verify"))
            assert h is not first
        return len(counting._wrapped)

    assert asyncio.run(main()) == 2  # the real handler and the refusal, however many calls
    assert (
        m.registry.get_sample_value(
            "gamguard_requests_total", {"service": "gamguard.v1.Guard", "method": "Verify", "code": "OK"}
        )
        == 1
    )


def test_verdict_message_has_every_field(guard):
    async def main():
        plane = dp.DataPlane(guard)
        await plane.start()
        try:
            ok, buf = cv2.imencode(".png", np.round(phantom(2, 5) * 255).astype(np.uint8))
            return plane, await plane.verify(data=buf.tobytes(), request_id="rid-1")
        finally:
            await plane.stop()

    plane, res = asyncio.run(main())
    msg = verdict_message(res, plane)
    v = res.verdict
    assert msg.request_id == "rid-1" and msg.accepted == bool(v.accepted)
    assert msg.decision == (guard_pb2.ACCEPTED if v.accepted else guard_pb2.REJECTED)
    assert list(msg.reasons) == list(v.reasons) and dict(msg.scores) == pytest.approx(v.scores)
    assert dict(msg.thresholds) == pytest.approx(v.thresholds)
    assert msg.model.name == plane.model_name and msg.model.bundle_hash == plane.bundle_hash
    assert msg.timing.batch_size == 1 and msg.timing.total_ms == pytest.approx(res.total_ms)
    assert dict(msg.timing.stages_ms) == pytest.approx(res.stages_ms)
    assert msg.input_format == "png" and msg.bit_depth == 8
    assert msg.HasField("prediction") == bool(v.accepted)
    assert not msg.HasField("heatmap")  # not asked for
    with_map = verdict_message(res, plane, heatmap_values_wanted=True)
    assert len(with_map.heatmap.values) == with_map.heatmap.height * with_map.heatmap.width > 0


def test_batcher_waits_for_expected_company_within_the_delay():
    import time

    async def first_batch(expected, later: int, delay_s: float):
        sizes = []

        def run_batch(xs):
            sizes.append(len(xs))
            return list(xs[:, 0])

        b = MicroBatcher(run_batch, max_batch_size=8, max_queue_delay_s=delay_s, arriving=lambda: 0, expected=expected)
        await b.start()

        async def late(i):  # staggered arrivals, as gRPC clients come back
            await asyncio.sleep(0.05 * (i + 1))
            return await b.submit(np.array([float(i)]))

        t0 = time.perf_counter()
        first = asyncio.ensure_future(b.submit(np.array([9.0])))
        others = [asyncio.ensure_future(late(i)) for i in range(later)]
        await first
        dt = time.perf_counter() - t0
        await asyncio.gather(*others)
        await b.stop()
        return sizes, dt

    # behaviour, not speed: the delays dwarf scheduling noise
    sizes, dt = asyncio.run(first_batch(lambda: 3, later=2, delay_s=2.0))
    assert sizes == [3] and dt < 1.5  # waited for the two expected requests, not for the whole delay
    sizes, dt = asyncio.run(first_batch(lambda: 1, later=2, delay_s=2.0))
    assert sizes[0] == 1 and dt < 0.5  # a lone request does not wait
    sizes, dt = asyncio.run(first_batch(lambda: 8, later=1, delay_s=0.3))
    assert sizes[0] == 2 and 0.25 <= dt < 1.5  # company that does not come: the delay still bounds the wait


def test_data_plane_expects_as_much_company_as_was_in_flight(guard):
    async def main():
        plane = dp.DataPlane(guard)
        assert plane._expected_company() == 0
        plane._active = 3
        plane._peak_active = 5
        assert plane._expected_company() == 5  # the peak since the last question
        assert plane._expected_company() == 3  # a new window starts at the current count
        plane._peak_active, plane._peak_since = 7, plane._peak_since - 10 * plane.COMPANY_MEMORY_S
        assert plane._expected_company() == 3  # a stale burst is forgotten
        plane._active = 0
        await plane.stop()

    asyncio.run(main())
