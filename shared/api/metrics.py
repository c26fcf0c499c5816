"""GET /metrics (Prometheus text format) and the request metrics of a web service."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector
from starlette.concurrency import run_in_threadpool

from shared.config import Settings
from shared.metrics import HttpMetrics, PipelineCollector


def install_metrics(app: FastAPI, service: str, settings: Settings) -> None:
    """Count and time every request by route template; serve /metrics (no API key: scrape it
    from the deployment's own network, as Prometheus does)."""
    registry = CollectorRegistry()
    http = HttpMetrics(registry)
    registry.register(PipelineCollector(settings))
    ProcessCollector(registry=registry)

    @app.middleware("http")
    async def _measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            http.requests.labels(service, request.method, template, str(status)).inc()
            http.latency.labels(service, request.method, template).observe(
                time.perf_counter() - started
            )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)
