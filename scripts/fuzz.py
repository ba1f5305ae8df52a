#!/usr/bin/env python3
"""Long fuzz run against a real ``gamguard serve`` (plaintext, loopback, the embedded demo bundle).

    .venv/bin/python scripts/fuzz.py --cases 50000            # ~15-25 min on 2 cores
    .venv/bin/python scripts/fuzz.py --cases 2000 --json      # a quick look

Each case is drawn by hypothesis from the strategies in ``tests/fuzz_targets.py`` and sent over gRPC:
mutated and forged image files through ``Verify`` and OIP ``ModelInfer``, random Guard and OIP
requests (shapes up to 2**63, odd datatypes and parameters), and raw bytes that are not valid
protobuf. Passes only when

* no call ends in UNKNOWN or INTERNAL, and every call ends with a status (none lost);
* an image the decoder refuses offline is never answered OK (so never labelled);
* the server process is still alive at the end;
* the server's peak RSS (VmHWM) stays within ``--max-rss-mb`` (default 1536: the server's decode
  budget of 768 MiB plus its baseline, ~450 MB under load, with margin).

Prints a table (or JSON with ``--json``): cases, statuses by code, requests per second, peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(port: int, max_pixels: int, log_path: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("gamguard")
    cmd = [str(exe), "serve", "--insecure", "--port", str(port), "--max-pixels", str(max_pixels)]
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_ready(stub, proc, timeout: float = 120) -> None:
    import grpc

    from gamguard.proto import guard_pb2

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} while loading")
        try:
            stub.GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=2)
            return
        except grpc.RpcError:
            time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=50_000, help="number of fuzzed requests (default 50000)")
    ap.add_argument("--clients", type=int, default=4, help="requests in flight at once (default 4)")
    ap.add_argument("--max-rss-mb", type=float, default=1536, help="fail if the server's peak RSS exceeds this")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)

    import grpc
    from fuzz_targets import FUZZ_MAX_PIXELS, check_decode, guard_request, image_bytes, oip_request, protobuf_bytes
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    from gamguard.proto import grpc_predict_v2_pb2 as pb
    from gamguard.proto import grpc_predict_v2_pb2_grpc as pb_grpc
    from gamguard.proto import guard_pb2, guard_pb2_grpc

    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gamguard-fuzz-{port}.log"
    proc = start_server(port, FUZZ_MAX_PIXELS, log_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    stub, oip = guard_pb2_grpc.GuardStub(channel), pb_grpc.GRPCInferenceServiceStub(channel)
    raw = {
        m: channel.unary_unary(m, request_serializer=None, response_deserializer=None)
        for m in ("/gamguard.v1.Guard/Verify", "/inference.GRPCInferenceService/ModelInfer")
    }
    try:
        wait_ready(stub, proc)
        codes: collections.Counter = collections.Counter()
        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        failures: list[str] = []
        lock = threading.Lock()
        pool = ThreadPoolExecutor(args.clients)
        slots = threading.Semaphore(args.clients * 2)
        done = [0]

        def send(kind: str, payload) -> None:
            try:
                offline = None
                if kind == "image":
                    offline = check_decode(payload)
                    call = lambda: stub.Verify(guard_pb2.VerifyRequest(image=payload), timeout=60)  # noqa: E731
                elif kind == "oip-image":
                    offline = check_decode(payload)
                    req = pb.ModelInferRequest(model_name="gamguard-demo-hand")
                    req.inputs.add(name="image", datatype="BYTES", shape=[1])
                    req.raw_input_contents.append(len(payload).to_bytes(4, "little") + payload)
                    call = lambda: oip.ModelInfer(req, timeout=60)  # noqa: E731
                elif kind == "guard":
                    call = lambda: stub.Verify(payload, timeout=60)  # noqa: E731
                elif kind == "oip":
                    call = lambda: oip.ModelInfer(payload, timeout=60)  # noqa: E731
                else:
                    method = raw[
                        "/gamguard.v1.Guard/Verify"
                        if kind == "raw-guard"
                        else "/inference.GRPCInferenceService/ModelInfer"
                    ]
                    call = lambda: method(payload, timeout=60)  # noqa: E731
                try:
                    call()
                    code, details = "OK", ""
                except grpc.RpcError as exc:
                    code, details = exc.code().name, exc.details() or ""
                problem = None
                if code not in ALLOWED:
                    problem = f"{kind}: {code}: {details[:200]}"
                elif offline == "invalid" and code == "OK":
                    problem = f"{kind}: answered OK for an input the decoder refuses ({len(payload)} bytes)"
                with lock:
                    codes[code] += 1
                    by_kind[kind][code] += 1
                    done[0] += 1
                    if problem and len(failures) < 50:
                        failures.append(problem)
            except Exception as exc:  # noqa: BLE001 - a crash of the harness itself is a failure too
                with lock:
                    failures.append(f"{kind}: harness error {type(exc).__name__}: {exc}")
                    done[0] += 1
            finally:
                slots.release()

        cases = st.one_of(
            st.tuples(st.just("image"), image_bytes),
            st.tuples(st.just("oip-image"), image_bytes),
            st.tuples(st.just("guard"), guard_request()),
            st.tuples(st.just("oip"), oip_request()),
            st.tuples(st.sampled_from(["raw-guard", "raw-oip"]), protobuf_bytes),
        )
        started = time.monotonic()
        progress_every = max(1, args.cases // 20)

        @seed(args.seed)
        @settings(
            max_examples=args.cases,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis_phase_generate()],
        )
        @given(cases)
        def drive(case):
            slots.acquire()
            pool.submit(send, *case)
            if done[0] and done[0] % progress_every == 0:
                print(f"  {done[0]:,} / {args.cases:,} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)

        drive()
        pool.shutdown(wait=True)
        elapsed = time.monotonic() - started
        alive = proc.poll() is None
        rss = peak_rss_mb(proc.pid) if alive else float("nan")
    finally:
        channel.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
    sent = sum(codes.values())
    ok = not failures and alive and rss <= args.max_rss_mb and codes["UNKNOWN"] == 0 and codes["INTERNAL"] == 0
    report = {
        "cases": sent,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(sent / elapsed, 1) if elapsed else None,
        "statuses": dict(codes),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "unknown_or_internal": codes["UNKNOWN"] + codes["INTERNAL"],
        "server_alive": alive,
        "peak_rss_mb": round(rss, 1),
        "max_rss_mb": args.max_rss_mb,
        "server_log_bytes": log_path.stat().st_size if log_path.exists() else None,
        "failures": failures,
        "passed": ok,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"fuzz: {sent:,} cases in {elapsed:.0f} s ({report['requests_per_s']} req/s), server alive: {alive}")
        print(f"{'kind':<10} " + " ".join(f"{c:>19}" for c in sorted(codes)))
        for kind, counter in sorted(by_kind.items()):
            print(f"{kind:<10} " + " ".join(f"{counter.get(c, 0):>19,}" for c in sorted(codes)))
        print(
            f"peak RSS of the server: {rss:.0f} MB (bound {args.max_rss_mb:.0f} MB); UNKNOWN/INTERNAL: "
            f"{report['unknown_or_internal']}; server log: {report['server_log_bytes']:,} bytes"
        )
        for f in failures[:20]:
            print("FAIL", f)
        print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


def hypothesis_phase_generate():
    from hypothesis import Phase

    return Phase.generate


if __name__ == "__main__":
    sys.exit(main())
