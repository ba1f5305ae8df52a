"""`gamguard bench`: the quick run works end to end and its JSON has the documented shape and sane values.

Benchmarks are not tests: nothing here asserts a speed goal, only that every figure was measured
(positive, finite, consistent with its parts) and that the shape matches the documented contract
(docs/architecture.md, "Command-line contracts").
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gamguard.runtime.bench import common as bench
from gamguard.runtime.bundle import MODEL_FILE, default_bundle_dir


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_result():
    cmd = [sys.executable, "-m", "gamguard.runtime.cli", "bench", "--quick", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON object on stdout, got {len(lines)} lines"
    assert "bench:" in out.stderr  # progress goes to stderr, not stdout
    return json.loads(lines[0])  # allow_nan=False on the writer side: NaN/Inf would not even parse back


def _expected_sizes(result) -> list[int]:
    import onnxruntime as ort

    shape = (
        ort.InferenceSession(str(default_bundle_dir() / MODEL_FILE), providers=["CPUExecutionProvider"])
        .get_inputs()[0]
        .shape
    )
    dynamic = not isinstance(shape[2], int) and not isinstance(shape[3], int)
    return [224, 512] if dynamic else [int(shape[2])]


def test_guard_overhead_rows(quick_result):
    r = quick_result
    sizes = _expected_sizes(r)
    assert r["sizes"] == sizes
    if sizes != [224, 512]:  # the documented fallback for a bundle with a static input size
        assert "static" in r["sizes_note"] and str(sizes[0]) in r["sizes_note"]
    rows = r["guard_overhead"]
    assert sorted((row["size"], row["batch"]) for row in rows) == sorted((s, b) for s in sizes for b in (1, 8))
    for row in rows:
        for key in ("ratio", "guarded_ms", "logits_only_ms", "fused_engine_ms", "fused_engine_ratio"):
            assert _finite_positive(row[key]), (key, row)
        assert row["ratio"] == pytest.approx(row["guarded_ms"] / row["logits_only_ms"], rel=0.01)
        # the guarded call runs the whole logits graph and more: far below 1 would be a measuring bug
        assert row["ratio"] > 0.5, row
        # both places for the checks' arithmetic are timed, the one the run used is named
        assert {row["arithmetic"], row["alternative_arithmetic"]} == {"graph", "host"}
        assert _finite_positive(row["alternative_ratio"]) and _finite_positive(row["graph_engine_ms"])
    arith = r["guard_arithmetic"]
    assert arith["used"] == rows[0]["arithmetic"] and set(arith["faster_in_this_run"].values()) <= {"graph", "host"}
    for row in r["measures_cost"]:
        assert _finite_positive(row["measures_ms_per_image"]) and _finite_positive(row["engine_ms_per_image"])
        assert row["fraction_of_engine"] == pytest.approx(
            (row["measures_ms_per_image"] + row["feature_ms_per_image"]) / row["engine_ms_per_image"], rel=0.02
        )


def test_pytorch_comparison_is_null_or_measured(quick_result):
    r = quick_result
    pt = r["pytorch_gradcam"]
    if pt["status"] == "measured":
        assert r["speedup_vs_pytorch_gradcam"] == min(c["speedup"] for c in pt["cases"])
        assert all(_finite_positive(c["speedup"]) and _finite_positive(c["pytorch_ms"]) for c in pt["cases"])
        assert pt["implementation"]
    else:
        assert r["speedup_vs_pytorch_gradcam"] is None
        assert pt["reason"]


def test_grpc_efficiency_rows(quick_result):
    rows = quick_result["grpc_efficiency"]
    assert [row["clients"] for row in rows] == [1, 4, 16]
    for row in rows:
        for key in (
            "ratio",
            "ratio_vs_inprocess_dataplane",
            "p50_ms",
            "p99_ms",
            "grpc_rps",
            "inprocess_rps",
            "same_batches_rps",
        ):
            assert _finite_positive(row[key]), (key, row)
        assert row["p50_ms"] <= row["p99_ms"]
        assert row["ratio"] == pytest.approx(row["grpc_rps"] / row["same_batches_rps"], rel=0.01)
        assert row["ratio_vs_inprocess_dataplane"] == pytest.approx(row["grpc_rps"] / row["inprocess_rps"], rel=0.01)
        assert 1.0 <= row["grpc_mean_batch"] <= 8 and 1.0 <= row["inprocess_mean_batch"] <= 8
        # CPU per request: the server process vs the same-batch replay (clients not included)
        for key in ("server_cpu_ms_per_request", "same_batches_cpu_ms_per_request", "cpu_ratio"):
            assert _finite_positive(row[key]), (key, row)
        assert row["cpu_ratio"] == pytest.approx(
            row["same_batches_cpu_ms_per_request"] / row["server_cpu_ms_per_request"], rel=0.01
        )


def test_dicom_efficiency_rows(quick_result):
    rows = quick_result["dicom_efficiency"]
    assert [row["associations"] for row in rows] == [1, 4]
    for row in rows:
        for key in (
            "ratio",
            "cstore_ips",
            "grpc_ips",
            "null_scp_ips",
            "cstore_p50_ms",
            "grpc_p50_ms",
            "null_scp_p50_ms",
            "cstore_cpu_ms",
            "grpc_cpu_ms",
            "cstore_client_cpu_ms",
            "grpc_client_cpu_ms",
        ):
            assert _finite_positive(row[key]), (key, row)
        assert row["ratio"] == pytest.approx(row["cstore_ips"] / row["grpc_ips"], rel=0.02)
        assert row["ratio_if_node_free"] == pytest.approx(1 / (1 + row["grpc_ips"] / row["null_scp_ips"]), rel=0.02)
        assert len(row["rounds_ratio"]) == quick_result["dicom"]["rounds"] >= 2
        assert row["cpu_ratio"] == pytest.approx(row["grpc_cpu_ms"] / row["cstore_cpu_ms"], rel=0.02)
    dicom = quick_result["dicom"]
    assert dicom["goal_min_ratio"] == 0.7
    # the phantoms as they are (no --dicom-size): 256² DX, 12 bits in 16-bit words
    assert dicom["image"]["rows"] == dicom["image"]["columns"] == 256 and dicom["image"]["bits"] == 12
    assert 256 * 256 * 2 < dicom["image"]["bytes"] < 256 * 256 * 2 + 8192
    assert _finite_positive(dicom["durable_write_ms"]) and _finite_positive(dicom["results_ms_per_image"])
    # the SCU: dcmtk's storescu where installed (as .ci/run does), else pynetdicom's
    from gamguard.runtime.dicomnode.bench import dcmtk_storescu

    assert dicom["client"] == ("storescu" if dcmtk_storescu() else "pynetdicom")


def test_dicom_client_choice_and_a_failing_storescu_round(tmp_path, monkeypatch):
    from gamguard.runtime.dicomnode import bench as dicom_bench

    with pytest.raises(ValueError, match="unknown DICOM benchmark client"):
        dicom_bench.resolve_client("dcmsend")
    assert dicom_bench.resolve_client("pynetdicom") == "pynetdicom"
    # pynetdicom's own app named storescu (in this environment's bin/, first on PATH here) is never taken
    # for dcmtk's: it answers differently and exits 0 on refused stores
    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", venv_bin + os.pathsep + os.environ.get("PATH", ""))
    dicom_bench.dcmtk_storescu.cache_clear()
    found = dicom_bench.dcmtk_storescu()
    assert found is None or not found.startswith(str(Path(sys.prefix).resolve()))
    if found is None:
        pytest.skip("dcmtk's storescu not installed (apt-get install dcmtk)")
    assert b"dcmtk" in subprocess.run([found, "--version"], capture_output=True).stdout
    assert dicom_bench.resolve_client("auto") == "storescu"
    paths = [str(p) for p in dicom_bench._write_payloads(tmp_path, bench.phantom_images(1))]
    import socket

    with socket.socket() as free:  # a port nobody listens on: storescu exits non-zero, the round says so
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(RuntimeError, match="storescu exited"):
        dicom_bench._storescu_round(port, paths, 1, 1)


def test_machine_facts_recorded(quick_result):
    m = quick_result["machine"]
    assert m["threads"] == 1 and m["cpu_count"] >= 1 and m["onnxruntime"]
    assert m["providers_used"] == ["CPUExecutionProvider"] == m["logits_only_providers"]
    assert len(m["load_avg_start"]) == 3 and len(m["load_avg_end"]) == 3


def test_logits_only_model_is_the_fused_classifier(tmp_path):
    pytest.importorskip("onnx")
    import onnx
    import onnxruntime as ort

    fused = default_bundle_dir() / MODEL_FILE
    path = bench.logits_only_model(fused, tmp_path)
    cut = onnx.load(str(path))
    assert [o.name for o in cut.graph.output] == ["logits"]
    assert len(cut.graph.node) < len(onnx.load(str(fused)).graph.node)
    full = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    dims = [d if isinstance(d, int) else 128 for d in full.get_inputs()[0].shape[1:]]  # C, H, W
    x = np.random.default_rng(0).normal(size=(2, *dims)).astype(np.float32)
    a = bench.ort_session(path, ["CPUExecutionProvider"], 1).run(["logits"], {"image": x})[0]
    b = full.run(["logits"], {"image": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_interleaved_alternates_order():
    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_zoo_cases_get_rounds_for_about_a_second(monkeypatch):
    """Fast models are timed in more rounds than --repeats (capped); slow ones in --repeats rounds."""
    import time

    from gamguard.exporter import bench_zoo

    calls = []
    fast = {"fused": lambda: calls.append(1), "logits": lambda: None}
    assert bench_zoo.rounds_for(fast, 15) == bench_zoo.MAX_ROUNDS
    assert len(calls) == 2  # a warm-up round, then the timed round
    monkeypatch.setattr(bench_zoo, "MIN_CASE_SECONDS", 0.01)
    assert bench_zoo.rounds_for({"fused": lambda: time.sleep(0.02)}, 7) == 7


def test_bad_flags_are_user_errors(capsys, tmp_path):
    from gamguard.runtime.cli import main

    assert main(["bench", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["bench", "--sizes", "224,x"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["bench", "--dicom-size", "4"]) == 2
    assert "--dicom-size" in capsys.readouterr().err


def test_demo_bundle_has_its_torch_checkpoint(demo_bundle):
    """The PyTorch comparison of the demo bundle must not be skipped for want of its checkpoint."""
    from gamguard.runtime.bench.overhead import default_checkpoint

    ckpt = default_checkpoint(demo_bundle)
    assert ckpt is not None and ckpt.is_file() and ckpt.name == "demo.ckpt"
