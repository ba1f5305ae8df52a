"""Triton's perf_analyzer, the tool people measure inference servers with, against a real ``gamguard
serve`` on a loopback port: its input file written by ``gamguard data perf-input`` from DICOM phantoms,
a concurrency sweep, gRPC streaming, async calls and batched requests, with the server-side statistics
perf_analyzer reads (ModelConfig, ModelStatistics) checked against what the server counted.

perf_analyzer is NVIDIA's binary (2.41, from the tritonclient 2.41.0 wheel: the pip ``perf-analyzer``
needs glibc 2.38): ``bash scripts/get_perf_analyzer.sh`` fetches it into .cache/perf_analyzer (it
needs ``apt-get install libb64-0d``); ``GAMGUARD_PERF_ANALYZER`` may name another copy. Without it
these tests skip, saying so.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testlib import ThreadedServer, demo_bundle_path, phantom

from gamguard.runtime.server.config import ServeConfig

tc = pytest.importorskip("tritonclient.grpc")

REPO = Path(__file__).resolve().parents[1]
MAX_BATCH = 8
# count windows of a few requests each; stability loosened: these tests check that perf_analyzer works
# with gamguard, not how steady this shared machine is
WINDOWS = ["--measurement-mode", "count_windows", "--measurement-request-count", "24", "-s", "100"]


def perf_analyzer_path() -> str | None:
    """perf_analyzer that starts: ``GAMGUARD_PERF_ANALYZER``, the copy scripts/get_perf_analyzer.sh
    fetches, or one on PATH."""
    candidates = [
        os.environ.get("GAMGUARD_PERF_ANALYZER"),
        str(REPO / ".cache" / "perf_analyzer" / "perf_analyzer"),
        shutil.which("perf_analyzer"),
    ]
    for c in filter(None, candidates):
        try:
            done = subprocess.run([c, "--version"], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and b"Perf Analyzer" in done.stdout + done.stderr:
            return c
    return None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pa = perf_analyzer_path()
    if pa is None:
        pytest.skip(
            "Triton's perf_analyzer not found: run `bash scripts/get_perf_analyzer.sh` (it needs libb64: "
            "apt-get install libb64-0d), or set GAMGUARD_PERF_ANALYZER"
        )
    from gamguard.runtime.demo.synth import write_dicom

    folder = tmp_path_factory.mktemp("perf_analyzer")
    images = folder / "images"
    images.mkdir()
    for k in range(8):
        write_dicom(images / f"IM{k:04d}.dcm", phantom(k % 4, 300 + k))
    (images / "notes.txt").write_text("not an image")
    data = folder / "data.json"
    done = subprocess.run(
        [sys.executable, "-m", "gamguard.runtime.cli", "data", "perf-input", str(images), "--out", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 8 image(s)" in done.stderr
    cfg = ServeConfig(
        bundle=str(demo_bundle_path()),
        host="127.0.0.1",
        port=0,
        insecure=True,
        max_batch_size=MAX_BATCH,
        max_queue_delay_ms=5.0,
    )
    server = ThreadedServer(cfg).start()
    client = tc.InferenceServerClient(url=server.target)
    name = client.get_model_repository_index().models[0].name
    yield {"pa": pa, "server": server, "client": client, "name": name, "data": data, "folder": folder}
    client.close()
    server.stop()


def _run(env, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [env["pa"], "-m", env["name"], "-i", "grpc", "-u", env["server"].target, "--input-data", str(env["data"])]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def _stats(env):
    (s,) = env["client"].get_inference_statistics(env["name"]).model_stats
    return s


def test_concurrency_sweep_over_dicom_images(env):
    before = _stats(env)
    out = env["folder"] / "sweep.csv"
    done = _run(env, "--concurrency-range", "1:4:3", *WINDOWS, "-f", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {int(r["Concurrency"]): r for r in csv.DictReader(out.open())}
    assert sorted(rows) == [1, 4]
    for r in rows.values():
        assert float(r["Inferences/Second"]) > 0 and float(r["p50 latency"]) > 0
        # the server's side, from ModelStatistics: real engine and guard times (microseconds)
        assert float(r["Server Compute Infer"]) > 0 and float(r["Server Compute Output"]) > 0
        assert float(r["Server Compute Input"]) > 0  # the DICOM decode
    after = _stats(env)
    served = after.inference_stats.success.count - before.inference_stats.success.count
    assert served >= 3 * 24 * 2  # at least three windows of 24 requests per level
    assert after.inference_stats.fail.count == before.inference_stats.fail.count  # every image got a verdict
    assert after.inference_count - before.inference_count == served


def test_streaming_async_and_batched_requests(env):
    before = _stats(env)
    for args in (["--streaming", "--concurrency-range", "2"], ["--async", "--concurrency-range", "2"], ["-b", "4"]):
        done = _run(env, *args, *WINDOWS)
        assert done.returncode == 0, f"{args}: " + done.stdout[-2000:] + done.stderr[-2000:]
        assert "throughput" in done.stdout
        # the server's stage times of a request fit within its time (see statistics.py)
        assert "Server average accounted time was larger" not in done.stdout, args
    after = _stats(env)
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    # batched requests: 4 images per request, micro-batched into engine calls of up to MAX_BATCH
    batches = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert max(batches) <= MAX_BATCH and any(size >= 4 for size in batches)


def test_a_batch_above_the_models_maximum_is_refused_clearly(env):
    done = _run(env, "-b", str(2 * MAX_BATCH), *WINDOWS, timeout=60)
    assert done.returncode != 0
    assert f"batch-size must be <= {MAX_BATCH}" in done.stdout + done.stderr
    # the server carries on
    res = env["client"].infer(env["name"], [_fp32(phantom(1, 7))])
    assert res.as_numpy("accepted").shape == (1,)


def _fp32(image: np.ndarray):
    arr = np.asarray(image, np.float32)[None]
    inp = tc.InferInput("image_fp32", list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    return inp


# ------------------------------------------------------------------ the input file (no perf_analyzer needed)


def test_input_file_holds_each_image_as_tritons_raw_bytes_tensor(tmp_path):
    import base64
    import json

    from testlib import png16
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    from gamguard.runtime.datasets import iter_image_files
    from gamguard.runtime.demo.synth import write_dicom
    from gamguard.runtime.perf_input import input_data

    write_dicom(tmp_path / "IM0001.dcm", phantom(0, 1))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(png16(phantom(1, 2)))
    (tmp_path / "manifest.json").write_text("{}")
    files = iter_image_files([tmp_path])  # as `gamguard data perf-input` finds them
    assert [f.name for f in files] == ["IM0001.dcm", "b.png"]
    data = json.loads(json.dumps(input_data(files)))
    assert [list(step) for step in data["data"]] == [["image"], ["image"]]
    for step, f in zip(data["data"], files):
        raw = base64.b64decode(step["image"]["b64"])
        # what perf_analyzer sends is exactly Triton's own serialization of a one-element BYTES tensor
        assert raw == serialize_byte_tensor(np.array([f.read_bytes()], dtype=np.object_)).item()
        assert deserialize_bytes_tensor(raw).tolist() == [f.read_bytes()]


def test_perf_input_command_refuses_what_it_cannot_use(tmp_path):
    def run(*args):
        cmd = [sys.executable, "-m", "gamguard.runtime.cli", "data", "perf-input", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    (tmp_path / "empty").mkdir()
    done = run(tmp_path / "empty", "--out", tmp_path / "x.json")
    assert done.returncode == 2 and "no image files found" in done.stderr
    done = run(tmp_path / "missing", "--out", tmp_path / "x.json")
    assert done.returncode == 2 and "no such file or directory" in done.stderr
    done = run(tmp_path / "empty", "--out", tmp_path / "x.json", "--limit", "0")
    assert done.returncode == 2 and "--limit" in done.stderr
    assert not (tmp_path / "x.json").exists()
