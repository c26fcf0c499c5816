"""The lifecycle of images and batches: the statuses, the transitions allowed between them,
and the only code that writes them.

An image::

    (new) --accept--> queued --claim--> running --complete--> done
                        ^                  |  \\--fail------> failed
                        |                  |
                        +---release--------+      (its worker hit a transient failure)
                        +---expire---------+      (its worker died: the lease ran out)
                                           +--exhaust-------> failed  (leases ran out too often)
    queued | running --abandon--> failed                      (a dependency stayed down)
    (new) --accept for training--> stored                     (kept for training, never screened)

A batch: open --close--> processing --its last image finished--> completed.

Each batch's counters (images by status, rejected files, predictions by model version and
warning, a change version: `BatchImageCounts`, `BatchPredictionCounts`) follow these writes in
the same transaction, kept by the triggers of migration 0013 on the rows themselves, so no
writer (the worker, the sweeper, a data-lifecycle purge, a test's factory) can leave them out
of step; the triggers also NOTIFY `batch_changed`, which wakes long polls once the writing
transaction commits. Whether a batch has finished is read from them.

Every status write is a guarded UPDATE (`WHERE status IN (the transition's sources)`), so a
repeated, late or concurrent call changes nothing it should not: a duplicate delivery never
flips a finished image, and a release never revives one. A test enumerates `Transition`
against every status, and another checks that no other module writes an image's status.

These writes go by row id and are not tenant-scoped: their callers (ingest after its own
tenant-scoped checks, the worker and the sweeper, which own no tenant) name the rows.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from shared.imaging.intake import StoredImage

from shared.batches import image_counts, study_ids
from shared.db.base import new_id, utcnow
from shared.db.models import (
    TERMINAL_IMAGE_STATUSES,
    Batch,
    BatchPriority,
    BatchPurpose,
    BatchStatus,
    Image,
    ImageStatus,
    Prediction,
)
from shared.deliveries import queue_exam_exports
from shared.imaging.formats import RejectCode
from shared.vault import record_of
from shared.webhooks import announce_completion

QUEUED, RUNNING, DONE, FAILED = (
    ImageStatus.QUEUED,
    ImageStatus.RUNNING,
    ImageStatus.DONE,
    ImageStatus.FAILED,
)


class Transition(enum.Enum):
    """Each allowed move of an existing image: (the statuses it may start from, the target)."""

    CLAIM = (frozenset({QUEUED}), RUNNING)
    RELEASE = (frozenset({RUNNING}), QUEUED)
    EXPIRE = (frozenset({RUNNING}), QUEUED)
    COMPLETE = (frozenset({RUNNING}), DONE)
    FAIL = (frozenset({RUNNING}), FAILED)
    EXHAUST = (frozenset({RUNNING}), FAILED)
    ABANDON = (frozenset({QUEUED, RUNNING}), FAILED)

    @property
    def sources(self) -> frozenset[ImageStatus]:
        return self.value[0]

    @property
    def target(self) -> ImageStatus:
        return self.value[1]


# What a new image row may start as, by its batch's purpose.
INITIAL_STATUS = {BatchPurpose.SCREENING: QUEUED, BatchPurpose.TRAINING: ImageStatus.STORED}

# The whole table, (from, to), with None for a new row: what docs and tests read.
ALLOWED: frozenset[tuple[ImageStatus | None, ImageStatus]] = frozenset(
    {(None, status) for status in INITIAL_STATUS.values()}
    | {(source, t.target) for t in Transition for source in t.sources}
)


def initial_status(purpose: BatchPurpose) -> ImageStatus:
    """The status a new image of a batch with this purpose is created with."""
    return INITIAL_STATUS[purpose]


class BatchRef(Protocol):
    """What accepting images needs of their batch: a `Batch` row, or just these columns."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def tenant_id(self) -> uuid.UUID: ...
    @property
    def purpose(self) -> BatchPurpose: ...


