"""Taking one uploaded file into storage: sniff, read its header, stream it, describe it."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO, cast

from fastapi import UploadFile
from PIL import Image as PILImage

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
ZIP_MAGIC = b"PK\x03\x04"
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


@dataclass
class UploadOutcome:
    """What one uploaded file (or archive) became: stored images and refused files."""

    stored: list[StoredUpload] = field(default_factory=list)
    rejected: list[tuple[str, ImageRejected]] = field(default_factory=list)


def _raster_metadata(stream: BinaryIO, filename: str, hints: UploadHints) -> ImageMetadata:
    """Size from the PNG/JPEG header (pixels are not decoded); the rest from hints or name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        try:
            with PILImage.open(stream) as img:
                width, height = img.size
        except PILImage.DecompressionBombError as err:
            raise ImageRejected(RejectCode.IMAGE_TOO_LARGE, f"{filename}: {err}") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageRejected(
                RejectCode.INVALID_IMAGE, f"{filename} has an unreadable image header: {err}"
            ) from err
    match = RASTER_NAME.match(PurePosixPath(filename).stem)
    return ImageMetadata(
        laterality=hints.laterality or (parse_laterality(match["lat"]) if match else None),
        view=hints.view or (parse_view(match["view"]) if match else None),
        patient_id=hints.patient_id,
        study_uid=hints.study_key or (match["study"] if match else None),
        pixels=width * height,
    )


def store_file(
    stream: BinaryIO,
    filename: str,
    *,
    settings: Settings,
    store: ObjectStore,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    hints: UploadHints,
) -> StoredUpload:
    """Validate one seekable file and stream it into storage; raises ImageRejected."""
    head = stream.read(SNIFF_BYTES)
    if not head:
        raise ImageRejected(RejectCode.EMPTY_FILE, f"{filename} is empty")
    media_type = sniff_media_type(head)
    if media_type is None:
        raise ImageRejected(
            RejectCode.UNSUPPORTED_MEDIA_TYPE,
            f"{filename} is not DICOM, PNG or JPEG (judged by its content, not its name)",
        )
    stream.seek(0)
    if media_type == MediaType.DICOM:
        metadata = dicom_metadata(stream)
        if metadata.pixels is None:
            raise ImageRejected(
                RejectCode.NOT_DICOM_IMAGE,
                f"{filename} is DICOM but not an image (no Rows and Columns); send the "
                "image objects of the study",
            )
    else:
        metadata = _raster_metadata(stream, filename, hints)
    if metadata.pixels is not None and metadata.pixels > settings.max_image_pixels:
        raise ImageRejected(
            RejectCode.IMAGE_TOO_LARGE,
            f"{filename} declares {metadata.pixels} pixels; the limit is "
            f"{settings.max_image_pixels}",
        )
    stream.seek(0)
    image_id = new_id()
    key = f"tenants/{tenant_id}/batches/{batch_id}/images/{image_id}"
    try:
        stored = store.put_stream(
            key, stream, content_type=media_type.value, limit=settings.max_file_bytes
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


def store_upload(
    upload: UploadFile,
    *,
    settings: Settings,
    store: ObjectStore,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    hints: UploadHints,
) -> UploadOutcome:
    """Store one uploaded file, or each image inside an uploaded zip archive."""
    filename = safe_filename(upload.filename)
    is_zip = upload.file.read(4) == ZIP_MAGIC
    upload.file.seek(0)
    if is_zip:
        return _store_archive(
            upload.file,
            filename,
            settings=settings,
            store=store,
            tenant_id=tenant_id,
            batch_id=batch_id,
            hints=hints,
        )
    try:
        stored = store_file(
            upload.file,
            filename,
            settings=settings,
            store=store,
            tenant_id=tenant_id,
            batch_id=batch_id,
            hints=hints,
        )
    except ImageRejected as rejection:
        return UploadOutcome(rejected=[(filename, rejection)])
    return UploadOutcome(stored=[stored])


def unsafe_entry_reason(info: zipfile.ZipInfo) -> str | None:
    """Why an archive entry must not be used, or None if it is safe."""
    name = info.filename.replace("\\", "/")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "is a symbolic link"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the archive with '..'"
    return None


def _store_archive(
    stream: BinaryIO,
    archive_name: str,
    *,
    settings: Settings,
    store: ObjectStore,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    hints: UploadHints,
) -> UploadOutcome:
    """Each image of a zip archive, within the entry-count and uncompressed-size limits.

    Sizes are checked against the entries' headers before anything is extracted; the
    decompressor itself never yields more than a header declares (CPython's zipfile stops
    there and fails the CRC), so lying headers cannot exceed the limit either.
    """
    outcome = UploadOutcome()
    try:
        archive = zipfile.ZipFile(stream)
        entries = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        outcome.rejected.append(
            (
                archive_name,
                ImageRejected(
                    RejectCode.INVALID_ARCHIVE,
                    f"{archive_name} is not a readable zip archive: {err}",
                ),
            )
        )
        return outcome
    declared = sum(info.file_size for info in entries)
    if len(entries) > settings.max_zip_entries:
        outcome.rejected.append(
            (
                archive_name,
                ImageRejected(
                    RejectCode.ARCHIVE_TOO_MANY_ENTRIES,
                    f"{archive_name} holds {len(entries)} files; the limit is "
                    f"{settings.max_zip_entries} per archive",
                ),
            )
        )
        return outcome
    if declared > settings.max_zip_bytes:
        outcome.rejected.append(
            (
                archive_name,
                ImageRejected(
                    RejectCode.ARCHIVE_TOO_LARGE,
                    f"{archive_name} expands to {declared} bytes; the limit is "
                    f"{settings.max_zip_bytes}",
                ),
            )
        )
        return outcome
    try:
        for info in entries:
            label = f"{archive_name}/{info.filename}"
            reason = unsafe_entry_reason(info)
            if reason is not None:
                outcome.rejected.append(
                    (
                        label,
                        ImageRejected(
                            RejectCode.UNSAFE_ARCHIVE_ENTRY, f"{label} {reason}; it was skipped"
                        ),
                    )
                )
                continue
            try:
                with archive.open(info) as entry:
                    if entry.read(4) == ZIP_MAGIC:
                        raise ImageRejected(
                            RejectCode.UNSUPPORTED_MEDIA_TYPE,
                            f"{label} is an archive inside an archive",
                        )
                    entry.seek(0)
                    outcome.stored.append(
                        store_file(
                            cast(BinaryIO, entry),
                            safe_filename(info.filename),
                            settings=settings,
                            store=store,
                            tenant_id=tenant_id,
                            batch_id=batch_id,
                            hints=hints,
                        )
                    )
            except ImageRejected as rejection:
                outcome.rejected.append((label, rejection))
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                outcome.rejected.append(
                    (
                        label,
                        ImageRejected(
                            RejectCode.INVALID_ARCHIVE, f"{label} cannot be extracted: {err}"
                        ),
                    )
                )
    except BaseException:
        # Storage failed part-way: remove what this archive already stored, then report.
        for done in outcome.stored:
            store.delete(done.stored.key)
        raise
    return outcome
