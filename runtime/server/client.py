"""A small synchronous client for ``gamguard.v1.Guard`` (used by ``gamguard predict`` and ``gamguard demo``).

    from gamguard.runtime.server.client import GuardClient
    with GuardClient("127.0.0.1:8001") as c:              # plaintext (a server run with --insecure)
        verdict = c.verify(open("hand.png", "rb").read())
        print(verdict.accepted, verdict.prediction.label, list(verdict.reasons))

TLS: ``GuardClient(target, tls=True, ca_cert="ca.pem")``; mutual TLS adds ``client_cert`` and
``client_key``; a bearer token goes in ``token``. Verdicts are ``gamguard.v1.Verdict`` messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import grpc

from gamguard.proto import guard_pb2, guard_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def read_optional(path) -> bytes | None:
    """The bytes of ``path``, or None when no path is given (an optional certificate or key)."""
    return Path(path).read_bytes() if path else None


def make_channel(
    target: str,
    *,
    tls: bool = False,
    ca_cert=None,
    client_cert=None,
    client_key=None,
    server_name: str | None = None,
    token: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A channel to ``target``; TLS when ``tls`` or any certificate is given."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls or ca_cert or client_cert:
        if bool(client_cert) != bool(client_key):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        creds = grpc.ssl_channel_credentials(
            root_certificates=read_optional(ca_cert),
            private_key=read_optional(client_key),
            certificate_chain=read_optional(client_cert),
        )
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(target, creds, options=options)
    channel = grpc.insecure_channel(target, options=options)
    if token:  # plaintext + token: attach the header ourselves (call credentials need TLS)
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or []) + [self._md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        self.metadata = metadata


class GuardClient:
    def __init__(self, target: str, *, timeout: float = 60.0, **channel_kw):
        self.target = target
        self.timeout = timeout
        self.channel = make_channel(target, **channel_kw)
        self.stub = guard_pb2_grpc.GuardStub(self.channel)

    def __enter__(self) -> "GuardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    @staticmethod
    def request(
        data: bytes | None = None,
        *,
        tensor: guard_pb2.Tensor | None = None,
        frame: int | None = None,
        request_id: str = "",
        heatmap_png: bool = False,
        heatmap_values: bool = False,
    ) -> guard_pb2.VerifyRequest:
        req = guard_pb2.VerifyRequest(request_id=request_id, heatmap_png=heatmap_png, heatmap_values=heatmap_values)
        if tensor is not None:
            req.tensor.CopyFrom(tensor)
        else:
            req.image = data or b""
        if frame is not None:
            req.frame = frame
        return req

    def verify(self, data: bytes | None = None, **kw) -> guard_pb2.Verdict:
        timeout = kw.pop("timeout", self.timeout)
        return self.stub.Verify(self.request(data, **kw), timeout=timeout)

    def verify_stream(
        self, requests: Iterable[guard_pb2.VerifyRequest], timeout: float | None = None
    ) -> Iterator[guard_pb2.Verdict]:
        return self.stub.VerifyStream(iter(requests), timeout=timeout or self.timeout)

    def model_info(self) -> guard_pb2.ModelInfo:
        return self.stub.GetModelInfo(guard_pb2.ModelInfoRequest(), timeout=self.timeout)


# ------------------------------------------------------------------------------------------- output


KEY_SCORES = ("garbage_prob", "attention.p", "feature.p", "combined_p")


def verdict_record(
    name: str, verdict: guard_pb2.Verdict | None = None, *, error: str | None = None, code: str | None = None
) -> dict:
    """One JSON-serialisable row: what `gamguard predict --json` prints per file."""
    if verdict is None:
        return {
            "file": name,
            "accepted": False,
            "label": None,
            "reasons": ["INVALID_INPUT"] if code == "INVALID_ARGUMENT" else [],
            "scores": {},
            "error": error,
            "status": code,
        }
    rec = {
        "file": name,
        "accepted": bool(verdict.accepted),
        "label": verdict.prediction.label if verdict.accepted else None,
        "reasons": list(verdict.reasons),
        "failed_measures": list(verdict.failed_measures),
        "scores": dict(sorted(verdict.scores.items())),
        "thresholds": dict(sorted(verdict.thresholds.items())),
        "request_id": verdict.request_id,
        "bundle_hash": verdict.model.bundle_hash,
        "input_format": verdict.input_format,
        "timing_ms": {
            "decode": round(verdict.timing.decode_ms, 2),
            "queue": round(verdict.timing.queue_ms, 2),
            "engine": round(verdict.timing.engine_ms, 2),
            "guard": round(verdict.timing.guard_ms, 2),
            "total": round(verdict.timing.total_ms, 2),
        },
        "batch_size": verdict.timing.batch_size,
    }
    if verdict.accepted:
        rec["probabilities"] = dict(verdict.prediction.probabilities)
    if verdict.detail:
        rec["detail"] = verdict.detail
    if verdict.sop_instance_uid:
        rec["sop_instance_uid"] = verdict.sop_instance_uid
    return rec


def format_table(records: list[dict], *, extra: dict[str, list[str]] | None = None) -> str:
    """A plain-text verdict table (one line per record)."""
    # garbage_prob: the garbage class's probability; combined_p: min(1, combined statistic), the p-value
    # the checks combine to (docs/architecture.md, "The guard decision")
    head = ["file", "decision", "label", "reasons", "garbage_prob", "combined_p", "ms"]
    if extra:
        head = [head[0]] + list(extra) + head[1:]
    rows = []
    for i, r in enumerate(records):
        if r.get("status") and r["status"] != "OK" and not r.get("request_id"):
            decision, reasons = r["status"], (r.get("error") or "")[:100]
        else:
            decision, reasons = ("ACCEPTED" if r["accepted"] else "REJECTED"), ",".join(r["reasons"]) or "-"
        s = r.get("scores") or {}

        def num(key, upper=float("inf")):
            return f"{min(s[key], upper):.3f}" if key in s else "-"

        row = [r["file"]]
        if extra:
            row += [col[i] for col in extra.values()]
        row += [
            decision,
            r.get("label") or "-",
            reasons,
            num("garbage_prob"),
            num("combined_p", upper=1.0),
            f"{r['timing_ms']['total']:.0f}" if r.get("timing_ms") else "-",
        ]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_verdict_overlay(
    path,
    image_bytes: bytes,
    verdict: guard_pb2.Verdict,
    class_names: list[str],
    *,
    title: str = "",
    frame: int | None = None,
):
    """Heatmap overlay PNG for a served verdict (needs the verdict's heatmap values).

    Decodes the input locally (same decoder as the server) and draws it with
    :mod:`gamguard.runtime.overlays`; returns the path, or None when the input cannot be decoded.
    """
    from types import SimpleNamespace

    import numpy as np

    from gamguard.runtime.decode import DecodeError, decode_bytes
    from gamguard.runtime.overlays import write_overlay

    try:
        image = decode_bytes(image_bytes, frame=frame).pixels
    except DecodeError:
        return None
    h, w = verdict.heatmap.height, verdict.heatmap.width
    cam = np.asarray(verdict.heatmap.values, np.float32).reshape(h, w) if len(verdict.heatmap.values) else None
    ref = (
        np.asarray(verdict.heatmap.reference_values, np.float32).reshape(h, w)
        if len(verdict.heatmap.reference_values)
        else None
    )
    # Class indices only for accepted inputs: the server never names a class for a rejected one.
    index = verdict.prediction.index if verdict.accepted else None
    shown = SimpleNamespace(
        accepted=verdict.accepted,
        label=verdict.prediction.label if verdict.accepted else None,
        reasons=list(verdict.reasons),
        failed_measures=list(verdict.failed_measures),
        cam=cam,
        reference_cam=ref,
        predicted_index=index,
        reference_index=index,
    )
    return write_overlay(path, image, shown, class_names, title=title)
