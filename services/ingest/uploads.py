"""Taking one uploaded file into storage: sniff, check, de-identify, stream, describe.

Nothing is stored as uploaded: DICOM headers are de-identified (shared/imaging/deid.py) and
PNG/JPEG metadata is stripped (shared/imaging/raster.py) on the way to object storage.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
import tempfile
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any, BinaryIO, TypeVar, cast

from fastapi import UploadFile
from PIL import Image as PILImage

from shared.config import Settings
from shared.db.base import new_id
from shared.db.models import Laterality, View
from shared.imaging.deid import Deidentifier
from shared.imaging.dicom import read_header, screenable_metadata, write_deidentified
from shared.imaging.formats import (
    SNIFF_BYTES,
    ImageMetadata,
    ImageRejected,
    MediaType,
    RejectCode,
    parse_laterality,
    parse_view,
    require_laterality_and_view,
    sniff_media_type,
)
from shared.imaging.raster import strip_jpeg_metadata, strip_png_metadata
from shared.storage import ObjectStore, ObjectTooLarge, StoredObject

T = TypeVar("T")

# PNG/JPEG carry no DICOM header; their laterality and view may come from the file name:
# <study>_<L|R>_<CC|MLO>.<ext>, e.g. "exam17_L_MLO.png".
ZIP_MAGIC = b"PK\x03\x04"
RASTER_NAME = re.compile(r"^(?P<study>.+)_(?P<lat>[LR])_(?P<view>CC|MLO)$", re.IGNORECASE)
MANIFEST_NAME = "manifest.csv"
# Column names a manifest may use; the generator's labels.csv is a valid manifest.
MANIFEST_COLUMNS = {
    "file": ("file", "filename"),
    "study": ("study", "study_key", "study_id"),
    "patient": ("patient", "patient_id"),
    "laterality": ("laterality",),
    "view": ("view",),
}
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# A de-identified copy stays in memory up to this size, then spills to a temporary file.
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024


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
    laterality: Laterality
    view: View


def patient_key(secret: str, tenant_id: uuid.UUID, patient_id: str) -> str:
    """Keyed hash of a patient id: stable per patient, meaningless without the secret.

    The tenant is part of the key: the same id string at two sites is two patients, and
    keys must not link one tenant's patients to another's.
    """
    message = f"{tenant_id}:{patient_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@lru_cache(maxsize=4)
def deidentifier_for(secret: str) -> Deidentifier:
    return Deidentifier(secret)


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


def _stream_size(stream: BinaryIO) -> int:
    position = stream.tell()
    size = stream.seek(0, io.SEEK_END)
    stream.seek(position)
    return size


def store_file(
    stream: BinaryIO,
    filename: str,
    *,
    settings: Settings,
    store: ObjectStore,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    hints: UploadHints,
    size: int | None = None,
) -> StoredUpload:
    """Check one seekable file, store a de-identified copy; raises ImageRejected.

    `size` is the file's length where the caller knows it without seeking (zip entries).
    """
    size = _stream_size(stream) if size is None else size
    if size > settings.max_file_bytes:
        raise ImageRejected(
            RejectCode.FILE_TOO_LARGE,
            f"{filename} is {size} bytes, larger than the limit of {settings.max_file_bytes}",
        )
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
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as clean:
        if media_type == MediaType.DICOM:
            header = read_header(stream, filename)
            metadata = _guard_dicom(filename, screenable_metadata, header, filename)
        else:
            metadata = _raster_metadata(stream, filename, hints)
        _refuse_oversized(metadata, filename, settings)
        require_laterality_and_view(metadata, filename)
        image_id = new_id()
        # Without a study id, each such file is its own study.
        study_key = metadata.study_uid or f"image:{image_id}"
        key_of_patient = patient_key(
            settings.patient_key_secret, tenant_id, metadata.patient_id or f"study:{study_key}"
        )
        if media_type == MediaType.DICOM:
            deidentifier = deidentifier_for(settings.patient_key_secret)
            _guard_dicom(
                filename,
                write_deidentified,
                stream,
                header,
                cast(BinaryIO, clean),
                deidentifier=deidentifier,
                patient_key=key_of_patient,
                filename=filename,
            )
            study_key = deidentifier.pseudonymous_uid(study_key)
        else:
            stream.seek(0)
            strip = strip_png_metadata if media_type == MediaType.PNG else strip_jpeg_metadata
            strip(stream, cast(BinaryIO, clean), filename)
        clean.seek(0)
        key = f"tenants/{tenant_id}/batches/{batch_id}/images/{image_id}"
        try:
            stored = store.put_stream(
                key,
                cast(BinaryIO, clean),
                content_type=media_type.value,
                limit=settings.max_file_bytes,
            )
        except ObjectTooLarge as err:
            raise ImageRejected(
                RejectCode.FILE_TOO_LARGE,
                f"{filename} is larger than the limit of {err.limit} bytes",
            ) from err
    assert metadata.laterality is not None  # require_laterality_and_view checked both
    assert metadata.view is not None
    return StoredUpload(
        image_id=image_id,
        filename=filename,
        media_type=media_type,
        stored=stored,
        study_key=study_key[:128],
        patient_key=key_of_patient,
        laterality=metadata.laterality,
        view=metadata.view,
    )


def _guard_dicom(label: str, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a step over an untrusted DICOM header: any failure of it is the file's fault.

    pydicom raises what its parsers happen to raise (KeyError, struct.error, ValueError on a
    malformed value met while writing); the uploader gets invalid_dicom, never a 500.
    """
    try:
        return step(*args, **kwargs)
    except ImageRejected:
        raise
    except Exception as err:
        raise ImageRejected(
            RejectCode.INVALID_DICOM,
            f"{label}: the DICOM header is malformed ({type(err).__name__}: {err}); send a "
            "valid DICOM Part 10 file",
        ) from err


