"""The viewer's pages are behind a login and show a tenant only its own rows."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from shared.config import Settings
from shared.db.models import Image, Prediction, Study
from shared.storage import Keys, ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, screen_everything, upload_batch


def test_viewer_needs_a_login_and_hides_other_tenants(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    _, other_key = make_tenant(session)
    batch, _ = upload_batch(ingest, key, [s.path for s in exam], name="mine")
    screen_everything(session, settings, store)
    study = session.scalars(select(Study)).one()
    image = session.scalars(select(Image)).first()
    assert image is not None
    pages = [
        "/viewer/",
        f"/viewer/batches/{batch['id']}",
        f"/viewer/exams/{study.id}",
        f"/viewer/images/{image.id}/view.png",
        f"/viewer/images/{image.id}/heatmap.png",
    ]
    for page in pages:  # no login: sent to the form
        response = results.get(page, follow_redirects=False)
        assert (response.status_code, response.headers["location"]) == (303, "/viewer/login")

    refused = results.post("/viewer/login", data={"api_key": "msk_nope"}, follow_redirects=False)
    assert refused.status_code == 401
    results.post("/viewer/login", data={"api_key": other_key}, follow_redirects=False)
    assert "mine" not in results.get("/viewer/").text
    assert results.get(f"/viewer/exams/{study.id}").status_code == 404
    assert results.get(f"/viewer/images/{image.id}/view.png").status_code == 404
    assert results.get(f"/viewer/images/{image.id}/heatmap.png").status_code == 404
    assert results.get(f"/viewer/batches/{batch['id']}/progress.json").status_code == 404

    logged_in = results.post("/viewer/login", data={"api_key": key}, follow_redirects=False)
    assert logged_in.status_code == 303
    cookie = logged_in.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "mine" in results.get("/viewer/").text
    exam_page = results.get(f"/viewer/exams/{study.id}")
    assert exam_page.status_code == 200
    assert exam_page.text.count('class="mammogram"') == 4
    preview = results.get(f"/viewer/images/{image.id}/view.png")
    assert (preview.status_code, preview.headers["content-type"]) == (200, "image/png")
    progress = results.get(f"/viewer/batches/{batch['id']}/progress.json").json()
    assert progress == {"status": "open", "total": 4, "finished": 4}


def test_previews_and_heatmaps_are_the_bytes_the_worker_stored(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    upload_batch(ingest, key, [s.path for s in exam[:1]])
    (image,) = session.scalars(select(Image)).all()
    results.post("/viewer/login", data={"api_key": key}, follow_redirects=False)
    # Not screened yet: nothing to show, and nothing is rendered on request.
    assert results.get(f"/viewer/images/{image.id}/view.png").status_code == 404
    screen_everything(session, settings, store)
    (prediction,) = session.scalars(select(Prediction)).all()
    overlay_key = Keys.heatmap_overlay(image.id, prediction.model_version_id)

    stored = {
        f"/viewer/images/{image.id}/view.png": store.get_bytes(Keys.preview(image.id)),
        f"/viewer/images/{image.id}/heatmap.png": store.get_bytes(overlay_key),
        f"/v1/images/{image.id}/heatmap.png": store.get_bytes(overlay_key),
        f"/v1/images/{image.id}/heatmap.png?style=grey": store.get_bytes(prediction.heatmap_key),
    }
    for url, body in stored.items():
        response = results.get(url, headers=auth(key))
        assert (response.status_code, response.content) == (200, body), url

    store.delete(overlay_key)  # e.g. a prediction made before overlays were stored
    missing = results.get(f"/v1/images/{image.id}/heatmap.png", headers=auth(key))
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "heatmap_not_found")
