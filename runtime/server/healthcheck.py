"""A tiny gRPC health probe: ``python -m gamguard.runtime.server.healthcheck``.

Asks a gamguard server's ``grpc.health.v1.Health/Check`` and exits 0 only when the answer is SERVING
(the server reports NOT_SERVING until the bundle is loaded and verified). Used by container
HEALTHCHECKs and the systemd watchdog script, where the Go ``grpc_health_probe`` binary is not
available; Kubernetes uses its native ``grpc:`` probes instead.

Every option can also come from the environment (``GAMGUARD_HEALTH_PORT``, ``GAMGUARD_HEALTH_HOST``,
``GAMGUARD_HEALTH_INSECURE=1``, ``GAMGUARD_HEALTH_TLS_CA``, ``GAMGUARD_HEALTH_TLS_CERT``,
``GAMGUARD_HEALTH_TLS_KEY``, ``GAMGUARD_HEALTH_TLS_SERVER_NAME``), so a container image can declare a
HEALTHCHECK once and a deployment that changes the transport only sets variables; flags win.

Exit status: 0 SERVING; 1 NOT_SERVING / UNKNOWN / SERVICE_UNKNOWN; 2 unreachable, timeout or a TLS
error; 64 bad arguments. One line on stderr says why, for ``docker inspect`` and the journal.

examples::

    python -m gamguard.runtime.server.healthcheck --port 8001 --insecure
    python -m gamguard.runtime.server.healthcheck --port 8001 --tls-ca /certs/ca.crt --tls-server-name gamguard
    python -m gamguard.runtime.server.healthcheck --port 8001 --tls-ca ca.crt --tls-cert probe.crt --tls-key probe.key
"""

from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_SERVING, EXIT_NOT_SERVING, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2, 64


def _env(name: str, default=None):
    return os.environ.get(f"GAMGUARD_HEALTH_{name}") or default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gamguard.runtime.server.healthcheck",
        description="Exit 0 when a gamguard server's gRPC health service says SERVING.",
    )
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="server address (default 127.0.0.1)")
    # a string default: argparse converts it with type=, so a bad GAMGUARD_HEALTH_PORT is a usage error
    p.add_argument("--port", type=int, default=_env("PORT", "8001"), help="gRPC port (default 8001)")
    p.add_argument("--service", default="", help="health service name to ask about (default '': the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per attempt (default 3)")
    p.add_argument(
        "--attempts",
        type=int,
        default=1,
        help="ask up to N times until SERVING (a server still loading its bundle is "
        "NOT_SERVING for a moment; default 1)",
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between attempts (default 2)")
    tls = p.add_argument_group("transport (pick --insecure or TLS)")
    tls.add_argument(
        "--insecure",
        action="store_true",
        default=_env("INSECURE", "0").lower() not in ("0", "false", "no", ""),
        help="plaintext (a server started with --insecure); TLS options are then ignored",
    )
    tls.add_argument(
        "--tls-ca", default=_env("TLS_CA"), metavar="FILE", help="CA certificate that signed the server's certificate"
    )
    tls.add_argument(
        "--tls-cert", default=_env("TLS_CERT"), metavar="FILE", help="client certificate (servers with --tls-client-ca)"
    )
    tls.add_argument("--tls-key", default=_env("TLS_KEY"), metavar="FILE", help="client private key")
    tls.add_argument(
        "--tls-server-name",
        default=_env("TLS_SERVER_NAME"),
        metavar="NAME",
        help="name to verify the server certificate against (default: --host)",
    )
    return p


def _channel(args):
    import grpc

    target = f"{args.host}:{args.port}"
    if args.insecure:
        return grpc.insecure_channel(target)
    from gamguard.runtime.server.client import make_channel

    return make_channel(
        target,
        tls=True,
        ca_cert=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
        server_name=args.tls_server_name,
    )


def check(args) -> tuple[int, str]:
    """(exit status, one-line reason)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        channel = _channel(args)
    except OSError as exc:
        return EXIT_UNREACHABLE, f"cannot read TLS file: {exc}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout, wait_for_ready=False
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return EXIT_NOT_SERVING, f"service {args.service!r} unknown to the server"
            return EXIT_UNREACHABLE, f"{args.host}:{args.port}: {code.name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (EXIT_SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING), status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; keep 2 for "unreachable"
        return EXIT_USAGE if exc.code else 0
    if not args.insecure and bool(args.tls_cert) != bool(args.tls_key):
        print("healthcheck: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_USAGE
    if args.attempts < 1 or args.interval < 0 or args.timeout <= 0:
        print("healthcheck: --attempts must be >= 1, --interval >= 0, --timeout > 0", file=sys.stderr)
        return EXIT_USAGE
    for attempt in range(args.attempts):
        if attempt:
            time.sleep(args.interval)
        code, reason = check(args)
        if code == EXIT_SERVING:
            break
    print(f"healthcheck: {reason}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
