"""The data plane's request errors: one class per way a request can fail, each mapped to one status
code by every protocol adapter (for gRPC: :mod:`gamguard.runtime.server.status`).

Nothing here knows about a transport, so the data plane and the batcher raise them freely.
"""

from __future__ import annotations


class DataPlaneError(Exception):
    """Base of the data plane's request errors (each maps to one protocol status code)."""


class InvalidRequest(DataPlaneError):
    """The input cannot be decoded or is not a valid image (→ INVALID_ARGUMENT)."""


class Overloaded(DataPlaneError):
    """The batching queue is full (→ RESOURCE_EXHAUSTED); the client should back off and retry."""


class DeadlineExpired(DataPlaneError):
    """The request's deadline passed before the engine got to it (→ DEADLINE_EXCEEDED)."""


class NotReady(DataPlaneError):
    """The bundle is not loaded yet, or the server is draining (→ UNAVAILABLE)."""
