"""Batches, studies, images and predictions as a tenant sees them: creation and reads.

Every function here takes a tenant id and filters by it; endpoints never build their own
queries. Status changes, and the writes of the worker and the sweeper (which go by row id and
belong to no tenant), are in `shared/lifecycle.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import distinct_on, insert
from sqlalchemy.orm import Session, joinedload

from shared.db.base import new_id, utcnow
from shared.db.models import (
    Batch,
    BatchPriority,
    BatchPurpose,
    Image,
    ImageStatus,
    ModelVersion,
    Prediction,
    RejectedFile,
    Study,
)


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
) -> uuid.UUID:
    """The id of the batch's study for `study_key`; concurrent uploads of one exam share one
    row. Core statements on the session's connection: this runs once per image received."""
    connection = session.connection()
    existing = select(Study.id).where(
        Study.batch_id == batch_id, Study.study_key == study_key, Study.tenant_id == tenant_id
    )
    study_id = connection.scalar(existing)
    if study_id is not None:  # the exam's second view onwards: no insert attempted
        return study_id
    connection.execute(
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
    study_id = connection.scalar(existing)
    assert study_id is not None
    return study_id


def image_count(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> int:
    count = session.scalar(
        select(func.count()).where(Image.batch_id == batch_id, Image.tenant_id == tenant_id)
    )
    return int(count or 0)


def image_counts(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> dict[str, int]:
    """How many of the batch's images are in each status (every status present, 0 or more)."""
    counts = {status.value: 0 for status in ImageStatus}
    rows = session.execute(
        select(Image.status, func.count())
        .where(Image.batch_id == batch_id, Image.tenant_id == tenant_id)
        .group_by(Image.status)
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


def rejection_count(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> int:
    count = session.scalar(
        select(func.count()).where(
            RejectedFile.batch_id == batch_id, RejectedFile.tenant_id == tenant_id
        )
    )
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
            select(Image)
            .where(Image.study_id.in_(list(images)), Image.tenant_id == tenant_id)
            .order_by(Image.id)
        )
        for image in rows:
            images[image.study_id].append(image)
    return [(study, images[study.id]) for study in studies]


def model_versions_used(
    *, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> list[ModelVersion]:
    """The model versions that scored any of the batch's images, oldest first."""
    query = (
        select(ModelVersion)
        .where(
            ModelVersion.id.in_(
                select(Prediction.model_version_id)
                .join(Image, Image.id == Prediction.image_id)
                .where(Image.batch_id == batch_id, Prediction.tenant_id == tenant_id)
                .distinct()
            )
        )
        .order_by(ModelVersion.created_at)
    )
    return list(session.scalars(query))


def warning_counts(
    *, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> dict[str, int]:
    """How many of the batch's images carry each prediction warning (any model version)."""
    code = func.unnest(Prediction.warnings).label("code")
    flagged = (
        select(Prediction.image_id, code)
        .join(Image, Image.id == Prediction.image_id)
        .where(Image.batch_id == batch_id, Prediction.tenant_id == tenant_id)
        .subquery()
    )
    query = select(flagged.c.code, func.count(func.distinct(flagged.c.image_id))).group_by(
        flagged.c.code
    )
    return {str(code): int(count) for code, count in session.execute(query).all()}


def get_image(*, session: Session, tenant_id: uuid.UUID, image_id: uuid.UUID) -> Image | None:
    return session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))


def latest_predictions(
    *, session: Session, tenant_id: uuid.UUID, image_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Prediction]:
    """Each image's newest prediction (an image may be screened by several model versions)."""
    if not image_ids:
        return {}
    query = (
        select(Prediction)
        .where(Prediction.image_id.in_(image_ids), Prediction.tenant_id == tenant_id)
        .order_by(Prediction.image_id, Prediction.created_at.desc())
        .ext(distinct_on(Prediction.image_id))
        # The reference is for workers; a results page never reads it.
        .options(joinedload(Prediction.model_version).defer(ModelVersion.input_reference))
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


def get_exam(
    *, session: Session, tenant_id: uuid.UUID, study_id: uuid.UUID
) -> tuple[Study, list[Image]] | None:
    """One of the tenant's exams (a study) with its images, or None."""
    study = session.scalar(select(Study).where(Study.id == study_id, Study.tenant_id == tenant_id))
    if study is None:
        return None
    images = session.scalars(
        select(Image)
        .where(Image.study_id == study.id, Image.tenant_id == tenant_id)
        .order_by(Image.id)
    )
    return study, list(images)
