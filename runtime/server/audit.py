"""The audit log: one JSON object per line for every verdict the server gives.

Each line: ``time`` (UTC, ISO 8601), ``request_id``, ``protocol``, ``model``, ``version``,
``bundle_hash``, ``decision`` (accepted / rejected / invalid), ``reasons``, ``failed_measures``,
``scores`` (every check's score and p-value, ``combined_p`` and ``conformal_p`` included), ``label``
(accepted only), ``input_format``, ``sop_instance_uid`` (DICOM only), ``policy`` and ``checks`` (the
guard's decision policy and enforced checks, e.g. ``garbage+attention+feature``: with the scores they
let ``gamguard drift`` replay the server's drift monitor), ``bundle_dir`` (where the bundle was
loaded from) and ``detail`` for invalid inputs. A request refused for another reason gets a line too: ``decision``
``refused`` (server busy, deadline passed, draining) or ``error`` (an internal error), with the gRPC
``status`` name and ``detail``; so every call ends with exactly one line.

Never patient data: records are built field by field from the verdict and the decoder's whitelisted
facts — the DICOM dataset itself never reaches this module, so patient name, ID, birth date or
any other PHI cannot end up here. The SOP Instance UID identifies an image instance (needed to trace
a verdict back to the PACS) and is the only DICOM identifier written.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import IO


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class AuditLog:
    """Append-only JSON-lines writer, safe to call from several threads; ``path='-'`` is stderr."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        if self.path == "-":
            self._fh: IO[str] = sys.stderr
            self._owned = False
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
            self._owned = True

    def _write(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=False, separators=(",", ":"))
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    @staticmethod
    def _now() -> str:
        return datetime.now(timezone.utc).isoformat(timespec="milliseconds")

    def record_verdict(
        self,
        result,
        *,
        protocol: str,
        model: str,
        version: str,
        bundle_hash: str,
        policy: str | None = None,
        checks: str | None = None,
        bundle_dir: str | None = None,
    ) -> None:
        v = result.verdict
        self._write(
            {
                **self._request(result.request_id, protocol, model, version, bundle_hash),
                "decision": "accepted" if v.accepted else "rejected",
                "reasons": list(v.reasons or []),
                "failed_measures": list(v.failed_measures or []),
                "scores": {str(k): _finite(s) for k, s in (v.scores or {}).items()},
                "label": v.label if v.accepted else None,
                "input_format": result.input_format,
                "sop_instance_uid": result.sop_instance_uid,
                "total_ms": round(float(result.total_ms), 3),
                "policy": policy,
                "checks": checks,
                "bundle_dir": bundle_dir,
            }
        )

    def _request(self, request_id: str, protocol: str, model: str, version: str, bundle_hash: str) -> dict:
        """The fields every request's line starts with."""
        return {
            "time": self._now(),
            "request_id": request_id,
            "protocol": protocol,
            "model": model,
            "version": version,
            "bundle_hash": bundle_hash,
        }

    def record_invalid(
        self, request_id: str, *, protocol: str, model: str, version: str, bundle_hash: str, detail: str
    ) -> None:
        self._write(
            {
                **self._request(request_id, protocol, model, version, bundle_hash),
                "decision": "invalid",
                "reasons": ["INVALID_INPUT"],
                "detail": detail[:500],
            }
        )

    def record_refused(
        self, request_id: str, *, protocol: str, model: str, version: str, bundle_hash: str, status: str, detail: str
    ) -> None:
        self._write(
            {
                **self._request(request_id, protocol, model, version, bundle_hash),
                "decision": "error" if status == "INTERNAL" else "refused",
                "reasons": [],
                "status": status,
                "detail": detail[:500],
            }
        )

    def record_event(self, event: str, **fields) -> None:
        """A transport event (e.g. a DICOM association accepted or rejected): ``time``, ``event`` and the
        caller's fields (AE titles, peer addresses, reasons; never dataset contents). Event lines carry
        no ``decision``, so readers of verdicts skip them."""
        self._write({"time": self._now(), "event": event, **fields})

    def reopen(self) -> None:
        """Close and reopen the file (after logrotate moved it; ``gamguard serve`` does this on SIGHUP)."""
        if not self._owned:
            return
        with self._lock:
            self._fh.close()
            self._fh = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            if self._owned and not self._fh.closed:
                self._fh.close()
