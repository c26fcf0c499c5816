from __future__ import annotations

import threading
import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.batches import (
    claim_images,
    close_batch,
    get_batch,
    image_counts,
    list_batches,
    record_failure,
    record_prediction,
    refresh_batches,
    results_page,
)
from shared.config import Settings
from shared.db.base import session_factory
from shared.db.models import BatchStatus, Image, ImageStatus, ModelVersion, Prediction
from tests.factories import make_batch, make_image, make_tenant


def _model(session: Session) -> ModelVersion:
    version = ModelVersion(
        name=f"m-{uuid.uuid4().hex[:6]}", architecture={}, checkpoint_key="k", trained=False
    )
    session.add(version)
    session.commit()
    return version


def test_batch_lifecycle_open_processing_completed(session: Session) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    images = [make_image(session, batch) for _ in range(2)]
    version = _model(session)

    locked = get_batch(session=session, tenant_id=tenant.id, batch_id=batch.id, for_update=True)
    assert locked is not None
    close_batch(session=session, batch=locked)
    session.commit()
    assert locked.status == BatchStatus.PROCESSING

    claimed = claim_images(session=session, image_ids=[i.id for i in images], lease_s=60)
    record_prediction(session=session, image=claimed[0], model_version_id=version.id, score=0.3)
    refresh_batches(session=session, batch_ids=[batch.id])
    session.commit()
    assert locked.status == BatchStatus.PROCESSING  # one image is still running

    record_failure(session=session, image=claimed[1], code="decode_failed", message="bad")
    refresh_batches(session=session, batch_ids=[batch.id])
    session.commit()
    session.refresh(locked)
    assert locked.status == BatchStatus.COMPLETED
    assert locked.completed_at is not None
    assert image_counts(session=session, batch_id=batch.id) == {
        "queued": 0,
        "running": 0,
        "done": 1,
        "failed": 1,
        "stored": 0,
    }


def test_closing_a_batch_whose_images_are_all_finished_completes_it(session: Session) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    close_batch(session=session, batch=batch)
    session.commit()
    assert batch.status == BatchStatus.COMPLETED  # an empty closed batch has nothing left


def test_duplicate_delivery_creates_no_second_prediction_or_transition(session: Session) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    image = make_image(session, batch)
    version = _model(session)
    for score in (0.25, 0.75):  # the same chunk delivered twice
        claimed = claim_images(session=session, image_ids=[image.id], lease_s=60)
        for row in claimed:
            record_prediction(session=session, image=row, model_version_id=version.id, score=score)
        session.commit()
    count = session.scalar(select(func.count()).select_from(Prediction))
    assert count == 1
    session.refresh(image)
    assert image.status == ImageStatus.DONE
    assert image.attempts == 1  # the second delivery found nothing to claim
    assert session.scalars(select(Prediction.malignancy_score)).one() == 0.25


def test_failed_image_is_not_flipped_to_done_by_a_late_result(session: Session) -> None:
    tenant, _ = make_tenant(session)
    image = make_image(session, make_batch(session, tenant))
    version = _model(session)
    (claimed,) = claim_images(session=session, image_ids=[image.id], lease_s=60)
    record_failure(session=session, image=claimed, code="decode_failed", message="bad")
    session.commit()
    wrote = record_prediction(
        session=session, image=claimed, model_version_id=version.id, score=0.9
    )
    session.commit()
    assert wrote is False
    assert session.scalar(select(func.count()).select_from(Prediction)) == 0
    session.refresh(image)
    assert image.status == ImageStatus.FAILED
    assert image.error_code == "decode_failed"


def test_queries_are_scoped_to_the_tenant(session: Session) -> None:
    owner, _ = make_tenant(session)
    other, _ = make_tenant(session)
    batch = make_batch(session, owner)
    make_image(session, batch)
    assert get_batch(session=session, tenant_id=other.id, batch_id=batch.id) is None
    assert list_batches(session=session, tenant_id=other.id, limit=10, before=None) == []
    assert (
        results_page(session=session, tenant_id=other.id, batch_id=batch.id, limit=10, after=None)
        == []
    )


def test_batches_list_newest_first_with_keyset_pages(session: Session) -> None:
    tenant, _ = make_tenant(session)
    made = [make_batch(session, tenant, name=f"b{i}") for i in range(5)]
    first = list_batches(session=session, tenant_id=tenant.id, limit=2, before=None)
    assert [b.name for b in first] == ["b4", "b3"]
    rest = list_batches(
        session=session, tenant_id=tenant.id, limit=10, before=(first[-1].created_at, first[-1].id)
    )
    assert [b.name for b in rest] == ["b2", "b1", "b0"]
    assert len({b.id for b in first + rest}) == len(made)


def test_a_task_arriving_before_ingest_commits_enqueued_at_still_claims_its_images(
    session: Session, settings: Settings
) -> None:
    """Ingest sends the task, then commits `enqueued_at`; a worker that is quick enough meets
    the rows still locked. It must wait for them, not skip them (they would sit queued until
    the sweeper's requeue, minutes later)."""
    tenant, _ = make_tenant(session)
    image = make_image(session, make_batch(session, tenant))
    factory = session_factory(settings.database_url)
    ingest = factory()
    ingest.execute(update(Image).where(Image.id == image.id).values(enqueued_at=func.now()))
    claimed: list[uuid.UUID] = []

    def worker() -> None:
        with factory() as worker_session:
            rows = claim_images(session=worker_session, image_ids=[image.id], lease_s=60)
            claimed.extend(r.id for r in rows)
            worker_session.commit()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive(), "the claim should wait for ingest's transaction"
    ingest.commit()
    ingest.close()
    thread.join(timeout=30)
    assert claimed == [image.id]
