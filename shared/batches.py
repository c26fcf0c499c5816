"""Batches, studies and images: creation, state transitions and tenant-scoped queries.

Every query here takes a tenant id and filters by it; endpoints never build their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import distinct_on, insert
from sqlalchemy.orm import Session, joinedload

from shared.db.base import new_id, utcnow
from shared.db.models import (
    TERMINAL_IMAGE_STATUSES,
    Batch,
    BatchPriority,
    BatchPurpose,
    BatchStatus,
    Image,
    ImageStatus,
    ModelVersion,
    Prediction,
    RejectedFile,
    Study,
)
from shared.webhooks import announce_completion


def create_batch(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    name: str,
    priority: BatchPriority,
    callback_url: str | None = None,
    purpose: BatchPurpose = BatchPurpose.SCREENING,
) -> Batch:
    batch = Batch(
        tenant_id=tenant_id,
        name=name,
        priority=priority,
        callback_url=callback_url,
        purpose=purpose,
    )
    session.add(batch)
    session.flush()
    return batch


def get_batch(
    *, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID, for_update: bool = False
) -> Batch | None:
    """The tenant's batch, or None (also for another tenant's batch id)."""
    query = select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    if for_update:
        query = query.with_for_update()
    return session.scalar(query)


def list_batches(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Batch]:
    """Newest first, keyset-paginated on (created_at, id)."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if before is not None:
        query = query.where(func.row(Batch.created_at, Batch.id) < func.row(*before))
    query = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    return list(session.scalars(query))


def get_or_create_study(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    study_key: str,
    patient_key: str,
) -> Study:
    """The batch's study for `study_key`; concurrent uploads of one exam share one row."""
    session.execute(
        insert(Study)
        .values(
            tenant_id=tenant_id,
            batch_id=batch_id,
            study_key=study_key,
            patient_key=patient_key,
            id=new_id(),
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[Study.batch_id, Study.study_key])
    )
    study = session.scalar(
        select(Study).where(
            Study.batch_id == batch_id, Study.study_key == study_key, Study.tenant_id == tenant_id
        )
    )
    assert study is not None
    return study


def image_count(*, session: Session, batch_id: uuid.UUID) -> int:
    return int(session.scalar(select(func.count()).where(Image.batch_id == batch_id)) or 0)


def image_counts(*, session: Session, batch_id: uuid.UUID) -> dict[str, int]:
    counts = {status.value: 0 for status in ImageStatus}
    rows = session.execute(
        select(Image.status, func.count()).where(Image.batch_id == batch_id).group_by(Image.status)
    )
    for status, count in rows:
        counts[ImageStatus(status).value] = int(count)
    return counts


def record_rejections(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    rejections: Sequence[tuple[str, str, str]],
) -> None:
    """Keep (filename, code, message) of refused uploads so results can show them."""
    session.add_all(
        RejectedFile(
            tenant_id=tenant_id, batch_id=batch_id, filename=name[:600], code=code, message=msg
        )
        for name, code, msg in rejections
    )


def rejection_count(*, session: Session, batch_id: uuid.UUID) -> int:
    count = session.scalar(select(func.count()).where(RejectedFile.batch_id == batch_id))
    return int(count or 0)


def rejections_page(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    limit: int,
    after: uuid.UUID | None,
) -> list[RejectedFile]:
    query = select(RejectedFile).where(
        RejectedFile.batch_id == batch_id, RejectedFile.tenant_id == tenant_id
    )
    if after is not None:
        query = query.where(RejectedFile.id > after)
    return list(session.scalars(query.order_by(RejectedFile.id).limit(limit)))


