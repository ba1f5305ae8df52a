"""Server assembly: a ``grpc.aio`` server with the Guard and Open Inference Protocol services,
health, reflection, TLS / mutual TLS, an optional bearer token, metrics, audit log, the drift monitor
and a graceful drain.

Lifecycle (what ``grpc.health.v1.Health`` reports, for the overall server ``""`` and each service):

1. ``start()`` binds the port and answers at once, NOT_SERVING: orchestrators can tell "up but
   loading" from "down";
2. the bundle is loaded in a thread (hashes verified and calibration required by
   ``Guard.from_bundle``), the data plane starts and a self-test inference runs through it;
3. only then SERVING;
4. ``stop()`` (SIGTERM in ``gamguard serve``) switches to NOT_SERVING, optionally waits
   ``drain_delay_s`` so load balancers notice, refuses new calls and lets in-flight ones finish
   within ``shutdown_grace_s``, then drains the batcher.

With ``--model-control explicit`` an Open Inference Protocol client may also unload the model
(:meth:`GuardServer.unload_model`: NOT_SERVING until loaded again) and load it again
(:meth:`GuardServer.load_model`: steps 2–3 for a fresh copy of the configured bundle, swapped in
while the old one keeps answering).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from gamguard.proto import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc, guard_pb2, guard_pb2_grpc

from ..drift_monitor import DriftMonitor
from .client import read_optional
from .config import ServeConfig
from .dataplane import DataPlane, DataPlaneConfig
from .grpc_guard import GuardServicer
from .grpc_inference import InferenceServicer
from .metrics import Metrics
from .quietlog import quiet_input_libraries
from .wire import MalformedRequestInterceptor

log = logging.getLogger(__name__)

GUARD_SERVICE = guard_pb2.DESCRIPTOR.services_by_name["Guard"].full_name  # gamguard.v1.Guard
INFERENCE_SERVICE = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health.SERVICE_NAME  # grpc.health.v1.Health
SERVED = (GUARD_SERVICE, INFERENCE_SERVICE)
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


@dataclass
class ServerState:
    """What the servicers read: the data plane once ready, and whether we are draining."""

    plane: DataPlane | None = None
    draining: bool = False
    load_error: str | None = None
    expected_model_name: str | None = None
    expected_model_version: str = ""  # of the last loaded bundle: the repository index lists it unloaded too
    unloaded: bool = False  # by RepositoryModelUnload
    control: "GuardServer | None" = None  # load_model / unload_model; only with --model-control explicit

    def not_ready_reason(self) -> str:
        if self.unloaded:
            return (
                f"model {self.expected_model_name!r} is unloaded (RepositoryModelUnload); load it again "
                "with RepositoryModelLoad"
            )
        if self.load_error:
            return f"not ready: the bundle failed to load: {self.load_error}"
        return "not ready: the bundle is still loading"


def reflection_v1_file():
    """``grpc.reflection.v1``'s schema. grpcio-reflection ships only v1alpha; v1 is the same file under
    a new package (every message and field number unchanged), so it is v1alpha's descriptor renamed."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    messages = list(proto.message_type)
    while messages:
        m = messages.pop()
        messages.extend(m.nested_type)
        for f in m.field:
            if f.type_name:
                f.type_name = f.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    return proto


def reflection_pool():
    """A descriptor pool holding every service we expose, for server reflection.

    The OIP messages live in a private pool (see ``scripts/gen_protos.py``), so reflection gets its
    own pool with all the files rather than protobuf's default one.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        pool.Add(proto)
        added.add(fd.name)

    for fd in (guard_pb2.DESCRIPTOR, grpc_predict_v2_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(fd)
    pool.Add(reflection_v1_file())
    return pool


def enable_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Server reflection as ``grpc.reflection.v1`` (what current grpcurl asks first) and as
    ``grpc.reflection.v1alpha``: one servicer; the v1 method is (de)serialized with v1alpha's messages,
    which are the same on the wire."""
    servicer = reflection.aio.ReflectionServicer(
        services + (reflection.SERVICE_NAME, REFLECTION_V1_SERVICE), pool=reflection_pool()
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {"ServerReflectionInfo": v1}),)
    )


