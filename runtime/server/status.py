"""What both gRPC servicers share about a call: the status code of each data-plane error, and the
call's deadline as the data plane's ``timeout_s``.

The data plane raises typed errors (:mod:`gamguard.runtime.server.errors`) and knows nothing of gRPC;
this is the one place that turns them into ``grpc.StatusCode``.
"""

from __future__ import annotations

import grpc

from .errors import DataPlaneError, DeadlineExpired, InvalidRequest, NotReady, Overloaded

STATUS_OF = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(exc: DataPlaneError) -> grpc.StatusCode:
    """The status code a data-plane error is answered with (INTERNAL for an error not listed)."""
    return STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)


def request_timeout(context) -> float | None:
    """The call's remaining deadline in seconds, or None when the client set none (grpc reports a
    huge number then)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None
