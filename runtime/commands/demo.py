"""`gamguard demo`: the main job, end to end on this machine, no data or network needed."""

HELP = "serve the embedded demo bundle and send it X-ray phantoms and off-distribution images over gRPC"

DESCRIPTION = """\
The whole runtime in one command:

  1. start `gamguard serve` in-process on a free loopback port with the embedded demo bundle
     (or --bundle DIR) and wait for its health check to turn SERVING;
  2. generate inputs: in-distribution hand/wrist phantoms (16-bit PNG, JPEG and a MONOCHROME1 DICOM)
     and off-distribution images the model never saw in training (the phantom generator's held-out
     kinds, pydicom's CT test file) plus a malformed (truncated) PNG;
  3. send them through a real gRPC client (gamguard.v1.Guard: a VerifyStream for the study, unary
     Verify for the rest) and print the verdict table;
  4. write heatmap overlays (input + Grad-CAM, beside the class's reference map) to --out;
  5. drain and shut the server down;
  6. with --dicom, also the DICOM path: a `gamguard dicom-node` in-process forwarding to a small
     receiving archive (a pynetdicom Storage SCP on loopback), a console sending DX phantoms,
     off-distribution images, a colour photo (secondary capture), a CT file and a malformed DX by
     C-STORE, and the table of what the console was told and what the SRs at the archive say.

Examples:
  gamguard demo
  gamguard demo --out /tmp/demo --json
  gamguard demo --dicom
"""


def add_arguments(parser):
    parser.add_argument("--bundle", metavar="DIR", help="bundle to serve (default: the embedded demo bundle)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default="gamguard-demo",
        help="where inputs and heatmap overlays go (default ./gamguard-demo)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated inputs (default 7)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="also send DICOMs to a DICOM node by C-STORE and show the SR verdicts arriving at an archive "
        "(the DICOMs sent: OUT/dicom/inputs; what the archive received: OUT/dicom/archive; overlays: "
        "OUT/dicom/overlays)",
    )


def _class_names():
    from gamguard.runtime.demo.phantoms import CLASS_NAMES

    return CLASS_NAMES


