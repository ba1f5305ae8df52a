"""`gamguard predict`: send images to a running gamguard server and print the verdicts."""

HELP = "send images to a gamguard server (gRPC) and print a table of verdicts"

DESCRIPTION = """\
Send image files (PNG, JPEG, 16-bit PNG, DICOM) to a running `gamguard serve` over gamguard.v1.Guard
and print one verdict per file: decision, label (accepted inputs only), reasons and key scores.

Examples:
  gamguard predict --server 127.0.0.1:8001 hand.png study/*.dcm
  gamguard predict --server xray-box:8001 --tls-ca ca.pem --tls-cert me.crt --tls-key me.key scan.dcm
  gamguard predict --server 127.0.0.1:8001 --overlays out/ --json *.png

Exit status: 0 when every file got a verdict (accepted or rejected), 1 when some file was refused
(e.g. INVALID_ARGUMENT for a malformed file), 2 for usage or connection errors.
"""


def add_arguments(parser):
    parser.add_argument("files", nargs="+", metavar="FILE", help="images to verify")
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="address of `gamguard serve`")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="CA certificate (PEM) that signed the server's (implies --tls)"
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--tls-server-name", metavar="NAME", help="expected server name in its certificate")
    parser.add_argument("--token-file", metavar="FILE", help="bearer token file (server's --auth-token-file)")
    parser.add_argument("--frame", type=int, metavar="N", help="frame of multi-frame DICOM files (0-based)")
    parser.add_argument("--overlays", metavar="DIR", help="write heatmap overlay PNGs here")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per-request deadline (default 60)")
    parser.add_argument("--json", action="store_true", help="one JSON object per file on stdout")


def run(args):
    import json
    import sys
    from pathlib import Path

    import grpc

    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.overlays import overlay_path
    from gamguard.runtime.server.client import GuardClient, format_table, verdict_record, write_verdict_overlay

    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
    except OSError as exc:
        raise CommandError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    try:
        client = GuardClient(
            args.server,
            timeout=args.timeout,
            tls=args.tls,
            ca_cert=args.tls_ca,
            client_cert=args.tls_cert,
            client_key=args.tls_key,
            server_name=args.tls_server_name,
            token=token,
        )
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    records, refused = [], 0
    overlay_names: set[str] = set()
    with client:
        class_names = None
        for name in args.files:
            path = Path(name)
            try:
                data = path.read_bytes()
            except OSError as exc:  # one unreadable file is a row of the table, not the end of the run
                refused += 1
                records.append(verdict_record(name, error=exc.strerror or str(exc), code="UNREADABLE"))
                if args.json:
                    print(json.dumps(records[-1]), flush=True)
                continue
            try:
                verdict = client.verify(data, frame=args.frame, heatmap_values=bool(args.overlays))
            except grpc.RpcError as exc:
                code = exc.code()
                if (
                    code
                    in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)
                    and not records
                ):
                    raise CommandError(f"{args.server}: {code.name}: {exc.details()}") from None
                refused += 1
                records.append(verdict_record(name, error=exc.details(), code=code.name))
                if args.json:
                    print(json.dumps(records[-1]), flush=True)
                continue
            rec = verdict_record(name, verdict)
            if args.overlays:
                if class_names is None:
                    class_names = list(client.model_info().class_names)
                out = write_verdict_overlay(
                    overlay_path(args.overlays, path, overlay_names),
                    data,
                    verdict,
                    class_names,
                    title=path.name,
                    frame=args.frame,
                )
                rec["overlay"] = str(out) if out else None
            records.append(rec)
            if args.json:
                print(json.dumps(rec), flush=True)
    if not args.json:
        print(format_table(records))
        if args.overlays:
            print(f"overlays written to {args.overlays}", file=sys.stderr)
    return 1 if refused else 0
