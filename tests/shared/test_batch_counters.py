"""A batch's counters (migration 0013's triggers) agree with counting its rows after every
kind of write, announce each committed change, and let concurrent writers of one batch pass
each other."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from sqlalchemy import create_engine, delete, func, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from services.results.changes import libpq_url
from shared.batches import batch_counters, prediction_summary, record_rejections
from shared.config import Settings
from shared.db.models import (
    COUNTER_SHARDS,
    Batch,
    Image,
    ImageStatus,
    Prediction,
    PredictionWarning,
    RejectedFile,
)
from shared.lifecycle import (
    abandon_images,
    claim_images,
    mark_enqueued,
    record_failure,
    record_prediction,
    release_images,
)
from tests.factories import make_batch, make_image, make_model_version, make_tenant

FLAG = PredictionWarning.INPUT_UNLIKE_TRAINING_DATA.value


def _counted(session: Session, batch: Batch) -> tuple[dict[str, int], int]:
    """What counting the rows says: images by status, and rejected files."""
    counts = {status.value: 0 for status in ImageStatus}
    for status, count in session.execute(
        select(Image.status, func.count()).where(Image.batch_id == batch.id).group_by(Image.status)
    ):
        counts[status.value] = count
    rejected = session.scalar(
        select(func.count()).select_from(RejectedFile).where(RejectedFile.batch_id == batch.id)
    )
    return counts, int(rejected or 0)


def _agree(session: Session, batch: Batch, versions_before: int) -> int:
    """The counters equal the counts, and their version grew; returns the version."""
    counters = batch_counters(session=session, tenant_id=batch.tenant_id, batch_id=batch.id)
    counts, rejected = _counted(session, batch)
    assert counters.counts == counts
    assert counters.rejected == rejected
    assert counters.version > versions_before
    return counters.version


def test_counters_follow_every_write_of_images_predictions_and_rejections(
    session: Session,
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    version = make_model_version(session, trained=True)
    images = [make_image(session, batch, study_key=f"s{i // 4}") for i in range(8)]
    ids = [image.id for image in images]
    seen = _agree(session, batch, 0)

    mark_enqueued(session=session, image_ids=ids)  # no status changes: the version stays
    session.commit()
    assert batch_counters(session=session, tenant_id=tenant.id, batch_id=batch.id).version == seen

    claim_images(session=session, image_ids=ids[:6], lease_s=60)
    session.commit()
    seen = _agree(session, batch, seen)
    for image in images[:3]:
        record_prediction(
            session=session,
            image=image,
            model_version_id=version.id,
            score=0.5,
            warnings=[FLAG] if image is images[0] else [],
        )
    record_failure(session=session, image=images[3], code="undecodable", message="no")
    release_images(session=session, image_ids=[ids[4]])
    session.commit()
    seen = _agree(session, batch, seen)
    abandon_images(session=session, image_ids=ids, code="broker_down", message="gone")
    record_rejections(
        session=session,
        tenant_id=tenant.id,
        batch_id=batch.id,
        rejections=[("a.txt", "unsupported_media_type", "not an image")] * 2,
    )
    session.commit()
    seen = _agree(session, batch, seen)
    summary = prediction_summary(session=session, tenant_id=tenant.id, batch_id=batch.id)
    assert [v.id for v in summary.versions] == [version.id]
    assert summary.warning_counts == {FLAG: 1}

    # A purge (issue 22's data lifecycle) deletes rows: the counters follow it too.
    session.execute(delete(Prediction).where(Prediction.image_id.in_(ids[:1])))
    session.execute(delete(RejectedFile).where(RejectedFile.batch_id == batch.id))
    session.commit()
    seen = _agree(session, batch, seen)
    summary = prediction_summary(session=session, tenant_id=tenant.id, batch_id=batch.id)
    assert summary.warning_counts == {}
    session.execute(delete(Prediction).where(Prediction.image_id.in_(ids)))
    session.execute(delete(Image).where(Image.id.in_(ids[:5])))
    session.commit()
    seen = _agree(session, batch, seen)
    assert (
        prediction_summary(session=session, tenant_id=tenant.id, batch_id=batch.id).versions == []
    )


def test_a_bulk_statement_over_several_batches_counts_each(session: Session) -> None:
    tenant, _ = make_tenant(session)
    batches = [make_batch(session, tenant) for _ in range(3)]
    for batch in batches:
        for _ in range(4):
            make_image(session, batch)
    session.execute(
        update(Image)
        .where(Image.batch_id.in_([b.id for b in batches[:2]]))
        .values(status=ImageStatus.RUNNING)
    )
    session.commit()
    for batch in batches:
        _agree(session, batch, 0)
    assert (
        batch_counters(session=session, tenant_id=tenant.id, batch_id=batches[0].id).counts[
            "running"
        ]
        == 4
    )


def test_another_tenant_reads_no_counters(session: Session) -> None:
    tenant, _ = make_tenant(session)
    other, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    make_image(session, batch)
    counters = batch_counters(session=session, tenant_id=other.id, batch_id=batch.id)
    assert sum(counters.counts.values()) == 0
    assert counters.version == 0


def test_a_change_is_announced_when_it_commits_not_before(
    settings: Settings, session: Session
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    with psycopg.connect(libpq_url(settings.database_url), autocommit=True) as listener:
        listener.execute("LISTEN batch_changed")
        make_image(session, batch, study_key="announced")  # committed by the factory
        heard = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert heard == [str(batch.id)]

        session.execute(
            update(Image).where(Image.batch_id == batch.id).values(status=ImageStatus.RUNNING)
        )
        assert list(listener.notifies(timeout=1, stop_after=1)) == []  # not committed yet
        session.commit()
        heard = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert heard == [str(batch.id)]


def _connections_on_different_shards(settings: Settings) -> tuple[Session, Session]:
    """Two sessions whose connections (fresh ones, not pooled) write to different shards."""
    engine = create_engine(settings.database_url, poolclass=NullPool)
    first = Session(engine)
    shard = first.scalar(text("SELECT pg_backend_pid() % :n"), {"n": COUNTER_SHARDS})
    for _ in range(50):
        second = Session(engine)
        if second.scalar(text("SELECT pg_backend_pid() % :n"), {"n": COUNTER_SHARDS}) != shard:
            return first, second
        second.close()
    pytest.fail("no two connections on different shards in 50 tries")


def test_two_writers_of_one_batch_do_not_wait_for_each_other(
    settings: Settings, session: Session
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    images = [make_image(session, batch, study_key=str(uuid.uuid4())) for _ in range(2)]
    first, second = _connections_on_different_shards(settings)
    try:
        first.execute(
            update(Image).where(Image.id == images[0].id).values(status=ImageStatus.RUNNING)
        )
        # The first transaction holds its shard's row; the second must not queue behind it.
        second.execute(text("SET LOCAL lock_timeout = '2s'"))
        second.execute(
            update(Image).where(Image.id == images[1].id).values(status=ImageStatus.RUNNING)
        )
        second.commit()
        first.commit()
    finally:
        first.close()
        second.close()
    counters = batch_counters(session=session, tenant_id=tenant.id, batch_id=batch.id)
    assert counters.counts["running"] == 2
