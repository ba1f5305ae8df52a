"""Brief fuzzing of the decoders and the request parsers (CI: a few hundred cases per target, no
example database, seconds). The long run against a real server is ``scripts/fuzz.py``."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="fuzz tests need hypothesis (pip install -e '.[dev]')")
from fuzz_targets import (  # noqa: E402
    check_decode,
    check_guard_request,
    check_oip_request,
    guard_request,
    image_bytes,
    oip_request,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402

BRIEF = settings(
    max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@BRIEF
@given(image_bytes)
def test_fuzz_decode_bytes(data):
    check_decode(data)


@BRIEF
@given(oip_request())
def test_fuzz_oip_request_parser(req):
    check_oip_request(req)


@BRIEF
@given(guard_request())
def test_fuzz_guard_request_parser(req):
    check_guard_request(req)
