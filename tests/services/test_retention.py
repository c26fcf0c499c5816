"""Retention (shared/retention.py), with the clock injected: a tenant's completed batches
lose their images' objects after image_retention_days (rows and results stay, and say so)
and are erased whole after result_retention_days; exactly what is due goes, nothing else,
in chunks, and a second round finds nothing."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cli.main import main
from devstack.synth import SynthImage
from services.worker.periodic import purge_what_is_due
from shared import retention
from shared.config import Settings, get_settings
from shared.db.base import utcnow
from shared.db.models import Batch, Image, Tenant
from shared.erasure import image_object_keys
from shared.retention import purge_due, set_retention
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, screen_everything, upload_batch


def _screened_batch(
    ingest: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    key: str,
    paths: list[Path],
    completed_days_ago: float,
) -> str:
    batch, _ = upload_batch(ingest, key, paths, name=f"{completed_days_ago} days")
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    screen_everything(session, settings, store)
    session.execute(
        update(Batch)
        .where(Batch.id == uuid.UUID(batch["id"]))
        .values(completed_at=utcnow() - timedelta(days=completed_days_ago))
    )
    session.commit()
    return str(batch["id"])


def _objects_of(session: Session, store: ObjectStore, batch_id: str) -> list[bool]:
    images = session.scalars(select(Image).where(Image.batch_id == uuid.UUID(batch_id))).all()
    assert images
    return [store.exists(k) for k in image_object_keys(store, images)]


def test_retention_purges_exactly_what_is_due_and_says_so(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(retention, "IMAGES_PER_CHUNK", 3)  # four images: two chunks
    site, key = make_tenant(session)
    other, other_key = make_tenant(session)
    set_retention(session, site, image_days=30, result_days=365)
    session.commit()
    paths = [i.path for i in exam]
    due = _screened_batch(ingest, session, settings, store, key, paths, 40)
    recent = _screened_batch(ingest, session, settings, store, key, paths, 10)
    expired = _screened_batch(ingest, session, settings, store, key, paths, 400)
    other_old = _screened_batch(ingest, session, settings, store, other_key, paths, 400)
    assert all(_objects_of(session, store, due))  # preview and heatmaps written

    report = purge_due(settings.database_url, store, now=utcnow())
    assert (report.batches_erased, report.images_purged) == (1, 4)

    session.expire_all()
    assert not any(_objects_of(session, store, due))
    assert all(_objects_of(session, store, recent))
    assert all(_objects_of(session, store, other_old))  # that tenant keeps everything
    assert results.get(f"/v1/batches/{expired}", headers=auth(key)).status_code == 404
    assert session.get(Batch, uuid.UUID(due)).images_purged_at is not None  # type: ignore[union-attr]
    assert session.get(Batch, uuid.UUID(recent)).images_purged_at is None  # type: ignore[union-attr]
    status = results.get(f"/v1/batches/{due}", headers=auth(key)).json()
    assert status["images_purged_at"] is not None
    assert (
        results.get(f"/v1/batches/{recent}", headers=auth(key)).json()["images_purged_at"] is None
    )

    # The purged batch's results stay, and say the images are gone.
    page = results.get(f"/v1/batches/{due}/results", headers=auth(key)).json()["items"]
    assert [r["status"] for r in page] == ["done"] * 4
    assert all(r["score"] is not None and r["image_purged_at"] for r in page)
    assert all(r["heatmap_url"] is None for r in page)
    gone = results.get(f"/v1/images/{page[0]['id']}/heatmap.png", headers=auth(key))
    assert gone.status_code == 410
    assert gone.json()["error"]["code"] == "image_purged"
    exams = results.get(f"/v1/batches/{due}/exams", headers=auth(key)).json()["items"]
    assert all(i["image_purged_at"] for i in exams[0]["images"])
    kept = results.get(f"/v1/batches/{recent}/results", headers=auth(key)).json()["items"]
    assert all(r["image_purged_at"] is None and r["heatmap_url"] for r in kept)
    results.post("/viewer/login", data={"api_key": key})
    exam_page = results.get(f"/viewer/exams/{exams[0]['id']}").text
    assert "image removed on" in exam_page

    # Nothing is due any more: the next round (the workers' job, real clock) does nothing.
    again = purge_due(settings.database_url, store, now=utcnow())
    assert (again.batches_erased, again.images_purged, again.objects) == (0, 0, 0)
    assert purge_what_is_due(settings) == 0
    assert other.image_retention_days is None


def test_results_cannot_be_kept_shorter_than_images(session: Session) -> None:
    tenant, _ = make_tenant(session)
    with pytest.raises(ValueError, match="shorter than images"):
        set_retention(session, tenant, image_days=30, result_days=7)
    with pytest.raises(ValueError, match="at least 1"):
        set_retention(session, tenant, image_days=0, result_days=None)


def test_the_operator_sets_retention_from_the_command_line(
    settings: Settings,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SCREENING_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        tenant, _ = make_tenant(session, "retained")
        assert main(["admin", "tenant", "retention", "retained", "--images-days", "90"]) == 0
        assert main(["admin", "tenant", "retention", "retained", "--results-days", "3650"]) == 0
        shown = capsys.readouterr().out
        assert "images (files, previews, heatmaps): 90 days after the batch completed" in shown
        assert "results and rows: 3650 days after the batch completed" in shown
        assert main(["admin", "tenant", "retention", "retained", "--results-days", "30"]) == 2
        assert "cannot be kept shorter than images" in capsys.readouterr().err
        session.expire_all()
        kept = session.get_one(Tenant, tenant.id)
        assert (kept.image_retention_days, kept.result_retention_days) == (90, 3650)
        assert main(["admin", "tenant", "retention", "retained", "--forever"]) == 0
        session.expire_all()
        assert session.get_one(Tenant, tenant.id).image_retention_days is None
    finally:
        get_settings.cache_clear()
