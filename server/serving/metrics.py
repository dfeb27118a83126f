"""Prometheus metrics of the inference service: requests by endpoint and status, latency, errors, texts.

The endpoint label is one of a fixed set (unknown paths count as ``other``), so a client cannot grow the
number of series; no label ever holds a request's text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    def __init__(self, *, endpoints: tuple[str, ...], labels: tuple[str, ...]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.endpoints = frozenset(endpoints)
        self.requests = Counter(
            "privatune_serve_requests", "Requests answered, by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "privatune_serve_errors", "Requests answered with a 4xx or 5xx, by status.", ["status"], registry=r
        )
        self.latency = Histogram(
            "privatune_serve_request_seconds",
            "Seconds from a request's arrival to its response, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.texts = Counter("privatune_serve_texts", "Texts classified.", registry=r)
        info = Gauge("privatune_serve_labels", "The classifier's labels, one series each.", ["label"], registry=r)
        for label in labels:
            info.labels(label=label).set(1)

    def endpoint(self, path: str) -> str:
        return path if path in self.endpoints else "other"

    def observe(self, *, endpoint: str, status: int, seconds: float, texts: int = 0) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(status=str(status)).inc()
        if texts:
            self.texts.inc(texts)
