"""The one way an image comes in, whatever carried it (an HTTP upload, a file in a zip
archive, a DICOM C-STORE or STOW-RS): sniff its format from its bytes, read its header without
its pixels, apply the quality gate, de-identify it, and stream the clean copy to object storage.

Nothing is stored as received: DICOM headers are de-identified (`deid.py`), PNG/JPEG metadata
is stripped (`raster.py`). A refused file raises `ImageRejected` with a stable code
(`formats.py`), and nothing of it is kept. The caller records the rows
(`shared.lifecycle.accept_images`) and queues them after its commit.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any, BinaryIO, TypeVar, cast

from minio.error import S3Error
from PIL import Image as PILImage
from pydicom import Dataset
from urllib3.exceptions import HTTPError as StorageConnectionError

from shared.config import Settings
from shared.db.base import new_id
from shared.db.models import Laterality, View
from shared.imaging.deid import Deidentifier
from shared.imaging.dicom import deidentified_copy, read_header, screenable_metadata
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
from shared.storage import Keys, ObjectStore, ObjectTooLarge, StoredObject, StreamEndedEarly
from shared.vault import OriginalIdentity, SealedIdentity, seal, vault_keys

T = TypeVar("T")
log = logging.getLogger(__name__)

# PNG/JPEG carry no DICOM header; their laterality and view may come from the file name:
# <study>_<L|R>_<CC|MLO>.<ext>, e.g. "exam17_L_MLO.png".
RASTER_NAME = re.compile(r"^(?P<study>.+)_(?P<lat>[LR])_(?P<view>CC|MLO)$", re.IGNORECASE)
# A de-identified copy stays in memory up to this size, then spills to a temporary file.
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class IntakeHints:
    """What the sender says of files that carry no metadata of their own (PNG, JPEG): form
    fields, or a row of an archive's manifest."""

    study_key: str | None = None
    patient_id: str | None = None
    laterality: Laterality | None = None
    view: View | None = None


@dataclass(frozen=True)
class StoredImage:
    """An image stored in object storage, de-identified, with what its row needs."""

    image_id: uuid.UUID
    filename: str
    media_type: MediaType
    stored: StoredObject
    study_key: str
    patient_key: str
    laterality: Laterality
    view: View
    # DICOM: the pseudonymous SOP Instance UID (the de-identified copy's own).
    sop_instance_key: str | None = None
    # DICOM, when the tenant keeps identities: the original identifiers, sealed.
    sealed_identity: SealedIdentity | None = None
    # The header's manufacturer, model name and pixel spacing (ImageMetadata's).
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    pixel_spacing_mm: float | None = None


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
class IntakeOutcome:
    """What one received file (or archive) became: accepted images and refused files."""

    stored: list[StoredImage] = field(default_factory=list)
    rejected: list[tuple[str, ImageRejected]] = field(default_factory=list)


def _raster_metadata(stream: BinaryIO, filename: str, hints: IntakeHints) -> ImageMetadata:
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


@dataclass(frozen=True)
class Destination:
    """Where accepted images go: a tenant's batch, in this object store, under these limits."""

    settings: Settings
    store: ObjectStore
    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    # Seal each DICOM image's original identifiers into the vault (the tenant's setting;
    # without a configured vault key nothing is sealed).
    keep_identity: bool = False


def _text_of(header: Dataset, keyword: str) -> str | None:
    value = header.get(keyword)
    return str(value).strip() or None if value is not None else None


def original_identity(header: Dataset) -> OriginalIdentity | None:
    """The identifiers a returned object must carry, read before de-identification."""
    study_uid = _text_of(header, "StudyInstanceUID")
    if study_uid is None:
        return None
    return OriginalIdentity(
        study_instance_uid=study_uid,
        **{
            field: _text_of(header, keyword)
            for field, keyword in (
                ("series_instance_uid", "SeriesInstanceUID"),
                ("sop_instance_uid", "SOPInstanceUID"),
                ("frame_of_reference_uid", "FrameOfReferenceUID"),
                ("patient_id", "PatientID"),
                ("patient_name", "PatientName"),
                ("patient_birth_date", "PatientBirthDate"),
                ("patient_sex", "PatientSex"),
                ("accession_number", "AccessionNumber"),
                ("study_date", "StudyDate"),
                ("study_time", "StudyTime"),
                ("study_id", "StudyID"),
                ("referring_physician_name", "ReferringPhysicianName"),
            )
        },
    )


