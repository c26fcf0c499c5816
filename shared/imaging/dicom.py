"""DICOM uploads: read the header, check it can be screened, store a de-identified copy.

Only the header is parsed; the de-identified copy is the new header followed by the upload's
own pixel data element, streamed byte for byte from where it lies in the upload to the store,
so a 70 MB mammogram is never copied aside and its compressed frames are never re-encoded.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from shared.db.models import Laterality, View
from shared.imaging.deid import Deidentifier
from shared.imaging.formats import (
    GREYSCALE_PHOTOMETRICS,
    ImageMetadata,
    ImageRejected,
    RejectCode,
    parse_laterality,
    parse_view,
)

# Header values longer than this are read only if something asks for them (a private blob
# before the pixels is dropped unread).
HEADER_DEFER_BYTES = 1024 * 1024
PIXEL_DATA = (0x7FE0, 0x0010)
ITEM, SEQUENCE_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
UNDEFINED_LENGTH = 0xFFFFFFFF

# Digital Mammography X-Ray Image Storage - For Processing: raw detector data, not an image
# meant for reading (nor for a model trained on images for presentation).
MAMMO_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.2.1")
# Older systems export mammograms as CR or DX; BodyPartExamined tells those apart.
GENERAL_XRAY_MODALITIES = ("CR", "DX")
# ViewCodeSequence codes (PS3.16 CID 4014), SNOMED CT and the legacy SRT codes.
VIEW_CODES = {
    "399162004": View.CC,
    "R-10242": View.CC,
    "399368009": View.MLO,
    "R-10226": View.MLO,
}


def read_header(source: BinaryIO, filename: str) -> Dataset:
    """Everything before the pixel data; `source` is left at the Pixel Data element."""
    try:
        return pydicom.dcmread(source, stop_before_pixels=True, defer_size=HEADER_DEFER_BYTES)
    except Exception as err:  # untrusted bytes: pydicom fails in many ways (KeyError,
        # struct.error, ...); every one of them is a property of this file
        raise ImageRejected(
            RejectCode.INVALID_DICOM,
            f"{filename}: the DICOM header cannot be read ({err}); send a valid DICOM Part 10 file",
        ) from err


def transfer_syntax_decodable(syntax: UID | None) -> bool:
    if not syntax:
        return False
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def _plain(ds: Dataset, keyword: str) -> str | None:
    """A short text attribute as sent (trimmed, at most 64 characters), None when absent."""
    try:
        value = str(ds.get(keyword, "") or "").strip()
    except (TypeError, ValueError):
        return None
    return value[:64] or None


def pixel_spacing_mm(ds: Dataset) -> float | None:
    """The row spacing of Pixel Spacing, else of Imager Pixel Spacing (at the detector, what
    a mammography view without magnification correction carries); None when neither reads
    as a positive number."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            several = isinstance(value, Sequence) and not isinstance(value, str)
            spacing = float(value[0] if several else value)
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def laterality_of(ds: Dataset) -> Laterality | None:
    """ImageLaterality, then Laterality, then a laterality prefix in ViewPosition ("RMLO")."""
    for keyword in ("ImageLaterality", "Laterality"):
        found = parse_laterality(ds.get(keyword))
        if found is not None:
            return found
    position = _text(ds, "ViewPosition").replace(" ", "")
    if position[:1] in ("L", "R") and parse_view(position[1:]) is not None:
        return parse_laterality(position[:1])
    return None


def view_of(ds: Dataset) -> View | None:
    """ViewPosition (CC, MLO, also "L CC"/"RMLO"), then ViewCodeSequence."""
    position = _text(ds, "ViewPosition").replace(" ", "")
    found = parse_view(position) or (
        parse_view(position[1:]) if position[:1] in ("L", "R") else None
    )
    if found is not None:
        return found
    for item in ds.get("ViewCodeSequence", None) or []:
        code = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "")
        if code in VIEW_CODES:
            return VIEW_CODES[code]
        meaning = str(item.get("CodeMeaning", "")).lower().replace("-", "")
        if meaning in ("craniocaudal", "cranio caudal"):
            return View.CC
        if meaning in ("mediolateral oblique", "medio lateral oblique"):
            return View.MLO
    return None


