"""Studies that arrive instance by instance over DICOM (C-STORE to the gateway, STOW-RS to
ingest), assembled into one batch per study.

Each instance goes through the one intake (`shared/imaging/intake.py`), then into its study's
open batch: a batch per (tenant, pseudonymous Study Instance UID), created by the first
instance. The sweeper closes a study's batch once no instance has arrived for
`dicom_study_quiet_s` (`close_quiet_studies`); an instance arriving after that starts a
follow-up batch of the same study, so nothing is refused for lateness. A SOP instance sent
twice (a sender's retry) is one image: the second copy is acknowledged and not stored again.

An instance is acknowledged only once its object is stored and its row committed. Queuing it
is the caller's: the gateway's dispatcher thread sends the images committed meanwhile as one
task, STOW-RS a request's images in chunks; the row is the outbox either way, so an instance
whose queuing failed is sent by the sweeper.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import BinaryIO, NamedTuple

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import OperationalError as DatabaseError
from sqlalchemy.orm import Session

from shared.batches import record_rejections
from shared.config import Settings
from shared.db.base import new_id, session_scope, utcnow
from shared.db.models import (
    Batch,
    BatchPurpose,
    BatchSource,
    BatchStatus,
    Image,
    RejectedFile,
    Tenant,
)
from shared.imaging.dicom import read_header
from shared.imaging.formats import ImageRejected, RejectCode
from shared.imaging.intake import (
    Destination,
    IntakeHints,
    deidentifier_for,
    discard,
    patient_key,
    take_in,
)
from shared.lifecycle import accept_images, close_batch, mark_enqueued
from shared.queue import enqueue_screening
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

OPEN_STUDY_BATCH = text("status = 'open' AND dicom_study_key IS NOT NULL")


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: the tenant that owns it, how it came, and from which node."""

    tenant_id: uuid.UUID
    source: BatchSource
    label: str  # the node's AE title, or "STOW-RS": names the study's batch
    node_id: uuid.UUID | None = None


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # this SOP instance was stored before: acknowledged, not stored
    REFUSED = "refused"  # the quality gate refused it, with a code


@dataclass(frozen=True)
class Receipt:
    outcome: Outcome
    # The instance's own UIDs, for the sender's answer (STOW-RS lists them); never stored.
    sop_class_uid: str | None
    sop_instance_uid: str | None
    batch_id: uuid.UUID | None = None
    image_id: uuid.UUID | None = None
    rejection: ImageRejected | None = None


def receive_instance(
    stream: BinaryIO,
    *,
    sender: Sender,
    settings: Settings,
    store: ObjectStore,
    expected_study_uid: str | None = None,
) -> Receipt:
    """Take one DICOM Part 10 instance into its study's batch. A refusal of the instance is a
    Receipt (recorded in the batch when its study is known); an outage of Postgres or the
    object store raises, so the sender is told to retry, and nothing of the instance is kept.
    `expected_study_uid` refuses an instance of any other study (STOW-RS to one study).
    """
    try:
        header = read_header(stream, "instance")
    except ImageRejected as rejection:
        return Receipt(Outcome.REFUSED, None, None, rejection=rejection)
    header_end = stream.tell()
    sop_class = str(header.get("SOPClassUID") or "") or None
    sop_instance = str(header.get("SOPInstanceUID") or "") or None
    study_uid = str(header.get("StudyInstanceUID") or "")
    if not study_uid or not sop_instance:
        missing = "Study Instance UID" if not study_uid else "SOP Instance UID"
        invalid = ImageRejected(
            RejectCode.INVALID_DICOM, f"the instance has no {missing}; send a valid DICOM object"
        )
        return Receipt(Outcome.REFUSED, sop_class, sop_instance, rejection=invalid)
    if expected_study_uid is not None and study_uid != expected_study_uid:
        mismatch = ImageRejected(
            RejectCode.STUDY_MISMATCH,
            "the instance belongs to another study than the one posted to",
        )
        return Receipt(Outcome.REFUSED, sop_class, sop_instance, rejection=mismatch)
    deidentifier = deidentifier_for(settings.patient_key_secret)
    study_key = deidentifier.pseudonymous_uid(study_uid)
    sop_key = deidentifier.pseudonymous_uid(sop_instance)
    filename = f"instance-{sop_key[5:21]}.dcm"  # names the instance without identifying it
    accession = str(header.get("AccessionNumber") or "")
    accession_key = (
        patient_key(settings.patient_key_secret, sender.tenant_id, f"accession:{accession}")
        if accession
        else None
    )

    with session_scope(settings.database_url) as session:
        known = _image_of(session, sender.tenant_id, sop_key)
        if known is not None:
            return Receipt(Outcome.DUPLICATE, sop_class, sop_instance, known[1], known[0])
        # A shared lock on the open batch while the instance is stored and recorded: the
        # sweeper never closes a study that is receiving (it skips locked batches).
        batch = open_study_batch(
            session, sender=sender, study_key=study_key, accession_key=accession_key
        )
        keeps_identity = bool(
            session.scalar(select(Tenant.identity_vault).where(Tenant.id == sender.tenant_id))
        )
        stream.seek(0)
        try:
            stored = take_in(
                stream,
                filename,
                to=Destination(
                    settings, store, sender.tenant_id, batch.id, keep_identity=keeps_identity
                ),
                hints=IntakeHints(),
                known_header=(header, header_end),
            )
        except ImageRejected as rejection:
            refused_before = session.scalar(
                select(RejectedFile.id).where(
                    RejectedFile.batch_id == batch.id, RejectedFile.filename == filename
                )
            )
            if refused_before is None:  # a sender retrying a refused instance: recorded once
                record_rejections(
                    session=session,
                    tenant_id=sender.tenant_id,
                    batch_id=batch.id,
                    rejections=[(filename, rejection.code.value, rejection.message)],
                )
            return Receipt(Outcome.REFUSED, sop_class, sop_instance, batch.id, rejection=rejection)
        try:
            (image,) = accept_images(
                session=session, batch=batch, accepted=[stored], one_per_sop_instance=True
            )
            session.flush()
        except IntegrityError as err:
            if constraint_of(err) != SOP_INSTANCE_CONSTRAINT:
                discard(store, [stored])
                raise
            # The same instance, on another association, committed first.
            session.rollback()
            discard(store, [stored])
            return Receipt(Outcome.DUPLICATE, sop_class, sop_instance, batch.id)
        except BaseException:
            discard(store, [stored])
            raise
        image_id, batch_id = image.id, batch.id
    return Receipt(Outcome.STORED, sop_class, sop_instance, batch_id, image_id)


