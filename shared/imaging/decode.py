"""Decode stored image bytes into a presentation-ready grey-level array.

An image is read as its stored values and one lookup table (`StoredPixels`): the whole
modality/VOI chain, computed once per distinct stored value. The worker hands those to the
model's device and looks them up there (shared/imaging/preprocess.py); everything else asks
for the grey levels (`decode_image`).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image as PILImage
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from shared.imaging.formats import (
    GREYSCALE_PHOTOMETRICS,
    ImageRejected,
    MediaType,
    RejectCode,
)

DEFAULT_MAX_PIXELS = 64_000_000
# Grey levels a lookup table may have: 16 bits stored at most (DICOM and 16-bit PNG alike).
MAX_LEVELS = 1 << 16
# The Pixel Data element's tag as it appears in a little-endian file.
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class StoredPixels:
    """An image's stored values (integers, at most 16 bits) and the table that maps each to
    its grey level in [0, 1], bright = dense tissue: `table[value - low]`.

    `values` may be a read-only view of the file's own bytes (uncompressed DICOM is never
    copied on the way in).
    """

    values: NDArray[np.integer]
    low: int
    table: NDArray[np.float32]
    # How the pixels were read: "native" (the pixel element itself) or "decoded" (pydicom's
    # decoders or Pillow): what `make bench` reports the cost of, per transfer syntax.
    read_as: str = "native"

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.values.shape
        return rows, cols

    def index(self, values: NDArray[np.integer]) -> NDArray[np.integer]:
        return values - self.low if self.low >= 0 else values.astype(np.int32) - self.low

    def grey_of(self, values: NDArray[np.integer]) -> NDArray[np.float32]:
        """Grey levels of some of the image's values (a coarse view, say)."""
        grey: NDArray[np.float32] = np.take(self.table, self.index(values))
        return grey

    def grey(self) -> NDArray[np.float32]:
        return self.grey_of(self.values)


