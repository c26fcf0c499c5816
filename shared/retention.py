"""Retention: what a tenant keeps, and for how long, after a batch completes.

Two settings per tenant (`screening admin tenant retention`): `image_retention_days`, after
which a completed batch's images lose their objects (the stored file, preview, heatmaps and
overlays) while their rows and results stay, each saying when (`image_purged_at`); and
`result_retention_days`, after which the whole batch is erased as `DELETE /v1/batches/{id}`
erases it (shared/erasure.py). None keeps them until erased.

`purge_due` is run by the workers every `retention_interval_s` with the clock it is given
(tests inject one). It works in bounded chunks, a transaction each, and is idempotent: a
batch's images are marked as their objects go, the batch once none is left, so an
interrupted purge goes on where it stopped and a finished one finds nothing to do.
The DICOM results already rendered for the site (reports, segmentations) are results, not
images: they go with the batch, at result retention.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.db.base import session_scope
from shared.db.models import Batch, Image, Tenant
from shared.erasure import erase_batch, image_object_keys
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

IMAGES_PER_CHUNK = 500
BATCHES_PER_ROUND = 100


@dataclass
class PurgeReport:
    images_purged: int = 0  # images whose objects went (rows kept)
    objects: int = 0
    batches_erased: int = 0  # batches past result retention, erased whole


def _due_batches(
    session: Session, now: datetime, days_column: Any, *, images_left: bool
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(tenant, batch) of completed batches older than their tenant's retention, oldest
    first; `images_left`: only those whose images are not all purged yet."""
    query = (
        select(Batch.tenant_id, Batch.id)
        .join(Tenant, Tenant.id == Batch.tenant_id)
        .where(
            Batch.completed_at.is_not(None),
            days_column.is_not(None),
            Batch.completed_at < now - func.make_interval(0, 0, 0, days_column),
        )
        .order_by(Batch.completed_at)
        .limit(BATCHES_PER_ROUND)
    )
    if images_left:
        query = query.where(Batch.images_purged_at.is_(None))
    return [(tenant_id, batch_id) for tenant_id, batch_id in session.execute(query)]


def purge_images_of_batch(
    session: Session, store: ObjectStore, *, batch_id: uuid.UUID, now: datetime
) -> tuple[int, int]:
    """One chunk of the batch's images: delete their objects, mark them; mark the batch when
    none is left. Returns (images, objects); (0, 0) once the batch is done."""
    images = list(
        session.scalars(
            select(Image)
            .where(Image.batch_id == batch_id, Image.image_purged_at.is_(None))
            .order_by(Image.id)
            .limit(IMAGES_PER_CHUNK)
            .with_for_update(skip_locked=True)
        )
    )
    keys = image_object_keys(store, images)
    store.delete_many(keys)
    if images:
        session.execute(
            update(Image)
            .where(Image.id.in_([image.id for image in images]))
            .values(image_purged_at=now)
            .execution_options(synchronize_session=False)
        )
    if len(images) < IMAGES_PER_CHUNK:
        left = session.scalar(
            select(func.count())
            .select_from(Image)
            .where(Image.batch_id == batch_id, Image.image_purged_at.is_(None))
        )
        if not left:
            session.execute(update(Batch).where(Batch.id == batch_id).values(images_purged_at=now))
    return len(images), len(keys)


def purge_due(database_url: str, store: ObjectStore, *, now: datetime) -> PurgeReport:
    """Everything due at `now`: batches past result retention erased, then the images of
    batches past image retention purged, a chunk per transaction."""
    report = PurgeReport()
    with session_scope(database_url) as session:
        erasable = _due_batches(session, now, Tenant.result_retention_days, images_left=False)
    for tenant_id, batch_id in erasable:
        with session_scope(database_url) as session:
            erased = erase_batch(session, store, tenant_id=tenant_id, batch_id=batch_id)
        if erased is not None:
            report.batches_erased += 1
            report.objects += erased.objects
            log.info("retention erased batch %s", batch_id, extra={"batch_id": batch_id})
    with session_scope(database_url) as session:
        purgeable = _due_batches(session, now, Tenant.image_retention_days, images_left=True)
    for _, batch_id in purgeable:
        while True:
            with session_scope(database_url) as session:
                images, objects = purge_images_of_batch(session, store, batch_id=batch_id, now=now)
            report.images_purged += images
            report.objects += objects
            if images < IMAGES_PER_CHUNK:
                break
    return report


def set_retention(
    session: Session, tenant: Tenant, *, image_days: int | None, result_days: int | None
) -> None:
    """A tenant's retention; results must outlive images (a result without its image is
    fine, the other way round is not)."""
    for days in (image_days, result_days):
        if days is not None and days < 1:
            raise ValueError("retention is a whole number of days, at least 1")
    if image_days is not None and result_days is not None and result_days < image_days:
        raise ValueError(
            f"results ({result_days} days) cannot be kept shorter than images ({image_days})"
        )
    tenant.image_retention_days = image_days
    tenant.result_retention_days = result_days
