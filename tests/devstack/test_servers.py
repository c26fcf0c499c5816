"""The embedded servers are real servers, and stopping them leaves nothing behind."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import redis

from devstack.servers import pid_alive, start_postgres, start_redis, stop_server


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_postgres_starts_on_a_free_port_and_stops_completely(tmp_path: Path) -> None:
    server = start_postgres(tmp_path / "pg", database="probe")
    try:
        url = server.url.replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        assert version is not None
        assert _port_of(server.url) != 5432
    finally:
        stop_server(server)
    assert not pid_alive(server.pid)
    assert not _port_open(_port_of(server.url))


def test_redis_is_append_only_without_eviction(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
        assert _port_of(server.url) != 6379
    finally:
        stop_server(server)
    assert not pid_alive(server.pid)