class _BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires exactly one ``authorization: Bearer <token>`` header on every call except health checks
    (a second header is refused rather than letting either one win)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(f"/{HEALTH_SERVICE}/"):
            return await continuation(handler_call_details)
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        got = values[0] if len(values) == 1 else ""
        got_bytes = got.encode() if isinstance(got, str) else bytes(got)
        if hmac.compare_digest(got_bytes, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny(handler)


async def _deny_unary(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


async def _deny_stream(request_or_iterator, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
    yield  # pragma: no cover - makes this an async generator


def _deny(handler):
    # module-level deny functions: the handler's behaviour is the same object for every call, so the
    # metrics interceptor's per-method cache stays bounded however many calls are refused
    if handler is None:
        return None
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny_unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(_deny_unary, **kw)


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every unary RPC by final status code (streams are counted when they start).

    The counting wrapper of a method is built once and reused: grpc asks the interceptor for the
    handler on every call, and building a new handler per call costs the event loop for nothing.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._wrapped: dict[tuple[str, object], object] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method_path = handler_call_details.method or "/?/?"
        if handler.request_streaming or handler.response_streaming:
            service, _, method = method_path.strip("/").partition("/")
            self.metrics.observe_rpc(service, method, "STREAM")
            return handler
        key = (method_path, handler.unary_unary)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            service, _, method = method_path.strip("/").partition("/")
            wrapped = self._wrapped[key] = self._counting(handler, service, method)
        return wrapped

    def _counting(self, handler, service: str, method: str):
        inner = handler.unary_unary
        metrics = self.metrics

        async def counted(request, context):
            try:
                response = await inner(request, context)
            except BaseException:
                code = context.code() if hasattr(context, "code") else None
                metrics.observe_rpc(service, method, _code_name(code) or "ERROR")
                raise
            metrics.observe_rpc(service, method, "OK")
            return response

        return grpc.unary_unary_rpc_method_handler(
            counted, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _code_name(code) -> str | None:
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


def _check_tls_files(cfg) -> None:
    """gRPC reports an unusable certificate or key only as "cannot bind": load them with the ssl
    module first so the operator is told which file is wrong."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca:
            ssl.create_default_context(cafile=cfg.tls_client_ca)
    except (ssl.SSLError, ValueError, OSError) as exc:
        ca = f", --tls-client-ca {cfg.tls_client_ca}" if cfg.tls_client_ca else ""
        raise OSError(f"TLS files unusable (--tls-cert {cfg.tls_cert}, --tls-key {cfg.tls_key}{ca}): {exc}") from None


def default_guard_factory(config: ServeConfig) -> Callable[[], object]:
    def load():
        from gamguard.runtime.bundle import resolve_bundle
        from gamguard.runtime.guard import Guard

        kwargs = {}
        if config.policy:
            kwargs["policy"] = config.policy
        guard = Guard.from_bundle(
            resolve_bundle(config.bundle), providers=config.providers, threads=config.threads, **kwargs
        )
        if config.trusted_key:
            from gamguard.runtime.signing import verify_bundle_signature

            verify_bundle_signature(guard.bundle_dir, guard.manifest, config.trusted_key)
        if config.expect_bundle_hash and guard.bundle_hash != config.expect_bundle_hash.strip().lower():
            from gamguard.runtime.bundle import BundleError

            raise BundleError(
                f"bundle_hash {guard.bundle_hash} is not the expected {config.expect_bundle_hash} "
                "(--expect-bundle-hash): the bundle or a served setting differs from the approved one"
            )
        return guard

    return load


def plane_config(cfg: ServeConfig) -> DataPlaneConfig:
    """The data plane's settings from the serving configuration (``serve`` and ``dicom-node`` alike)."""
    return DataPlaneConfig(
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_ms=cfg.max_queue_delay_ms,
        max_queue_size=cfg.max_queue_size,
        max_pixels=cfg.max_pixels,
        decode_workers=cfg.decode_workers,
        max_decode_bytes=cfg.max_decode_mb << 20,
        decode_memory_bytes=cfg.decode_memory_mb << 20,
        reveal_rejected_details=bool(cfg.debug_rejected_details),
    )


class GuardServer:
    """One gamguard server. ``guard_factory`` returns a loaded Guard (default: from ``config.bundle``)."""

    def __init__(self, config: ServeConfig, *, guard_factory: Callable[[], object] | None = None, audit=None):
        self.config = config
        self.guard_factory = guard_factory or default_guard_factory(config)
        self.metrics = Metrics()
        self.audit = audit
        if self.audit is None and config.audit_log:
            from .audit import AuditLog

            self.audit = AuditLog(config.audit_log)
        self.state = ServerState()
        if config.model_control == "explicit":
            self.state.control = self
        self._model_lock = asyncio.Lock()  # one load / unload at a time, the startup load included
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        self._load_task: asyncio.Task | None = None
        self._stopped = False

    @property
    def target(self) -> str:
        host = self.config.bind_host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind and start answering (NOT_SERVING), then load the bundle in the background."""
        cfg = self.config
        quiet_input_libraries()
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [_MetricsInterceptor(self.metrics)]
        if cfg.auth_token_file:
            token = Path(cfg.auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"{cfg.auth_token_file}: empty token file")
            interceptors.append(_BearerTokenInterceptor(token))  # inside metrics: refused calls are counted
        interceptors.append(MalformedRequestInterceptor(self.state))  # innermost: parses only what auth let in
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        guard_pb2_grpc.add_GuardServicer_to_server(GuardServicer(self.state), self.server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.state), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("",) + SERVED:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        enable_reflection(self.server, SERVED + (HEALTH_SERVICE,))
        address = f"{cfg.bind_host}:{cfg.port}"
        if cfg.insecure:
            port = self.server.add_insecure_port(address)
        else:
            _check_tls_files(cfg)
            creds = grpc.ssl_server_credentials(
                [(read_optional(cfg.tls_key), read_optional(cfg.tls_cert))],
                root_certificates=read_optional(cfg.tls_client_ca),
                require_client_auth=bool(cfg.tls_client_ca),
            )
            port = self.server.add_secure_port(address, creds)
        if not port:
            raise OSError(f"cannot bind {address}")
        self.port = int(port)
        await self.server.start()
        if cfg.health_port is not None:
            # Health alone, plaintext: same servicer (same states) as on the main port. It carries no
            # images or verdicts, only SERVING / NOT_SERVING, so TLS-less probes can reach it.
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            address = f"{cfg.health_bind_host}:{cfg.health_port}"
            hport = self.health_server.add_insecure_port(address)
            if not hport:
                raise OSError(f"cannot bind the health port {address}")
            self.health_port = int(hport)
            await self.health_server.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_bind_host)
        log.info(
            "gRPC listening on %s:%s (%s)%s%s",
            cfg.bind_host,
            self.port,
            "plaintext" if cfg.insecure else ("mutual TLS" if cfg.tls_client_ca else "TLS"),
            f", metrics on {cfg.metrics_bind_host}:{self.metrics_port}/metrics" if self.metrics_port else "",
            f", plaintext health on {cfg.health_bind_host}:{self.health_port}" if self.health_port else "",
        )
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="gamguard-load")
        return self.port

    async def _build_plane(self) -> DataPlane:
        """Load the configured bundle (hashes verified) into a started, self-tested data plane."""
        loop = asyncio.get_running_loop()
        guard = await loop.run_in_executor(None, self.guard_factory)
        self.state.expected_model_name = str(guard.manifest.get("model", {}).get("name", ""))
        plane = DataPlane(
            guard,
            plane_config(self.config),
            metrics=self.metrics,
            audit=self.audit,
            drift=await loop.run_in_executor(None, self._drift_monitor_for, guard),
        )
        await plane.start()
        try:
            await plane.self_test()
        except BaseException:
            await plane.stop()
            raise
        self.state.expected_model_version = plane.model_version
        return plane

    def _drift_monitor_for(self, guard) -> DriftMonitor | None:
        """The drift monitor of a freshly loaded guard: the serving plane's own when the bundle and its
        guard settings are the same (a reload continues the watch), else a new one. None for stand-in
        guards of the tests without a calibration (every real Guard has one)."""
        if not hasattr(guard, "calibration"):
            return None
        old = self.state.plane
        if (
            old is not None
            and old.drift is not None
            and old.bundle_hash == str(guard.bundle_hash)
            and (old.guard.policy, old.guard.enforced_checks) == (guard.policy, guard.enforced_checks)
        ):
            return old.drift
        return DriftMonitor.for_guard(guard)

    async def _serve(self, plane: DataPlane) -> None:
        self.state.plane, self.state.unloaded, self.state.load_error = plane, False, None
        self.metrics.watch_drift(plane.drift)
        self.metrics.ready.set(1)
        for name in ("",) + SERVED:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving model %s version %s (bundle %s…)", plane.model_name, plane.model_version, plane.bundle_hash[:12]
        )

    async def _load(self) -> None:
        async with self._model_lock:
            try:
                plane = await self._build_plane()
            except Exception as exc:  # noqa: BLE001 - reported through health and wait_ready()
                self.state.load_error = f"{type(exc).__name__}: {exc}"
                log.error("cannot serve: %s", self.state.load_error)
                self.ready.set()
                return
            await self._serve(plane)
        self.ready.set()

    async def load_model(self) -> None:
        """(Re)load the configured bundle from disk (RepositoryModelLoad). The fresh copy is verified and
        self-tested before it replaces the serving one, which keeps answering meanwhile, and keeps
        serving if the load fails (the exception says why)."""
        async with self._model_lock:
            plane = await self._build_plane()
            if self.state.draining:
                await plane.stop()
                raise RuntimeError("the server is shutting down")
            old = self.state.plane
            await self._serve(plane)
            if old is not None:
                await old.stop()  # finishes the requests it already holds
        log.info("model %s loaded on request", plane.model_name)

    async def unload_model(self) -> None:
        """Stop serving the model (RepositoryModelUnload): NOT_SERVING, new requests UNAVAILABLE, the
        loaded copy drained and released."""
        async with self._model_lock:
            old, self.state.plane = self.state.plane, None
            self.state.unloaded = True
            self.metrics.ready.set(0)
            self.metrics.watch_drift(None)
            for name in ("",) + SERVED:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if old is not None:
                await old.stop()
        log.info("model %s unloaded on request", self.state.expected_model_name)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the bundle is loaded and self-tested; raise RuntimeError if loading failed."""
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.state.load_error:
            raise RuntimeError(self.state.load_error)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, finish in-flight ones, drain the batcher."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        self.state.draining = True
        self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay_s > 0:
            await asyncio.sleep(self.config.drain_delay_s)
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:  # kept answering NOT_SERVING until the main port closed
            await self.health_server.stop(0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.state.plane is not None:
            await self.state.plane.stop()
        self.metrics.close()
        if self.audit is not None:
            self.audit.close()
        log.info("server stopped")