def accept_images(
    *,
    session: Session,
    batch: BatchRef,
    accepted: Sequence[StoredImage],
    one_per_sop_instance: bool = False,
) -> list[Image]:
    """The rows of images the intake stored for `batch`: each in its study (one row per study
    key, shared by concurrent uploads), starting in the batch purpose's initial status. The
    caller commits, and only then queues them.

    `one_per_sop_instance` (DICOM received from a node) records each SOP instance's key, so a
    second copy of the instance fails (IntegrityError, at the insert here) instead of becoming
    a second image.
    """
    studies: dict[str, str] = {}
    for item in accepted:  # a study's patient is its first view's, as when sent one by one
        studies.setdefault(item.study_key, item.patient_key)
    study_of = study_ids(
        session=session, tenant_id=batch.tenant_id, batch_id=batch.id, studies=studies
    )
    now = utcnow()
    rows = [
        {
            "id": item.image_id,
            "tenant_id": batch.tenant_id,
            "batch_id": batch.id,
            "study_id": study_of[item.study_key],
            "filename": item.filename,
            "object_key": item.stored.key,
            "sha256": item.stored.sha256,
            "size_bytes": item.stored.size,
            "media_type": item.media_type.value,
            "laterality": item.laterality,
            "view": item.view,
            "sop_instance_key": item.sop_instance_key if one_per_sop_instance else None,
            "manufacturer": item.manufacturer,
            "manufacturer_model": item.manufacturer_model,
            "pixel_spacing_mm": item.pixel_spacing_mm,
            "status": initial_status(batch.purpose),
            "created_at": now,
        }
        for item in accepted
    ]
    # One Core statement for the request's rows, now (a duplicate SOP instance fails here):
    # the ORM's unit of work cost more than the rest of recording them.
    session.connection().execute(insert(Image), rows)
    session.add_all(
        record_of(item.sealed_identity, tenant_id=batch.tenant_id, image_id=item.image_id)
        for item in accepted
        if item.sealed_identity is not None
    )
    # What callers read of the rows (not in the session: nothing of them is flushed again).
    return [Image(attempts=0, **row) for row in rows]


