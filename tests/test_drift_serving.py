"""The drift monitor in a real server (demo bundle, loopback gRPC): GetModelInfo, Prometheus metrics,
the audit log, and `gamguard drift` replaying that audit log to the same state, with its report.

In-distribution phantoms first (the flag must stay down), then off-distribution images (it must rise)."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
from testlib import ThreadedServer, demo_bundle_path, id_phantoms, ood_images, png16

from gamguard.proto import guard_pb2, guard_pb2_grpc
from gamguard.runtime.cli import main as cli_main
from gamguard.runtime.server.config import ServeConfig

N_ID = 60
N_OOD = 40


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    audit = tmp / "audit.jsonl"
    cfg = ServeConfig(
        bundle=str(demo_bundle_path()), host="127.0.0.1", port=0, insecure=True, metrics_port=0, audit_log=str(audit)
    )
    server = ThreadedServer(cfg).start()
    channel = grpc.insecure_channel(server.target)
    stub = guard_pb2_grpc.GuardStub(channel)
    images, _ = id_phantoms()
    id_stream = [png16(images[i]) for i in range(N_ID)]
    ood, _ = ood_images(N_OOD // 4, kinds=("chest", "rotated_hand", "inverted_hand", "photo"))
    ood_stream = [png16(im) for im in ood] + [b"not an image"]  # an invalid input: audited, not monitored

    def send(items):
        reqs = (guard_pb2.VerifyRequest(request_id=f"d{i}", image=d) for i, d in enumerate(items))
        return list(stub.VerifyStream(reqs, timeout=120))

    send(id_stream)
    info_id = stub.GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=10)
    verdicts = send(ood_stream)
    info_ood = stub.GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=10)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    yield {
        "tmp": tmp,
        "audit": audit,
        "info_id": info_id,
        "info_ood": info_ood,
        "metrics": metrics,
        "ood_verdicts": verdicts,
    }
    channel.close()
    server.stop()


def test_model_info_reports_the_monitor(served):
    before, after = served["info_id"].drift, served["info_ood"].drift
    assert before.available and after.available
    assert before.n == N_ID and not before.drift and before.alarm_at == 0
    assert max(before.statistics.values()) < before.threshold
    assert before.reference_rate > before.alpha > 0
    assert after.n == N_ID + N_OOD  # the invalid input is not a decision of the checks
    assert after.drift and N_ID < after.alarm_at <= N_ID + N_OOD
    assert after.per_check["feature"] > 0 and set(after.per_check) == {"garbage", "attention", "feature"}
    assert json.loads(after.state_json)["alarm"]["at"] == after.alarm_at


def test_metrics_expose_the_flag_and_statistics(served):
    text = served["metrics"]
    assert "gamguard_drift 1.0" in text
    for series in (
        'gamguard_drift_statistic{test="score_shift"}',
        'gamguard_drift_statistic{test="rejection_rate"}',
        'gamguard_drift_rejection_rate{check="all"}',
        'gamguard_drift_rejection_rate{check="feature"}',
        "gamguard_drift_threshold",
        "gamguard_drift_reference_rate",
        "gamguard_drift_verdicts 100.0",
    ):
        assert series in text, series


def test_drift_command_replays_the_audit_log(served, capsys):
    lines = [json.loads(x) for x in served["audit"].read_text().splitlines()]
    verdict_lines = [x for x in lines if x["decision"] != "invalid"]
    assert {x["checks"] for x in verdict_lines} == {"garbage+attention+feature"}
    assert all("combined_p" in x["scores"] for x in verdict_lines)

    report = served["tmp"] / "report"
    rc = cli_main(["drift", "--audit-log", str(served["audit"]), "--json", "--report", str(report)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    live = json.loads(served["info_ood"].drift.state_json)
    assert out["drift"] is True and out["n"] == N_ID + N_OOD and out["invalid_inputs"] == 1
    assert out["alarm"]["at"] == live["alarm"]["at"]  # the same stream, in the same order, gives the same flag
    assert out["statistics"] == pytest.approx(live["statistics"])
    assert out["rejection_rate"] == pytest.approx(live["rejection_rate"])
    assert set(out["per_check"]) == {"garbage", "attention", "feature"}
    html = (report / "index.html").read_text()
    assert "DRIFT" in html and "drift.png" in html and "not counted: 1 invalid inputs" in html
    assert (report / "drift.png").stat().st_size > 10_000
    assert cli_main(["drift", "--audit-log", str(served["audit"])]) == 0  # the text says the same
    assert "not counted: 1 invalid inputs" in capsys.readouterr().out


def test_drift_command_refuses_a_log_of_another_bundle(served, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(
            json.dumps({**json.loads(x), "bundle_hash": "f" * 64}) + "\n"
            for x in served["audit"].read_text().splitlines()
        )
    )
    assert cli_main(["drift", "--audit-log", str(other)]) == 2
    err = capsys.readouterr().err
    assert "no verdict in the audit log was given by this bundle" in err and "ffffffffffff" in err
    assert cli_main(["drift", "--audit-log", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such audit log" in capsys.readouterr().err


def test_drift_command_reads_rotated_logs_in_order_and_refuses_logs_without_checks(served, tmp_path, capsys):
    lines = served["audit"].read_text().splitlines(keepends=True)
    older, newer = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl"
    older.write_text("".join(lines[:50]))
    newer.write_text("".join(lines[50:]))
    assert cli_main(["drift", "--audit-log", str(older), str(newer), "--json"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert cli_main(["drift", "--audit-log", str(served["audit"]), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert (split["n"], split["alarm"], split["statistics"]) == (whole["n"], whole["alarm"], whole["statistics"])

    old = tmp_path / "old.jsonl"  # written before the lines said which checks were enforced
    old.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(x).items() if k not in ("checks", "policy")}) + "\n" for x in lines
        )
    )
    assert cli_main(["drift", "--audit-log", str(old)]) == 2
    assert "do not say which checks were enforced" in capsys.readouterr().err


def test_drift_command_finds_the_bundle_the_log_records(served, tmp_path, capsys):
    import shutil

    lines = [json.loads(x) for x in served["audit"].read_text().splitlines()]
    assert {x.get("bundle_dir") for x in lines if x["decision"] != "invalid"} == {str(demo_bundle_path().resolve())}
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), copy)
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(json.dumps({**x, "bundle_dir": str(copy)}) + "\n" for x in lines))
    assert cli_main(["drift", "--audit-log", str(moved), "--json"]) == 0  # no --bundle
    assert json.loads(capsys.readouterr().out)["bundle"]["dir"] == str(copy)
    shutil.rmtree(copy)  # gone: back to the default (the demo bundle, which served this log)
    assert cli_main(["drift", "--audit-log", str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"]["dir"] != str(copy)


def test_a_reload_continues_the_watch_and_an_unload_ends_it(tmp_path):
    from gamguard.proto import grpc_predict_v2_pb2 as oip
    from gamguard.proto import grpc_predict_v2_pb2_grpc as oip_grpc

    cfg = ServeConfig(
        bundle=str(demo_bundle_path()),
        host="127.0.0.1",
        port=0,
        insecure=True,
        metrics_port=0,
        model_control="explicit",
    )
    server = ThreadedServer(cfg).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub, repo = guard_pb2_grpc.GuardStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
            name = stub.GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=10).model.name
            images, _ = id_phantoms()
            for i in range(5):
                stub.Verify(guard_pb2.VerifyRequest(image=png16(images[i])), timeout=60)

            def drift():
                return stub.GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=10).drift

            def metrics():
                url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
                return urllib.request.urlopen(url, timeout=10).read().decode()

            assert drift().n == 5
            repo.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=name), timeout=120)
            assert drift().n == 5  # same bundle, same settings: the same monitor goes on
            repo.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name=name), timeout=60)
            assert "gamguard_drift_verdicts" not in metrics()
            repo.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=name), timeout=120)
            assert drift().n == 0 and "gamguard_drift_verdicts 0.0" in metrics()
    finally:
        server.stop()
