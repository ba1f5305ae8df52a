"""Requests that fail before any servicer code runs: bytes that are not a valid protobuf message (a
broken frame, a string field that is not UTF-8), and the server's last-resort net for unexpected errors.

grpc reports a message it cannot parse as UNKNOWN with the Python exception's text and no audit line.
:class:`MalformedRequestInterceptor` wraps every method's request parser so such a message becomes a
:class:`Malformed` placeholder instead: unary methods answer INVALID_ARGUMENT (one audit line, status
documented), streaming methods refuse the stream at that item — except those listed in
``PER_ITEM_STREAMS``, whose servicer answers the bad item with its own error verdict and goes on.
The interceptor sits inside the bearer-token check, so an unauthenticated client learns nothing
about what it sent.
"""

from __future__ import annotations

import inspect
import logging

import grpc

from .dataplane import new_request_id
from .errors import InvalidRequest
from .quietlog import log_limited

log = logging.getLogger(__name__)

PER_ITEM_STREAMS = frozenset({"/gamguard.v1.Guard/VerifyStream", "/inference.GRPCInferenceService/ModelStreamInfer"})
MAX_REQUEST_ID_CHARS = 256


class Malformed:
    """Stands for a request message that did not parse (the exception type only, never its text)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error

    def message(self) -> str:
        return f"malformed request: not a valid protobuf message of this method ({self.error})"


def client_request_id(value: str) -> str:
    """The caller's request id, or a new one when empty; an id too long to log is refused."""
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request id is {len(value)} characters; at most {MAX_REQUEST_ID_CHARS} are accepted")
    return value or new_request_id()


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - any parser failure is the caller's malformed message
            return Malformed(type(exc).__name__)

    return parse


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring. ``state.plane`` (when loaded) audits the refusals."""

    def __init__(self, state):
        self.state = state
        self._wrapped: dict[tuple[str, object], object] = {}  # built once per method (hot path)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method or ""
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        key = (method, behaviour)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(handler, method)
        return wrapped

    def _refuse(self, method: str, bad: Malformed) -> str:
        text = bad.message()
        log_limited(log, "malformed", "refused a malformed request message on %s (%s)", method, bad.error)
        plane = self.state.plane
        if plane is not None:
            plane.record_invalid(new_request_id(), method.strip("/").split("/")[0], text)
        return text

    def _wrap(self, handler, method: str):
        kw = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        refuse = self._refuse
        if not handler.request_streaming:
            inner = handler.unary_unary or handler.unary_stream

            if handler.response_streaming and not inspect.isasyncgenfunction(inner):
                # a server-streaming handler that writes with context.write (grpc_health's Watch does)

                async def unary_stream_writer(request, context):
                    if isinstance(request, Malformed):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refuse(method, request))
                    await inner(request, context)

                return grpc.unary_stream_rpc_method_handler(unary_stream_writer, **kw)

            if handler.response_streaming:

                async def unary_stream(request, context):
                    if isinstance(request, Malformed):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refuse(method, request))
                    async for item in inner(request, context):
                        yield item

                return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

            async def unary_unary(request, context):
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refuse(method, request))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)

        inner = handler.stream_unary or handler.stream_stream
        if method in PER_ITEM_STREAMS:  # the servicer answers a Malformed item itself
            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.response_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            return make(inner, **kw)

        async def checked(requests, context):
            async for request in requests:
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refuse(method, request))
                yield request

        if handler.response_streaming and not inspect.isasyncgenfunction(inner):

            async def stream_stream_writer(requests, context):
                await inner(checked(requests, context), context)

            return grpc.stream_stream_rpc_method_handler(stream_stream_writer, **kw)

        if handler.response_streaming:

            async def stream_stream(requests, context):
                async for item in inner(checked(requests, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)

        async def stream_unary(requests, context):
            return await inner(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)


def internal_error(plane, request_id: str, protocol: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The last-resort answer to an exception no handler expected: INTERNAL with a fixed text (never
    the exception's), one audit line, and a rate-limited log entry with the traceback."""
    log_limited(
        log,
        f"internal-{type(exc).__name__}",
        "internal error on a %s request (%s)",
        protocol,
        type(exc).__name__,
        level=logging.ERROR,
        exc_info=exc,
    )
    if plane is not None:
        plane.record_error(request_id, protocol, f"internal error ({type(exc).__name__})")
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); request id {request_id}"
