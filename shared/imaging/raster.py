"""PNG and JPEG uploads: stored without the metadata that can carry identity.

PNG text chunks (tEXt, zTXt, iTXt), EXIF and timestamps, and JPEG's APPn (EXIF, XMP ...) and
comment segments can hold a patient's name as easily as a DICOM header can. The pixels are
copied untouched (no re-encoding), chunk by chunk, so memory stays flat.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from shared.imaging.formats import ImageRejected, RejectCode

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks needed to show the image as it was; everything else is dropped.
PNG_KEPT_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"sBIT", b"sRGB"}
# JPEG: APP0 (JFIF) and APP14 (Adobe colour transform) are kept: decoders need them and they
# carry no free text. Other APPn and COM segments are dropped.
JPEG_DROPPED_MARKERS = {0xFE} | set(range(0xE1, 0xEE)) | {0xEF}
JPEG_START_OF_SCAN = 0xDA
COPY_CHUNK_BYTES = 1024 * 1024


def _read_exact(source: BinaryIO, count: int, filename: str) -> bytes:
    data = source.read(count)
    if len(data) != count:
        raise ImageRejected(RejectCode.INVALID_IMAGE, f"{filename} ends in the middle of a chunk")
    return data


def _copy(source: BinaryIO, out: BinaryIO | None, count: int, filename: str) -> None:
    """Copy `count` bytes to `out`, or skip them when `out` is None."""
    while count:
        chunk = _read_exact(source, min(COPY_CHUNK_BYTES, count), filename)
        if out is not None:
            out.write(chunk)
        count -= len(chunk)


def strip_png_metadata(source: BinaryIO, out: BinaryIO, filename: str) -> None:
    if _read_exact(source, 8, filename) != PNG_SIGNATURE:
        raise ImageRejected(RejectCode.INVALID_IMAGE, f"{filename} is not a PNG")
    out.write(PNG_SIGNATURE)
    while True:
        head = _read_exact(source, 8, filename)
        (length,) = struct.unpack(">I", head[:4])
        kind = head[4:]
        keep = kind in PNG_KEPT_CHUNKS
        if keep:
            out.write(head)
        _copy(source, out if keep else None, length + 4, filename)  # data and CRC
        if kind == b"IEND":
            return


def strip_jpeg_metadata(source: BinaryIO, out: BinaryIO, filename: str) -> None:
    if _read_exact(source, 2, filename) != b"\xff\xd8":
        raise ImageRejected(RejectCode.INVALID_IMAGE, f"{filename} is not a JPEG")
    out.write(b"\xff\xd8")
    while True:
        marker = _read_exact(source, 2, filename)
        while marker[1] == 0xFF:  # fill bytes before a marker
            marker = marker[1:] + _read_exact(source, 1, filename)
        if marker[0] != 0xFF:
            raise ImageRejected(RejectCode.INVALID_IMAGE, f"{filename} has a malformed segment")
        length_bytes = _read_exact(source, 2, filename)
        (length,) = struct.unpack(">H", length_bytes)
        if length < 2:
            raise ImageRejected(RejectCode.INVALID_IMAGE, f"{filename} has a malformed segment")
        keep = marker[1] not in JPEG_DROPPED_MARKERS
        if keep:
            out.write(marker + length_bytes)
        _copy(source, out if keep else None, length - 2, filename)
        if marker[1] == JPEG_START_OF_SCAN:
            # Entropy-coded data and everything after it are pixels: copy as they are.
            while chunk := source.read(COPY_CHUNK_BYTES):
                out.write(chunk)
            return
