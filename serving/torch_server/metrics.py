"""Prometheus metrics, correct across gunicorn's worker processes.

Under gunicorn, ``gunicorn_conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
worker starts: every worker then writes its samples to memory-mapped files in
that folder, ``/metrics`` (answered by whichever worker gets the scrape) merges
all of them, and gunicorn's ``child_exit`` hook marks dead workers so their live
gauges disappear. Without the variable (tests with Flask's test client, a plain
``flask run``) the metrics live in this process only.

Series:

- ``mnist_rest_requests_total{endpoint,method,status}``
- ``mnist_rest_request_duration_seconds{endpoint}`` (histogram, until the response is produced)
- ``mnist_rest_batch_size`` (histogram, images per predict request)
- ``mnist_rest_forward_batch_size`` (histogram, images per model forward pass; differs with micro-batching)
- ``mnist_rest_in_flight_requests`` (sum over live workers)
- ``mnist_rest_model_version`` (the highest version each live worker serves, labelled by pid)
- ``mnist_rest_model_events_total{event}`` (loaded, unloaded, refused)
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
ENDPOINTS = ("predict", "status", "metadata", "healthz", "readyz", "metrics", "openapi", "other")
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
_FIXED_PATHS = {"/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics", "/openapi.yaml": "openapi"}


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (never the raw path: that would let callers mint series)."""
    if path.endswith(":predict"):
        return "predict"
    if path.startswith("/v1/models/"):
        return "metadata" if path.endswith("/metadata") else "status"
    return _FIXED_PATHS.get(path, "other")


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


class ServerMetrics:
    """The server's metrics, registered in a private registry (several apps may share a test process)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mnist_rest_requests", "HTTP requests answered, by endpoint, method and status code",
            ["endpoint", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "mnist_rest_request_duration_seconds", "Time from request start until the response is produced",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mnist_rest_batch_size", "Images per predict request", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_batch_size = Histogram(
            "mnist_rest_forward_batch_size", "Images per model forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "mnist_rest_in_flight_requests", "Requests being handled now", multiprocess_mode="livesum", registry=r
        )
        self.model_version = Gauge(
            "mnist_rest_model_version", "Highest model version served by each worker (0: none loaded)",
            multiprocess_mode="liveall", registry=r,
        )  # fmt: skip
        self.model_events = Counter(
            "mnist_rest_model_events", "Model versions loaded, unloaded or refused", ["event"], registry=r
        )
        self._latency_children = {e: self.latency.labels(e) for e in ENDPOINTS}
        self.model_version.set(0)

    def observe_request(self, endpoint: str, method: str, status: str, seconds: float) -> None:
        self.requests.labels(endpoint, method, status).inc()
        self._latency_children[endpoint].observe(seconds)

    def on_model_event(self, event: str, version: int) -> None:
        self.model_events.labels(event).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; merged over all workers in multiprocess mode."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
