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


def _assert_subset_of(mine, theirs, seen: set) -> None:
    """Every field of ``mine`` (recursively through message-typed fields) exists in ``theirs`` with the
    same number, type, cardinality, oneof and enum values: what a client parsing with ``theirs`` reads
    is what we wrote. Fields only ``theirs`` has read as defaults."""
    if mine.full_name in seen:
        return
    seen.add(mine.full_name)
    assert mine.full_name == theirs.full_name
    for f in mine.fields:
        t = theirs.fields_by_name.get(f.name)
        assert t is not None, f"{f.full_name} is not in tritonclient's schema"
        assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), f.full_name
        oneof = (
            f.containing_oneof.name if f.containing_oneof else None,
            t.containing_oneof.name if t.containing_oneof else None,
        )
        assert oneof[0] == oneof[1], f.full_name
        if f.message_type is not None:
            _assert_subset_of(f.message_type, t.message_type, seen)
        if f.enum_type is not None:
            assert f.enum_type.full_name == t.enum_type.full_name, f.full_name
            for v in f.enum_type.values:
                assert t.enum_type.values_by_name[v.name].number == v.number, v.full_name


def test_every_message_we_serve_is_wire_compatible_with_tritonclient():
    """Down to the last nested message (ModelConfig, ModelStatistics, ...): Triton's ModelConfig is
    large and we declare only what we fill, so this is a subset check, not equality."""
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2 as triton

    from gamguard.proto import grpc_predict_v2_pb2 as ours

    ours_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    triton_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    seen: set = set()
    for method in ours_service.methods:
        theirs = triton_service.methods_by_name[method.name]
        assert (method.client_streaming, method.server_streaming) == (
            theirs.client_streaming,
            theirs.server_streaming,
        ), method.name
        _assert_subset_of(method.input_type, theirs.input_type, seen)
        _assert_subset_of(method.output_type, theirs.output_type, seen)
    assert {"inference.ModelConfig", "inference.ModelStatistics", "inference.ModelStreamInferResponse"} <= seen
