"""Prometheus metrics of the server, on their own registry and HTTP port.

Exposed (all prefixed ``gamguard_``):

* ``requests_total{service,method,code}`` – RPCs by gRPC status code;
* ``verdicts_total{decision}`` – accepted / rejected / invalid;
* ``rejections_total{reason}`` – rejected verdicts by reason (one verdict can have several);
* ``stage_seconds{stage}`` – latency histograms per stage: decode, queue, preprocess/engine/guard
  (as the guard reports them) and total;
* ``batch_size`` – histogram of how many requests shared one engine call;
* ``queue_depth`` – requests waiting for the engine now;
* ``ready`` – 1 once the bundle is loaded, verified and self-tested;
* drift monitor (:mod:`gamguard.runtime.drift_monitor`), read from the monitor at scrape time:
  ``drift`` (1 once the flag is raised; it stays up until a restart), ``drift_statistic{test}``
  (``rejection_rate`` and ``score_shift`` CUSUMs) against ``drift_threshold``,
  ``drift_check_statistic{check}``, ``drift_rejection_rate{check}`` (``all`` and each enforced check,
  over the last 200 verdicts), ``drift_reference_rate`` (the in-control rate bound), ``drift_alpha``
  and ``drift_verdicts`` (verdicts monitored). Alert rules: ``deploy/prometheus-alerts.yml``.

Each server owns a fresh ``CollectorRegistry`` so several servers (tests, blue/green in one process)
never collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gamguard_requests",
            "RPCs handled, by service, method and gRPC status code",
            ["service", "method", "code"],
            registry=r,
        )
        self.verdicts = Counter(
            "gamguard_verdicts", "Verdicts by decision (accepted, rejected, invalid)", ["decision"], registry=r
        )
        self.rejections = Counter("gamguard_rejections", "Rejected verdicts by reason", ["reason"], registry=r)
        self.stage_seconds = Histogram(
            "gamguard_stage_seconds", "Latency per stage", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "gamguard_batch_size", "Requests per engine call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("gamguard_queue_depth", "Requests waiting for the engine", registry=r)
        self.ready = Gauge("gamguard_ready", "1 when the bundle is loaded, verified and self-tested", registry=r)
        self._http = None
        self._drift: _DriftCollector | None = None
        # ``labels(...)`` builds a key, takes the metric's lock and looks the child up on every call;
        # these hooks run on the server's event loop for every request, so the children are looked up
        # once per label value and kept (label sets are small and fixed: stages, reasons, decisions).
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # hooks used by the data plane and the servicers
    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def observe_result(self, result) -> None:
        v = result.verdict
        self._child(self.verdicts, "accepted" if v.accepted else "rejected").inc()
        for reason in v.reasons or ():
            self._child(self.rejections, reason).inc()
        for stage, ms in result.stages_ms.items():
            self._child(self.stage_seconds, stage).observe(max(0.0, float(ms)) / 1000.0)
        self._child(self.stage_seconds, "total").observe(result.total_ms / 1000.0)

    def observe_invalid(self) -> None:
        self._child(self.verdicts, "invalid").inc()
        self._child(self.rejections, "INVALID_INPUT").inc()

    def observe_rpc(self, service: str, method: str, code: str) -> None:
        self._child(self.requests, service, method, code).inc()

    def watch_drift(self, monitor) -> None:
        """Expose a :class:`~gamguard.runtime.drift_monitor.DriftMonitor`'s state (read at scrape time,
        so the request path pays nothing for it); a later call replaces the monitor (model reload),
        None removes the drift series (model unloaded)."""
        if self._drift is None:
            self._drift = _DriftCollector()
            self.registry.register(self._drift)
        self._drift.monitor = monitor

    def exposition(self) -> bytes:
        """The text exposition format (what the HTTP endpoint serves)."""
        return generate_latest(self.registry)

    # HTTP endpoint
    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0 picks a free one); returns the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _DriftCollector:
    """Prometheus collector over a drift monitor's :meth:`state`."""

    def __init__(self):
        self.monitor = None  # set by Metrics.watch_drift

    def describe(self):
        return []  # collected lazily: nothing to check at registration

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        monitor = self.monitor
        if monitor is None:
            return
        st = monitor.state()
        yield GaugeMetricFamily(
            "gamguard_drift", "1 once the drift flag is raised (latched until restart)", value=float(st["drift"])
        )
        stat = GaugeMetricFamily("gamguard_drift_statistic", "Drift CUSUM statistics", labels=["test"])
        for name, v in st["statistics"].items():
            stat.add_metric([name], float(v))
        yield stat
        yield GaugeMetricFamily(
            "gamguard_drift_threshold", "Alarm threshold of the drift statistics", value=float(st["threshold"])
        )
        check_stat = GaugeMetricFamily(
            "gamguard_drift_check_statistic", "Rejection-rate CUSUM per check", labels=["check"]
        )
        for name, v in st["per_check_statistic"].items():
            check_stat.add_metric([name], float(v))
        yield check_stat
        rate = GaugeMetricFamily(
            "gamguard_drift_rejection_rate", f"Rejection rate over the last {st['window']} verdicts", labels=["check"]
        )
        if st["window_rejection_rate"] is not None:
            rate.add_metric(["all"], float(st["window_rejection_rate"]))
            for name, v in st["window_per_check"].items():
                rate.add_metric([name], float(v))
        yield rate
        yield GaugeMetricFamily(
            "gamguard_drift_reference_rate", "In-control rejection rate bound p0", value=float(st["reference_rate"])
        )
        yield GaugeMetricFamily("gamguard_drift_alpha", "The bundle's alpha", value=float(st["alpha"]))
        yield GaugeMetricFamily("gamguard_drift_verdicts", "Verdicts the drift monitor has seen", value=float(st["n"]))
