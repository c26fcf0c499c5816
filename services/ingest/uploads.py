"""Taking one uploaded file into storage: sniff, read its header, stream it, describe it."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath

from fastapi import UploadFile

from shared.config import Settings
from shared.db.base import new_id
from shared.db.models import Laterality, View
from shared.imaging.formats import (
    SNIFF_BYTES,
    ImageMetadata,
    ImageRejected,
    MediaType,
    RejectCode,
    dicom_metadata,
    parse_laterality,
    parse_view,
    sniff_media_type,
)
from shared.storage import ObjectStore, ObjectTooLarge, StoredObject

# PNG/JPEG carry no DICOM header; their laterality and view may come from the file name:
# <study>_<L|R>_<CC|MLO>.<ext>, e.g. "exam17_L_MLO.png".
RASTER_NAME = re.compile(r"^(?P<study>.+)_(?P<lat>[LR])_(?P<view>CC|MLO)$", re.IGNORECASE)


@dataclass(frozen=True)
class UploadHints:
    """Per-request fields for files that carry no metadata of their own (PNG, JPEG)."""

    study_key: str | None = None
    patient_id: str | None = None
    laterality: Laterality | None = None
    view: View | None = None


@dataclass(frozen=True)
class StoredUpload:
    image_id: uuid.UUID
    filename: str
    media_type: MediaType
    stored: StoredObject
    study_key: str
    patient_key: str
    laterality: Laterality | None
    view: View | None


def patient_key(secret: str, patient_id: str) -> str:
    """Keyed hash of a patient id: stable per patient, meaningless without the secret."""
    return hmac.new(secret.encode(), patient_id.encode(), hashlib.sha256).hexdigest()


def safe_filename(name: str | None) -> str:
    """The base name only (no folders), without control characters, at most 255 characters."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    printable = "".join(ch for ch in base if ch.isprintable())
    return printable[:255] or "unnamed"


def _raster_metadata(filename: str, hints: UploadHints) -> ImageMetadata:
    match = RASTER_NAME.match(PurePosixPath(filename).stem)
    return ImageMetadata(
        laterality=hints.laterality or (parse_laterality(match["lat"]) if match else None),
        view=hints.view or (parse_view(match["view"]) if match else None),
        patient_id=hints.patient_id,
        study_uid=hints.study_key or (match["study"] if match else None),
    )


def store_upload(
    upload: UploadFile,
    *,
    settings: Settings,
    store: ObjectStore,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    hints: UploadHints,
) -> StoredUpload:
    """Validate and stream one file into storage; raises ImageRejected with a stable code."""
    filename = safe_filename(upload.filename)
    head = upload.file.read(SNIFF_BYTES)
    if not head:
        raise ImageRejected(RejectCode.EMPTY_FILE, f"{filename} is empty")
    media_type = sniff_media_type(head)
    if media_type is None:
        raise ImageRejected(
            RejectCode.UNSUPPORTED_MEDIA_TYPE,
            f"{filename} is not DICOM, PNG or JPEG (judged by its content, not its name)",
        )
    if media_type == MediaType.DICOM:
        upload.file.seek(0)
        metadata = dicom_metadata(upload.file)
        head = upload.file.read(SNIFF_BYTES)
    else:
        metadata = _raster_metadata(filename, hints)
    image_id = new_id()
    key = f"tenants/{tenant_id}/batches/{batch_id}/images/{image_id}"
    try:
        stored = store.put_stream(
            key,
            upload.file,
            content_type=media_type.value,
            limit=settings.max_file_bytes,
            prefix=head,
        )
    except ObjectTooLarge as err:
        raise ImageRejected(
            RejectCode.FILE_TOO_LARGE, f"{filename} is larger than the limit of {err.limit} bytes"
        ) from err
    # Without a study id, each such file is its own study, keyed by its content.
    study_key = metadata.study_uid or f"sha256:{stored.sha256}"
    return StoredUpload(
        image_id=image_id,
        filename=filename,
        media_type=media_type,
        stored=stored,
        study_key=study_key[:128],
        patient_key=patient_key(
            settings.patient_key_secret, metadata.patient_id or f"study:{study_key}"
        ),
        laterality=metadata.laterality,
        view=metadata.view,
    )
