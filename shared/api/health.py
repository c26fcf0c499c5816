"""Liveness and readiness: /healthz (process up), /readyz (dependencies reachable)."""

from __future__ import annotations

from collections.abc import Callable

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from shared.api.errors import error_body
from shared.config import Settings
from shared.db.base import get_engine
from shared.storage import ObjectStore


def _check_postgres(settings: Settings) -> None:
    with get_engine(settings.database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


def _check_s3(settings: Settings) -> None:
    ObjectStore(settings).ping()


CHECKS: dict[str, Callable[[Settings], None]] = {
    "postgres": _check_postgres,
    "redis": _check_redis,
    "object_storage": _check_s3,
}

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    results: dict[str, str] = {}
    for name, check in CHECKS.items():
        try:
            check(settings)
            results[name] = "ok"
        except Exception as err:  # readiness reports any failure rather than raising it
            results[name] = f"unreachable: {type(err).__name__}: {err}"[:300]
    if all(v == "ok" for v in results.values()):
        return JSONResponse({"status": "ready", "checks": results})
    return JSONResponse(
        error_body("not_ready", "a dependency is unreachable", {"checks": results}),
        503,
        headers={"Retry-After": "5"},
    )
