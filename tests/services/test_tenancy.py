"""Every /v1 route of both services, walked from their route tables (so new routes are too)."""

from __future__ import annotations

import re
import time

import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from devstack.servers import free_port, wait_until
from services.ingest.app import create_app as create_ingest
from services.results.app import create_app as create_results
from shared.config import Settings
from shared.db.models import (
    Evaluation,
    ExportDelivery,
    ExportDeliveryStatus,
    Scope,
    TrainingRun,
)
from shared.deliveries import add_destination
from tests.factories import make_batch, make_image, make_model_version, make_tenant
from tests.helpers import auth

APPS = {"ingest": create_ingest, "results": create_results}
# Model versions belong to the deployment, not to a tenant (docs/security.md says so): every
# tenant may read them.
DEPLOYMENT_WIDE = {"/v1/models/{version_id}", "/v1/models/{version_id}/shadow"}


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
    # Every scope, the erase scope included: scopes never stand in for tenant isolation.
    _, intruder_key = make_tenant(session, scopes=list(Scope))
    batch = make_batch(session, owner)
    image = make_image(session, batch)
    run = TrainingRun(tenant_id=owner.id, name="run", hyperparameters={}, seed=0)
    session.add(run)
    destination = add_destination(
        session=session, tenant_id=owner.id, name="pacs", url="https://pacs.example/dicom-web"
    )
    delivery = ExportDelivery(
        tenant_id=owner.id,
        batch_id=batch.id,
        study_id=image.study_id,
        destination_id=destination.id,
        status=ExportDeliveryStatus.DEAD,
    )
    session.add(delivery)
    evaluation = Evaluation(tenant_id=owner.id, model_version_ids=[])
    session.add(evaluation)
    session.commit()
    ids = {
        "evaluation_id": str(evaluation.id),
        "version_id": str(make_model_version(session).id),
        "batch_id": str(batch.id),
        "image_id": str(image.id),
        "run_id": str(run.id),
        "exam_id": str(image.study_id),
        "delivery_id": str(delivery.id),
    }
    walked = 0
    for service, method, path in _routes(settings):
        names = re.findall(r"\{([a-z_]+)\}", path)
        if not names or path in DEPLOYMENT_WIDE:
            continue
        url = path.format(**{name: ids[name] for name in names})
        kwargs = {}
        if path.endswith("/images") and method == "POST":
            kwargs["files"] = [("files", ("x.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64, "image/png"))]
        if path.endswith("/operating-point") and method == "PUT":
            # The version is everyone's; the evaluation named is the owner's.
            kwargs["json"] = {
                "evaluation_id": ids["evaluation_id"],
                "target": "sensitivity",
                "value": 0.9,
            }
        if path.endswith("/outcome"):
            kwargs["json"] = {
                "truth": "malignant",
                "breast": "left",
                "source": "biopsy",
                "date": "2026-10-02",
            }
        with TestClient(APPS[service](settings)) as client:
            response = client.request(method, url, headers=auth(intruder_key), **kwargs)
        assert response.status_code == 404, (service, method, path, response.text)
        assert response.json()["error"]["code"].endswith("_not_found")
        walked += 1
    assert walked >= 8


def test_each_key_is_rate_limited_on_its_own_with_retry_after(
    settings: Settings, session: Session
) -> None:
    limited = settings.model_copy(update={"rate_limit_per_minute": 5})
    _, busy_key = make_tenant(session)
    _, quiet_key = make_tenant(session)
    apps = create_results(limited), create_ingest(limited)
    now = [time.time() // 60 * 60 + 10.0]  # 10 s into a one-minute window, for both services
    for app in apps:
        app.state.clock = lambda: now[0]
    with TestClient(apps[0]) as results, TestClient(apps[1]) as ingest:
        # The count is per key across services: 3 results reads and 2 ingest calls use it up.
        statuses = [
            results.get("/v1/batches", headers=auth(busy_key)).status_code for _ in range(3)
        ]
        statuses += [
            ingest.post("/v1/batches", json={"name": "b"}, headers=auth(busy_key)).status_code
            for _ in range(2)
        ]
        assert statuses == [200, 200, 200, 201, 201]
        refused = results.get("/v1/batches", headers=auth(busy_key))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.headers["Retry-After"] == "51"  # the window ends 50 s from now, + 1
        assert results.get("/v1/batches", headers=auth(quiet_key)).status_code == 200
        now[0] += 60  # the next window
        assert results.get("/v1/batches", headers=auth(busy_key)).status_code == 200


def test_status_polls_cost_a_tenth_of_a_request(settings: Settings, session: Session) -> None:
    limited = settings.model_copy(
        update={"rate_limit_per_minute": 2, "rate_limit_polls_per_request": 10}
    )
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    app = create_results(limited)
    now = [time.time() // 60 * 60 + 10.0]
    app.state.clock = lambda: now[0]
    with TestClient(app) as results:
        status = f"/v1/batches/{batch.id}"
        first = results.get(status, headers=auth(key))  # a plain read: a whole request
        assert first.status_code == 200
        poll = {**auth(key), "If-None-Match": first.headers["ETag"]}
        # The other request's worth of budget buys ten conditional polls (and long polls).
        answers = [results.get(status, headers=poll).status_code for _ in range(9)]
        answers.append(results.get(status, params={"wait": 0.01}, headers=auth(key)).status_code)
        assert answers == [304] * 9 + [200]
        refused = results.get(status, headers=poll)
        assert refused.status_code == 429
        assert "1/10" in refused.json()["error"]["message"]
        # If-None-Match on a page is no poll: a page costs a whole request.
        now[0] += 60
        page = {**auth(key), "If-None-Match": first.headers["ETag"]}
        assert results.get(f"{status}/results", headers=page).status_code == 200
        assert results.get(f"{status}/results", headers=page).status_code == 200
        assert results.get(status, headers=poll).status_code == 429


def test_a_cached_key_is_counted_on_the_event_loop(settings: Settings, session: Session) -> None:
    """A key the results process has cached is charged by the loop's own Redis client, with
    no worker thread: here the thread path's Redis is unreachable (it lets requests through),
    so the 429 can only come from the loop's count."""
    limited = settings.model_copy(update={"rate_limit_per_minute": 3})
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    app = create_results(limited)
    app.state.redis = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    now = time.time() // 60 * 60 + 10.0
    app.state.clock = lambda: now
    with TestClient(app) as results:
        changes = app.state.batch_changes
        wait_until(changes.listening.is_set, timeout=10, what="the key cache trusted", log=None)
        status = f"/v1/batches/{batch.id}"
        # Not cached yet: looked up in a worker thread, whose Redis is down: let through.
        assert results.get(status, headers=auth(key)).status_code == 200
        answers = [results.get(status, headers=auth(key)).status_code for _ in range(4)]
        assert answers == [200, 200, 200, 429]
