from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from devstack.synth import SynthOptions, generate_exams
from shared.imaging.decode import decode_image, read_pixels
from shared.imaging.formats import ImageRejected, MediaType, RejectCode, sniff_media_type


@pytest.fixture(scope="module")
def dicom_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dicom")
    return generate_exams(
        out, exams=1, seed=1, options=SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
    )[0].path


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _gradient(dtype: type, top: int) -> np.ndarray:
    return np.tile(np.linspace(0, top, 64), (48, 1)).astype(dtype)


def test_sniffing_judges_content_not_names(dicom_path: Path) -> None:
    assert sniff_media_type(dicom_path.read_bytes()[:132]) == MediaType.DICOM
    assert sniff_media_type(_png(_gradient(np.uint8, 255))[:132]) == MediaType.PNG
    assert sniff_media_type(b"\xff\xd8\xff\xe0rest") == MediaType.JPEG
    assert sniff_media_type(b"%PDF-1.7 not an image") is None


def test_dicom_decodes_to_unit_range(dicom_path: Path) -> None:
    pixels = decode_image(dicom_path.read_bytes(), MediaType.DICOM)
    assert pixels.dtype == np.float32
    assert pixels.shape == (256, 208)
    assert pixels.min() == 0.0
    assert pixels.max() == 1.0


def test_monochrome1_is_inverted_to_monochrome2(dicom_path: Path) -> None:
    original = decode_image(dicom_path.read_bytes(), MediaType.DICOM)
    ds = pydicom.dcmread(dicom_path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (int(2**ds.BitsStored - 1) - ds.pixel_array).astype(np.uint16).tobytes()
    del ds.WindowCenter, ds.WindowWidth
    buffer = io.BytesIO()
    ds.save_as(buffer)
    inverted_source = decode_image(buffer.getvalue(), MediaType.DICOM)
    assert np.allclose(inverted_source, original, atol=2e-3)


@pytest.mark.parametrize(("dtype", "top"), [(np.uint8, 255), (np.uint16, 65535)])
def test_png_of_8_and_16_bits(dtype: type, top: int) -> None:
    pixels = decode_image(_png(_gradient(dtype, top)), MediaType.PNG)
    assert pixels.shape == (48, 64)
    assert pixels[0, 0] == 0.0
    assert pixels[0, -1] == 1.0


def test_jpeg() -> None:
    buffer = io.BytesIO()
    PILImage.fromarray(_gradient(np.uint8, 255)).save(buffer, format="JPEG", quality=95)
    pixels = decode_image(buffer.getvalue(), MediaType.JPEG)
    assert pixels.shape == (48, 64)
    assert pixels[:, -1].mean() > 0.9


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (b"\x89PNG\r\n\x1a\ntruncated", MediaType.PNG),
        (b"\x00" * 128 + b"DICM" + b"\x01" * 50, MediaType.DICOM),
        (_png(np.full((32, 32), 7, dtype=np.uint8)), MediaType.PNG),  # blank
    ],
)
def test_undecodable_images_are_rejected_with_a_code(data: bytes, media_type: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, media_type)
    assert caught.value.code == RejectCode.DECODE_FAILED


def _saved(ds: pydicom.Dataset, syntax: str) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("bits", [8, 16])
def test_uncompressed_pixels_are_read_in_place_as_pydicom_reads_them(
    dicom_path: Path, syntax: str, bits: int
) -> None:
    ds = pydicom.dcmread(dicom_path)
    if bits == 8:
        ds.PixelData = (ds.pixel_array >> 6).astype(np.uint8).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        del ds.WindowCenter, ds.WindowWidth
    ds.file_meta.TransferSyntaxUID = syntax
    data = _saved(ds, syntax)
    stored = read_pixels(data, MediaType.DICOM)
    assert stored.read_as == "native"
    assert np.shares_memory(stored.values, np.frombuffer(data, dtype=np.uint8))  # no copy
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert stored.values.dtype == expected.dtype
    assert np.array_equal(stored.values, expected)


def test_bits_above_bits_stored_are_left_to_pydicom(dicom_path: Path) -> None:
    """A stored value with a bit set above BitsStored (an overlay in the high bits, say) is
    not read in place: pydicom decides what the pixel is, as before."""
    ds = pydicom.dcmread(dicom_path)
    values = ds.pixel_array.copy()
    values[0, 0] |= 1 << 15
    ds.PixelData = values.tobytes()
    data = _saved(ds, ExplicitVRLittleEndian)
    stored = read_pixels(data, MediaType.DICOM)
    assert stored.read_as == "decoded"
    assert np.array_equal(stored.values, pydicom.dcmread(io.BytesIO(data)).pixel_array)


def test_each_window_gets_its_own_table(dicom_path: Path) -> None:
    """Grey tables are kept per header: a second window on the same pixels must not be
    answered from the first one's table."""
    ds = pydicom.dcmread(dicom_path)
    first = decode_image(dicom_path.read_bytes(), MediaType.DICOM)
    ds.WindowCenter, ds.WindowWidth = float(ds.WindowCenter) / 2, float(ds.WindowWidth) / 4
    narrowed = decode_image(_saved(ds, ExplicitVRLittleEndian), MediaType.DICOM)
    assert not np.array_equal(first, narrowed)
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    linear = np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    unit = (linear - linear.min()) / (linear.max() - linear.min())
    assert np.allclose(narrowed, unit, atol=1e-4)