def screenable_metadata(ds: Dataset, filename: str) -> ImageMetadata:
    """The header half of the quality gate: raises ImageRejected with the first reason found.

    Order matters only for which reason a user sees first: what the object is, then whether
    its pixels can be decoded, then whether it is an image for reading, then which breast and
    view it shows.
    """
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageRejected(
            RejectCode.NOT_DICOM_IMAGE,
            f"{filename} is DICOM but not an image (no Rows and Columns); send the image "
            "objects of the study",
        )
    modality = _text(ds, "Modality")
    if modality != "MG" and not (
        modality in GENERAL_XRAY_MODALITIES and _text(ds, "BodyPartExamined") == "BREAST"
    ):
        raise ImageRejected(
            RejectCode.NOT_MAMMOGRAPHY,
            f"{filename} has Modality {modality or 'missing'}; only mammograms (MG, or CR/DX "
            "with BodyPartExamined BREAST) can be screened",
        )
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not transfer_syntax_decodable(syntax):
        name = UID(syntax).name if syntax else "missing"
        raise ImageRejected(
            RejectCode.UNSUPPORTED_TRANSFER_SYNTAX,
            f"{filename} uses transfer syntax {name}, which this service cannot decode; send "
            "it uncompressed, JPEG, JPEG-LS, JPEG 2000 or RLE",
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0)
        pixels = int(ds.Rows) * int(ds.Columns)
    except (TypeError, ValueError) as err:
        raise ImageRejected(
            RejectCode.INVALID_DICOM, f"{filename}: the image pixel module is malformed ({err})"
        ) from err
    if frames > 1:
        raise ImageRejected(
            RejectCode.MULTI_FRAME,
            f"{filename} holds {frames} frames (tomosynthesis or a cine?); send 2-D "
            "mammograms, one frame per file",
        )
    photometric = _text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in GREYSCALE_PHOTOMETRICS:
        raise ImageRejected(
            RejectCode.NOT_GREYSCALE,
            f"{filename} is a colour image ({photometric or 'no'} photometric interpretation, "
            f"{samples} samples per pixel); mammograms are MONOCHROME1 or MONOCHROME2",
        )
    if not 8 <= bits <= 16:
        raise ImageRejected(
            RejectCode.UNSUPPORTED_BIT_DEPTH,
            f"{filename} stores {bits} bits per pixel; 8 to 16 are supported",
        )
    if (
        _text(ds, "PresentationIntentType") == "FOR PROCESSING"
        or ds.get("SOPClassUID") == MAMMO_FOR_PROCESSING
    ):
        raise ImageRejected(
            RejectCode.NOT_FOR_PRESENTATION,
            f"{filename} is a FOR PROCESSING (raw detector) image; send the FOR PRESENTATION "
            "image the modality produced for reading",
        )
    return ImageMetadata(
        laterality=laterality_of(ds),
        view=view_of(ds),
        patient_id=str(ds.get("PatientID") or "") or None,
        study_uid=str(ds.get("StudyInstanceUID") or "") or None,
        pixels=pixels,
        sop_instance_uid=str(ds.get("SOPInstanceUID") or "") or None,
        manufacturer=_plain(ds, "Manufacturer"),
        manufacturer_model=_plain(ds, "ManufacturerModelName"),
        pixel_spacing_mm=pixel_spacing_mm(ds),
    )


@dataclass(frozen=True)
class DeidentifiedCopy:
    """A de-identified file as the bytes that replace everything before the pixel values
    (the new header and the Pixel Data element's tag, VR and length) followed by a byte range
    of the source: the original pixel value, never copied aside on its way to the store."""

    head: bytes
    pixels_at: int
    pixels_length: int

    @property
    def size(self) -> int:
        return len(self.head) + self.pixels_length


