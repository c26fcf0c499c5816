from __future__ import annotations

import uuid
from datetime import timedelta

import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from services.worker.sweeper import delete_orphans, relay_queued, sweep_once
from services.worker.sweeping import ExporterThread
from shared.config import Settings
from shared.db.base import session_factory, utcnow
from shared.db.models import BatchPriority, ExamExport, ExportStatus, Image, ImageStatus
from shared.lifecycle import claim_images, mark_enqueued
from shared.queue import make_celery
from shared.storage import Keys, ObjectStore
from tests.factories import make_batch, make_image, make_tenant
from tests.helpers import auth, screen_everything, upload_batch, wait_for


def _queue_length(settings: Settings, queue: str = "inference") -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def _expire(session: Session, image: Image) -> None:
    image.lease_expires_at = utcnow() - timedelta(seconds=1)
    session.commit()


def test_expired_lease_is_requeued_and_sent_again(settings: Settings, store: ObjectStore) -> None:
    with session_factory(settings.database_url)() as session:
        tenant, _ = make_tenant(session)
        image = make_image(session, make_batch(session, tenant))
        claim_images(session=session, image_ids=[image.id], lease_s=60)
        session.commit()
        # A live lease is left alone.
        assert sweep_once(settings, store=store, producer=make_celery(settings)).requeued == 0
        _expire(session, image)

        report = sweep_once(settings, store=store, producer=make_celery(settings))

        assert (report.requeued, report.sent) == (1, 1)
        session.refresh(image)
        assert image.status == ImageStatus.QUEUED
        assert image.lease_expires_at is None
        assert image.enqueued_at is not None
    assert _queue_length(settings) == 1


def test_relay_sends_unsent_and_lost_work_but_not_fresh_work(
    session: Session, settings: Settings
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    _unsent, fresh, lost = (make_image(session, batch) for _ in range(3))
    mark_enqueued(session=session, image_ids=[fresh.id, lost.id])
    lost.enqueued_at = utcnow() - timedelta(hours=1)
    session.commit()

    sent = relay_queued(
        session=session, producer=make_celery(settings), chunk_size=10, requeue_after_s=900
    )
    session.commit()

    assert sent == 2
    session.expire_all()
    assert all(i.enqueued_at is not None for i in session.scalars(select(Image)))
    assert _queue_length(settings) == 1  # one task carrying both ids


def test_relayed_work_of_an_urgent_batch_goes_back_to_the_urgent_queue(
    session: Session, settings: Settings
) -> None:
    tenant, _ = make_tenant(session)
    bulk = make_batch(session, tenant, name="bulk")
    urgent = make_batch(session, tenant, name="urgent", priority=BatchPriority.URGENT)
    for batch in (bulk, bulk, urgent):
        make_image(session, batch)
    sent = relay_queued(
        session=session, producer=make_celery(settings), chunk_size=10, requeue_after_s=900
    )
    session.commit()
    assert sent == 3
    assert _queue_length(settings, "inference-urgent") == 1
    assert _queue_length(settings, "inference") == 1


def test_concurrent_sweepers_skip_rows_another_holds(settings: Settings) -> None:
    make = session_factory(settings.database_url)
    with make() as setup:
        tenant, _ = make_tenant(setup)
        batch = make_batch(setup, tenant)
        held, free = make_image(setup, batch), make_image(setup, batch)
    with make() as first, make() as second:
        # The first sweeper holds one row; the second must neither wait nor take it.
        first.execute(select(Image).where(Image.id == held.id).with_for_update())
        sent = relay_queued(
            session=second, producer=make_celery(settings), chunk_size=10, requeue_after_s=900
        )
        second.commit()
        first.rollback()
    assert sent == 1
    with make() as check:
        assert check.get(Image, held.id).enqueued_at is None  # type: ignore[union-attr]
        assert check.get(Image, free.id).enqueued_at is not None  # type: ignore[union-attr]


def test_orphaned_objects_are_deleted_and_everything_else_kept(
    session: Session, store: ObjectStore
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    kept, orphan = (Keys.image(tenant.id, batch.id, uuid.uuid4()) for _ in range(2))
    image = make_image(session, batch, object_key=kept)
    gone_image, gone_study, version = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    # Derived objects of an image or study that is there, model files, and keys that name
    # no image are kept; those of an image or study that is gone (erased) are not.
    owned = [
        Keys.model_checkpoint("some-model"),
        Keys.preview(image.id),
        Keys.heatmap(image.id, version),
        Keys.dicom_result(image.study_id, "report", None),
        f"{Keys.PREVIEWS}not-an-image.png",
    ]
    unowned = [
        orphan,
        Keys.preview(gone_image),
        Keys.heatmap(gone_image, version),
        Keys.heatmap_overlay(gone_image, version),
        Keys.dicom_result(gone_study, "heatmap", gone_image),
    ]
    for key in (kept, *owned, *unowned):
        store.put_bytes(key, b"data", content_type="application/octet-stream")
    session.commit()

    assert delete_orphans(session=session, store=store, grace_s=3600) == 0  # too recent
    assert delete_orphans(session=session, store=store, grace_s=0) == len(unowned)

    assert not any(store.exists(key) for key in unowned)
    assert store.exists(kept)
    assert all(store.exists(key) for key in owned)


def test_the_sweeper_leaves_dicom_results_to_the_exporter_so_a_backlog_never_delays_leases(
    ingest: TestClient,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    with session_factory(settings.database_url)() as session:
        _, key = make_tenant(session)
        batch, _ = upload_batch(ingest, key, [image.path for image in exam], name="exports")
        ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
        screen_everything(session, settings, store)
        pending = select(func.count()).where(ExamExport.status == ExportStatus.PENDING)
        assert session.scalar(pending) == 1  # the screened exam's results, to be rendered
        tenant, _ = make_tenant(session)
        stranded = make_image(session, make_batch(session, tenant))
        claim_images(session=session, image_ids=[stranded.id], lease_s=60)
        session.commit()
        _expire(session, stranded)

        report = sweep_once(settings, store=store, producer=make_celery(settings), exports=False)
        assert (report.requeued, report.results_rendered) == (1, 0)
        assert session.scalar(pending) == 1

        exporter = ExporterThread(settings.model_copy(update={"sweep_interval_s": 0.05}))
        exporter.start()
        try:
            wait_for(lambda: session.scalar(pending) == 0, timeout=60, what="the exporter")
        finally:
            exporter.stopping.set()
            exporter.join(timeout=30)
        assert not exporter.is_alive()
        rendered = session.scalar(
            select(func.count()).where(ExamExport.status == ExportStatus.RENDERED)
        )
        assert rendered == 1
