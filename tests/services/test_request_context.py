"""Every request has an id (the caller's when plain), answered back and bound to one
structured access-log line with the route template, status and the ids in the path."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from shared.logs import JsonFormatter
from tests.factories import make_tenant
from tests.helpers import auth

GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, Any]]]:
    """Access-log records as the services' JSON formatter writes them, at the time of the
    call (the request's context is gone afterwards)."""
    lines: list[dict[str, Any]] = []
    formatter = JsonFormatter("ingest")

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    logger = logging.getLogger("access")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_requests_get_ids_and_one_access_line_each(
    ingest: TestClient, session: Session, access_lines: list[dict[str, Any]]
) -> None:
    _, key = make_tenant(session)
    created = ingest.post(
        "/v1/batches", json={"name": "b"}, headers={**auth(key), "X-Request-ID": "client-42"}
    )
    batch_id = created.json()["id"]
    closed = ingest.post(f"/v1/batches/{batch_id}/close", headers=auth(key))
    hostile = ingest.get("/healthz", headers={"X-Request-ID": "x" * 65})
    missing = ingest.get("/no/such/route")

    assert created.headers["X-Request-ID"] == "client-42"
    for response in (closed, hostile, missing):
        assert GENERATED_ID.match(response.headers["X-Request-ID"])
    assert [line["message"].split()[:3] for line in access_lines] == [
        ["POST", "/v1/batches", "201"],
        ["POST", "/v1/batches/{batch_id}/close", "200"],
        ["GET", "/healthz", "200"],
        ["GET", "/no/such/route", "404"],
    ]
    assert [line["request_id"] for line in access_lines] == [
        r.headers["X-Request-ID"] for r in (created, closed, hostile, missing)
    ]
    assert access_lines[1]["batch_id"] == batch_id
    assert "batch_id" not in access_lines[0]
