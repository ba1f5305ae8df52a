"""Server configuration: command-line flags, an optional YAML/JSON config file, and defaults.

Precedence: a flag given on the command line > the config file (``--config FILE``) > the default.
Config file keys are the long flag names, with dashes or underscores::

    # gamguard-serve.yaml
    bundle: /opt/gamguard/bundle
    port: 8001
    host: 0.0.0.0
    tls-cert: /etc/gamguard/server.crt
    tls-key: /etc/gamguard/server.key
    tls-client-ca: /etc/gamguard/clients-ca.crt   # mutual TLS
    metrics-port: 9090
    max-batch-size: 8
    max-queue-delay-ms: 5
    audit-log: /var/log/gamguard/audit.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path

MODEL_CONTROL_MODES = ("none", "explicit")


class ConfigError(ValueError):
    """A bad flag combination or config file; the message says what to change."""


@dataclass
class ServeConfig:
    bundle: str | None = None
    host: str | None = None  # None: 127.0.0.1 with --insecure, 0.0.0.0 with TLS
    port: int = 8001
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None  # None: 127.0.0.1 (plaintext HTTP: expose it only on purpose)
    health_port: int | None = None  # extra plaintext port with grpc.health.v1.Health only
    health_host: str | None = None  # None: 127.0.0.1 (plaintext: expose it only on purpose)
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 64
    max_message_mb: int = 64
    max_pixels: int = 64_000_000
    max_decode_mb: int = 768
    decode_memory_mb: int = 768
    decode_workers: int = 2
    providers: str | None = None
    threads: int | None = None
    policy: str | None = None
    expect_bundle_hash: str | None = None
    trusted_key: str | None = None
    debug_rejected_details: bool = False
    audit_log: str | None = None
    shutdown_grace_s: float = 30.0
    drain_delay_s: float = 0.0
    model_control: str = "none"  # "explicit": OIP RepositoryModelLoad / Unload allowed

    @property
    def bind_host(self) -> str:
        if self.host:
            return self.host
        return "127.0.0.1" if self.insecure else "0.0.0.0"

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or "127.0.0.1"

    @property
    def health_bind_host(self) -> str:
        return self.health_host or "127.0.0.1"

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb) * 1024 * 1024

    def validate(self) -> "ServeConfig":
        if self.insecure and (self.tls_cert or self.tls_key or self.tls_client_ca):
            raise ConfigError("--insecure cannot be combined with --tls-cert/--tls-key/--tls-client-ca")
        if not self.insecure:
            if not (self.tls_cert and self.tls_key):
                raise ConfigError(
                    "TLS needs --tls-cert FILE and --tls-key FILE; for plaintext on loopback pass --insecure"
                )
            for name in ("tls_cert", "tls_key", "tls_client_ca"):
                value = getattr(self, name)
                if value and not Path(value).is_file():
                    raise ConfigError(f"--{name.replace('_', '-')}: {value}: no such file")
        if self.trusted_key and not Path(self.trusted_key).is_file():
            raise ConfigError(f"--trusted-key: {self.trusted_key}: no such file")
        if self.auth_token_file and not Path(self.auth_token_file).is_file():
            raise ConfigError(f"--auth-token-file: {self.auth_token_file}: no such file")
        for name in ("port", "metrics_port", "health_port"):
            value = getattr(self, name)
            if value is not None and not (0 <= int(value) <= 65535):
                raise ConfigError(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
        if (
            self.health_port is not None
            and self.health_port != 0
            and self.health_port in (self.port, self.metrics_port)
        ):
            raise ConfigError("--health-port must differ from --port and --metrics-port")
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ConfigError("--max-batch-size and --max-queue-size must be >= 1")
        if self.max_queue_delay_ms < 0:
            raise ConfigError("--max-queue-delay-ms must be >= 0")
        if self.max_message_mb < 1:
            raise ConfigError("--max-message-mb must be >= 1")
        if self.max_pixels < 64:
            raise ConfigError("--max-pixels is too small")
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"--model-control must be one of {', '.join(MODEL_CONTROL_MODES)}, got {self.model_control!r}"
            )
        if self.max_decode_mb < 1 or self.decode_memory_mb < self.max_decode_mb:
            raise ConfigError(
                "--max-decode-mb must be >= 1 and --decode-memory-mb at least --max-decode-mb "
                f"(got {self.max_decode_mb} and {self.decode_memory_mb})"
            )
        return self


# flag name, type, help. Defaults come from ServeConfig; argparse defaults stay None so we can tell
# which flags the user actually gave (those override the config file).
_FLAGS = (
    ("--bundle", str, "bundle directory (default: the embedded demo bundle)"),
    ("--host", str, "address to bind (default 127.0.0.1 with --insecure, 0.0.0.0 with TLS)"),
    ("--port", int, "gRPC port (default 8001; 0 picks a free port)"),
    ("--tls-cert", str, "server certificate chain (PEM)"),
    ("--tls-key", str, "server private key (PEM)"),
    ("--tls-client-ca", str, "CA bundle (PEM) for mutual TLS: clients must present a certificate it signed"),
    (
        "--auth-token-file",
        str,
        "file holding a bearer token; clients must send 'authorization: Bearer TOKEN' (health checks are exempt)",
    ),
    ("--metrics-port", int, "serve Prometheus metrics at http://HOST:PORT/metrics (default: off)"),
    (
        "--metrics-host",
        str,
        "address for the metrics endpoint (default 127.0.0.1; it is plaintext HTTP without "
        "authentication: pass e.g. 0.0.0.0 only where the network is trusted)",
    ),
    (
        "--health-port",
        int,
        "also serve grpc.health.v1.Health alone, in plaintext, on this port (for probes that "
        "cannot speak TLS, e.g. kubelet's gRPC probes; default: off)",
    ),
    (
        "--health-host",
        str,
        "address for --health-port (default 127.0.0.1; for kubelet probes pass the pod address or 0.0.0.0)",
    ),
    ("--max-batch-size", int, "most requests sharing one engine call (default 8)"),
    ("--max-queue-delay-ms", float, "longest a request waits for others to fill a batch (default 5)"),
    ("--max-queue-size", int, "requests waiting beyond this are refused with RESOURCE_EXHAUSTED (default 64)"),
    ("--max-message-mb", int, "largest gRPC message in MiB, both directions (default 64)"),
    ("--max-pixels", int, "largest accepted image in pixels, checked before decoding (default 64000000)"),
    (
        "--max-decode-mb",
        int,
        "most memory one image may need to decode, estimated from its header before "
        "decoding; larger ones are refused with INVALID_ARGUMENT (default 768)",
    ),
    (
        "--decode-memory-mb",
        int,
        "memory budget of all requests being decoded: their encoded bytes plus decode "
        "memory; beyond it RESOURCE_EXHAUSTED (default 768)",
    ),
    ("--decode-workers", int, "threads decoding images (default 2)"),
    ("--providers", str, "ONNX Runtime providers, e.g. 'cuda,cpu' (default: TensorRT → CUDA → CPU, as available)"),
    ("--threads", int, "engine intra-op threads (default: onnxruntime's choice)"),
    ("--policy", str, "guard decision policy override (default: the bundle's calibrated policy)"),
    (
        "--trusted-key",
        str,
        "operator's Ed25519 public key (PEM): serve only a bundle whose bundle.sig it verifies "
        "(sign with `gamguard sign`; needs the 'cryptography' package)",
    ),
    (
        "--expect-bundle-hash",
        str,
        "refuse to serve unless the served bundle_hash (bundle files, bundle.json and "
        "overrides) is exactly this one: pins the version you approved",
    ),
    ("--audit-log", str, "append a JSON line per verdict to this file ('-' for stderr); never contains PHI"),
    ("--shutdown-grace-s", float, "on SIGTERM, how long in-flight requests may take to finish (default 30)"),
    ("--drain-delay-s", float, "on SIGTERM, report NOT_SERVING this long before refusing new calls (default 0)"),
    (
        "--model-control",
        str,
        "'explicit': Open Inference Protocol clients may unload and (re)load the configured bundle "
        "(RepositoryModelUnload / RepositoryModelLoad, like Triton's --model-control-mode=explicit); "
        "'none' refuses them (default none)",
    ),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file with any of these options (keys are flag names; flags given on the command line win)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext gRPC (no TLS); binds 127.0.0.1 unless --host is given",
    )
    parser.add_argument(
        "--debug-rejected-details",
        action="store_true",
        default=None,
        help="DEBUG ONLY: rejected verdicts also carry the per-class thresholds and reference heatmap "
        "of the model's top class (which reveal that class); off by default",
    )
    metavars = {
        "--bundle": "DIR",
        "--host": "HOST",
        "--metrics-host": "HOST",
        "--health-host": "HOST",
        "--providers": "LIST",
        "--policy": "NAME",
        "--audit-log": "FILE",
        "--model-control": "MODE",
        "--expect-bundle-hash": "HEX",
        "--trusted-key": "PEM",
    }
    for flag, typ, help_text in _FLAGS:
        metavar = metavars.get(flag) or ("FILE" if typ is str else flag.lstrip("-").split("-")[-1].upper())
        parser.add_argument(flag, type=typ, default=None, help=help_text, metavar=metavar)


def _field_names() -> set[str]:
    return {f.name for f in fields(ServeConfig)}


def _read_mapping(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {p}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - YAML/JSON parser errors
        raise ConfigError(f"--config: {p}: cannot parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p}: expected a mapping of option names to values")
    return data


# Sections of the same file that belong to other commands: ``dicom:`` holds gamguard dicom-node's options.
SECTIONS = ("dicom",)


def load_config_section(path: str | Path, section: str) -> dict:
    """The ``section:`` mapping of a config file ({} when absent)."""
    data = _read_mapping(path).get(section) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path}: '{section}' must be a mapping of option names to values")
    return data


def load_config_file(path: str | Path) -> dict:
    """The serve options of a config file (other commands' sections left out)."""
    p = Path(path)
    data = _read_mapping(p)
    out = {}
    known = _field_names()
    for key, value in data.items():
        if key in SECTIONS:
            continue
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"--config: {p}: unknown option {key!r} (known: "
                f"{', '.join(sorted(k.replace('_', '-') for k in known))})"
            )
        out[name] = value
    return out


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Merge defaults, the config file and the flags given, then validate."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for name in _field_names():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return serve_config_from_values(values).validate()


def serve_config_from_values(values: dict) -> ServeConfig:
    """A ServeConfig from option values, config-file values coerced to the declared types (not validated)."""
    try:
        cfg = ServeConfig(**values)
        for f in fields(ServeConfig):  # coerce config-file values to the declared types
            v = getattr(cfg, f.name)
            if v is None:
                continue
            if f.name in (
                "port",
                "metrics_port",
                "health_port",
                "max_batch_size",
                "max_queue_size",
                "max_message_mb",
                "max_pixels",
                "max_decode_mb",
                "decode_memory_mb",
                "decode_workers",
                "threads",
            ):
                setattr(cfg, f.name, int(v))
            elif f.name in ("max_queue_delay_ms", "shutdown_grace_s", "drain_delay_s"):
                setattr(cfg, f.name, float(v))
            elif f.name in ("insecure", "debug_rejected_details"):
                if not isinstance(v, bool):  # bool("false") is True: refuse strings, never guess
                    raise ValueError(f"{f.name.replace('_', '-')} must be true or false, got {v!r}")
            else:
                setattr(cfg, f.name, str(v))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad configuration value: {exc}") from None
    return cfg
