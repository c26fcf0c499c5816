"""The container stack cannot run here (no Docker engine), so its shape is checked instead."""

from __future__ import annotations

import importlib
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import build_parser
from shared.queue import INFERENCE_QUEUES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = {name: spec for name, spec in SERVICES.items() if "build" in spec}


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_every_command_points_at_code_that_exists(name: str) -> None:
    command = APP_SERVICES[name]["command"]
    if command[:3] == ["python", "-m", "uvicorn"]:
        module, attribute = _option(command, "--factory").split(":")
        assert callable(getattr(importlib.import_module(module), attribute))
    elif command[:4] == ["celery", "-A", "services.worker.celery_app", "flower"]:
        dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
        assert "monitoring]" in dockerfile  # the worker image installs Flower
        assert "flower" in (ROOT / "pyproject.toml").read_text()
    elif command[0] == "celery":
        assert importlib.util.find_spec(_option(command, "-A")) is not None
        declared = set(_option(command, "-Q").split(","))
        from shared.queue import Queue

        assert declared <= {q.value for q in Queue}
    elif command[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(command[2]) is not None
    elif command[0] == "screening":
        args = build_parser().parse_args(command[1:])
        assert callable(args.func)
    else:
        pytest.fail(f"{name}: unrecognised command {command}")


def test_the_image_copies_every_package_the_project_installs() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    where = find["find"]["where"]
    packages = {p.rstrip("*") for p in find["find"]["include"]}
    for package in packages:
        folder = next(w for w in where if (ROOT / w / package).is_dir())
        top = package if folder == "." else folder
        assert f"COPY {top} {top}" in dockerfile, package


def test_every_dockerfile_target_exists() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for spec in APP_SERVICES.values():
        assert f" AS {spec['build']['target']}" in dockerfile


def test_both_workers_reserve_a_gpu_and_consume_their_queue() -> None:
    for name, queue in (("worker-inference", INFERENCE_QUEUES), ("worker-training", "training")):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]
        assert _option(SERVICES[name]["command"], "-Q") == queue


def test_redis_persists_and_never_evicts() -> None:
    command = SERVICES["redis"]["command"]
    assert _option(command, "--appendonly") == "yes"
    assert _option(command, "--maxmemory-policy") == "noeviction"


def test_every_long_running_service_has_a_health_check() -> None:
    for name, spec in SERVICES.items():
        if spec.get("restart") != "no":
            assert "healthcheck" in spec, name


def test_services_start_after_the_one_shot_init() -> None:
    for name in ("ingest", "results", "worker-inference", "worker-training"):
        assert SERVICES[name]["depends_on"]["init"]["condition"] == (
            "service_completed_successfully"
        )


def test_secrets_have_no_defaults() -> None:
    env = SERVICES["ingest"]["environment"]
    assert env["SCREENING_ENV"] == "prod"
    for name in ("SCREENING_S3_SECRET_KEY", "SCREENING_PATIENT_KEY_SECRET", "SCREENING_VAULT_KEYS"):
        assert ":?" in env[name], f"{name} must be required, not defaulted"
