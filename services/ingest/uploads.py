"""One uploaded file, or each image of an uploaded zip archive, through the intake."""

from __future__ import annotations

import uuid

from fastapi import UploadFile

from services.ingest.archives import ZIP_MAGIC, store_archive
from shared.config import Settings
from shared.imaging.formats import ImageRejected
from shared.imaging.intake import IntakeHints, IntakeOutcome, safe_filename, take_in
from shared.storage import ObjectStore


def store_upload(
    upload: UploadFile,
    *,
    settings: Settings,
    store: ObjectStore,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    hints: IntakeHints,
) -> IntakeOutcome:
    """Store one uploaded file, or each image inside an uploaded zip archive."""
    filename = safe_filename(upload.filename)
    is_zip = upload.file.read(4) == ZIP_MAGIC
    upload.file.seek(0)
    if is_zip:
        return store_archive(
            upload.file,
            filename,
            settings=settings,
            store=store,
            tenant_id=tenant_id,
            batch_id=batch_id,
            hints=hints,
        )
    try:
        stored = take_in(
            upload.file,
            filename,
            settings=settings,
            store=store,
            tenant_id=tenant_id,
            batch_id=batch_id,
            hints=hints,
        )
    except ImageRejected as rejection:
        return IntakeOutcome(rejected=[(filename, rejection)])
    return IntakeOutcome(stored=[stored])
