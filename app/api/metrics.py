"""Prometheus metrics: a pure ASGI middleware (no per-request task overhead) + counters."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram

REQUESTS = Counter("modelpress_http_requests_total", "HTTP requests",
                   ["method", "route", "status"])
LATENCY = Histogram("modelpress_http_request_duration_seconds", "HTTP request latency (s)",
                    ["method", "route"],
                    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60))
UPLOAD_BYTES = Counter("modelpress_upload_bytes_total", "Bytes received in uploads", ["kind"])
JOBS_SUBMITTED = Counter("modelpress_jobs_submitted_total", "Jobs accepted", ["queue"])


class MetricsMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            # path_format: the template without convertors ("/v1/jobs/{job_id}").
            path = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)
