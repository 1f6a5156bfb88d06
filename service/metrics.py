"""Prometheus metrics of one app instance, and the ASGI middleware that counts requests.

Each app gets its own `CollectorRegistry`, so several apps in one process (tests) do not
collide. Route labels are the route's template (`/predict`), never the raw path, so a
scan of random URLs cannot blow up the label set.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PROMETHEUS_CONTENT_TYPE", "Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class Metrics:
    """The service's metrics, registered in a private registry."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they only add noise here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "m2_requests", "HTTP requests by route, method and status",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "m2_request_duration_seconds", "HTTP request latency by route",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("m2_queue_depth", "predictions waiting for a batch", registry=r)
        self.queue_seconds = Histogram(
            "m2_queue_seconds", "time from enqueue to batch start", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "m2_batch_size", "requests per model call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "m2_model_seconds", "time of one batched model call", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "m2_rejected", "predictions refused before the model", ["reason"], registry=r
        )
        self.store_items = Gauge("m2_store_items", "predictions held in the store", registry=r)
        self.store_bytes = Gauge("m2_store_bytes", "bytes held in the store", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP response by route template and status, times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["received"] = start  # request.state.received
        status = 500  # if the app dies before answering, that is what the client sees

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "<unmatched>"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