SOP_INSTANCE_CONSTRAINT = "uq_images_tenant_sop_instance"


def constraint_of(err: IntegrityError) -> str | None:
    diag = getattr(err.orig, "diag", None)
    return getattr(diag, "constraint_name", None)


def _image_of(
    session: Session, tenant_id: uuid.UUID, sop_key: str
) -> tuple[uuid.UUID, uuid.UUID] | None:
    row = (
        session.connection()
        .execute(
            select(Image.id, Image.batch_id).where(
                Image.tenant_id == tenant_id, Image.sop_instance_key == sop_key
            )
        )
        .first()
    )
    return (row[0], row[1]) if row else None


def queue_received(settings: Settings, producer: Celery, image_ids: Sequence[uuid.UUID]) -> None:
    """Queue committed images for screening; if the broker or the database is down, the
    sweeper's outbox relay sends them later."""
    if not image_ids:
        return
    try:
        enqueue_screening(producer, image_ids, chunk_size=settings.inference_chunk_size)
        with session_scope(settings.database_url) as session:
            mark_enqueued(session=session, image_ids=image_ids)
    except (BrokerError, DatabaseError) as err:
        log.warning("%d images stored but not yet queued: %s", len(image_ids), err)


class StudyBatch(NamedTuple):
    id: uuid.UUID
    tenant_id: uuid.UUID
    purpose: BatchPurpose


def open_study_batch(
    session: Session, *, sender: Sender, study_key: str, accession_key: str | None
) -> StudyBatch:
    """The study's open batch, created if it has none (a first instance, or one after the
    study's last batch closed), under a shared lock. Core statements on the session's
    connection: this runs once per instance received."""
    connection = session.connection()
    open_batch = (
        select(Batch.id, Batch.tenant_id, Batch.purpose)
        .where(
            Batch.tenant_id == sender.tenant_id,
            Batch.dicom_study_key == study_key,
            Batch.status == BatchStatus.OPEN,
        )
        .with_for_update(read=True)
    )
    row = connection.execute(open_batch).first()
    if row is not None:  # the study's second instance onwards
        return StudyBatch(*row)
    for _ in range(3):
        connection.execute(
            insert(Batch)
            .values(
                id=new_id(),
                tenant_id=sender.tenant_id,
                name=f"{sender.label} study {study_key[-10:]}",
                priority="normal",
                status=BatchStatus.OPEN,
                purpose=BatchPurpose.SCREENING,
                source=sender.source,
                dicom_study_key=study_key,
                dicom_node_id=sender.node_id,
                accession_key=accession_key,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(
                index_elements=[Batch.tenant_id, Batch.dicom_study_key],
                # The index's own predicate, as literal SQL: with a bound parameter Postgres
                # cannot match the index once the statement runs on a generic plan.
                index_where=OPEN_STUDY_BATCH,
            )
        )
        row = connection.execute(open_batch).first()
        if row is not None:
            return StudyBatch(*row)
    raise RuntimeError(f"study {study_key} kept closing while an instance arrived")


def close_quiet_studies(*, session: Session, quiet_s: float) -> int:
    """Close the open study batches that received nothing for `quiet_s`; returns how many.

    Batches receiving an instance right now are locked by their receiver and skipped.
    """
    cutoff = utcnow() - timedelta(seconds=quiet_s)
    last_image = (
        select(func.max(Image.created_at)).where(Image.batch_id == Batch.id).scalar_subquery()
    )
    last_refusal = (
        select(func.max(RejectedFile.created_at))
        .where(RejectedFile.batch_id == Batch.id)
        .scalar_subquery()
    )
    quiet = list(
        session.scalars(
            select(Batch)
            .where(
                Batch.status == BatchStatus.OPEN,
                Batch.dicom_study_key.is_not(None),
                func.greatest(Batch.created_at, last_image, last_refusal) < cutoff,
            )
            .with_for_update(skip_locked=True)
        )
    )
    for batch in quiet:
        close_batch(session=session, batch=batch)
    return len(quiet)
