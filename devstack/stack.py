"""The local stack: real servers, migrations, a demo tenant, and the three service processes.

`up` uses the Postgres, Redis and S3 named by SCREENING_DATABASE_URL, SCREENING_REDIS_URL and
SCREENING_S3_ENDPOINT when they are set, and otherwise starts embedded servers under the stack
directory. Everything it starts is recorded in `state.json`, which `down` reads to stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

from devstack.servers import (
    RunningServer,
    ServerStartError,
    free_port,
    pid_alive,
    start_postgres,
    start_redis,
    start_s3,
    stop_pid,
    stop_server,
    wait_until,
)
from shared.config import (
    CONNECTION_FIELDS,
    Settings,
    settings_from_environ,
    settings_to_environ,
)
from shared.queue import INFERENCE_QUEUES
from shared.vault import new_key

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TENANT = "demo"


@dataclass
class StackState:
    env: dict[str, str]
    servers: list[RunningServer] = field(default_factory=list)
    services: dict[str, int] = field(default_factory=dict)  # name -> pid (= process group)
    commands: dict[str, list[str]] = field(default_factory=dict)
    # Every SCREENING_* variable the services were started with, so a restart matches.
    service_env: dict[str, str] = field(default_factory=dict)

    def metrics_url(self, service: str) -> str:
        """Where a service serves /metrics (the workers' ports are on their command lines)."""
        if service in ("ingest", "results"):
            return f"{self.env[f'SCREENING_{service.upper()}_URL']}/metrics"
        command = self.commands[service]
        return f"http://127.0.0.1:{command[command.index('--metrics-port') + 1]}/metrics"

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {
                    "env": self.env,
                    "servers": [s.to_json() for s in self.servers],
                    "services": self.services,
                    "commands": self.commands,
                    "service_env": self.service_env,
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, path: Path) -> StackState | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        servers = [
            RunningServer(s["name"], s["pid"], s["url"], Path(s["data_dir"]), s.get("ports", {}))
            for s in data["servers"]
        ]
        return cls(
            env=data["env"],
            servers=servers,
            services=data["services"],
            commands=data.get("commands", {}),
            service_env=data.get("service_env", {}),
        )

    def pids(self) -> list[int]:
        return [*self.services.values(), *(s.pid for s in self.servers)]


# Services that print a " ready." line once they serve (the web services answer /healthz).
WORKER_SERVICES = ("worker", "trainer", "gateway")


def _celery_worker(
    python: str, queues: str, hostname: str, metrics_port: str, pool: list[str]
) -> list[str]:
    return [
        *(python, "-m", "celery", "-A", "services.worker.celery_app", "worker"),
        *("-Q", queues, *pool, "--hostname", hostname, "--metrics-port", metrics_port),
        *("--loglevel", "INFO", "--without-gossip", "--without-mingle"),
    ]


def service_commands(python: str) -> dict[str, list[str]]:
    """How each service process is started, with ports filled in later."""
    return {
        "ingest": [
            python,
            "-m",
            "uvicorn",
            "--factory",
            "services.ingest.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            "{ingest_port}",
            "--no-access-log",
        ],
        # Several processes (`results_workers`): polling is most of what clients do.
        "results": [python, "-m", "services.results", "--port", "{results_port}"],
        "worker": _celery_worker(
            python,
            INFERENCE_QUEUES,
            "worker-{worker_port}@%h",
            "{worker_metrics_port}",
            ["--concurrency", "1", "--pool", "prefork"],
        ),
        # The DICOM node PACS send studies to (C-STORE); its port is in .stack/env.
        "gateway": [
            *(python, "-m", "services.gateway", "--host", "127.0.0.1"),
            *("--port", "{gateway_port}", "--metrics-port", "{gateway_metrics_port}"),
        ],
        # Training runs for minutes to hours: its own process, so screening goes on meanwhile.
        # The solo pool runs the task in this process (no fork), and one run at a time.
        "trainer": _celery_worker(
            python,
            "training",
            "trainer-{worker_port}@%h",
            "{trainer_metrics_port}",
            ["--pool", "solo"],
        ),
    }


def start_service(name: str, command: list[str], env: Mapping[str, str], log_dir: Path) -> int:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def stop_service(pid: int, *, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Signal a service and wait until it is gone, then SIGKILL anything of its group left.

    A graceful signal goes to the leader alone, as `docker stop` does: Celery's main process
    then lets its pool child finish the running chunk (a SIGTERM to the whole group would
    kill the child mid-chunk). SIGKILL goes to the whole group.
    """
    with contextlib.suppress(ProcessLookupError):
        if sig == signal.SIGKILL:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    stop_pid(pid, timeout=timeout)  # escalates to SIGKILL only if `sig` did not end it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # any child the leader left behind


def stop_services(pids: list[int]) -> None:
    """Stop several services at once: each is told first, then each is waited for, so the
    stack stops in the time of its slowest service rather than the sum of them all."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        stop_service(pid)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def prepare_infrastructure(settings: Settings) -> str:
    """Migrate the schema, create the bucket, register a model, make the demo tenant's key."""
    from alembic import command
    from alembic.config import Config

    from shared.db.base import session_scope
    from shared.ml.registry import ensure_active_model, shipped_model_dir
    from shared.storage import ObjectStore
    from shared.tenants import create_tenant, issue_api_key

    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", settings.database_url)
    command.upgrade(config, "head")
    store = ObjectStore(settings)
    store.ensure_bucket()
    with session_scope(settings.database_url) as session:
        ensure_active_model(session=session, store=store, shipped=shipped_model_dir(settings))
        from sqlalchemy import select

        from shared.db.models import Tenant

        tenant = session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT))
        tenant = tenant or create_tenant(session=session, name=DEMO_TENANT)
        return issue_api_key(session=session, tenant=tenant).secret


