"""Ingest API: create batches, upload images, close batches."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from kombu.exceptions import OperationalError as BrokerError
from minio.error import S3Error
from sqlalchemy.exc import OperationalError as DatabaseError
from urllib3.exceptions import HTTPError as StorageConnectionError

from services.ingest.deps import (
    CallerDep,
    ProducerDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    StorersDep,
)
from services.ingest.schemas import (
    AcceptedImage,
    BatchCreate,
    RejectedFile,
    UploadResult,
    WebhookSecret,
)
from services.ingest.uploads import store_upload
from shared.api.deps import Caller, require_scope
from shared.api.errors import ApiError
from shared.api.schemas import (
    COMMON_ERRORS,
    PLAIN_TEXT_PATTERN,
    BatchPublic,
    error_responses,
)
from shared.batches import create_batch, get_batch, image_count, record_rejections
from shared.db.models import (
    AuditAction,
    Batch,
    BatchPriority,
    BatchPurpose,
    BatchStatus,
    Image,
    Laterality,
    Scope,
    View,
)
from shared.imaging.intake import Destination, IntakeHints, StoredImage, discard
from shared.lifecycle import accept_images, close_batch, mark_enqueued
from shared.queue import enqueue_screening
from shared.webhooks import SIGNATURE_HEADER, tenant_secret

log = logging.getLogger(__name__)
router = APIRouter(
    dependencies=[require_scope(Scope.SUBMIT)],
    prefix="/v1",
    tags=["batches"],
    responses={**COMMON_ERRORS, **error_responses(409, 413)},
)

RETRY_AFTER_S = "5"


def _batch_not_found(batch_id: uuid.UUID) -> ApiError:
    return ApiError(404, "batch_not_found", f"no batch {batch_id} exists for this API key")


def _not_open(batch: Batch) -> ApiError:
    return ApiError(
        409,
        "batch_not_open",
        f"batch {batch.id} is {batch.status.value}; it takes no more images. "
        "Create a new batch for further uploads.",
    )


@router.post("/batches", status_code=201, response_model=BatchPublic)
def post_batch(spec: BatchCreate, session: SessionDep, caller: CallerDep) -> Batch:
    batch = create_batch(
        session=session,
        tenant_id=caller.tenant.id,
        name=spec.name,
        priority=spec.priority,
        callback_url=str(spec.callback_url) if spec.callback_url else None,
        purpose=spec.purpose,
    )
    caller.audit(session, AuditAction.CREATE, "batch", batch.id)
    session.commit()
    return batch


@router.get("/webhook-secret", response_model=WebhookSecret, tags=["webhooks"])
def get_webhook_secret(session: SessionDep, caller: CallerDep) -> WebhookSecret:
    """The secret that signs this tenant's webhook deliveries (made on first request)."""
    tenant = session.merge(caller.tenant)
    secret = tenant_secret(session, tenant)
    caller.audit(session, AuditAction.READ, "webhook_secret", None)
    session.commit()
    return WebhookSecret(
        secret=secret,
        signature_header=SIGNATURE_HEADER,
        scheme="t=<unix seconds>,v1=hex(HMAC-SHA256(secret, '<t>.' + raw body))",
    )


