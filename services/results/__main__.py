"""`python -m services.results`: the results service in `results_workers` processes.

Polling is most of what clients do, and one Python process answers on one core: uvicorn's
supervisor runs N of them on one port. What they share lives outside them: the rate limit's
counters in Redis, batch changes announced by Postgres to each process's listener, and the
HTTP metrics in a Prometheus multiprocess directory (any process's /metrics sums them all).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import uvicorn
from uvicorn.supervisors import Multiprocess

from services.results.server import NoDelayConfig
from shared.config import Settings, get_settings

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


# Processes per core by default. A process answers one request at a time (its threads share
# one interpreter lock), so a status poll that lands on a process rendering a page of 100
# exams waits for it; with more processes than cores the kernel runs the short request
# beside the long one instead. Measured on 2 cores, 50 pollers, pairs of runs alternated:
# status / pages p99 26-35 / 48-74 ms with 2 processes, 22-29 / 46-58 with 4, 16-24 / 34-43
# with 6, 15-19 / 34-42 with 8 (README "Polling at scale").
WORKERS_PER_CORE = 3
# The default's ceiling: each process keeps its own Postgres connections (see
# `results_database_pool_size`) and about 110 MB of memory.
MAX_DEFAULT_WORKERS = 12


def worker_count(settings: Settings, cores: int | None = None) -> int:
    """`results_workers`, or when it is 0 three per core, at most `MAX_DEFAULT_WORKERS`."""
    if settings.results_workers:
        return settings.results_workers
    return min(WORKERS_PER_CORE * (cores or os.cpu_count() or 1), MAX_DEFAULT_WORKERS)


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m services.results")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-*")
    args = parser.parse_args(argv)
    workers = worker_count(settings)
    if workers > 1 and not os.environ.get(METRICS_DIR_ENV):
        # Set before the workers start: prometheus_client picks its value store on import.
        os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="results-metrics-")
    config = NoDelayConfig(
        "services.results.app:create_server_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=workers,
        access_log=False,
        proxy_headers=args.proxy_headers,
    )
    server = uvicorn.Server(config)
    if workers == 1:
        server.run()
        return
    Multiprocess(config, sockets=[config.bind_socket()]).run()


if __name__ == "__main__":
    main()
