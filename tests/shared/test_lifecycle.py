"""The image and batch lifecycle: the transition table, and the guarded writes built on it."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.batches import get_batch, image_counts
from shared.config import Settings
from shared.db.base import session_factory, utcnow
from shared.db.models import (
    BatchPurpose,
    BatchStatus,
    Image,
    ImageStatus,
    Laterality,
    Prediction,
    Study,
    View,
)
from shared.imaging.formats import MediaType
from shared.imaging.intake import StoredImage
from shared.lifecycle import (
    ALLOWED,
    Transition,
    abandon_images,
    accept_images,
    apply,
    claim_images,
    close_batch,
    expire_leases,
    initial_status,
    record_failure,
    record_prediction,
    refresh_batches,
    renew_leases,
)
from shared.storage import StoredObject
from tests.factories import make_batch, make_image, make_model_version, make_tenant


def _images_in_every_status(session: Session) -> dict[ImageStatus, Image]:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    images = {status: make_image(session, batch) for status in ImageStatus}
    for status, image in images.items():
        # Test set-up only: put each image straight into the status under test.
        session.execute(update(Image).where(Image.id == image.id).values(status=status))
    session.commit()
    return images


@pytest.mark.parametrize("transition", list(Transition), ids=lambda t: t.name)
def test_a_transition_moves_only_images_in_its_sources(
    session: Session, transition: Transition
) -> None:
    images = _images_in_every_status(session)
    moved = apply(session, transition, [image.id for image in images.values()])
    session.commit()
    assert set(moved) == {images[status].id for status in transition.sources}
    for before, image in images.items():
        session.refresh(image)
        expected = transition.target if before in transition.sources else before
        assert image.status == expected, f"{transition.name} from {before}"


def test_the_table_forbids_every_move_out_of_a_finished_image_and_into_running_but_a_claim() -> (
    None
):
    finished = {ImageStatus.DONE, ImageStatus.FAILED, ImageStatus.STORED}
    assert not {(source, target) for source, target in ALLOWED if source in finished}
    assert {source for source, target in ALLOWED if target == ImageStatus.RUNNING} == {
        ImageStatus.QUEUED
    }
    # Every status can be reached, and every transition lands where the table says.
    assert {target for _, target in ALLOWED} == set(ImageStatus)
    assert (None, ImageStatus.QUEUED) in ALLOWED
    assert initial_status(BatchPurpose.TRAINING) == ImageStatus.STORED


def test_abandoning_fails_queued_and_running_images_and_completes_their_batch(
    session: Session,
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    queued, running, done = (make_image(session, batch) for _ in range(3))
    claim_images(session=session, image_ids=[running.id, done.id], lease_s=60)
    record_prediction(
        session=session, image=done, model_version_id=make_model_version(session).id, score=0.5
    )
    close_batch(session=session, batch=batch)
    session.commit()

    count = abandon_images(
        session=session,
        image_ids=[queued.id, running.id, done.id],
        code="dependency_unavailable",
        message="the object store stayed down",
    )
    session.commit()

    assert count == 2
    for image, status in ((queued, "failed"), (running, "failed"), (done, "done")):
        session.refresh(image)
        assert image.status == status
    assert queued.error_code == "dependency_unavailable"
    assert done.error_code is None
    session.refresh(batch)
    assert batch.status == BatchStatus.COMPLETED


def test_batch_lifecycle_open_processing_completed(session: Session) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    images = [make_image(session, batch) for _ in range(2)]
    version = make_model_version(session)

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
    assert image_counts(session=session, tenant_id=tenant.id, batch_id=batch.id) == {
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
    version = make_model_version(session)
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
    version = make_model_version(session)
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


def test_image_that_keeps_killing_workers_fails_after_max_attempts(session: Session) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    image = make_image(session, batch)
    close_batch(session=session, batch=batch)
    session.commit()
    for attempt in range(1, 4):
        claim_images(session=session, image_ids=[image.id], lease_s=60)
        session.commit()
        image.lease_expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
        requeued, failed = expire_leases(session=session, max_attempts=3, limit=100)
        session.commit()
        assert (requeued, failed) == ((1, 0) if attempt < 3 else (0, 1))
    session.refresh(image)
    assert (image.status, image.error_code, image.attempts) == (
        ImageStatus.FAILED,
        "too_many_attempts",
        3,
    )
    session.refresh(batch)
    assert batch.status == BatchStatus.COMPLETED


def test_a_heartbeat_renews_running_leases_only_and_skips_rows_another_holds(
    session: Session, settings: Settings
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    running, held_elsewhere, queued = (make_image(session, batch) for _ in range(3))
    claim_images(session=session, image_ids=[running.id, held_elsewhere.id], lease_s=1)
    session.commit()
    # Another transaction holds one row (its worker recording it): skipped, not waited for.
    other = session_factory(settings.database_url)()
    other.execute(select(Image.id).where(Image.id == held_elsewhere.id).with_for_update())
    try:
        renewed = renew_leases(
            session=session, image_ids=[running.id, held_elsewhere.id, queued.id], lease_s=600
        )
        session.commit()
    finally:
        other.rollback()
        other.close()
    assert renewed == 1
    for image in (running, held_elsewhere, queued):
        session.refresh(image)
    assert running.lease_expires_at is not None
    assert running.lease_expires_at > utcnow() + timedelta(seconds=500)
    assert held_elsewhere.lease_expires_at is not None
    assert held_elsewhere.lease_expires_at < utcnow() + timedelta(seconds=2)
    assert (queued.status, queued.lease_expires_at) == (ImageStatus.QUEUED, None)


def _stored(study_key: str, patient_key: str, view: View = View.CC) -> StoredImage:
    image_id = uuid.uuid4()
    return StoredImage(
        image_id=image_id,
        filename=f"{image_id.hex[:6]}.dcm",
        media_type=MediaType.DICOM,
        stored=StoredObject(key=f"test/{image_id}", size=1, sha256="0" * 64),
        study_key=study_key,
        patient_key=patient_key,
        laterality=Laterality.LEFT,
        view=view,
    )


def test_accepted_views_join_their_study_within_a_request_and_across_requests(
    session: Session,
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    first = accept_images(
        session=session,
        batch=batch,
        accepted=[
            _stored("A", "pa"),
            _stored("B", "pb"),
            _stored("A", "other"),
            _stored("B", "pb"),
        ],
    )
    session.commit()
    later = accept_images(
        session=session, batch=batch, accepted=[_stored("C", "pc"), _stored("A", "pa")]
    )
    session.commit()
    study_of = {image.id: image.study_id for image in (*first, *later)}
    a, b, a_again, b_again = (study_of[image.id] for image in first)
    c, a_later = (study_of[image.id] for image in later)
    assert a == a_again == a_later
    assert b == b_again
    assert len({a, b, c}) == 3
    patients = dict(session.execute(select(Study.study_key, Study.patient_key)).tuples().all())
    assert patients == {"A": "pa", "B": "pb", "C": "pc"}  # a study's first view names it


def test_concurrent_uploads_of_one_exam_share_one_study(settings: Settings) -> None:
    factory = session_factory(settings.database_url)
    with factory() as setup:
        tenant, _ = make_tenant(setup)
        batch = make_batch(setup, tenant)
        batch_ref = (batch.id, batch.tenant_id, batch.purpose)
    ready = threading.Barrier(2)
    study_ids: list[uuid.UUID] = []

    class Ref:
        id, tenant_id, purpose = batch_ref

    def upload(view: View) -> None:
        with factory() as mine:
            mine.connection()  # the transaction is open before both insert
            ready.wait()
            (image,) = accept_images(session=mine, batch=Ref(), accepted=[_stored("X", "p", view)])
            mine.commit()
            study_ids.append(image.study_id)

    threads = [threading.Thread(target=upload, args=(view,)) for view in (View.CC, View.MLO)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(study_ids) == 2
    assert study_ids[0] == study_ids[1]
