"""Decode stored image bytes into a presentation-ready grey-level array."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image as PILImage
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from shared.imaging.formats import (
    GREYSCALE_PHOTOMETRICS,
    ImageRejected,
    MediaType,
    RejectCode,
)

DEFAULT_MAX_PIXELS = 64_000_000


def decode_image(
    data: bytes, media_type: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> NDArray[np.float32]:
    """A 2-D float32 array in [0, 1], bright = dense tissue, whatever the source format.

    The pixel count an image declares is checked before its pixels are decoded, so a
    decompression bomb is refused rather than expanded.
    """
    try:
        if media_type == MediaType.DICOM:
            pixels = _decode_dicom(data, max_pixels)
        elif media_type in (MediaType.PNG, MediaType.JPEG):
            pixels = _decode_raster(data, max_pixels)
        else:
            raise ImageRejected(RejectCode.UNSUPPORTED_MEDIA_TYPE, f"cannot decode {media_type}")
    except ImageRejected:
        raise
    except Exception as err:  # any decoder failure is a property of this file, never retried
        raise ImageRejected(RejectCode.DECODE_FAILED, f"image could not be decoded: {err}") from err
    return _to_unit_range(pixels)


def _refuse_if_too_large(declared: int, max_pixels: int) -> None:
    if declared > max_pixels:
        raise ImageRejected(
            RejectCode.IMAGE_TOO_LARGE,
            f"the image declares {declared} pixels; the limit is {max_pixels}",
        )


def _decode_dicom(data: bytes, max_pixels: int) -> NDArray[np.floating]:
    """Stored values -> modality LUT (rescale) -> VOI LUT or window (LINEAR, SIGMOID) ->
    MONOCHROME2. Ingest's header gate refuses the same cases first; this is the backstop for
    objects stored before a rule existed or altered since."""
    ds = pydicom.dcmread(io.BytesIO(data))
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
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise ImageRejected(RejectCode.DECODE_FAILED, f"not a 2-D image: shape {stored.shape}")
    # Stored values are integers of at most 16 bits, so the whole chain (modality LUT, VOI
    # LUT or window, MONOCHROME1 inversion) is computed once per distinct value and applied
    # as one table lookup: several times faster than running it over every pixel.
    low, high = int(stored.min()), int(stored.max())
    levels = np.arange(low, high + 1, dtype=np.int64 if low < 0 else np.uint32)
    table = apply_modality_lut(levels.astype(stored.dtype), ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        table = apply_voi_lut(table, ds)
    table = np.asarray(table, dtype=np.float64)
    if photometric == "MONOCHROME1":
        table = table.max() - table  # MONOCHROME1: high values are dark
    # Scaled to [0, 1] here, in float64, so the image needs one float32 lookup and no pass of
    # its own (the lowest and highest stored values are in the image by construction).
    t_low, t_high = float(table.min()), float(table.max())
    if t_high > t_low:
        table = (table - t_low) / (t_high - t_low)
    table = table.astype(np.float32)
    index = stored - low if low >= 0 else stored.astype(np.int32) - low
    pixels: NDArray[np.float32] = np.take(table, index)
    return pixels


def _decode_raster(data: bytes, max_pixels: int) -> NDArray[np.float64]:
    with PILImage.open(io.BytesIO(data)) as img:  # reads the header only
        _refuse_if_too_large(img.size[0] * img.size[1], max_pixels)
        grey = img if img.mode in ("L", "I", "I;16", "I;16B", "I;16L") else img.convert("L")
        return np.asarray(grey, dtype=np.float64)


def _to_unit_range(pixels: NDArray[np.floating]) -> NDArray[np.float32]:
    if pixels.ndim != 2 or min(pixels.shape) < 8:
        raise ImageRejected(RejectCode.DECODE_FAILED, f"not a 2-D image: shape {pixels.shape}")
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        raise ImageRejected(RejectCode.DECODE_FAILED, "image is blank (one grey level)")
    if pixels.dtype == np.float32 and low == 0.0 and high == 1.0:
        return pixels.astype(np.float32, copy=False)  # already scaled by the lookup table
    return ((pixels - low) / (high - low)).astype(np.float32)