def apply(
    session: Session, transition: Transition, image_ids: Sequence[uuid.UUID], **values: Any
) -> list[uuid.UUID]:
    """Move those of `image_ids` that are in one of the transition's sources to its target,
    writing `values` with it; returns the ids that moved (the others are left as they are)."""
    if not image_ids:
        return []
    moved = session.scalars(
        update(Image)
        .where(Image.id.in_(image_ids), Image.status.in_(transition.sources))
        .values(status=transition.target, **values)
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return list(moved)


# -- claiming: queued -> running under a lease ---------------------------------------------


def _start_lease(session: Session, image_ids: list[uuid.UUID], lease_s: float) -> list[Image]:
    now = utcnow()
    moved = apply(
        session,
        Transition.CLAIM,
        image_ids,
        attempts=Image.attempts + 1,
        started_at=now,
        lease_expires_at=now + timedelta(seconds=lease_s),
    )
    if not moved:
        return []
    rows = session.scalars(
        select(Image)
        .where(Image.id.in_(moved))
        .order_by(Image.id)
        .execution_options(populate_existing=True)
    )
    return list(rows)


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
    locked = list(
        session.scalars(
            select(Image.id)
            .where(Image.id.in_(image_ids), Image.status == QUEUED)
            .order_by(Image.id)
            .with_for_update()
        )
    )
    return _start_lease(session, locked, lease_s)


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
    query = select(Image.id, is_urgent).join(Batch, Batch.id == Image.batch_id)
    query = query.where(Image.status == QUEUED)
    if urgent_only:
        query = query.where(is_urgent)
    rows = session.execute(
        query.order_by(is_urgent.desc(), Image.id)
        .limit(limit)
        .with_for_update(of=Image, skip_locked=True)
    ).all()
    urgency = {image_id: bool(urgent) for image_id, urgent in rows}
    images = _start_lease(session, list(urgency), lease_s)
    return sorted(((image, urgency[image.id]) for image in images), key=lambda pair: not pair[1])


def renew_leases(*, session: Session, image_ids: Sequence[uuid.UUID], lease_s: float) -> int:
    """Extend the leases of running images their worker is still at (its heartbeat): a live
    worker keeps its images however long it works, so a lease can be short, and a dead
    worker's images are back in the queue soon after. Rows another transaction holds (the
    worker finishing them) are skipped, never waited for. Returns how many were renewed."""
    held = (
        select(Image.id)
        .where(Image.id.in_(image_ids), Image.status == RUNNING)
        .order_by(Image.id)
        .with_for_update(skip_locked=True)
    )
    renewed = session.execute(
        update(Image)
        .where(Image.id.in_(held.scalar_subquery()))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return int(renewed.rowcount)  # type: ignore[attr-defined]


def release_images(*, session: Session, image_ids: Sequence[uuid.UUID]) -> int:
    """Hand running images back to the queue (their worker hit a transient failure)."""
    return len(apply(session, Transition.RELEASE, image_ids, lease_expires_at=None))


def expire_leases(*, session: Session, max_attempts: int, limit: int) -> tuple[int, int]:
    """Running images whose lease ran out (their worker died): back to the queue, or failed
    with `too_many_attempts` once claimed `max_attempts` times (an image that kills its
    worker must not kill every worker). Returns (requeued, failed)."""
    expired = session.execute(
        select(Image.id, Image.attempts, Image.batch_id)
        .where(Image.status == RUNNING, Image.lease_expires_at < utcnow())
        .order_by(Image.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    spent = [row for row in expired if row.attempts >= max_attempts]
    failed = []
    for row in spent:
        failed += apply(
            session,
            Transition.EXHAUST,
            [row.id],
            lease_expires_at=None,
            finished_at=utcnow(),
            error_code=RejectCode.TOO_MANY_ATTEMPTS.value,
            error_message=(
                f"the worker processing this image stopped {row.attempts} times; it was not "
                "retried again"
            ),
        )
    requeued = apply(
        session,
        Transition.EXPIRE,
        [row.id for row in expired if row.attempts < max_attempts],
        lease_expires_at=None,
        enqueued_at=None,  # the outbox relay sends it again on this very sweep
    )
    if failed:
        refresh_batches(session=session, batch_ids=[row.batch_id for row in spent])
    return len(requeued), len(failed)


def mark_enqueued(*, session: Session, image_ids: Sequence[uuid.UUID]) -> None:
    """Record that the broker accepted these images' work (the outbox's "sent" mark)."""
    session.execute(
        update(Image)
        .where(Image.id.in_(image_ids))
        .values(enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    )


# -- finishing: running -> done | failed ----------------------------------------------------


def _finish(session: Session, transition: Transition, image_id: uuid.UUID, **values: Any) -> bool:
    moved = apply(
        session, transition, [image_id], finished_at=utcnow(), lease_expires_at=None, **values
    )
    return bool(moved)


def record_prediction(
    *,
    session: Session,
    image: Image,
    model_version_id: uuid.UUID,
    score: float,
    heatmap_key: str | None = None,
    input_distance: float | None = None,
    input_intensity: float | None = None,
    warnings: Sequence[str] = (),
) -> bool:
    """Mark a running image done with its score; False (and nothing written) otherwise.

    A repeat for the same image and model version never adds a second row.
    """
    if not _finish(session, Transition.COMPLETE, image.id, error_code=None, error_message=None):
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
            input_distance=input_distance,
            input_intensity=input_intensity,
            warnings=list(warnings),
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[Prediction.image_id, Prediction.model_version_id])
    )
    return True


def record_failure(*, session: Session, image: Image, code: str, message: str) -> bool:
    """Mark a running image failed with a stable code; False if it was not running."""
    return _finish(session, Transition.FAIL, image.id, error_code=code, error_message=message)


def abandon_images(
    *, session: Session, image_ids: Sequence[uuid.UUID], code: str, message: str
) -> int:
    """Last resort after retries: fail what is still queued or running, so no image stays
    stuck, and complete the batches that this finishes."""
    moved = apply(
        session,
        Transition.ABANDON,
        image_ids,
        finished_at=utcnow(),
        lease_expires_at=None,
        error_code=code,
        error_message=message,
    )
    if moved:
        batch_ids = session.scalars(select(Image.batch_id).where(Image.id.in_(moved)).distinct())
        refresh_batches(session=session, batch_ids=list(batch_ids))
    return len(moved)


# -- batches ----------------------------------------------------------------------------------


def complete_if_finished(*, session: Session, batch: Batch) -> bool:
    """Mark a closed batch completed once no image is queued or running; caller holds its lock."""
    if batch.status != BatchStatus.PROCESSING:
        return False
    counts = image_counts(session=session, tenant_id=batch.tenant_id, batch_id=batch.id)
    if any(counts[status.value] for status in ImageStatus if status not in TERMINAL_IMAGE_STATUSES):
        return False
    batch.status = BatchStatus.COMPLETED
    batch.completed_at = utcnow()
    announce_completion(session, batch, counts)
    queue_exam_exports(session, batch)
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