@router.post("/batches/{batch_id}/images", status_code=202, response_model=UploadResult)
def post_images(
    batch_id: uuid.UUID,
    files: Annotated[list[UploadFile], File(description="DICOM, PNG or JPEG files")],
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    producer: ProducerDep,
    storers: StorersDep,
    study_key: Annotated[str | None, Form(max_length=128, pattern=PLAIN_TEXT_PATTERN)] = None,
    patient_id: Annotated[str | None, Form(max_length=128, pattern=PLAIN_TEXT_PATTERN)] = None,
    laterality: Annotated[Laterality | None, Form()] = None,
    view: Annotated[View | None, Form()] = None,
) -> UploadResult:
    tenant = caller.tenant
    batch = get_batch(session=session, tenant_id=tenant.id, batch_id=batch_id)
    if batch is None:
        raise _batch_not_found(batch_id)
    if batch.status != BatchStatus.OPEN:
        raise _not_open(batch)
    if len(files) > settings.max_files_per_request:
        raise ApiError(
            413,
            "too_many_files",
            f"{len(files)} files in one request; send at most "
            f"{settings.max_files_per_request} per request",
        )
    session.rollback()  # release the snapshot while files stream; re-checked under lock below

    destination = Destination(
        settings, store, tenant.id, batch_id, keep_identity=tenant.identity_vault
    )
    hints = IntakeHints(
        study_key=study_key, patient_id=patient_id, laterality=laterality, view=view
    )
    stored: list[StoredImage] = []
    rejected: list[RejectedFile] = []
    storage_failure: Exception | None = None
    # The files of a request are checked, de-identified and streamed to storage side by side
    # (the object store is another process; hashing and socket I/O release the GIL).
    futures = [
        storers.submit(store_upload, upload, to=destination, hints=hints) for upload in files
    ]
    for future in futures:  # in upload order, and every one finished before going on
        try:
            outcome = future.result()
        except (S3Error, StorageConnectionError) as err:
            storage_failure = err
            continue
        stored.extend(outcome.stored)
        rejected.extend(
            RejectedFile(filename=name, code=err.code.value, message=err.message)
            for name, err in outcome.rejected
        )
    if storage_failure is not None:
        discard(store, stored)
        raise ApiError(
            503,
            "storage_unavailable",
            "object storage is unavailable; nothing was kept. Retry the upload.",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from storage_failure

    rejections = [(r.filename, r.code, r.message) for r in rejected]
    if not stored:
        _keep_rejections(session, caller, batch_id, rejections)
        raise ApiError(
            422,
            "no_acceptable_files",
            "none of the files could be accepted; see detail.rejected for why",
            detail={"rejected": [r.model_dump() for r in rejected]},
        )

    try:
        accepted = _record_images(
            session=session,
            caller=caller,
            batch_id=batch_id,
            uploads=stored,
            rejections=rejections,
            max_images=settings.max_images_per_batch,
        )
    except ApiError:
        discard(store, stored)
        raise
    except DatabaseError as err:
        session.rollback()
        discard(store, stored)
        raise ApiError(
            503,
            "database_unavailable",
            "the database is unavailable; nothing was kept. Retry the upload.",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from err

    # Rows are committed; only now may workers hear of them. The rows are the outbox: if the
    # broker is down, they stay unsent and the sweeper sends them once it is back.
    image_ids = [image.id for image in accepted]
    warnings: list[str] = []
    if batch.purpose == BatchPurpose.TRAINING:
        image_ids = []  # kept for training, never screened
    try:
        enqueue_screening(
            producer,
            image_ids,
            chunk_size=settings.inference_chunk_size,
            urgent=batch.priority == BatchPriority.URGENT,
        )
        mark_enqueued(session=session, image_ids=image_ids)
        session.commit()
    except (BrokerError, DatabaseError) as err:
        session.rollback()
        log.warning("images of batch %s stored but not yet queued: %s", batch_id, err)
        warnings.append(
            "the job queue is unavailable right now; the images are stored and will be queued "
            "automatically when it is back"
        )

    return UploadResult(
        batch_id=batch_id,
        accepted=[
            AcceptedImage(
                id=i.id,
                filename=i.filename,
                study_id=i.study_id,
                media_type=i.media_type,
                size_bytes=i.size_bytes,
                sha256=i.sha256,
                laterality=i.laterality,
                view=i.view,
            )
            for i in accepted
        ],
        rejected=rejected,
        warnings=warnings,
    )


def _record_images(
    *,
    session: SessionDep,
    caller: Caller,
    batch_id: uuid.UUID,
    uploads: list[StoredImage],
    rejections: list[tuple[str, str, str]],
    max_images: int,
) -> list[Image]:
    """Insert the image rows (and the refusals) in one transaction, if the batch is open."""
    tenant_id = caller.tenant.id
    batch = get_batch(session=session, tenant_id=tenant_id, batch_id=batch_id)
    if batch is None:
        raise _batch_not_found(batch_id)
    # Lock the batch so a concurrent close waits for this commit (and then sees these images).
    session.refresh(batch, with_for_update={"read": True})
    if batch.status != BatchStatus.OPEN:
        session.rollback()
        raise _not_open(batch)
    already = image_count(session=session, tenant_id=tenant_id, batch_id=batch_id)
    if already + len(uploads) > max_images:
        session.rollback()
        raise ApiError(
            413,
            "batch_full",
            f"batch {batch_id} holds {already} images and takes at most {max_images}; "
            "start a new batch for the rest",
            detail={"images": already, "limit": max_images},
        )
    images = accept_images(session=session, batch=batch, accepted=uploads)
    record_rejections(
        session=session, tenant_id=tenant_id, batch_id=batch_id, rejections=rejections
    )
    caller.audit(
        session, AuditAction.UPLOAD, "batch", batch_id, image_ids=[str(i.id) for i in images]
    )
    session.commit()
    return images


def _keep_rejections(
    session: SessionDep, caller: Caller, batch_id: uuid.UUID, rejections: list[tuple[str, str, str]]
) -> None:
    """Record refusals of an upload that stored nothing; best effort, the 422 says it all."""
    try:
        record_rejections(
            session=session, tenant_id=caller.tenant.id, batch_id=batch_id, rejections=rejections
        )
        session.commit()
    except DatabaseError:
        session.rollback()
        log.warning("could not record %d refused files of batch %s", len(rejections), batch_id)


@router.post("/batches/{batch_id}/close", response_model=BatchPublic)
def post_close(batch_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Batch:
    batch = get_batch(
        session=session, tenant_id=caller.tenant.id, batch_id=batch_id, for_update=True
    )
    if batch is None:
        raise _batch_not_found(batch_id)
    close_batch(session=session, batch=batch)
    caller.audit(session, AuditAction.CLOSE, "batch", batch.id)
    session.commit()
    return batch
