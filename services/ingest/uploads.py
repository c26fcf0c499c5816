"""One uploaded file, or each image of an uploaded zip archive, through the intake."""

from __future__ import annotations

from fastapi import UploadFile

from services.ingest.archives import ZIP_MAGIC, store_archive
from shared.imaging.formats import ImageRejected
from shared.imaging.intake import Destination, IntakeHints, IntakeOutcome, safe_filename, take_in


def store_upload(upload: UploadFile, *, to: Destination, hints: IntakeHints) -> IntakeOutcome:
    """Store one uploaded file, or each image inside an uploaded zip archive."""
    filename = safe_filename(upload.filename)
    is_zip = upload.file.read(4) == ZIP_MAGIC
    upload.file.seek(0)
    if is_zip:
        return store_archive(upload.file, filename, to=to, hints=hints)
    try:
        stored = take_in(upload.file, filename, to=to, hints=hints)
    except ImageRejected as rejection:
        return IntakeOutcome(rejected=[(filename, rejection)])
    return IntakeOutcome(stored=[stored])
