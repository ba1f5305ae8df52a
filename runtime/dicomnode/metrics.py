"""Prometheus metrics of the DICOM path, on the same registry (and HTTP endpoint) as the server's.

All prefixed ``gamguard_dicom_``; labels carry AE-level facts only (outcome, status, destination as
``AET@host_port``), never anything from a dataset:

* ``associations_total{result}`` — accepted / rejected / released / aborted;
* ``active_associations`` — associations open now;
* ``requests_total{service,status}`` — C-ECHO and C-STORE answers by outcome (success, invalid,
  overloaded, not_ready, refused, error);
* ``results_pending`` — received images whose SR/SC are not built yet (the journal);
* ``verdicts_deferred_total`` — answered images whose verification failed after the answer (overload,
  deadline, shutdown): the results builder derives their verdicts again from the journal;
* ``results_built_total{kind}`` — SRs and Secondary Captures written to the outbox;
* ``forward_queue_depth{destination}`` — objects waiting for a destination;
* ``forwarded_total{destination}`` / ``forward_failures_total{destination,kind}`` — C-STOREs to
  destinations that succeeded / failed (kind: connect, status).

The verdicts themselves are counted by the server's ``gamguard_verdicts_total`` etc. (the DICOM path
goes through the same data plane).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class DicomMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.associations = Counter(
            "gamguard_dicom_associations", "DICOM associations by outcome", ["result"], registry=r
        )
        self.active = Gauge("gamguard_dicom_active_associations", "DICOM associations open now", registry=r)
        self.requests = Counter(
            "gamguard_dicom_requests", "C-ECHO / C-STORE requests by outcome", ["service", "status"], registry=r
        )
        self.results_pending = Gauge(
            "gamguard_dicom_results_pending", "Received images whose SR/SC are not built yet", registry=r
        )
        self.verdicts_deferred = Counter(
            "gamguard_dicom_verdicts_deferred",
            "Answered images whose verdict is derived again from the journal (verification failed after the answer)",
            registry=r,
        )
        self.results_built = Counter(
            "gamguard_dicom_results_built", "Result objects written to the outbox", ["kind"], registry=r
        )
        self.queue_depth = Gauge(
            "gamguard_dicom_forward_queue_depth", "Objects waiting for a destination", ["destination"], registry=r
        )
        self.forwarded = Counter(
            "gamguard_dicom_forwarded", "Objects stored at a destination", ["destination"], registry=r
        )
        self.forward_failures = Counter(
            "gamguard_dicom_forward_failures", "Failed forwards by kind", ["destination", "kind"], registry=r
        )