def exams_page(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    limit: int,
    after: uuid.UUID | None,
) -> list[tuple[Study, list[Image]]]:
    """A batch's studies (exams) in upload order, each with its images, keyset on study id."""
    query = select(Study).where(Study.batch_id == batch_id, Study.tenant_id == tenant_id)
    if after is not None:
        query = query.where(Study.id > after)
    studies = list(session.scalars(query.order_by(Study.id).limit(limit)))
    images: dict[uuid.UUID, list[Image]] = {s.id: [] for s in studies}
    if studies:
        rows = session.scalars(
            select(Image).where(Image.study_id.in_(list(images))).order_by(Image.id)
        )
        for image in rows:
            images[image.study_id].append(image)
    return [(study, images[study.id]) for study in studies]


def complete_if_finished(*, session: Session, batch: Batch) -> bool:
    """Mark a closed batch completed once no image is queued or running; caller holds its lock."""
    if batch.status != BatchStatus.PROCESSING:
        return False
    unfinished = session.scalar(
        select(func.count()).where(
            Image.batch_id == batch.id, Image.status.not_in(TERMINAL_IMAGE_STATUSES)
        )
    )
    if unfinished:
        return False
    batch.status = BatchStatus.COMPLETED
    batch.completed_at = utcnow()
    announce_completion(session, batch, image_counts(session=session, batch_id=batch.id))
    return True


def close_batch(*, session: Session, batch: Batch) -> None:
    """No more images; the caller holds the batch row lock (get_batch(for_update=True))."""
    if batch.status != BatchStatus.OPEN:
        return
    batch.status = BatchStatus.PROCESSING
    batch.closed_at = utcnow()
    complete_if_finished(session=session, batch=batch)


def refresh_batches(*, session: Session, batch_ids: Sequence[uuid.UUID]) -> None:
    """After images changed state: complete any of these batches that just finished."""
    for batch_id in sorted(set(batch_ids)):
        batch = session.scalar(select(Batch).where(Batch.id == batch_id).with_for_update())
        if batch is not None:
            complete_if_finished(session=session, batch=batch)


def model_versions_used(*, session: Session, batch_id: uuid.UUID) -> list[ModelVersion]:
    query = (
        select(ModelVersion)
        .where(
            ModelVersion.id.in_(
                select(Prediction.model_version_id)
                .join(Image, Image.id == Prediction.image_id)
                .where(Image.batch_id == batch_id)
                .distinct()
            )
        )
        .order_by(ModelVersion.created_at)
    )
    return list(session.scalars(query))


def get_image(*, session: Session, tenant_id: uuid.UUID, image_id: uuid.UUID) -> Image | None:
    return session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))


def latest_predictions(
    *, session: Session, image_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Prediction]:
    """Each image's newest prediction (an image may be screened by several model versions)."""
    if not image_ids:
        return {}
    query = (
        select(Prediction)
        .where(Prediction.image_id.in_(image_ids))
        .order_by(Prediction.image_id, Prediction.created_at.desc())
        .ext(distinct_on(Prediction.image_id))
        .options(joinedload(Prediction.model_version))
    )
    return {p.image_id: p for p in session.scalars(query)}


def results_page(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    limit: int,
    after: uuid.UUID | None,
) -> list[Image]:
    """A batch's images in upload order, keyset-paginated on id (time-ordered UUIDv7)."""
    query = select(Image).where(Image.batch_id == batch_id, Image.tenant_id == tenant_id)
    if after is not None:
        query = query.where(Image.id > after)
    return list(session.scalars(query.order_by(Image.id).limit(limit)))


def claim_images(
    *, session: Session, image_ids: Sequence[uuid.UUID], lease_s: float
) -> list[Image]:
    """Move queued images to running under a lease; any other state is skipped.

    The rows are locked, so two deliveries of one chunk never claim an image twice (the second
    waits, then sees the image running). It waits rather than skipping locked rows: ingest
    sends a task before its own `enqueued_at` update commits, and a task skipping those rows
    would leave its images queued until the sweeper's requeue, minutes later. An image whose
    worker died is returned to `queued` by the sweeper once its lease has expired, never taken
    over while the lease holds.
    """
    images = list(
        session.scalars(
            select(Image)
            .where(Image.id.in_(image_ids), Image.status == ImageStatus.QUEUED)
            .order_by(Image.id)
            .with_for_update()
        )
    )
    _start_lease(images, lease_s)
    return images


