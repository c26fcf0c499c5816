"""Every transfer syntax and photometric interpretation, with real encoded files.

Two sources: files the project's generator encodes (every syntax, MONOCHROME1 and 2), and the
DICOM test files pydicom ships, read from the installed package.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from devstack.synth import (
    COMPRESSED_SYNTAXES,
    LOSSY_SYNTAXES,
    UNCOMPRESSED_SYNTAXES,
    DicomVariant,
    SynthOptions,
    generate_exams,
)
from shared.imaging.decode import decode_image
from shared.imaging.formats import ImageRejected, MediaType, RejectCode
from shared.imaging.preprocess import BreastCrop

SMALL = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# The worst pixel error after normalising to [0, 1], per lossy syntax (8-bit JPEG is coarse).
LOSSY_TOLERANCE = {"JPEGBaseline8Bit": 0.1, "JPEGExtended12Bit": 0.01}


def _generate(tmp: Path, variant: DicomVariant) -> Path:
    return generate_exams(tmp / variant.name, exams=1, seed=5, options=SMALL, variants=(variant,))[
        0
    ].path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return decode_image(
        _generate(tmp_path_factory.mktemp("ref"), DicomVariant()).read_bytes(), MediaType.DICOM
    )


@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    "syntax", UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES, ids=lambda s: UID(s).keyword
)
def test_every_generated_syntax_decodes_to_the_same_picture(
    tmp_path: Path, reference: np.ndarray, syntax: str, monochrome1: bool
) -> None:
    path = _generate(tmp_path, DicomVariant(transfer_syntax=syntax, monochrome1=monochrome1))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    pixels = decode_image(path.read_bytes(), MediaType.DICOM)
    tolerance = LOSSY_TOLERANCE.get(UID(syntax).keyword, 0.002) if syntax in LOSSY_SYNTAXES else 0.0
    # MONOCHROME1 comes out as MONOCHROME2: bright tissue on a dark background either way.
    assert np.abs(pixels - reference).max() <= tolerance


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_pydicom_files_of_one_image_in_many_syntaxes_decode_identically(name: str) -> None:
    expected = decode_image((PYDICOM_FILES / "MR_small.dcm").read_bytes(), MediaType.DICOM)
    assert np.array_equal(
        decode_image((PYDICOM_FILES / name).read_bytes(), MediaType.DICOM), expected
    )


@pytest.mark.parametrize(
    "name",
    [
        "JPGExtended.dcm",  # JPEG extended (process 2 and 4), 12 bit
        "JPEG2000.dcm",  # JPEG 2000 lossy
        "693_J2KI.dcm",
        "JPEGLSNearLossless_16.dcm",
        "JPEGLSNearLossless_08.dcm",
        "image_dfl.dcm",  # deflated explicit VR little endian
        "CT_small.dcm",  # signed, rescale slope and intercept
    ],
)
def test_pydicom_compressed_files_match_pydicoms_own_decoding(name: str) -> None:
    data = (PYDICOM_FILES / name).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    ours = decode_image(data, MediaType.DICOM)
    raw = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        raw = pydicom.pixels.apply_voi_lut(raw, ds)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    assert ours.shape == expected.shape
    assert np.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("SC_rgb_jpeg.dcm", RejectCode.NOT_GREYSCALE),  # JPEG baseline, colour
        ("examples_palette.dcm", RejectCode.NOT_GREYSCALE),  # one sample, but a palette
        ("SC_rgb_rle_2frame.dcm", RejectCode.MULTI_FRAME),
        ("rtdose_1frame.dcm", RejectCode.UNSUPPORTED_BIT_DEPTH),  # 32 bit
        ("examples_ybr_color.dcm", RejectCode.MULTI_FRAME),
        ("MR_truncated.dcm", RejectCode.DECODE_FAILED),
    ],
)
def test_pydicom_files_that_cannot_be_screened_fail_with_their_code(
    name: str, code: RejectCode
) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image((PYDICOM_FILES / name).read_bytes(), MediaType.DICOM)
    assert caught.value.code == code


def _with_window(path: Path, **tags: object) -> tuple[bytes, np.ndarray]:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue(), ds.pixel_array.astype(np.float64)


def _unit(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def test_rescale_then_linear_window_as_the_standard_defines(tmp_path: Path) -> None:
    path = _generate(tmp_path, DicomVariant())
    slope, intercept, centre, width = 2.0, -1000.0, 14000.0, 8000.0
    data, stored = _with_window(
        path,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=centre,
        WindowWidth=width,
        VOILUTFunction="LINEAR",
    )
    x = stored * slope + intercept  # modality LUT, then PS3.3 C.11.2.1.2.1
    expected = np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert np.allclose(decode_image(data, MediaType.DICOM), _unit(expected), atol=1e-4)


def test_sigmoid_window_as_the_standard_defines(tmp_path: Path) -> None:
    path = _generate(tmp_path, DicomVariant(voi_lut_function="SIGMOID"))
    centre, width = 9000.0, 3000.0
    data, stored = _with_window(path, WindowCenter=centre, WindowWidth=width)
    expected = 1.0 / (1.0 + np.exp(-4.0 * (stored - centre) / width))  # PS3.3 C.11.2.1.3.1
    pixels = decode_image(data, MediaType.DICOM)
    assert np.allclose(pixels, _unit(expected), atol=1e-4)
    linear = decode_image(_with_window(path, VOILUTFunction="LINEAR")[0], MediaType.DICOM)
    assert not np.allclose(pixels, linear, atol=1e-2)  # the function really changes the result


def test_vendor_quirks_crop_to_the_same_breast(tmp_path: Path) -> None:
    """A grey background and a burnt-in label do not move the breast crop."""
    plain = decode_image(_generate(tmp_path, DicomVariant()).read_bytes(), MediaType.DICOM)
    quirky_path = _generate(
        tmp_path, DicomVariant(background=0.18, burnt_in_label=True, monochrome1=True)
    )
    quirky = decode_image(quirky_path.read_bytes(), MediaType.DICOM)
    written = pydicom.dcmread(quirky_path)
    assert written.BurnedInAnnotation == "YES"
    top = 2**written.BitsStored - 1
    assert 0.1 * top < written.pixel_array[-1, -1] < 0.9 * top  # a grey background as stored
    assert (quirky == 1.0).sum() > 50  # the label saturates after MONOCHROME1 inversion
    crop = BreastCrop()
    a = crop(plain)
    b = crop(quirky)
    assert abs(a.shape[0] - b.shape[0]) <= 3
    assert abs(a.shape[1] - b.shape[1]) <= 3
