"""Prometheus metrics: HTTP traffic, upstream calls, tokens and cost.

With several worker processes (`python main.py --workers N`), each process
writes its values to files in `PROMETHEUS_MULTIPROC_DIR` and `/metrics` adds
up all of them, so any worker answers for the whole server.
"""

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from app.db.models import UsageRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The service's metrics, in a registry of their own (no process-global state)."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "openai_service_http_requests", "HTTP requests served", ["method", "route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "openai_service_http_request_duration_seconds",
            "Time to serve an HTTP request (to its last byte)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "openai_service_upstream_requests", "Upstream call attempts", ["endpoint", "model", "status"], registry=r
        )
        self.upstream_latency = Histogram(
            "openai_service_upstream_latency_seconds",
            "Upstream call latency",
            ["endpoint", "model", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "openai_service_time_to_first_token_seconds",
            "Time to the first streamed token",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "openai_service_tokens", "Tokens by kind (input includes cached)", ["model", "kind", "source"], registry=r
        )
        self.cost = Counter("openai_service_cost_usd", "Cost in USD of priced calls", ["model"], registry=r)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    def observe_usage(self, record: UsageRecord) -> None:
        """Count one ledger row."""
        status = str(record.status_code)
        self.upstream_requests.labels(record.endpoint, record.model, status).inc()
        self.upstream_latency.labels(record.endpoint, record.model, status).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            self.time_to_first_token.labels(record.endpoint, record.model).observe(record.ttft_ms / 1000)
        for kind, value in (
            ("input", record.input_tokens),
            ("cached", record.cached_tokens),
            ("output", record.output_tokens),
            ("reasoning", record.reasoning_tokens),
        ):
            if value:
                self.tokens.labels(record.model, kind, record.source).inc(value)
        if record.cost_usd:
            self.cost.labels(record.model).inc(float(record.cost_usd))

    def render(self) -> bytes:
        """The exposition text, summed over every worker process in multiprocess mode."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry)
