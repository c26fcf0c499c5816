"""`celery worker --metrics-port N`: /metrics of a worker, served from its main process.

The figures are the pipeline's, read from Postgres and Redis at scrape time
(shared/metrics.py), so they are right however many pool processes screen.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps
from click import Option
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.process_collector import ProcessCollector

from shared.config import get_settings
from shared.metrics import PipelineCollector

log = logging.getLogger(__name__)


class MetricsServer(bootsteps.StartStopStep):  # type: ignore[misc]
    def __init__(self, parent: Any, metrics_port: int = 0, **options: Any) -> None:
        super().__init__(parent, **options)
        self.port = metrics_port

    def start(self, parent: Any) -> None:
        if not self.port:
            return
        registry = CollectorRegistry()
        registry.register(PipelineCollector(get_settings()))
        ProcessCollector(registry=registry)
        start_http_server(self.port, addr="127.0.0.1", registry=registry)
        log.info("metrics on http://127.0.0.1:%d/metrics", self.port)


def install(app: Celery) -> None:
    """Add the --metrics-port option and the step that serves it. Called where the app is
    made: the option must exist before `celery worker` parses its command line."""
    app.user_options["worker"].add(
        Option(["--metrics-port"], type=int, default=0, help="serve /metrics here (0: off)")
    )
    app.steps["worker"].add(MetricsServer)