def deidentified_copy(
    source: BinaryIO,
    header: Dataset,
    *,
    size: int,
    deidentifier: Deidentifier,
    patient_key: str,
    filename: str,
) -> DeidentifiedCopy:
    """De-identify `header` and find the pixel element's extent in `source` (seekable, `size`
    bytes long, and positioned where read_header left it); the file is checked to hold all of
    it, and `source` is left where the pixel value starts.

    Whatever follows the pixel data (trailing padding, a digital signature, private groups)
    is dropped.
    """
    syntax = UID(header.file_meta.TransferSyntaxUID)
    out = io.BytesIO()
    if syntax.is_deflated:
        # One deflate stream covers header and pixels alike, so no byte range can be kept;
        # deflated images are small and rare, and bounded by the per-file limit.
        source.seek(0)
        full = pydicom.dcmread(source)
        deidentifier.apply(full, patient_key=patient_key)
        pydicom.dcmwrite(out, full, enforce_file_format=True)
        return DeidentifiedCopy(head=out.getvalue(), pixels_at=0, pixels_length=0)
    deidentifier.apply(header, patient_key=patient_key)
    pydicom.dcmwrite(out, header, enforce_file_format=True)
    element_head, length = _pixel_element_head(
        source,
        little_endian=syntax.is_little_endian,
        implicit_vr=syntax.is_implicit_VR,
        filename=filename,
    )
    pixels_at = source.tell()
    if length == UNDEFINED_LENGTH:
        length = _encapsulated_length(source, pixels_at, size, filename)
        source.seek(pixels_at)
    elif pixels_at + length > size:
        raise _truncated(filename)
    return DeidentifiedCopy(
        head=out.getvalue() + element_head, pixels_at=pixels_at, pixels_length=length
    )


def _pixel_element_head(
    source: BinaryIO, *, little_endian: bool, implicit_vr: bool, filename: str
) -> tuple[bytes, int]:
    """The Pixel Data element's tag, VR and length as they stand, and the length."""
    order = "<" if little_endian else ">"
    head = _read_exact(source, 4, filename)
    if struct.unpack(order + "HH", head) != PIXEL_DATA:
        raise ImageRejected(
            RejectCode.NOT_DICOM_IMAGE,
            f"{filename} has no Pixel Data; send the image objects of the study",
        )
    if implicit_vr:
        value_header = _read_exact(source, 4, filename)
        length_bytes = value_header
    else:
        value_header = _read_exact(source, 8, filename)
        if value_header[:2] not in (b"OB", b"OW", b"UN"):
            raise ImageRejected(
                RejectCode.INVALID_DICOM, f"{filename}: Pixel Data has VR {value_header[:2]!r}"
            )
        length_bytes = value_header[4:]
    (length,) = struct.unpack(order + "I", length_bytes)
    return head + value_header, length


def _encapsulated_length(source: BinaryIO, start: int, end: int, filename: str) -> int:
    """Bytes from `start` through the sequence delimiter of encapsulated (compressed) pixel
    data: fragment items are stepped over by their lengths, not read. Always little endian,
    the only byte order compressed transfer syntaxes allow."""
    position = start
    while True:
        if position + 8 > end:
            raise _truncated(filename)
        source.seek(position)
        group, element, item_length = struct.unpack("<HHI", source.read(8))
        position += 8
        if (group, element) == SEQUENCE_DELIMITER:
            return position - start
        if (group, element) != ITEM:
            raise ImageRejected(
                RejectCode.INVALID_DICOM,
                f"{filename}: compressed Pixel Data holds a ({group:04X},{element:04X}) "
                "element where a fragment item belongs",
            )
        position += item_length  # past the end: the next turn finds the file truncated


def _read_exact(source: BinaryIO, count: int, filename: str) -> bytes:
    data = source.read(count)
    if len(data) != count:
        raise _truncated(filename)
    return data


def _truncated(filename: str) -> ImageRejected:
    return ImageRejected(
        RejectCode.INVALID_DICOM,
        f"{filename}: the pixel data ends before its declared length (a truncated transfer?); "
        "send the complete file",
    )
