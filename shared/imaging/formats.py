"""What an uploaded file is (sniffed from its bytes, never its name) and what it says of itself."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shared.db.models import Laterality, View

# Enough bytes to tell the formats apart: DICOM's magic sits after a 128-byte preamble.
SNIFF_BYTES = 132


# The only DICOM photometric interpretations a mammogram has; PALETTE COLOR, RGB and YBR are
# refused even with one sample per pixel (a palette index is not a grey level).
GREYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


class MediaType(enum.StrEnum):
    DICOM = "application/dicom"
    PNG = "image/png"
    JPEG = "image/jpeg"


class RejectCode(enum.StrEnum):
    """Stable codes for refused uploads and failed images; users switch on these.

    docs/imaging.md lists every code with what it means and what to do about it (a test
    keeps the two in step).
    """

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
    INVALID_MANIFEST = "invalid_manifest"
    MANIFEST_FILE_MISSING = "manifest_file_missing"
    NOT_MAMMOGRAPHY = "not_mammography"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MULTI_FRAME = "multi_frame"
    NOT_GREYSCALE = "not_greyscale"
    UNSUPPORTED_BIT_DEPTH = "unsupported_bit_depth"
    NOT_FOR_PRESENTATION = "not_for_presentation"
    UNKNOWN_LATERALITY = "unknown_laterality"
    UNKNOWN_VIEW = "unknown_view"
    EMPTY_BREAST_REGION = "empty_breast_region"
    STUDY_MISMATCH = "study_mismatch"


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
    sop_instance_uid: str | None = None
    # Non-identifying acquisition metadata (DICOM only), kept on the image row for drift.
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    pixel_spacing_mm: float | None = None


def parse_laterality(value: object) -> Laterality | None:
    text = str(value or "").strip().upper()
    return {"L": Laterality.LEFT, "R": Laterality.RIGHT}.get(text)


def parse_view(value: object) -> View | None:
    return {"CC": View.CC, "MLO": View.MLO}.get(str(value or "").strip().upper())


def require_laterality_and_view(metadata: ImageMetadata, filename: str) -> None:
    """Every screened image must say which breast and which view it shows."""
    if metadata.laterality is None:
        raise ImageRejected(
            RejectCode.UNKNOWN_LATERALITY,
            f"{filename}: which breast it shows is not known; DICOM needs ImageLaterality "
            "(or Laterality) L or R, PNG/JPEG a `laterality` form field, a manifest row or a "
            "name like exam1_L_CC.png",
        )
    if metadata.view is None:
        raise ImageRejected(
            RejectCode.UNKNOWN_VIEW,
            f"{filename}: the view is not known or not CC/MLO; DICOM needs ViewPosition (or "
            "ViewCodeSequence) CC or MLO, PNG/JPEG a `view` form field, a manifest row or a "
            "name like exam1_L_CC.png",
        )