def local_vault_key_file(stack_dir: Path) -> Path:
    """The local stack's identity vault key: made once, readable by its owner only."""
    path = stack_dir / "vault-keys.json"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(json.dumps({"local-1": new_key()}))
    return path


def up(
    stack_dir: Path, *, environ: Mapping[str, str] | None = None, python: str = sys.executable
) -> StackState:
    """Start the stack (idempotent: a running stack is returned as it is)."""
    environ = dict(os.environ if environ is None else environ)
    stack_dir = stack_dir.resolve()
    stack_dir.mkdir(parents=True, exist_ok=True)
    state_path = stack_dir / "state.json"
    existing = StackState.load(state_path)
    if existing is not None:
        if all(pid_alive(pid) for pid in existing.pids()):
            return existing
        down(stack_dir)

    base = settings_from_environ(environ)
    state = StackState(env={})
    try:
        database_url = environ.get("SCREENING_DATABASE_URL")
        if not database_url:
            state.servers.append(start_postgres(stack_dir / "postgres"))
            database_url = state.servers[-1].url
        redis_url = environ.get("SCREENING_REDIS_URL")
        if not redis_url:
            state.servers.append(start_redis(stack_dir / "redis"))
            redis_url = state.servers[-1].url
        s3_endpoint = environ.get("SCREENING_S3_ENDPOINT")
        if not s3_endpoint:
            state.servers.append(
                start_s3(
                    stack_dir / "s3", access_key=base.s3_access_key, secret_key=base.s3_secret_key
                )
            )
            s3_endpoint = state.servers[-1].url
        ports = {
            "ingest_port": free_port(),
            "results_port": free_port(),
            "worker_port": free_port(),
            "worker_metrics_port": free_port(),
            "trainer_metrics_port": free_port(),
            "gateway_port": free_port(),
            "gateway_metrics_port": free_port(),
        }
        vault_key_file = base.vault_key_file
        if base.vault_keys is None and vault_key_file is None:
            vault_key_file = local_vault_key_file(stack_dir)
        settings = base.model_copy(
            update={
                "vault_key_file": vault_key_file,
                "database_url": database_url,
                "redis_url": redis_url,
                "s3_endpoint": s3_endpoint,
                "ingest_url": f"http://127.0.0.1:{ports['ingest_port']}",
                "results_url": f"http://127.0.0.1:{ports['results_port']}",
                "dicom_host": "127.0.0.1",
                "dicom_port": ports["gateway_port"],
                "dicom_ae_title": base.dicom_ae_title,
            }
        )
        api_key = prepare_infrastructure(settings)
        state.env = {
            **settings_to_environ(
                settings,
                ("ingest_url", "results_url", "dicom_host", "dicom_port", "dicom_ae_title"),
            ),
            **(
                {"SCREENING_VAULT_KEY_FILE": str(settings.vault_key_file)}
                if settings.vault_key_file is not None
                else {}
            ),
            "SCREENING_API_KEY": api_key,
            **settings_to_environ(settings, CONNECTION_FIELDS),
        }
        state.service_env = {
            **{k: v for k, v in environ.items() if k.startswith("SCREENING_")},
            **state.env,
        }
        service_env = {**environ, **state.service_env, "PYTHONUNBUFFERED": "1"}
        logs = stack_dir / "logs"
        for name, template in service_commands(python).items():
            (logs / f"{name}.log").unlink(missing_ok=True)
            state.commands[name] = [part.format(**ports) for part in template]
            state.services[name] = start_service(name, state.commands[name], service_env, logs)
        state.save(state_path)
        for name in state.services:
            wait_ready(state, name, logs, ready_lines_before=0)
    except BaseException:
        state.save(state_path)
        down(stack_dir)
        raise
    write_env_file(stack_dir / "env", state.env)
    return state