def _refuse_oversized(metadata: ImageMetadata, filename: str, settings: Settings) -> None:
    if metadata.pixels is not None and metadata.pixels > settings.max_image_pixels:
        raise ImageRejected(
            RejectCode.IMAGE_TOO_LARGE,
            f"{filename} declares {metadata.pixels} pixels; the limit is "
            f"{settings.max_image_pixels}",
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
    manifest_entries = [i for i in entries if PurePosixPath(i.filename).name == MANIFEST_NAME]
    manifest: dict[str, UploadHints] = {}
    if manifest_entries:
        try:
            manifest = _read_manifest(archive, manifest_entries[0], archive_name)
        except ImageRejected as rejection:
            outcome.rejected.append((archive_name, rejection))
            return outcome
    used_rows: set[str] = set()
    try:
        for info in entries:
            if info in manifest_entries:
                continue
            label = f"{archive_name}/{info.filename}"
            row_name = _manifest_row_name(manifest, info.filename)
            if row_name is not None:
                used_rows.add(row_name)
            entry_hints = _merge_hints(hints, manifest.get(row_name or ""))
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
                            hints=entry_hints,
                            size=info.file_size,
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
    for missing in sorted(set(manifest) - used_rows):
        outcome.rejected.append(
            (
                f"{archive_name}/{missing}",
                ImageRejected(
                    RejectCode.MANIFEST_FILE_MISSING,
                    f"{MANIFEST_NAME} lists {missing}, which is not in {archive_name}",
                ),
            )
        )
    return outcome


def _manifest_row_name(manifest: dict[str, UploadHints], entry_name: str) -> str | None:
    """The manifest row for an archive entry: by its path in the archive, else its base name."""
    path = entry_name.replace("\\", "/")
    if path in manifest:
        return path
    base = PurePosixPath(path).name
    return base if base in manifest else None


def _merge_hints(request: UploadHints, row: UploadHints | None) -> UploadHints:
    """A manifest row's values win over the request's form fields, field by field."""
    if row is None:
        return request
    return replace(
        request,
        **{name: value for name, value in vars(row).items() if value is not None},
    )


def _manifest_error(archive_name: str, problem: str) -> ImageRejected:
    return ImageRejected(
        RejectCode.INVALID_MANIFEST,
        f"{archive_name}/{MANIFEST_NAME}: {problem}. Expected CSV with a header row: file, "
        "laterality (L or R), view (CC or MLO), and optionally study and patient; nothing from "
        "this archive was stored",
    )


def _read_manifest(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_name: str
) -> dict[str, UploadHints]:
    """Per-file hints from manifest.csv, keyed by the file's path or name in the archive."""
    if info.file_size > MAX_MANIFEST_BYTES:
        raise _manifest_error(archive_name, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = archive.read(info).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _manifest_error(archive_name, f"not UTF-8 text ({err.reason})") from err
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise _manifest_error(archive_name, f"cannot be extracted ({err})") from err
    reader = csv.DictReader(io.StringIO(text))
    fields = {name.strip().lower(): name for name in reader.fieldnames or []}
    columns = {
        key: next((fields[a] for a in aliases if a in fields), None)
        for key, aliases in MANIFEST_COLUMNS.items()
    }
    if columns["file"] is None:
        raise _manifest_error(archive_name, "no `file` column")
    rows: dict[str, UploadHints] = {}
    try:
        for number, record in enumerate(reader, start=2):

            def cell(key: str, record: dict[str, str] = record) -> str | None:
                column = columns[key]
                value = (record.get(column) or "").strip() if column else ""
                return value[:128] or None

            name = cell("file")
            if name is None:
                raise _manifest_error(archive_name, f"line {number} names no file")
            laterality, view = cell("laterality"), cell("view")
            row = UploadHints(
                study_key=cell("study"),
                patient_id=cell("patient"),
                laterality=parse_laterality(laterality) if laterality else None,
                view=parse_view(view) if view else None,
            )
            if laterality and row.laterality is None:
                raise _manifest_error(
                    archive_name, f"line {number}: laterality {laterality!r} is not L or R"
                )
            if view and row.view is None:
                raise _manifest_error(
                    archive_name, f"line {number}: view {view!r} is not CC or MLO"
                )
            rows[name.replace("\\", "/")] = row
    except csv.Error as err:
        raise _manifest_error(archive_name, f"not valid CSV ({err})") from err
    return rows