def _inputs(out_dir, seed: int):
    """(name, group, bytes) of every demo input; files are also written under out_dir/inputs."""
    import cv2
    import numpy as np

    from gamguard.runtime.demo import phantoms
    from gamguard.runtime.demo.synth import write_dicom, write_png16

    inputs_dir = out_dir / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for stage, cls in enumerate(phantoms.CLASS_NAMES):
        img = phantoms.hand_phantom(stage, rng).image
        path = write_png16(inputs_dir / f"phantom_{cls}.png", img)
        items.append((path.name, "in-distribution", path.read_bytes()))
    img = phantoms.hand_phantom(1, rng).image
    path = inputs_dir / "phantom_child.jpg"
    cv2.imwrite(str(path), np.rint(img * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    items.append((path.name, "in-distribution", path.read_bytes()))
    img = phantoms.hand_phantom(2, rng).image
    path = write_dicom(inputs_dir / "phantom_adolescent_mono1.dcm", img, photometric="MONOCHROME1")
    items.append((path.name, "in-distribution", path.read_bytes()))
    for kind in phantoms.HELD_OUT_KINDS:
        path = write_png16(inputs_dir / f"ood_{kind}.png", phantoms.ood_image(kind, rng))
        items.append((path.name, "off-distribution", path.read_bytes()))
    try:
        from pydicom.data import get_testdata_file

        ct = get_testdata_file("CT_small.dcm")
    except Exception:  # noqa: BLE001 - pydicom's test files are optional data
        ct = None
    if ct:
        data = open(ct, "rb").read()
        (inputs_dir / "pydicom_CT_small.dcm").write_bytes(data)
        items.append(("pydicom_CT_small.dcm", "off-distribution", data))
    good = (inputs_dir / "phantom_infant.png").read_bytes()
    (inputs_dir / "malformed_truncated.png").write_bytes(good[: len(good) // 3])
    items.append(("malformed_truncated.png", "malformed", good[: len(good) // 3]))
    return items


def _open_inference_check(target: str, model: str, items, accepted_name, rejected_name) -> dict:
    """The same server through the Open Inference Protocol v2 (what tritonclient.grpc sends)."""
    import grpc
    import numpy as np

    from gamguard.proto import grpc_predict_v2_pb2 as pb
    from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc
    from gamguard.runtime.server.codecs import deserialize_bytes, serialize_bytes

    def infer(stub, data: bytes):
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="image", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(serialize_bytes([data]))
        resp = stub.ModelInfer(req, timeout=60)
        out = {o.name: raw for o, raw in zip(resp.outputs, resp.raw_output_contents)}
        accepted = bool(np.frombuffer(out["accepted"], np.bool_)[0])
        label = deserialize_bytes(out["label"])[0].decode() if "label" in out else None
        return accepted, label, resp.parameters["reasons"].string_param, sorted(set(out) & {"label", "probabilities"})

    by_name = {name: (group, data) for name, group, data in items}
    first_in = accepted_name or next(n for n, (g, _) in by_name.items() if g == "in-distribution")
    first_out = rejected_name or next(n for n, (g, _) in by_name.items() if g == "off-distribution")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=10).ready
        accepted, label, reasons, _ = infer(stub, by_name[first_in][1])
        r_accepted, _, _, r_outputs = infer(stub, by_name[first_out][1])
    return {
        "model_ready": ready,
        "file": first_in,
        "accepted": accepted,
        "label": label,
        "reasons": reasons,
        "rejected_file": first_out,
        "rejected_accepted": r_accepted,
        "rejected_outputs": r_outputs or "none",
    }


def run(args):
    import asyncio
    import json
    import logging
    import sys
    import time
    from pathlib import Path

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gamguard.runtime.bundle import BundleError, load_manifest, resolve_bundle
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.overlays import overlay_path
    from gamguard.runtime.server.app import GuardServer
    from gamguard.runtime.server.client import GuardClient, format_table, verdict_record, write_verdict_overlay
    from gamguard.runtime.server.config import ServeConfig

    t_start = time.perf_counter()
    if not getattr(args, "verbose", False):  # the table is the output; server logs only with -v
        logging.getLogger("gamguard").setLevel(logging.WARNING)
    bundle_dir = resolve_bundle(args.bundle)
    try:
        load_manifest(bundle_dir)
    except BundleError as exc:
        raise CommandError(f"cannot serve the demo bundle: {exc}") from None
    out_dir = Path(args.out)
    overlay_dir = out_dir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    overlay_names: set[str] = set()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))

    items = _inputs(out_dir, args.seed)
    (out_dir / "audit.jsonl").unlink(missing_ok=True)  # this run's verdicts only
    config = ServeConfig(
        bundle=str(bundle_dir),
        host="127.0.0.1",
        port=0,
        insecure=True,
        audit_log=str(out_dir / "audit.jsonl"),
        shutdown_grace_s=10.0,
    )

    def client_session(target: str) -> dict:
        """Everything a remote client does, over a real gRPC channel."""
        channel = grpc.insecure_channel(target)
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        say(f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
        channel.close()
        records, groups = [], []
        with GuardClient(target, timeout=60) as client:
            info = client.model_info()
            say(
                f"model: {info.model.name} {info.model.version}  bundle {info.model.bundle_hash[:12]}  "
                f"classes {', '.join(info.class_names)}  alpha {info.calibration.alpha:g}"
            )
            class_names = list(info.class_names)
            # The in-distribution study goes through one VerifyStream, like a console sending a series.
            study = [it for it in items if it[1] == "in-distribution"]
            stream = client.verify_stream(
                client.request(data, request_id=name, heatmap_values=True) for name, _, data in study
            )
            answered = {v.request_id: v for v in stream}
            for name, group, data in items:
                if name in answered:
                    verdict = answered[name]
                else:
                    try:
                        verdict = client.verify(data, request_id=name, heatmap_values=True)
                    except grpc.RpcError as exc:
                        records.append(verdict_record(name, error=exc.details(), code=exc.code().name))
                        groups.append(group)
                        continue
                rec = verdict_record(name, verdict)
                out = write_verdict_overlay(
                    overlay_path(overlay_dir, name, overlay_names, suffix=".png"),
                    data,
                    verdict,
                    class_names,
                    title=name,
                )
                rec["overlay"] = str(out) if out else None
                records.append(rec)
                groups.append(group)
        # for the OIP call, an input the Guard service accepted and one it rejected (if any)
        accepted = next((r["file"] for r in records if r.get("accepted")), None)
        rejected = next(
            (
                r["file"]
                for r, g in zip(records, groups)
                if g == "off-distribution" and r.get("request_id") and not r.get("accepted")
            ),
            None,
        )
        oip = _open_inference_check(target, info.model.name, items, accepted, rejected)
        say(
            f"open inference protocol: ModelInfer({oip['file']}) -> accepted={oip['accepted']} "
            f"label={oip['label']} reasons={oip['reasons'] or '-'}; ModelInfer({oip['rejected_file']}) -> "
            f"accepted={oip['rejected_accepted']}, class outputs {oip['rejected_outputs']}"
        )
        return {
            "records": records,
            "groups": groups,
            "open_inference": oip,
            "model": {"name": info.model.name, "version": info.model.version, "bundle_hash": info.model.bundle_hash},
        }

    async def main() -> dict:
        server = GuardServer(config)
        await server.start()
        try:
            await server.wait_ready(timeout=120)
        except RuntimeError as exc:
            await server.stop(grace=0)
            raise CommandError(f"the server could not load the bundle: {exc}") from None
        say(
            f"server: gamguard.v1.Guard + inference.GRPCInferenceService on {server.target} "
            f"(ready in {time.perf_counter() - t_start:.1f} s)"
        )
        try:
            result = await asyncio.to_thread(client_session, server.target)
        finally:
            await server.stop(grace=5)
        say("server: drained and stopped")
        return result

    result = asyncio.run(main())
    records, groups = result["records"], result["groups"]
    summary = {}
    for group in ("in-distribution", "off-distribution", "malformed"):
        rows = [r for r, g in zip(records, groups) if g == group]
        summary[group] = {
            "n": len(rows),
            "accepted": sum(1 for r in rows if r.get("accepted")),
            "rejected": sum(1 for r in rows if r.get("request_id") and not r.get("accepted")),
            "refused": sum(1 for r in rows if not r.get("request_id")),
        }
    dicom = None
    if args.dicom:
        from gamguard.runtime.dicomnode.demo import run_dicom_demo

        dicom = run_dicom_demo(bundle_dir, out_dir, args.seed, say)
    elapsed = time.perf_counter() - t_start
    if args.json:
        print(
            json.dumps(
                {
                    **({"dicom": dicom} if dicom is not None else {}),
                    "model": result["model"],
                    "results": [dict(r, group=g) for r, g in zip(records, groups)],
                    "open_inference": result["open_inference"],
                    "summary": summary,
                    "overlays": str(overlay_dir),
                    "seconds": round(elapsed, 1),
                }
            )
        )
        return 0
    print()
    # what a reader should expect per row: the phantom's true maturity class, or a refusal
    expected = []
    for r, g in zip(records, groups):
        if g == "in-distribution":
            expected.append(next((c for c in _class_names() if f"_{c}" in r["file"]), "?"))
        else:
            expected.append("reject" if g == "off-distribution" else "refuse")
    print(format_table(records, extra={"group": groups, "truth": expected}))
    print()
    ind, ood, bad = summary["in-distribution"], summary["off-distribution"], summary["malformed"]
    print(
        f"in-distribution phantoms accepted: {ind['accepted']}/{ind['n']}   "
        f"off-distribution images rejected: {ood['rejected']}/{ood['n']}   "
        f"malformed inputs refused (INVALID_ARGUMENT): {bad['refused']}/{bad['n']}"
    )
    print(f"heatmap overlays: {overlay_dir}/   audit log: {out_dir / 'audit.jsonl'}   ({elapsed:.1f} s)")
    if dicom is not None:
        from gamguard.runtime.dicomnode.demo import format_rows

        print("\nDICOM: console --C-STORE--> gamguard dicom-node --SR + overlay--> archive")
        print(format_rows(dicom["rows"]))
        print(f"archive: {dicom['archive']}/   overlays (PNG): {dicom['overlays']}/   ({dicom['seconds']} s)")
    return 0
