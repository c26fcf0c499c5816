"""DICOM results going out: export destinations, the exam exports a completed batch queues,
and the delivery outbox with bounded retries.

When a screening batch completes (in the transaction that marks it completed), every exam with
a screened DICOM image gets an `exam_exports` row, and one `export_deliveries` row per enabled
destination of the tenant. A worker's sweeper renders the exam's objects
(`shared/dicom_export.py`) and sends them; a failed attempt is retried after
`export_retry_base_s` x 2^(attempt - 1), capped at an hour, and after `export_max_attempts` the
delivery is `dead`: listed with the destination's last answer, counted by /metrics, and sent
again only when asked (`POST /v1/deliveries/{id}/retry`). The objects keep their SOP Instance
UIDs across attempts, so a retry never gives a PACS a second copy.

This module touches rows only (no DICOM libraries): the web services use it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, joinedload

from shared.config import Settings
from shared.db.base import new_id, utcnow
from shared.db.models import (
    Batch,
    BatchPurpose,
    DicomNode,
    ExamExport,
    ExportDelivery,
    ExportDeliveryStatus,
    ExportDestination,
    ExportStatus,
    Image,
    ImageStatus,
    Transport,
)
from shared.imaging.formats import MediaType

MAX_BACKOFF_S = 3600


class DestinationError(ValueError):
    """A destination that cannot be added as given; the message says what to fix."""


def add_destination(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    name: str,
    node: DicomNode | None = None,
    url: str | None = None,
    secondary_capture: bool = False,
) -> ExportDestination:
    """A C-STORE destination (a registered node with a host and port) or a STOW-RS one
    (a DICOMweb base URL)."""
    if (node is None) == (url is None):
        raise DestinationError("give either a DICOM node (C-STORE) or a DICOMweb URL (STOW-RS)")
    if node is not None and (node.host is None or node.port is None):
        raise DestinationError(
            f"DICOM node {node.ae_title} has no host and port to send to; add it again with "
            "--host and --port"
        )
    if url is not None and not url.startswith(("http://", "https://")):
        raise DestinationError(f"{url!r} is not an http(s) URL of a DICOMweb server")
    destination = ExportDestination(
        tenant_id=tenant_id,
        name=name,
        transport=Transport.DIMSE if node is not None else Transport.STOW_RS,
        dicom_node_id=node.id if node is not None else None,
        url=url,
        secondary_capture=secondary_capture,
    )
    session.add(destination)
    session.flush()
    return destination


def list_destinations(*, session: Session, tenant_id: uuid.UUID) -> list[ExportDestination]:
    return list(
        session.scalars(
            select(ExportDestination)
            .where(ExportDestination.tenant_id == tenant_id)
            .options(joinedload(ExportDestination.dicom_node))
            .order_by(ExportDestination.created_at)
        )
    )


def disable_destination(
    *, session: Session, tenant_id: uuid.UUID, name: str
) -> ExportDestination | None:
    destination = session.scalar(
        select(ExportDestination).where(
            ExportDestination.tenant_id == tenant_id, ExportDestination.name == name
        )
    )
    if destination is not None and destination.disabled_at is None:
        destination.disabled_at = utcnow()
    return destination


def queue_exam_exports(session: Session, batch: Batch) -> None:
    """In the transaction completing `batch`: an export of every exam with a screened DICOM
    image, and a delivery of it to each enabled destination. Idempotent."""
    if batch.purpose != BatchPurpose.SCREENING:
        return
    study_ids = list(
        session.scalars(
            select(Image.study_id)
            .where(
                Image.batch_id == batch.id,
                Image.status == ImageStatus.DONE,
                Image.media_type == MediaType.DICOM.value,
            )
            .distinct()
            .order_by(Image.study_id)
        )
    )
    if not study_ids:
        return
    now = utcnow()
    session.execute(
        insert(ExamExport)
        .values(
            [
                {
                    "study_id": study_id,
                    "tenant_id": batch.tenant_id,
                    "batch_id": batch.id,
                    "status": ExportStatus.PENDING,
                    "objects": [],
                    "attempts": 0,
                    "created_at": now,
                }
                for study_id in study_ids
            ]
        )
        .on_conflict_do_nothing(index_elements=[ExamExport.study_id])
    )
    destination_ids = list(
        session.scalars(
            select(ExportDestination.id).where(
                ExportDestination.tenant_id == batch.tenant_id,
                ExportDestination.disabled_at.is_(None),
            )
        )
    )
    if not destination_ids:
        return
    session.execute(
        insert(ExportDelivery)
        .values(
            [
                {
                    "id": new_id(),
                    "tenant_id": batch.tenant_id,
                    "batch_id": batch.id,
                    "study_id": study_id,
                    "destination_id": destination_id,
                    "status": ExportDeliveryStatus.PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for study_id in study_ids
                for destination_id in destination_ids
            ]
        )
        .on_conflict_do_nothing(
            index_elements=[ExportDelivery.study_id, ExportDelivery.destination_id]
        )
    )


def backoff(settings: Settings, attempts: int) -> timedelta:
    return timedelta(
        seconds=min(MAX_BACKOFF_S, settings.export_retry_base_s * 2 ** max(0, attempts - 1))
    )


def batch_deliveries(
    *, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> list[ExportDelivery]:
    return list(
        session.scalars(
            select(ExportDelivery)
            .where(ExportDelivery.tenant_id == tenant_id, ExportDelivery.batch_id == batch_id)
            .options(joinedload(ExportDelivery.destination))
            .order_by(ExportDelivery.id)
        )
    )


def get_delivery(
    *, session: Session, tenant_id: uuid.UUID, delivery_id: uuid.UUID, for_update: bool = False
) -> ExportDelivery | None:
    query = select(ExportDelivery).where(
        ExportDelivery.id == delivery_id, ExportDelivery.tenant_id == tenant_id
    )
    if for_update:
        query = query.with_for_update(of=ExportDelivery)
    return session.scalar(query.options(joinedload(ExportDelivery.destination)))


def retry_delivery(delivery: ExportDelivery) -> None:
    """A dead delivery starts again with a fresh set of attempts, due now."""
    delivery.status = ExportDeliveryStatus.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()


def get_export(*, session: Session, tenant_id: uuid.UUID, study_id: uuid.UUID) -> ExamExport | None:
    return session.scalar(
        select(ExamExport).where(
            and_(ExamExport.study_id == study_id, ExamExport.tenant_id == tenant_id)
        )
    )


def delivery_counts(session: Session) -> dict[str, int]:
    """Deliveries by status, all tenants (for /metrics)."""
    rows = session.execute(
        select(ExportDelivery.status, func.count()).group_by(ExportDelivery.status)
    ).all()
    counts = {status.value: 0 for status in ExportDeliveryStatus}
    counts.update({status.value: count for status, count in rows})
    return counts
