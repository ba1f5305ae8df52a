#!/usr/bin/env python3
"""Regenerate the checked-in Python stubs in ``proto/`` from the ``.proto`` files next to them.

    .venv/bin/python scripts/gen_protos.py            # rewrite proto/*_pb2*.py(i)
    .venv/bin/python scripts/gen_protos.py --check    # exit 1 when the checked-in stubs drift

The .proto files are copied to a temporary include root as ``gamguard/proto/*.proto`` so protoc
writes imports as ``from gamguard.proto import ...`` (the installed package name) while the source
folder stays flat. Stubs are generated with grpcio-tools (a dev dependency); the generated code
carries protobuf's runtime version guard, which must stay within the protobuf range that
tritonclient accepts (>=6.30,<7).

The checked-in stubs were generated with grpcio-tools 1.72.1 (protobuf 6.30.0 gencode, so they run
on protobuf >= 6.30 — tritonclient's whole range; the gRPC stubs need grpcio >= 1.72.1; checked in a
venv with protobuf==6.30.0 grpcio==1.72.1). Newer grpcio-tools write a newer version guard
(1.81 → protobuf >= 6.33.5), narrowing what users can install, so regenerate with::

    pip install --target /tmp/gt72 grpcio-tools==1.72.1 protobuf==6.30.2
    PYTHONPATH=/tmp/gt72 .venv/bin/python scripts/gen_protos.py

``--check`` (and tests/test_grpc_protos.py) compare meaning, not bytes, so they pass with any
grpcio-tools as long as the stubs describe the same .proto files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Protos whose messages go into a private descriptor pool instead of protobuf's default one:
# tritonclient ships its own copy of package "inference" (grpc_service.proto) in the default pool,
# and two files defining the same symbols cannot share a pool. With a private pool, gamguard's
# server and a tritonclient can live in one process (tests, notebooks, the bench).
PRIVATE_POOL_PROTOS = ("grpc_predict_v2.proto",)
_DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_LINES = (
    "# gamguard (scripts/gen_protos.py): a private descriptor pool, so this module and tritonclient's\n"
    "# own copy of package 'inference' can be imported in the same process.\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def _use_private_pool(path: Path) -> None:
    text = path.read_text()
    if text.count(_DEFAULT_POOL_LINE) != 1:
        raise SystemExit(f"{path.name}: unexpected protoc output; cannot move it to a private pool")
    path.write_text(text.replace(_DEFAULT_POOL_LINE, _PRIVATE_POOL_LINES))


def generate(out_dir: Path) -> list[Path]:
    """Generate stubs for every ``proto/*.proto`` into ``out_dir``; return the files written."""
    import importlib.resources

    from grpc_tools import protoc  # dev dependency; imported late so --help works without it

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        pkg = root / "gamguard" / "proto"
        pkg.mkdir(parents=True)
        for p in protos:
            shutil.copy(p, pkg / p.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        well_known = str(importlib.resources.files("grpc_tools") / "_proto")
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
        ]
        args += [f"gamguard/proto/{p.name}" for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((gen / "gamguard" / "proto").iterdir()):
            if f.name.endswith("_pb2.py") and f.name.replace("_pb2.py", ".proto") in PRIVATE_POOL_PROTOS:
                _use_private_pool(f)
            if f.name.endswith(GENERATED_SUFFIXES):
                shutil.copy(f, out_dir / f.name)
                written.append(out_dir / f.name)
        return written


def stub_fingerprint(path: Path) -> object:
    """What a stub means, independent of the grpcio-tools version that wrote it.

    ``*_pb2.py``: the serialized FileDescriptorProto it registers (every message, field number,
    type and service). ``*_pb2_grpc.py``: the method paths and their request/response types.
    ``*_pb2.pyi``: ignored (editor hints only). Comparing meaning rather than bytes lets the
    checked-in stubs be generated with an older grpcio-tools (for a wider protobuf range) while the
    drift test runs with whatever grpcio-tools the dev environment has.
    """
    import ast
    import re

    text = path.read_text()
    if path.name.endswith("_pb2.py"):
        match = re.search(r"AddSerializedFile\((b'.*?')\)\n", text, re.S)
        if not match:
            raise ValueError(f"{path}: no serialized descriptor found")
        return ast.literal_eval(match.group(1))
    if path.name.endswith("_pb2_grpc.py"):
        paths = sorted(set(re.findall(r"'(/[\w.]+/\w+)'", text)))
        types = sorted(set(re.findall(r"__pb2\.(\w+)\.(?:FromString|SerializeToString)", text)))
        return paths, types
    return None


def drift(reference_dir: Path = PROTO_DIR) -> list[str]:
    """Names of stubs that differ in meaning from a fresh generation (empty list = in sync)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: stub_fingerprint(p) for p in generate(Path(tmp))}
        present = {p.name: stub_fingerprint(p) for p in reference_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    names = sorted(set(fresh) | set(present))
    return [n for n in names if fresh.get(n, "missing") != present.get(n, "missing")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        bad = drift()
        for n in bad:
            print(f"stale or missing stub: proto/{n}", file=sys.stderr)
        return 1 if bad else 0
    for f in generate(PROTO_DIR):
        print(f"wrote {f.relative_to(PROTO_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