def decode_image(
    data: bytes, media_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> NDArray[np.float32]:
    """A 2-D float32 array in [0, 1], bright = dense tissue, whatever the source format.

    The pixel count an image declares is checked before its pixels are decoded, so a
    decompression bomb is refused rather than expanded.
    """
    return read_pixels(data, media_type, max_pixels=max_pixels).grey()


def read_pixels(
    data: bytes, media_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> StoredPixels:
    """The image's stored values and their grey-level table (see `StoredPixels`)."""
    try:
        if media_type == MediaType.DICOM:
            stored = _read_dicom(data, max_pixels)
        elif media_type in (MediaType.PNG, MediaType.JPEG):
            stored = _read_raster(data, max_pixels)
        else:
            raise ImageRejected(RejectCode.UNSUPPORTED_MEDIA_TYPE, f"cannot decode {media_type}")
    except ImageRejected:
        raise
    except Exception as err:  # any decoder failure is a property of this file, never retried
        raise ImageRejected(RejectCode.DECODE_FAILED, f"image could not be decoded: {err}") from err
    return stored


def _refuse_if_too_large(declared: int, max_pixels: int) -> None:
    if declared > max_pixels:
        raise ImageRejected(
            RejectCode.IMAGE_TOO_LARGE,
            f"the image declares {declared} pixels; the limit is {max_pixels}",
        )


def _read_dicom(data: bytes, max_pixels: int) -> StoredPixels:
    """Stored values -> modality LUT (rescale) -> VOI LUT or window (LINEAR, SIGMOID) ->
    MONOCHROME2. Ingest's header gate refuses the same cases first; this is the backstop for
    objects stored before a rule existed or altered since."""
    buffer = io.BytesIO(data)
    ds = pydicom.dcmread(buffer, stop_before_pixels=True)
    _refuse_if_too_large(int(ds.Rows) * int(ds.Columns), max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageRejected(
            RejectCode.MULTI_FRAME, f"{frames} frames; only 2-D single-frame images are screened"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in GREYSCALE_PHOTOMETRICS:
        raise ImageRejected(
            RejectCode.NOT_GREYSCALE, f"{photometric} images cannot be screened; send greyscale"
        )
    bits = int(ds.get("BitsStored", 0) or 0)
    if not 8 <= bits <= 16:
        raise ImageRejected(
            RejectCode.UNSUPPORTED_BIT_DEPTH, f"{bits} bits stored; 8 to 16 are supported"
        )
    values = _native_values(ds, data, buffer.tell(), bits)
    read_as = "native"
    if values is not None:
        low, high = int(values.min()), int(values.max())
        if low >= 0 and high >> bits:  # a bit above BitsStored is set: pydicom decides
            values = None
    if values is None:  # compressed, big-endian, or bits that need pydicom's unpacking
        values = pydicom.dcmread(io.BytesIO(data)).pixel_array
        read_as = "decoded"
        low, high = int(values.min()), int(values.max())
    if values.ndim != 2:
        raise ImageRejected(RejectCode.DECODE_FAILED, f"not a 2-D image: shape {values.shape}")
    _refuse_if_too_small(values)
    if _LUT_SEQUENCES.isdisjoint(ds.keys()):
        every_level = _grey_of_every_level(_lut_header(ds), values.dtype.str)
        offset = low - int(np.iinfo(values.dtype).min)
        table = every_level[offset : offset + high - low + 1]
    else:  # tables in the header: computed for this image's levels alone, never kept
        levels = np.arange(low, high + 1, dtype=np.int64 if low < 0 else np.uint32)
        table = _grey_levels(ds, levels.astype(values.dtype))
    if photometric == "MONOCHROME1":
        table = table.max() - table  # MONOCHROME1: high values are dark
    return StoredPixels(values, low, _unit_table(table), read_as)


# What the modality LUT and VOI transforms read from a header, besides LUT sequences.
_LUT_ATTRIBUTES = (
    "BitsStored",
    "BitsAllocated",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PhotometricInterpretation",  # checked by the windowing
)
_LUT_SEQUENCES = frozenset(
    {
        pydicom.datadict.tag_for_keyword("ModalityLUTSequence"),
        pydicom.datadict.tag_for_keyword("VOILUTSequence"),
    }
)


def _grey_levels(ds: Dataset, levels: NDArray[np.integer]) -> NDArray[np.float64]:
    """Stored values -> modality LUT (rescale) -> VOI LUT or window (LINEAR, SIGMOID)."""
    table = apply_modality_lut(levels, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        table = apply_voi_lut(table, ds)
    return np.asarray(table, dtype=np.float64)


def _lut_header(ds: Dataset) -> tuple[tuple[str, object], ...]:
    header = []
    for keyword in _LUT_ATTRIBUTES:
        value = ds.get(keyword)
        if value is not None:
            header.append((keyword, tuple(value) if isinstance(value, MultiValue) else value))
    return tuple(header)


@functools.lru_cache(maxsize=64)
def _grey_of_every_level(header: tuple[tuple[str, object], ...], dtype: str) -> NDArray[np.float64]:
    """`_grey_levels` of every value `dtype` can hold, for one header's LUT attributes.

    Both transforms act on each value alone, so an image's table is a slice of this one:
    images of a site mostly share their rescale and window, and each then costs a slice
    instead of pydicom's windowing (about half a millisecond)."""
    ds = Dataset()
    for keyword, value in header:
        setattr(ds, keyword, list(value) if isinstance(value, tuple) else value)
    info = np.iinfo(np.dtype(dtype))
    levels = np.arange(int(info.min), int(info.max) + 1, dtype=np.int64).astype(dtype)
    table = _grey_levels(ds, levels)
    table.setflags(write=False)  # shared by every image with this header
    return table


def _native_values(
    ds: Dataset, data: bytes, element_at: int, bits_stored: int
) -> NDArray[np.integer] | None:
    """The pixel element of an uncompressed little-endian file as an array over `data`'s own
    bytes, without pydicom's pixel handling (a few times its cost); None where pydicom must
    decode: compressed or big-endian syntaxes, and signed values that need sign extension.
    (Its caller also hands pydicom unsigned values with a bit set above BitsStored.)"""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if allocated not in (8, 16) or (signed and bits_stored < allocated):
        return None
    if data[element_at : element_at + 4] != _PIXEL_DATA_TAG:
        return None  # stopped elsewhere (no pixel data): let pydicom say what is wrong
    if syntax == ExplicitVRLittleEndian:
        length = int.from_bytes(data[element_at + 8 : element_at + 12], "little")
        value_at = element_at + 12
    else:
        length = int.from_bytes(data[element_at + 4 : element_at + 8], "little")
        value_at = element_at + 8
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    needed = rows * cols * dtype.itemsize
    if length == _UNDEFINED_LENGTH or length < needed or value_at + needed > len(data):
        return None
    values = np.frombuffer(data, dtype=dtype, count=rows * cols, offset=value_at)
    return values.reshape(rows, cols)


def _read_raster(data: bytes, max_pixels: int) -> StoredPixels:
    with PILImage.open(io.BytesIO(data)) as img:  # reads the header only
        _refuse_if_too_large(img.size[0] * img.size[1], max_pixels)
        grey = img if img.mode in ("L", "I", "I;16", "I;16B", "I;16L") else img.convert("L")
        values = np.asarray(grey)
    if values.ndim != 2:
        raise ImageRejected(RejectCode.DECODE_FAILED, f"not a 2-D image: shape {values.shape}")
    _refuse_if_too_small(values)
    low, high = int(values.min()), int(values.max())
    if high - low >= MAX_LEVELS:
        raise ImageRejected(
            RejectCode.UNSUPPORTED_BIT_DEPTH, "more than 16 bits of grey levels; 8 to 16 are"
        )
    return StoredPixels(values, low, _unit_table(np.arange(high - low + 1, dtype=np.float64)))


def _refuse_if_too_small(values: NDArray[np.integer]) -> None:
    if min(values.shape) < 8:
        raise ImageRejected(RejectCode.DECODE_FAILED, f"not a 2-D image: shape {values.shape}")


def _unit_table(table: NDArray[np.float64]) -> NDArray[np.float32]:
    """The table scaled to [0, 1], in float64 and then stored as float32 (the lowest and
    highest stored values are in the image by construction, so its ends are 0 and 1)."""
    low, high = float(table.min()), float(table.max())
    if high <= low:
        raise ImageRejected(RejectCode.DECODE_FAILED, "image is blank (one grey level)")
    return ((table - low) / (high - low)).astype(np.float32)
