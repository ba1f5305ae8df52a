"""A console sending many images at once to the DICOM node: how fast they are stored, and when every result
is built. Needs dcmtk's ``storescu`` (apt-get install dcmtk).

    .venv/bin/python scripts/dicom_sustained.py [--images 512] [--build-backlog 256] [--result-workers 0,2]

For each ``--result-workers`` value: a node on loopback (the embedded demo bundle, 1 inference thread, no
forward destination), ``--images`` distinct DX phantoms sent by one ``storescu`` over one association (after
two warm-up images), then a wait until every SR and overlay is in the outbox. With more images than
``--build-backlog`` the results are built while the association is still sending, which is when building
them in the node's own process (``--result-workers 0``) slows the C-STOREs (docs/dicom-node.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(workers: int, images: int, backlog: int, paths: list[str], storescu: str, guard, bundle) -> dict:
    from gamguard.runtime.dicomnode.config import DicomNodeConfig
    from gamguard.runtime.dicomnode.node import BackgroundNode
    from gamguard.runtime.server.config import ServeConfig

    with tempfile.TemporaryDirectory(prefix="gamguard-sustained-") as queue:
        serve = ServeConfig(bundle=str(bundle), insecure=True, port=0, threads=1)
        node_cfg = DicomNodeConfig(
            host="127.0.0.1",
            port=0,
            allow_any_ae=True,
            queue_dir=queue,
            build_backlog=backlog,
            result_workers=workers,
        ).validate()
        with BackgroundNode(node_cfg, serve, guard_factory=lambda: guard) as node:
            send = [storescu, "-R", "-aet", "CONSOLE", "-aec", "GAMGUARD", "127.0.0.1", str(node.port)]
            subprocess.run([*send, *paths[:2]], check=True, capture_output=True)  # warm: workers started
            if not node.node.wait_results_built(300):
                raise RuntimeError("the warm-up images' results were not built")
            built = node.node.builder.built
            t0 = time.perf_counter()
            subprocess.run([*send, *paths[2:]], check=True, capture_output=True)
            stored = time.perf_counter() - t0
            if not node.node.wait_results_built(1800):
                raise RuntimeError("the results were not all built within 30 minutes")
            done = time.perf_counter() - t0
            if node.node.builder.built - built != images:
                raise RuntimeError(f"{node.node.builder.built - built} results built for {images} images")
    return {"workers": workers, "cstore_ips": images / stored, "stored_s": stored, "results_s": done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="distinct images sent (default 512)")
    parser.add_argument("--build-backlog", type=int, default=256, help="the node's --build-backlog (default 256)")
    parser.add_argument(
        "--result-workers", default="0,2", help="comma-separated --result-workers values to compare (default 0,2)"
    )
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    from gamguard.runtime.bench.common import phantom_images
    from gamguard.runtime.bundle import resolve_bundle
    from gamguard.runtime.dicomnode.bench import _write_payloads, dcmtk_storescu
    from gamguard.runtime.guard import Guard

    storescu = dcmtk_storescu()
    if storescu is None:
        print("needs dcmtk's storescu on PATH: apt-get install dcmtk", file=sys.stderr)
        return 2
    workers = [int(w) for w in args.result_workers.split(",")]
    with threadpool_limits(limits=1, user_api="blas"), tempfile.TemporaryDirectory() as folder:
        bundle = resolve_bundle(None)
        guard = Guard.from_bundle(bundle, providers=["CPUExecutionProvider"], threads=1, prefer="onnxruntime")
        print(f"writing {args.images + 2} phantoms ...", file=sys.stderr, flush=True)
        paths = [str(p) for p in _write_payloads(Path(folder), phantom_images(args.images + 2))]
        rows = []
        for w in workers:
            print(f"--result-workers {w}: sending {args.images} images ...", file=sys.stderr, flush=True)
            rows.append(run(w, args.images, args.build_backlog, paths, storescu, guard, bundle))
    print(f"{args.images} images over one association, --build-backlog {args.build_backlog}")
    print("| --result-workers | C-STORE images/s | all stored after s | all results built after s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['cstore_ips']:.0f} | {r['stored_s']:.1f} | {r['results_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
