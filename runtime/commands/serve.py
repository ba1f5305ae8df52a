"""`gamguard serve`: the guarded gRPC server (gamguard.v1.Guard + Open Inference Protocol v2)."""

HELP = "serve a bundle over gRPC (gamguard.v1.Guard, Open Inference Protocol v2, health, reflection)"

DESCRIPTION = """\
Serve a calibrated bundle over gRPC. Every answer is a guarded verdict: a label leaves the server only
when the input passed the garbage-class, Grad-CAM attention and early-feature checks.

Services on one port:
  gamguard.v1.Guard                    Verify, VerifyStream, GetModelInfo (full verdicts)
  inference.GRPCInferenceService       Open Inference Protocol v2 (tritonclient.grpc, KServe clients)
                                       with Triton's ModelConfig, ModelStatistics, ModelStreamInfer;
                                       RepositoryModelLoad/Unload only with --model-control explicit
  grpc.health.v1.Health                NOT_SERVING until the bundle is loaded, its hashes verified and
                                       a self-test inference passed; NOT_SERVING again while draining
                                       (and while the model is unloaded)
  grpc.reflection.v1.ServerReflection  and grpc.reflection.v1alpha.ServerReflection

Audit: --audit-log FILE appends one JSON line per verdict (never patient data); SIGHUP reopens the
file after logrotate has moved it.

Transport: TLS by default (--tls-cert/--tls-key; add --tls-client-ca for mutual TLS). Plaintext only
with --insecure, and then bound to 127.0.0.1 unless --host says otherwise. The metrics endpoint and
the plaintext health port bind 127.0.0.1 unless --metrics-host / --health-host say otherwise.
SIGTERM/SIGINT drain: health turns NOT_SERVING, new calls are refused, in-flight calls finish
(--shutdown-grace-s).

Limits: an image needing more than --max-decode-mb to decode (estimated from its header) is refused
with INVALID_ARGUMENT; all requests being decoded share --decode-memory-mb (RESOURCE_EXHAUSTED
beyond). Rejected verdicts carry nothing specific to the model's top class. --expect-bundle-hash pins
the bundle version (bundle_hash covers every file and every setting of bundle.json).

Examples:
  gamguard serve --insecure --port 8001                     # embedded demo bundle, loopback only
  gamguard serve --bundle /opt/bundle --port 8001 --tls-cert server.crt --tls-key server.key \\
                 --tls-client-ca clients-ca.crt --metrics-port 9090 --audit-log audit.jsonl
  gamguard serve --config /etc/gamguard/serve.yaml          # same options as YAML/JSON keys
  gamguard serve --bundle /opt/bundle --expect-bundle-hash 94140fe4... --tls-cert s.crt --tls-key s.key
"""


def add_arguments(parser):
    from gamguard.runtime.server.config import add_serve_arguments

    add_serve_arguments(parser)


def run(args):
    import asyncio
    import logging

    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.commands.signals import stop_event_on_signals
    from gamguard.runtime.server.config import ConfigError, config_from_args

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    from gamguard.runtime.server.app import GuardServer

    log = logging.getLogger("gamguard.serve")

    async def main() -> int:
        server = GuardServer(config)
        try:
            await server.start()
        except (OSError, RuntimeError, ValueError) as exc:
            raise CommandError(f"cannot start the server: {exc}") from None
        stop = stop_event_on_signals(server.audit)
        # a SIGTERM while the bundle is still loading stops at once
        ready, stopping = asyncio.ensure_future(server.ready.wait()), asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel(), stopping.cancel()
        if stop.is_set() and not server.ready.is_set():
            await server.stop(grace=0)
            return 0
        if server.state.load_error:
            await server.stop(grace=0)
            raise CommandError(f"cannot serve the bundle: {server.state.load_error}")
        print(
            f"gamguard: serving on {config.bind_host}:{server.port}"
            + (f", metrics on {config.metrics_bind_host}:{server.metrics_port}/metrics" if server.metrics_port else "")
            + (f", health on :{server.health_port}" if server.health_port else ""),
            flush=True,
        )
        await stop.wait()
        log.info("signal received: draining (grace %.0f s)", config.shutdown_grace_s)
        await server.stop()
        return 0

    return asyncio.run(main())
