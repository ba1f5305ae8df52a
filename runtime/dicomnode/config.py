"""Configuration of ``gamguard dicom-node``: flags, the ``dicom:`` section of the serve config file, defaults.

The node reads the same config file as ``gamguard serve``. Its top-level keys (bundle, metrics-port,
audit-log, the batching and engine options, and TLS/port for ``--grpc-port``) mean what they mean for
``serve``; the node's own options live in a ``dicom:`` mapping, keys = flag names::

    bundle: /opt/gamguard/bundle
    metrics-port: 9090
    audit-log: /var/log/gamguard/audit.jsonl
    dicom:
      port: 11112
      ae-title: GAMGUARD
      allow-ae: [DX_ROOM1, CR_ROOM2@10.1.2.3]
      forward: [PACS@10.1.0.5:104]
      queue-dir: /var/lib/gamguard/dicom

Precedence: flag > config file > default.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from gamguard.runtime.server.config import (
    ConfigError,
    ServeConfig,
    load_config_file,
    load_config_section,
    serve_config_from_values,
)

from .access import AccessError, AllowList, valid_ae_title

FORWARD_ORIGINALS = ("none", "accepted", "all")


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination, ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @property
    def name(self) -> str:
        """A label for metrics and the outbox folder name."""
        return re.sub(r"[^A-Za-z0-9._@-]", "_", f"{self.ae_title}@{self.host}_{self.port}")

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    m = re.fullmatch(r"\s*([^@]+)@(\[[^\]]+\]|[^:]+):(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"--forward {text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
    try:
        ae = valid_ae_title(m.group(1))
    except AccessError as exc:
        raise ConfigError(f"--forward {text!r}: {exc}") from None
    port = int(m.group(3))
    if not 1 <= port <= 65535:
        raise ConfigError(f"--forward {text!r}: port must be in 1..65535")
    return Destination(ae, m.group(2).strip("[]"), port)


@dataclass
class DicomNodeConfig:
    host: str = "0.0.0.0"
    port: int = 11112
    ae_title: str = "GAMGUARD"
    allow_ae: list = field(default_factory=list)
    allow_any_ae: bool = False
    forward: list = field(default_factory=list)
    forward_originals: str = "none"
    queue_dir: str = "gamguard-dicom"
    max_associations: int = 8
    max_pdu: int = 65536
    timeout_s: float = 60.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    forward_tls_ca: str | None = None
    forward_tls_cert: str | None = None
    forward_tls_key: str | None = None
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    build_backlog: int = 256
    result_workers: int | None = None  # None: resultpool.default_workers()
    receivers: int | None = None  # None: receiver.default_receivers()
    grpc_port: int | None = None
    grpc_insecure: bool = False

    @property
    def destinations(self) -> list[Destination]:
        return [parse_destination(d) for d in self.forward]

    def allow_list(self) -> AllowList:
        try:
            return AllowList(self.allow_ae, allow_any=self.allow_any_ae)
        except AccessError as exc:
            raise ConfigError(str(exc)) from None

    def validate(self) -> "DicomNodeConfig":
        try:
            self.ae_title = valid_ae_title(self.ae_title)
        except AccessError as exc:
            raise ConfigError(f"--ae-title: {exc}") from None
        self.allow_list()
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ConfigError("--forward: a destination is listed twice")
        if self.forward_originals not in FORWARD_ORIGINALS:
            raise ConfigError(f"--forward-originals must be one of {', '.join(FORWARD_ORIGINALS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.max_associations < 1:
            raise ConfigError("--max-associations must be >= 1")
        if self.max_pdu != 0 and not 4096 <= self.max_pdu <= 2**31 - 1:
            raise ConfigError("--max-pdu must be 0 (no limit) or 4096..2147483647 bytes")
        if self.timeout_s <= 0 or self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ConfigError("--timeout-s and --retry-initial-s must be > 0 and --retry-max-s >= --retry-initial-s")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("DICOM TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert/--tls-key")
        if bool(self.forward_tls_cert) != bool(self.forward_tls_key):
            raise ConfigError(
                "a client certificate for the destinations needs both --forward-tls-cert and --forward-tls-key"
            )
        if self.forward_tls_cert and not self.forward_tls_ca:
            raise ConfigError("--forward-tls-cert/--forward-tls-key need --forward-tls-ca (TLS to the destinations)")
        if self.forward_tls_ca and not self.destinations:
            raise ConfigError("--forward-tls-ca without a --forward destination")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "forward_tls_ca", "forward_tls_cert", "forward_tls_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"--{name.replace('_', '-')}: {value}: no such file")
        if self.build_backlog < 1:
            raise ConfigError("--build-backlog must be >= 1")
        if self.result_workers is not None and self.result_workers < 0:
            raise ConfigError("--result-workers must be >= 0")
        if self.receivers is not None and not 0 <= self.receivers <= 64:
            raise ConfigError("--receivers must be in 0..64")
        return self


# flag, type, help (defaults from DicomNodeConfig; argparse defaults stay None so given flags are known)
_FLAGS = (
    ("--host", str, "address to listen on (default 0.0.0.0: consoles are on the network)"),
    ("--port", int, "DICOM port (default 11112, the registered DICOM port; 0 picks a free one)"),
    ("--ae-title", str, "this node's AE title, the 'called AE title' consoles send to (default GAMGUARD)"),
    (
        "--forward-originals",
        str,
        "also forward the received images: none (default), accepted (only images the guard accepted) or all",
    ),
    (
        "--queue-dir",
        str,
        "folder of the journal and the outbox, kept across restarts (default ./gamguard-dicom); "
        "holds PHI: protect it like the archive",
    ),
    ("--max-associations", int, "most simultaneous associations; more are rejected (default 8)"),
    (
        "--max-pdu",
        int,
        "largest P-DATA PDU accepted, bytes; a peer announcing more is cut off (default 65536; 0 = no limit)",
    ),
    (
        "--timeout-s",
        float,
        "DIMSE/network idle timeout in seconds (default 60); a new connection has at most 10 s of it to associate",
    ),
    ("--tls-cert", str, "DICOM TLS: server certificate chain (PEM); without it the port is plaintext DICOM"),
    ("--tls-key", str, "DICOM TLS: private key (PEM)"),
    ("--tls-client-ca", str, "DICOM TLS: require client certificates signed by this CA (PEM)"),
    (
        "--forward-tls-ca",
        str,
        "DICOM TLS to every --forward destination: verify its certificate (and its host name as written in "
        "--forward) against this CA (PEM); without it results are sent in plaintext",
    ),
    (
        "--forward-tls-cert",
        str,
        "with --forward-tls-ca: client certificate chain (PEM) for destinations that ask for one",
    ),
    ("--forward-tls-key", str, "with --forward-tls-cert: its private key (PEM)"),
    ("--retry-initial-s", float, "first retry delay after a failed forward; doubles up to --retry-max-s (default 1)"),
    ("--retry-max-s", float, "longest delay between forward retries (default 60); objects are never dropped"),
    (
        "--build-backlog",
        int,
        "results are built between associations; with this many images waiting they are "
        "built during associations too (default 256)",
    ),
    (
        "--result-workers",
        int,
        "processes that build the SRs and overlays (about 45 ms of CPU per image each, off the serving "
        "process); 0 builds them in the node's own process (default: 2, or the usable CPUs if fewer)",
    ),
    (
        "--receivers",
        int,
        "processes that receive the associations (pynetdicom, header checks, the journal's write, and the "
        "decode of images of 256 KiB or more), beside the node's process, which verifies: receiving and "
        "verifying then run at the same time instead of taking turns in one interpreter; 0 receives in the "
        "node's own process (default: 2, or 0 on a machine with one usable CPU)",
    ),
    (
        "--grpc-port",
        int,
        "also serve the gRPC API (gamguard serve) on this port, from the same data plane; "
        "its TLS settings come from the config file's serve keys or --grpc-insecure",
    ),
)
_LIST_FLAGS = (
    (
        "--allow-ae",
        "AET[@HOST]",
        "calling AE title allowed to associate (repeatable); @HOST also pins the peer "
        "address. Required unless --allow-any-ae",
    ),
    ("--forward", "AET@HOST:PORT", "C-STORE destination of the results, e.g. the PACS (repeatable)"),
)
# serve options that also apply to the node (same flag names, same meaning)
SERVE_FLAGS = (
    "--bundle",
    "--metrics-port",
    "--metrics-host",
    "--audit-log",
    "--providers",
    "--threads",
    "--policy",
    "--max-batch-size",
    "--max-queue-delay-ms",
    "--max-queue-size",
    "--max-pixels",
    "--decode-workers",
)


def add_dicom_node_arguments(parser: argparse.ArgumentParser) -> None:
    from gamguard.runtime.server.config import _FLAGS as SERVE_FLAG_SPECS

    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the serve config file (YAML/JSON); the node's own "
        "options go in its 'dicom:' section; flags given on the command line win",
    )
    for flag, typ, help_text in SERVE_FLAG_SPECS:
        if flag in SERVE_FLAGS:
            parser.add_argument(
                flag,
                type=typ,
                default=None,
                help=help_text,
                metavar="DIR" if flag == "--bundle" else flag.lstrip("-").split("-")[-1].upper(),
            )
    for flag, typ, help_text in _FLAGS:
        parser.add_argument(
            flag, type=typ, default=None, help=help_text, metavar=flag.lstrip("-").split("-")[-1].upper()
        )
    for flag, metavar, help_text in _LIST_FLAGS:
        parser.add_argument(flag, action="append", default=None, metavar=metavar, help=help_text)
    parser.add_argument(
        "--allow-any-ae",
        action="store_true",
        default=None,
        help="admit every calling AE title (only behind a firewall that already limits who connects)",
    )
    parser.add_argument(
        "--grpc-insecure",
        action="store_true",
        default=None,
        help="with --grpc-port: plaintext gRPC on 127.0.0.1 (as serve --insecure)",
    )


_BOOL = ("allow_any_ae", "grpc_insecure")
_INT = ("port", "max_associations", "max_pdu", "build_backlog", "result_workers", "receivers", "grpc_port")
_FLOAT = ("timeout_s", "retry_initial_s", "retry_max_s")
_LIST = ("allow_ae", "forward")


def _coerce(values: dict) -> dict:
    out = {}
    for name, v in values.items():
        if v is None:
            out[name] = None
        elif name in _BOOL:
            if not isinstance(v, bool):
                raise ConfigError(f"dicom: {name.replace('_', '-')} must be true or false, got {v!r}")
            out[name] = v
        elif name in _INT or name in _FLOAT:
            kind = int if name in _INT else float
            try:
                if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    raise ValueError
                out[name] = kind(v)
            except ValueError:
                raise ConfigError(
                    f"dicom: {name.replace('_', '-')} must be {'an integer' if kind is int else 'a number'}, got {v!r}"
                ) from None
        elif name in _LIST:
            out[name] = [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        else:
            out[name] = str(v)
    return out


def node_config_from_args(args: argparse.Namespace) -> tuple[DicomNodeConfig, ServeConfig]:
    """The node's options and the serve options it shares (bundle, engine, batching, metrics, audit)."""
    known = {f.name for f in fields(DicomNodeConfig)}
    values: dict = {}
    serve_values: dict = {}
    if getattr(args, "config", None):
        serve_values.update(load_config_file(args.config))
        section = load_config_section(args.config, "dicom")
        for key, value in section.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"--config: {args.config}: unknown option {key!r} in the dicom section (known: "
                    f"{', '.join(sorted(k.replace('_', '-') for k in known))})"
                )
            values[name] = value
    for name in known:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    for flag in SERVE_FLAGS:
        name = flag.lstrip("-").replace("-", "_")
        given = getattr(args, name, None)
        if given is not None:
            serve_values[name] = given
    try:
        cfg = DicomNodeConfig(**{k: v for k, v in _coerce(values).items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad configuration value: {exc}") from None
    cfg.validate()
    # The serve side: the gRPC listener only exists with --grpc-port; otherwise its TLS rules do not apply.
    serve_values["port"] = cfg.grpc_port if cfg.grpc_port is not None else 0
    if cfg.grpc_port is None or cfg.grpc_insecure:
        serve_values.update(insecure=True, tls_cert=None, tls_key=None, tls_client_ca=None)
    return cfg, serve_config_from_values(serve_values).validate()
