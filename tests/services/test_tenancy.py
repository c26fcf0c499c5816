"""Every /v1 route of both services, walked from their route tables (so new routes are too)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.ingest.app import create_app as create_ingest
from services.results.app import create_app as create_results
from shared.config import Settings
from tests.factories import make_batch, make_image, make_tenant
from tests.services.conftest import auth

APPS = {"ingest": create_ingest, "results": create_results}


def _routes(settings: Settings) -> list[tuple[str, str, str]]:
    """(service, METHOD, path) of every /v1 operation in each service's OpenAPI schema."""
    found = []
    for service, factory in APPS.items():
        for path, operations in factory(settings).openapi()["paths"].items():
            if path.startswith("/v1"):
                found.extend((service, method.upper(), path) for method in sorted(operations))
    return found


def test_the_walk_covers_the_known_routes(settings: Settings) -> None:
    paths = {path for _, _, path in _routes(settings)}
    assert {
        "/v1/batches/{batch_id}/images",
        "/v1/batches/{batch_id}/results",
        "/v1/images/{image_id}",
    } <= paths


def test_every_route_refuses_requests_without_a_key(settings: Settings) -> None:
    for service, method, path in _routes(settings):
        with TestClient(APPS[service](settings)) as client:
            url = re.sub(r"\{[a-z_]+\}", "00000000-0000-7000-8000-000000000000", path)
            response = client.request(method, url)
        assert response.status_code == 401, (service, method, path)


def test_every_route_with_an_id_hides_another_tenants_rows(
    settings: Settings, session: Session
) -> None:
    owner, _ = make_tenant(session)
    _, intruder_key = make_tenant(session)
    batch = make_batch(session, owner)
    image = make_image(session, batch)
    ids = {"batch_id": str(batch.id), "image_id": str(image.id)}
    walked = 0
    for service, method, path in _routes(settings):
        names = re.findall(r"\{([a-z_]+)\}", path)
        if not names:
            continue
        url = path.format(**{name: ids[name] for name in names})
        kwargs = {}
        if path.endswith("/images") and method == "POST":
            kwargs["files"] = [("files", ("x.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64, "image/png"))]
        with TestClient(APPS[service](settings)) as client:
            response = client.request(method, url, headers=auth(intruder_key), **kwargs)
        assert response.status_code == 404, (service, method, path, response.text)
        assert response.json()["error"]["code"].endswith("_not_found")
        walked += 1
    assert walked >= 5
