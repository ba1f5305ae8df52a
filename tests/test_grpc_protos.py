"""The checked-in gRPC stubs match the .proto files, and our Open Inference Protocol schema is
wire-compatible with the copy tritonclient uses."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checked_in_stubs_match_proto_files():
    pytest.importorskip("grpc_tools")
    gen = _load_gen_protos()
    assert gen.drift() == [], "run: .venv/bin/python scripts/gen_protos.py"


def test_drift_check_notices_a_changed_proto(tmp_path, monkeypatch):
    """The drift check is not vacuous: a new field in a .proto makes it fail."""
    pytest.importorskip("grpc_tools")
    gen = _load_gen_protos()
    fake = tmp_path / "proto"
    fake.mkdir()
    for p in (REPO / "proto").iterdir():
        if p.suffix in (".proto", ".py", ".pyi"):
            (fake / p.name).write_bytes(p.read_bytes())
    text = (fake / "guard.proto").read_text()
    (fake / "guard.proto").write_text(
        text.replace("message ModelInfoRequest {}", "message ModelInfoRequest { string extra = 1; }")
    )
    monkeypatch.setattr(gen, "PROTO_DIR", fake)
    assert gen.drift(fake) == ["guard_pb2.py"]


def _fields(desc):
    out = {}
    for f in desc.fields:
        out[f.name] = (
            f.number,
            f.type,
            f.label if not hasattr(f, "is_repeated") else f.is_repeated,
            f.message_type.name if f.message_type else None,
        )
    for nested in desc.nested_types:
        out[nested.name] = _fields(nested)
    return out


def test_open_inference_protocol_matches_tritonclient():
    """Every message and method we serve has the same name, numbers and types as tritonclient's."""
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2 as triton

    from gamguard.proto import grpc_predict_v2_pb2 as ours

    assert ours.DESCRIPTOR.package == triton.DESCRIPTOR.package == "inference"
    ours_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    triton_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_service.methods:
        theirs = triton_service.methods_by_name[method.name]
        assert method.full_name == theirs.full_name
        for mine, other in ((method.input_type, theirs.input_type), (method.output_type, theirs.output_type)):
            assert mine.full_name == other.full_name
            assert _fields(mine) == _fields(other), mine.full_name
    for name in ("InferParameter", "InferTensorContents"):
        assert _fields(ours.DESCRIPTOR.message_types_by_name[name]) == _fields(
            triton.DESCRIPTOR.message_types_by_name[name]
        )


def test_stub_protobuf_guard_within_tritonclient_range():
    """The generated code's runtime guard must accept protobuf 6.30+/6.31 (tritonclient: >=6.30,<7)."""
    import re

    for name in ("guard_pb2.py", "grpc_predict_v2_pb2.py"):
        text = (REPO / "proto" / name).read_text()
        m = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)
        assert m, name
        assert (int(m.group(1)), int(m.group(2))) <= (6, 31), f"{name} needs protobuf {m.groups()}"
        assert int(m.group(1)) == 6


def test_stubs_import_next_to_tritonclient():
    code = (
        "import tritonclient.grpc\n"
        "import gamguard.proto.grpc_predict_v2_pb2_grpc, gamguard.proto.guard_pb2_grpc\n"
        "import tritonclient.grpc.service_pb2\n"
    )
    pytest.importorskip("tritonclient.grpc")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