def _ready_lines(log: Path) -> int:
    return log.read_text(errors="replace").count(" ready.") if log.exists() else 0


def wait_ready(state: StackState, name: str, logs: Path, *, ready_lines_before: int) -> None:
    """Wait for a service: /healthz for the web services, a new "ready." line for a worker."""
    log = logs / f"{name}.log"
    if name in WORKER_SERVICES:
        wait_until(lambda: _ready_lines(log) > ready_lines_before, timeout=120, what=name, log=log)
    else:
        health_url = f"{state.env[f'SCREENING_{name.upper()}_URL']}/healthz"
        wait_until(partial(_http_ok, health_url), timeout=60, what=f"{name} service", log=log)


def kill_service(stack_dir: Path, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send `sig` to a service's whole process group and wait until its leader is gone."""
    state = StackState.load(stack_dir.resolve() / "state.json")
    assert state is not None, "no stack running"
    stop_service(state.services[name], sig=sig, timeout=120)


def start_service_again(
    stack_dir: Path, name: str, *, overrides: Mapping[str, str] | None = None
) -> int:
    """Start a stopped service with its recorded command; returns the new pid once ready.

    `overrides` (SCREENING_* variables) apply to this start only, e.g. a worker at another
    batch size for a benchmark.
    """
    stack_dir = stack_dir.resolve()
    state = StackState.load(stack_dir / "state.json")
    assert state is not None, "no stack running"
    logs = stack_dir / "logs"
    before = _ready_lines(logs / f"{name}.log")
    env = {**os.environ, **state.service_env, **(overrides or {}), "PYTHONUNBUFFERED": "1"}
    state.services[name] = start_service(name, state.commands[name], env, logs)
    state.save(stack_dir / "state.json")
    wait_ready(state, name, logs, ready_lines_before=before)
    return state.services[name]


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    lines = [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    path.write_text("\n".join(lines) + "\n")


def down(stack_dir: Path) -> list[int]:
    """Stop everything `up` recorded; returns the pids still alive afterwards (none, normally)."""
    state_path = stack_dir / "state.json"
    state = StackState.load(state_path)
    if state is None:
        return []
    stop_services(list(state.services.values()))
    for server in reversed(state.servers):
        stop_server(server)
    survivors = [pid for pid in state.pids() if pid_alive(pid)]
    if not survivors:
        state_path.unlink()
        (stack_dir / "env").unlink(missing_ok=True)
    return survivors


__all__ = ["ServerStartError", "StackState", "down", "up"]
