"""deploy/: every command the containers, units and manifests run is the real CLI (parsed by the real
`gamguard serve` parser and accepted by its config validation); the health probe works against real
gRPC servers (plaintext and TLS); the pieces agree on ports; and scripts/check_deploy.sh — the linters
and schema validators for Dockerfiles, compose, Kubernetes/KServe manifests and systemd units — passes."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gamguard.runtime.commands import serve as serve_cmd
from gamguard.runtime.engines import packaging as gpu_packaging
from gamguard.runtime.server import healthcheck

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.jetson"]


# ------------------------------------------------------------------------------ reading deploy/


def dockerfile_instructions(name: str) -> dict[str, list[str]]:
    """Instruction → list of its (continuation-joined) argument strings."""
    text = (DEPLOY / name).read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, list[str]] = {}
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def exec_form(value: str) -> list[str]:
    value = re.sub(r"^--\S+\s+", "", value)  # drop HEALTHCHECK options one at a time
    while value.startswith("--"):
        value = re.sub(r"^--\S+\s+", "", value)
    assert value.startswith("CMD ") or value.startswith("["), value
    return json.loads(value.removeprefix("CMD ").strip())


def load_yaml(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d]


def unit(name: str) -> dict[str, str]:
    """Key → value of a systemd unit (last one wins, enough for these units)."""
    out = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def serve_argv_everywhere() -> dict[str, list[str]]:
    """Every `gamguard serve ...` argument list deploy/ runs, by where it comes from."""
    runs = {}
    for name in DOCKERFILES:
        ins = dockerfile_instructions(name)
        assert json.loads(ins["ENTRYPOINT"][-1]) == ["gamguard"], name
        runs[name] = json.loads(ins["CMD"][-1])
    compose = load_yaml("docker-compose.yml")[0]
    runs["docker-compose.yml"] = [str(a) for a in compose["services"]["gamguard"]["command"]]
    exec_start = shlex.split(unit("gamguard.service")["ExecStart"])
    assert exec_start[0] == "/opt/gamguard/bin/gamguard"
    runs["gamguard.service"] = exec_start[1:]
    for rel in ("k8s/base/deployment.yaml",):
        dep = load_yaml(rel)[0]
        runs[rel] = [str(a) for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]]
    for doc in load_yaml("kserve/servingruntime.yaml"):
        runs["kserve/servingruntime.yaml"] = [str(a) for a in doc["spec"]["containers"][0]["args"]]
    return runs


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# ------------------------------------------------------------------------------ the CLI contract


@pytest.mark.parametrize("where", sorted(serve_argv_everywhere()))
def test_deployed_serve_command_is_the_real_cli(where, tmp_path):
    from gamguard.runtime.server.config import ConfigError, config_from_args

    argv = serve_argv_everywhere()[where]
    assert argv[0] == "serve", f"{where} runs {argv[:1]}, not `gamguard serve`"
    parser = argparse.ArgumentParser(prog="gamguard serve")
    serve_cmd.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `gamguard serve` rejects {argv[1:]} (see stderr)")
    assert args.bundle and args.port
    # The TLS files exist inside the container/box, not here: point them at real files to let the
    # server's own validation judge the rest of the combination.
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, name):
            f = tmp_path / name
            f.write_text("pem")
            setattr(args, name, str(f))
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        pytest.fail(f"{where}: the server refuses this configuration: {exc}")
    assert cfg.bind_host == "0.0.0.0", f"{where} must listen beyond loopback inside its container/box"
    assert cfg.metrics_port, f"{where} must expose metrics"
    assert cfg.insecure == (where == "kserve/servingruntime.yaml"), (
        "only KServe (TLS at the mesh/ingress) runs plaintext; everything else uses TLS"
    )


def test_images_expose_the_ports_they_serve():
    for name in DOCKERFILES:
        ins = dockerfile_instructions(name)
        cmd = json.loads(ins["CMD"][-1])
        exposed = set(" ".join(ins["EXPOSE"]).split())
        assert {flag(cmd, "--port"), flag(cmd, "--metrics-port")} <= exposed, name
        assert "USER" in ins and ins["USER"][-1].split(":")[0] not in ("0", "root"), f"{name} must not run as root"
        assert not any("COPY" in i and "bundle" in i for i in ins.get("COPY", [])), "bundles are mounted, not baked"


def test_healthchecks_run_the_real_probe():
    probe = ["python", "-m", "gamguard.runtime.server.healthcheck"]
    for name in DOCKERFILES:
        ins = dockerfile_instructions(name)
        assert exec_form(ins["HEALTHCHECK"][-1])[:3] == probe, name
        env = " ".join(ins["ENV"])
        cmd = json.loads(ins["CMD"][-1])
        assert f"GAMGUARD_HEALTH_PORT={flag(cmd, '--port')}" in env, name
    compose = load_yaml("docker-compose.yml")[0]["services"]["gamguard"]
    assert compose["healthcheck"]["test"][1:4] == probe
    assert compose["environment"]["GAMGUARD_HEALTH_PORT"] == flag([str(a) for a in compose["command"]], "--port")
    exec_start = shlex.split(unit("gamguard-healthcheck.service")["ExecStart"])
    assert exec_start[:3] == ["/opt/gamguard/bin/python", "-m", "gamguard.runtime.server.healthcheck"]
    args = healthcheck.build_parser().parse_args(exec_start[3:])
    assert str(args.port) == flag(serve_argv_everywhere()["gamguard.service"], "--port")


def test_compose_prometheus_scrapes_the_metrics_port():
    compose = load_yaml("docker-compose.yml")[0]
    port = flag([str(a) for a in compose["services"]["gamguard"]["command"]], "--metrics-port")
    prom = load_yaml("prometheus.yml")[0]
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"gamguard:{port}" in targets
    mounts = compose["services"]["gamguard"]["volumes"]
    assert all(m["read_only"] for m in mounts), "bundle and certificates are mounted read-only"


def test_alert_rules_use_series_the_server_exports():
    """Every gamguard_* series the alert rules query is in the exposition of a server's metrics with a
    drift monitor on the demo bundle (a renamed metric would silently disarm an alert)."""
    from testlib import demo_bundle_path

    from gamguard.runtime.bundle import load_manifest
    from gamguard.runtime.checks.reference import CalibrationData
    from gamguard.runtime.drift_monitor import DriftMonitor, DriftReference
    from gamguard.runtime.server.metrics import Metrics

    rules = load_yaml("prometheus-alerts.yml")[0]
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    queried = {name for e in exprs for name in re.findall(r"\bgamguard_[a-z_]+", e)}
    assert {"gamguard_drift", "gamguard_drift_rejection_rate"} <= queried
    bundle = demo_bundle_path()
    manifest = load_manifest(bundle)
    ref = DriftReference.from_calibration(
        manifest, CalibrationData.load(bundle, manifest), policy="calibrated", checks="garbage+attention+feature"
    )
    monitor = DriftMonitor(ref)
    scores = {"garbage.p": 0.5, "attention.p": 0.5, "feature.p": 0.5, "garbage_margin": -3.0}
    monitor.observe([], scores)  # the windowed rates exist from the first verdict
    metrics = Metrics()
    metrics.watch_drift(monitor)
    exported = set(re.findall(r"^(gamguard_[a-z_]+)", metrics.exposition().decode(), re.M))
    assert queried <= exported, queried - exported
    compose = load_yaml("docker-compose.yml")[0]
    targets = [v["target"] for v in compose["services"]["prometheus"]["volumes"] if isinstance(v, dict)]
    assert "/etc/prometheus/prometheus-alerts.yml" in targets
    assert "prometheus-alerts.yml" in load_yaml("prometheus.yml")[0]["rule_files"]


def test_kubernetes_probes_use_native_grpc_on_a_served_port():
    dep = load_yaml("k8s/base/deployment.yaml")[0]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in c["args"]]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(ports["grpc"]) == flag(args, "--port") and str(ports["metrics"]) == flag(args, "--metrics-port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in c[probe], f"{probe} must be a native gRPC probe"
        assert c[probe]["grpc"]["port"] in ports.values()
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] and volumes["bundle"]["persistentVolumeClaim"]["readOnly"]
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] in ("bundle", "tls"))
    kinds = {
        d["kind"]
        for f in (DEPLOY / "k8s" / "base").glob("*.yaml")
        if f.name != "kustomization.yaml"
        for d in yaml.safe_load_all(f.read_text())
        if d
    }
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_kserve_runtime_and_inference_service_fit_together():
    (runtime,) = load_yaml("kserve/servingruntime.yaml")
    (isvc,) = load_yaml("kserve/inferenceservice.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] and model["protocolVersion"] == "grpc-v2"
    container = runtime["spec"]["containers"][0]
    args = [str(a) for a in container["args"]]
    (h2c,) = [p for p in container["ports"] if p["name"] == "h2c"]  # KServe routes gRPC to this port
    assert str(h2c["containerPort"]) == flag(args, "--port")
    assert flag(args, "--bundle") == "/mnt/models"  # where KServe's storage initializer puts storageUri


def test_systemd_unit_is_hardened_and_restarts():
    u = unit("gamguard.service")
    assert u["User"] == "gamguard" and u["Restart"] == "always"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "StandardOutput": "journal",
    }.items():
        assert u.get(key) == value, key
    assert "/var/lib/gamguard/bundle" in u["ReadOnlyPaths"]
    assert "gamguard" in (DEPLOY / "systemd" / "gamguard.sysusers.conf").read_text()


# ------------------------------------------------------------------------------ the health probe


class HealthServer:
    """A real gRPC server with the standard health service, on a loopback port."""

    def __init__(self, credentials=None):
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def set(self, status):
        self.health.set("", status)


@pytest.fixture
def plain_server():
    s = HealthServer()
    yield s
    s.server.stop(0)


def test_probe_reports_serving_not_serving_and_unknown_services(plain_server, capsys):
    args = ["--port", str(plain_server.port), "--insecure", "--timeout", "5"]
    plain_server.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(args) == healthcheck.EXIT_NOT_SERVING
    plain_server.set(health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(args) == healthcheck.EXIT_SERVING
    assert healthcheck.main(args + ["--service", "no.such.Service"]) == healthcheck.EXIT_NOT_SERVING
    assert "unknown" in capsys.readouterr().err


def test_probe_waits_for_a_server_that_is_still_loading(plain_server):
    plain_server.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    import threading

    threading.Timer(0.6, plain_server.set, args=(health_pb2.HealthCheckResponse.SERVING,)).start()
    t0 = time.monotonic()
    code = healthcheck.main(["--port", str(plain_server.port), "--insecure", "--attempts", "10", "--interval", "0.2"])
    assert code == healthcheck.EXIT_SERVING and time.monotonic() - t0 >= 0.5


def test_probe_reports_an_unreachable_server():
    s = HealthServer()
    port = s.port
    s.server.stop(0)
    assert healthcheck.main(["--port", str(port), "--insecure", "--timeout", "1"]) == healthcheck.EXIT_UNREACHABLE


def test_probe_reads_its_settings_from_the_environment(plain_server, monkeypatch):
    plain_server.set(health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.setenv("GAMGUARD_HEALTH_PORT", str(plain_server.port))
    monkeypatch.setenv("GAMGUARD_HEALTH_INSECURE", "1")
    monkeypatch.setenv("GAMGUARD_HEALTH_TLS_CA", "/nonexistent/ca.crt")  # ignored with INSECURE
    assert healthcheck.main([]) == healthcheck.EXIT_SERVING


def test_probe_rejects_bad_arguments():
    assert healthcheck.main(["--tls-cert", "a.crt"]) == healthcheck.EXIT_USAGE
    assert healthcheck.main(["--attempts", "0", "--insecure"]) == healthcheck.EXIT_USAGE
    assert healthcheck.main(["--port", "not-a-port"]) == healthcheck.EXIT_USAGE


def test_probe_bad_port_in_the_environment_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("GAMGUARD_HEALTH_PORT", "abc")
    assert healthcheck.main(["--insecure"]) == healthcheck.EXIT_USAGE
    assert healthcheck.build_parser().parse_args(["--port", "8123"]).port == 8123  # a flag still wins


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_probe_over_tls_and_mutual_tls(tmp_path):
    from testlib import make_ca, make_cert

    ca = make_ca(tmp_path, "ca")
    srv_crt, srv_key = make_cert(tmp_path, "server", ca, server=True)
    cli_crt, cli_key = make_cert(tmp_path, "client", ca, server=False)
    creds = grpc.ssl_server_credentials(
        [(srv_key.read_bytes(), srv_crt.read_bytes())], root_certificates=ca[0].read_bytes(), require_client_auth=True
    )
    s = HealthServer(creds)
    try:
        s.set(health_pb2.HealthCheckResponse.SERVING)
        base = ["--port", str(s.port), "--tls-ca", str(ca[0]), "--tls-server-name", "localhost", "--timeout", "5"]
        assert healthcheck.main(base + ["--tls-cert", str(cli_crt), "--tls-key", str(cli_key)]) == 0
        # Without a client certificate the mutual-TLS handshake fails: unreachable, not healthy.
        assert healthcheck.main(base) == healthcheck.EXIT_UNREACHABLE
        # Plaintext against a TLS port is not healthy either.
        assert healthcheck.main(["--port", str(s.port), "--insecure", "--timeout", "2"]) == healthcheck.EXIT_UNREACHABLE
    finally:
        s.server.stop(0)


def test_probe_against_gamguard_serve(tmp_path):
    """The probe the images use, against the real server process the images run."""
    from testlib import demo_bundle_path

    bundle = demo_bundle_path()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gamguard.runtime.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--insecure",
            "--port",
            "0",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line, deadline = "", time.monotonic() + 120
        while "serving on" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        m = re.search(r"serving on [\d.]+:(\d+)", line)
        assert m, f"server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        env = dict(os.environ, GAMGUARD_HEALTH_PORT=m.group(1), GAMGUARD_HEALTH_INSECURE="1")
        out = subprocess.run(
            [sys.executable, "-m", "gamguard.runtime.server.healthcheck"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "SERVING" in out.stderr
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------------------ GPU packaging check


def test_gpu_packaging_detects_two_onnxruntime_distributions():
    both = gpu_packaging.problems(
        distributions={"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"},
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert len(both) == 1 and "more than one" in both[0]
    assert (
        gpu_packaging.problems(
            distributions={"onnxruntime-gpu": "1.22.0"}, providers=["TensorrtExecutionProvider", "CPUExecutionProvider"]
        )
        == []
    )
    cpu_only = gpu_packaging.problems(distributions={"onnxruntime": "1.22.0"}, providers=["CPUExecutionProvider"])
    assert cpu_only and "no GPU execution provider" in cpu_only[0]


def test_gpu_packaging_on_this_install():
    # This (CPU) environment has exactly one onnxruntime distribution: fine for CPU, not for a GPU image.
    assert gpu_packaging.problems(allow_cpu=True) == []
    dists = gpu_packaging.onnxruntime_distributions()
    assert len(dists) == 1
    expect = 0 if "onnxruntime-gpu" in dists else 1
    assert gpu_packaging.main([]) == expect


# ------------------------------------------------------------------------------ linters and schemas


def test_check_deploy_script_passes():
    """yamllint, hadolint, compose schema, ShellCheck, kustomize + strict Kubernetes schemas (CRD
    containers included), systemd-analyze verify: the tools install themselves into build/."""
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_deploy.sh")], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "all deploy/ checks passed" in out.stderr
    for check in (
        "yamllint",
        "hadolint",
        "compose-schema",
        "shellcheck",
        "systemd-verify",
        "k8s base",
        "promtool-config",
        "promtool-rules-test",
    ):
        assert re.search(rf"^{re.escape(check)}.*\bok$", out.stderr, re.M), check
