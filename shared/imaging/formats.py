"""What an uploaded file is (sniffed from its bytes, never its name) and what it says of itself."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError

from shared.db.models import Laterality, View

# Enough bytes to tell the formats apart: DICOM's magic sits after a 128-byte preamble.
SNIFF_BYTES = 132


class MediaType(enum.StrEnum):
    DICOM = "application/dicom"
    PNG = "image/png"
    JPEG = "image/jpeg"


class RejectCode(enum.StrEnum):
    """Stable codes for refused uploads and failed images; users switch on these."""

    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    EMPTY_FILE = "empty_file"
    FILE_TOO_LARGE = "file_too_large"
    INVALID_DICOM = "invalid_dicom"
    DECODE_FAILED = "decode_failed"
    OBJECT_MISSING = "object_missing"
    DEPENDENCY_UNAVAILABLE = "dependency_unavailable"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    IMAGE_TOO_LARGE = "image_too_large"
    NOT_DICOM_IMAGE = "not_dicom_image"
    INVALID_IMAGE = "invalid_image"
    INVALID_ARCHIVE = "invalid_archive"
    ARCHIVE_TOO_LARGE = "archive_too_large"
    ARCHIVE_TOO_MANY_ENTRIES = "archive_too_many_entries"
    UNSAFE_ARCHIVE_ENTRY = "unsafe_archive_entry"


class ImageRejected(Exception):
    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def missing_object(cls, key: str) -> ImageRejected:
        return cls(
            RejectCode.OBJECT_MISSING,
            f"the stored image {key} is gone from object storage; upload it again",
        )


def sniff_media_type(head: bytes) -> MediaType | None:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return MediaType.DICOM
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return MediaType.PNG
    if head.startswith(b"\xff\xd8\xff"):
        return MediaType.JPEG
    return None


@dataclass(frozen=True)
class ImageMetadata:
    laterality: Laterality | None = None
    view: View | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    pixels: int | None = None  # as declared by the header, before any decoding


_VIEW_ALIASES = {"CC": View.CC, "MLO": View.MLO}


def parse_laterality(value: object) -> Laterality | None:
    text = str(value or "").strip().upper()
    return {"L": Laterality.LEFT, "R": Laterality.RIGHT}.get(text)


def parse_view(value: object) -> View | None:
    return _VIEW_ALIASES.get(str(value or "").strip().upper())


def dicom_metadata(source: BinaryIO) -> ImageMetadata:
    """Laterality, view and identity from a DICOM header; pixel data is not read.

    `source` is left at the position it had on entry.
    """
    position = source.tell()
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as err:
        raise ImageRejected(
            RejectCode.INVALID_DICOM,
            f"the DICOM header cannot be read ({err}); send a valid DICOM Part 10 file",
        ) from err
    finally:
        source.seek(position)
    laterality = parse_laterality(ds.get("ImageLaterality")) or parse_laterality(
        ds.get("Laterality")
    )
    return ImageMetadata(
        laterality=laterality,
        view=parse_view(ds.get("ViewPosition")),
        patient_id=str(ds.get("PatientID") or "") or None,
        study_uid=str(ds.get("StudyInstanceUID") or "") or None,
        pixels=_declared_pixels(ds),
    )


def _declared_pixels(ds: pydicom.Dataset) -> int | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.Rows) * int(ds.Columns) * max(1, frames)
    except (AttributeError, TypeError, ValueError):
        return None