def take_in(
    stream: BinaryIO,
    filename: str,
    *,
    to: Destination,
    hints: IntakeHints,
    size: int | None = None,
    known_header: tuple[Dataset, int] | None = None,
) -> StoredImage:
    """Check one seekable file and store its de-identified copy; raises ImageRejected.

    `size` is the file's length where the caller knows it without seeking (zip entries);
    `known_header` a DICOM header the caller read already (`read_header`), with the stream offset
    where it ended, so it is not parsed twice. It is de-identified in place.
    """
    settings, store, tenant_id, batch_id = to.settings, to.store, to.tenant_id, to.batch_id
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
    if media_type == MediaType.DICOM:
        if known_header is not None:
            header, header_end = known_header
            stream.seek(header_end)
        else:
            header = read_header(stream, filename)
        metadata = _guard_dicom(filename, screenable_metadata, header, filename)
    else:
        metadata = _raster_metadata(stream, filename, hints)
    _refuse_oversized(metadata, filename, settings)
    require_laterality_and_view(metadata, filename)
    image_id = new_id()
    sop_instance_key: str | None = None
    # Without a study id, each such file is its own study.
    study_key = metadata.study_uid or f"image:{image_id}"
    key_of_patient = patient_key(
        settings.patient_key_secret, tenant_id, metadata.patient_id or f"study:{study_key}"
    )
    sealed_identity = None
    key = Keys.image(tenant_id, batch_id, image_id)
    if media_type == MediaType.DICOM:
        deidentifier = deidentifier_for(settings.patient_key_secret)
        keys = vault_keys(settings) if to.keep_identity else None
        if keys is not None and keys.active is not None:
            identity = _guard_dicom(filename, original_identity, header)
            if identity is not None:
                sealed_identity = seal(identity, keys=keys, tenant_id=tenant_id, image_id=image_id)
        copy = _guard_dicom(
            filename,
            deidentified_copy,
            stream,
            header,
            size=size,
            deidentifier=deidentifier,
            patient_key=key_of_patient,
            filename=filename,
        )
        study_key = deidentifier.pseudonymous_uid(study_key)
        if metadata.sop_instance_uid:
            sop_instance_key = deidentifier.pseudonymous_uid(metadata.sop_instance_uid)
        # The new header, then the pixel element straight from the upload: no copy aside.
        stored = _put(
            store, key, stream, media_type, settings, filename, prefix=copy.head, length=copy.size
        )
    else:
        stream.seek(0)
        strip = strip_png_metadata if media_type == MediaType.PNG else strip_jpeg_metadata
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as clean:
            strip(stream, cast(BinaryIO, clean), filename)
            clean.seek(0)
            stored = _put(store, key, cast(BinaryIO, clean), media_type, settings, filename)
    assert metadata.laterality is not None  # require_laterality_and_view checked both
    assert metadata.view is not None
    return StoredImage(
        image_id=image_id,
        filename=filename,
        media_type=media_type,
        stored=stored,
        study_key=study_key[:128],
        patient_key=key_of_patient,
        laterality=metadata.laterality,
        view=metadata.view,
        sop_instance_key=sop_instance_key,
        sealed_identity=sealed_identity,
        manufacturer=metadata.manufacturer,
        manufacturer_model=metadata.manufacturer_model,
        pixel_spacing_mm=metadata.pixel_spacing_mm,
    )


def _put(
    store: ObjectStore,
    key: str,
    stream: BinaryIO,
    media_type: MediaType,
    settings: Settings,
    filename: str,
    *,
    prefix: bytes = b"",
    length: int | None = None,
) -> StoredObject:
    try:
        return store.put_stream(
            key,
            stream,
            content_type=media_type.value,
            limit=settings.max_file_bytes,
            prefix=prefix,
            length=length,
        )
    except ObjectTooLarge as err:
        raise ImageRejected(
            RejectCode.FILE_TOO_LARGE,
            f"{filename} is larger than the limit of {err.limit} bytes",
        ) from err
    except StreamEndedEarly as err:
        # The size its carrier declared (a zip entry's header) was more than it held.
        raise ImageRejected(
            RejectCode.INVALID_DICOM,
            f"{filename} ends before its declared length (a truncated transfer or archive "
            "entry?); send the complete file",
        ) from err


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


def discard(store: ObjectStore, accepted: Iterable[StoredImage]) -> None:
    """Remove stored copies whose rows will not be written (the orphan sweep is the backstop
    for any that cannot be removed now)."""
    for image in accepted:
        try:
            store.delete(image.stored.key)
        except (S3Error, StorageConnectionError):
            log.exception("could not remove orphaned object %s", image.stored.key)