def claim_next_images(
    *, session: Session, limit: int, lease_s: float, urgent_only: bool = False
) -> list[tuple[Image, bool]]:
    """Claim the next queued images of any batch, urgent batches first, then oldest first;
    each with whether its batch is urgent.

    This is the priority lane: a worker with room in its pipeline takes urgent work ahead of
    everything queued before it, and a busy one still takes urgent work (`urgent_only`).
    SKIP LOCKED keeps concurrent workers off each other's rows.
    """
    is_urgent = Batch.priority == BatchPriority.URGENT
    query = select(Image, is_urgent).join(Batch, Batch.id == Image.batch_id)
    query = query.where(Image.status == ImageStatus.QUEUED)
    if urgent_only:
        query = query.where(is_urgent)
    rows = session.execute(
        query.order_by(is_urgent.desc(), Image.id)
        .limit(limit)
        .with_for_update(of=Image, skip_locked=True)
    ).all()
    _start_lease([image for image, _ in rows], lease_s)
    return [(image, bool(urgent)) for image, urgent in rows]


def _start_lease(images: Sequence[Image], lease_s: float) -> None:
    now = utcnow()
    for image in images:
        image.status = ImageStatus.RUNNING
        image.attempts += 1
        image.started_at = now
        image.lease_expires_at = now + timedelta(seconds=lease_s)


def release_images(*, session: Session, image_ids: Sequence[uuid.UUID]) -> int:
    """Hand running images back to the queue (their worker hit a transient failure)."""
    result = session.execute(
        update(Image)
        .where(Image.id.in_(image_ids), Image.status == ImageStatus.RUNNING)
        .values(status=ImageStatus.QUEUED, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def mark_enqueued(*, session: Session, image_ids: Sequence[uuid.UUID]) -> None:
    """Record that the broker accepted these images' work (the outbox's "sent" mark)."""
    session.execute(
        update(Image)
        .where(Image.id.in_(image_ids))
        .values(enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def record_prediction(
    *,
    session: Session,
    image: Image,
    model_version_id: uuid.UUID,
    score: float,
    heatmap_key: str | None = None,
) -> bool:
    """Mark a running image done with its score; False (and nothing written) otherwise.

    A repeat for the same image and model version never adds a second row.
    """
    if not _finish(
        session=session, image_id=image.id, status=ImageStatus.DONE, code=None, message=None
    ):
        return False
    session.execute(
        insert(Prediction)
        .values(
            id=new_id(),
            tenant_id=image.tenant_id,
            image_id=image.id,
            model_version_id=model_version_id,
            malignancy_score=score,
            heatmap_key=heatmap_key,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[Prediction.image_id, Prediction.model_version_id])
    )
    return True


def record_failure(*, session: Session, image: Image, code: str, message: str) -> bool:
    """Mark a running image failed with a stable code; False if it was not running."""
    return _finish(
        session=session, image_id=image.id, status=ImageStatus.FAILED, code=code, message=message
    )


def _finish(
    *,
    session: Session,
    image_id: uuid.UUID,
    status: ImageStatus,
    code: str | None,
    message: str | None,
) -> bool:
    # Guarded transition: only a running image may finish, so a duplicate delivery never
    # flips a finished image again.
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status == ImageStatus.RUNNING)
        .values(
            status=status,
            error_code=code,
            error_message=message,
            finished_at=utcnow(),
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def get_exam(
    *, session: Session, tenant_id: uuid.UUID, study_id: uuid.UUID
) -> tuple[Study, list[Image]] | None:
    """One of the tenant's exams (a study) with its images, or None."""
    study = session.scalar(select(Study).where(Study.id == study_id, Study.tenant_id == tenant_id))
    if study is None:
        return None
    images = session.scalars(select(Image).where(Image.study_id == study.id).order_by(Image.id))
    return study, list(images)
