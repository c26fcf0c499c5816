"""How the results service listens with several workers."""

from __future__ import annotations

import socket

import yaml
from sqlalchemy.pool import QueuePool

from devstack.stack import REPO_ROOT
from services.results.__main__ import MAX_DEFAULT_WORKERS, worker_count
from services.results.app import create_app
from services.results.server import NoDelayConfig
from shared.config import Settings
from shared.db.base import MAX_OVERFLOW, get_engine


def test_connections_to_a_multi_worker_listener_send_small_writes_at_once() -> None:
    """uvicorn binds a multi-worker socket itself, and asyncio then leaves Nagle's algorithm
    on for its connections: every small response waited 40 ms for a delayed ACK."""
    config = NoDelayConfig("services.results.app:create_app", host="127.0.0.1", port=0, workers=2)
    listener = config.bind_socket()
    listener.listen()  # as the server does when it starts
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        client = socket.create_connection(listener.getsockname()[:2])
        accepted, _ = listener.accept()
        try:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            accepted.close()
            client.close()
    finally:
        listener.close()


def test_a_results_process_keeps_a_pool_for_the_requests_it_answers_at_once(
    settings: Settings,
) -> None:
    """Beyond its pool each request opened a Postgres connection of its own and closed it
    (a backend per request): the results app sizes the pool of its database's engine."""
    sized = settings.model_copy(update={"results_database_pool_size": 7})
    create_app(sized)
    engine = get_engine(sized.database_url)
    assert isinstance(engine.pool, QueuePool)
    assert engine.pool.size() == 7


# What compose's other services may hold (README: 15 each): ingest, gateway, worker, trainer,
# beat, flower.
OTHER_SERVICES_CONNECTIONS = 6 * 15


def test_the_default_runs_more_processes_than_cores_within_a_ceiling() -> None:
    """More processes than cores, so the kernel runs a short status poll beside a page being
    rendered in another process; a ceiling, as each keeps its own Postgres connections (the
    compose stack's max_connections covers it)."""
    default = Settings(results_workers=0)
    assert worker_count(default, cores=1) == 3
    assert worker_count(default, cores=2) == 6
    assert worker_count(default, cores=64) == MAX_DEFAULT_WORKERS
    assert worker_count(Settings(results_workers=5), cores=64) == 5
    per_process = default.results_database_pool_size + MAX_OVERFLOW
    assert MAX_DEFAULT_WORKERS * per_process + OTHER_SERVICES_CONNECTIONS <= (
        _compose_max_connections()
    )


def _compose_max_connections() -> int:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["postgres"]["command"]
    setting = next(arg for arg in command if arg.startswith("max_connections="))
    return int(setting.split("=", 1)[1])
