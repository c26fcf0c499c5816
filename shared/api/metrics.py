"""GET /metrics (Prometheus text format) and the request metrics of a web service."""

from __future__ import annotations

import os
import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.api.middleware import HttpMiddleware, NotingSend
from shared.api.requests import route_template
from shared.config import Settings
from shared.metrics import HttpMetrics, PipelineCollector


class HttpMetricsMiddleware(HttpMiddleware):
    """Counts and times every request by route template."""

    def __init__(self, app: ASGIApp, *, service: str, http: HttpMetrics) -> None:
        super().__init__(app)
        self.service = service
        self.http = http

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        noting = NotingSend(send)
        try:
            await self.app(scope, receive, noting)
        finally:
            template = route_template(scope) or "unmatched"
            method = scope["method"]
            self.http.requests.labels(self.service, method, template, str(noting.status)).inc()
            self.http.latency.labels(self.service, method, template).observe(
                time.perf_counter() - started
            )


def install_metrics(app: FastAPI, service: str, settings: Settings) -> None:
    """Count and time every request by route template; serve /metrics (no API key: scrape it
    from the deployment's own network, as Prometheus does)."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One of several processes on one port (services/results/__main__.py): requests are
        # counted in the shared directory, and /metrics sums every process's files.
        http = HttpMetrics(CollectorRegistry())
        MultiProcessCollector(registry)
    else:
        http = HttpMetrics(registry)
        ProcessCollector(registry=registry)
    registry.register(PipelineCollector(settings))
    app.add_middleware(HttpMetricsMiddleware, service=service, http=http)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)
