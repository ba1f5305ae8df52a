#!/usr/bin/env python3
"""Soak benchmark: many clients, mixed good and hostile traffic, against a real ``gamguard serve``.

    .venv/bin/python scripts/soak.py                       # 64 clients, 180 s, the embedded demo bundle
    .venv/bin/python scripts/soak.py --clients 64 --seconds 300 --json

The server runs with its defaults (plaintext on loopback). Each client loops, drawing an input class
by weight and sending it through ``Verify`` or OIP ``ModelInfer`` (half each):

* ``valid`` (40 %): in-distribution hand phantoms, 16-bit PNG;
* ``off_distribution`` (25 %): held-out off-distribution images (other anatomy, noise, ...), 16-bit PNG;
* ``invalid`` (25 %): a truncated JPEG with an end-of-image marker appended, a PNG cut short, random
  bytes, a DICOM with a NaN rescale slope, a tensor whose shape overflows int64;
* ``oversized`` (10 %): an 8000 x 8000 PNG of 60 KB (too large to decode), and a 3000 x 3000 colour
  noise PNG of 27 MB (decodable, but only a few fit in the decode budget at once).

Reported: requests per second, p50/p99 latency, statuses by code for each class, the server's peak
RSS (VmHWM) and its RSS sampled over time. Passes only when no invalid or oversized input was ever
answered with a verdict (none accepted, none labelled), every request ended with a status (none
lost), nothing ended in UNKNOWN or INTERNAL, and the peak RSS stayed within ``--max-rss-mb`` (default
2048, the memory limit in ``deploy/k8s``: the server's baseline under load, ~450 MB, plus its decode
budget, 768 MiB, plus the large gRPC messages being received and parsed, which gRPC holds in several
copies before the decode budget sees them).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

WEIGHTS = {"valid": 0.40, "off_distribution": 0.25, "invalid": 0.25, "oversized": 0.10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build_inputs(tmp: Path) -> dict[str, list[tuple[str, bytes]]]:
    """(name, encoded bytes) per input class; ``b""`` with name 'overflow-tensor' marks the tensor case."""
    import cv2
    import pydicom

    from gamguard.runtime.demo.phantoms import HELD_OUT_KINDS, hand_phantom, ood_image
    from gamguard.runtime.demo.synth import write_dicom

    def png16(img):
        return cv2.imencode(".png", np.rint(np.clip(img, 0, 1) * 65535).astype(np.uint16))[1].tobytes()

    rng = np.random.default_rng(2026)
    valid = [(f"phantom-{s}", png16(hand_phantom(s % 4, np.random.default_rng(5000 + s)).image)) for s in range(16)]
    ood = [(f"ood-{k}", png16(ood_image(k, np.random.default_rng(6000 + i)))) for i, k in enumerate(HELD_OUT_KINDS)]
    image = hand_phantom(2, np.random.default_rng(7000)).image
    u8 = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    jpeg = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    png = cv2.imencode(".png", u8)[1].tobytes()
    ds = pydicom.dcmread(write_dicom(tmp / "soak.dcm", image))
    ds.RescaleSlope = "NaN"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    invalid = [
        ("jpeg-truncated-eoi", jpeg[: int(len(jpeg) * 0.97)] + b"\xff\xd9"),
        ("png-cut", png[: len(png) // 2]),
        ("random-bytes", rng.bytes(4096)),
        ("dicom-nan-slope", buf.getvalue()),
        ("overflow-tensor", b""),
    ]
    bomb = cv2.imencode(".png", np.zeros((8000, 8000), np.uint8))[1].tobytes()
    large = cv2.imencode(".png", rng.integers(0, 255, (3000, 3000, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    oversized = [("png-8000x8000", bomb), ("png-3000x3000-rgb-noise", large[1].tobytes())]
    return {"valid": valid, "off_distribution": ood, "invalid": invalid, "oversized": oversized}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--seconds", type=float, default=180, help="how long to run (default 180)")
    ap.add_argument(
        "--max-rss-mb",
        type=float,
        default=2048,
        help="fail if the server's peak RSS exceeds this (default 2048: the memory limit of deploy/k8s)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)

    import tempfile

    import grpc

    from gamguard.proto import grpc_predict_v2_pb2 as pb
    from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc
    from gamguard.proto import guard_pb2, guard_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(Path(tmp))
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gamguard-soak-{port}.log"
    exe = Path(sys.executable).with_name("gamguard")
    proc = subprocess.Popen(
        [str(exe), "serve", "--insecure", "--port", str(port)], stdout=log_path.open("w"), stderr=subprocess.STDOUT
    )
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    stub, oip = guard_pb2_grpc.GuardStub(channel), pb_grpc.GRPCInferenceServiceStub(channel)
    for _ in range(240):
        try:
            model = stub.GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=2).model.name
            break
        except grpc.RpcError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            time.sleep(0.5)
    else:
        raise SystemExit("the server did not become ready")

    lock = threading.Lock()
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    problems: list[str] = []
    counts = {"sent": 0, "answered": 0, "accepted_invalid": 0}
    rss_samples: list[float] = []
    stop_at = time.monotonic() + args.seconds
    classes, weights = list(WEIGHTS), list(WEIGHTS.values())
    huge = guard_pb2.Tensor(dtype="uint8", shape=[2**32, 2**32], data=b"")

    def one(rng: random.Random) -> None:
        cls = rng.choices(classes, weights)[0]
        name, data = rng.choice(inputs[cls])
        use_oip = rng.random() < 0.5 and name != "overflow-tensor"
        t0 = time.perf_counter()
        with lock:
            counts["sent"] += 1
        accepted = None
        try:
            if use_oip:
                req = pb.ModelInferRequest(model_name=model)
                req.inputs.add(name="image", datatype="BYTES", shape=[1])
                req.raw_input_contents.append(struct.pack("<I", len(data)) + data)
                resp = oip.ModelInfer(req, timeout=120)
                accepted = bool(resp.parameters["accepted"].bool_param)
            else:
                req = (
                    guard_pb2.VerifyRequest(tensor=huge)
                    if name == "overflow-tensor"
                    else guard_pb2.VerifyRequest(image=data)
                )
                accepted = bool(stub.Verify(req, timeout=120).accepted)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        ms = (time.perf_counter() - t0) * 1000
        with lock:
            counts["answered"] += 1
            statuses[cls][code] += 1
            latencies[cls].append(ms)
            if cls in ("invalid", "oversized") and code == "OK" and name != "png-3000x3000-rgb-noise":
                problems.append(f"{name} answered OK (accepted={accepted})")
            if cls == "invalid" and accepted:
                counts["accepted_invalid"] += 1
            if code in ("UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "UNAVAILABLE"):
                problems.append(f"{name}: {code}")

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            one(rng)

    def sampler() -> None:
        while time.monotonic() < stop_at + 5 and proc.poll() is None:
            rss_samples.append(proc_kb(proc.pid, "VmRSS") / 1024)
            time.sleep(0.5)

    print(f"soak: {args.clients} clients for {args.seconds:.0f} s against 127.0.0.1:{port} ...", file=sys.stderr)
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    mon = threading.Thread(target=sampler, daemon=True)
    mon.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    alive = proc.poll() is None
    peak = proc_kb(proc.pid, "VmHWM") / 1024 if alive else float("nan")
    channel.close()
    proc.terminate()
    proc.wait(60)

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 1) if xs else None

    all_ms = [x for v in latencies.values() for x in v]
    total = sum(sum(c.values()) for c in statuses.values())
    lost = counts["sent"] - counts["answered"]
    report = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "verdicts_per_s": round(sum(statuses[c]["OK"] for c in ("valid", "off_distribution")) / elapsed, 1),
        "p50_ms": pct(all_ms, 50),
        "p99_ms": pct(all_ms, 99),
        "per_class": {
            c: {"statuses": dict(statuses[c]), "p50_ms": pct(latencies[c], 50), "p99_ms": pct(latencies[c], 99)}
            for c in classes
        },
        "lost": lost,
        "invalid_accepted": counts["accepted_invalid"],
        "server_alive": alive,
        "peak_rss_mb": round(peak, 1),
        "rss_mb_max_sampled": round(max(rss_samples), 1) if rss_samples else None,
        "max_rss_mb": args.max_rss_mb,
        "server_log_bytes": log_path.stat().st_size,
        "problems": problems[:20],
    }
    report["passed"] = bool(alive and not problems and lost == 0 and peak <= args.max_rss_mb)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"soak: {total:,} requests from {args.clients} clients in {elapsed:.0f} s: "
            f"{report['requests_per_s']} req/s ({report['verdicts_per_s']} verdicts/s), "
            f"p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms"
        )
        codes = sorted({k for c in statuses.values() for k in c})
        print(f"{'class':<18}" + "".join(f"{k:>20}" for k in codes) + f"{'p50 ms':>10}{'p99 ms':>10}")
        for c in classes:
            row = report["per_class"][c]
            print(
                f"{c:<18}"
                + "".join(f"{statuses[c].get(k, 0):>20,}" for k in codes)
                + f"{row['p50_ms'] or 0:>10.1f}{row['p99_ms'] or 0:>10.1f}"
            )
        print(
            f"server peak RSS {peak:.0f} MB (bound {args.max_rss_mb:.0f} MB), lost {lost}, invalid accepted "
            f"{counts['accepted_invalid']}, server log {report['server_log_bytes']:,} bytes"
        )
        for p in problems[:20]:
            print("PROBLEM", p)
        print("PASSED" if report["passed"] else "FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
