"""The one intake, called directly as the DICOM gateway will call it: no HTTP in between."""

from __future__ import annotations

import io
import uuid

import pydicom
import pytest
from pydicom.uid import RLELossless

from devstack.synth import SynthImage
from shared.config import Settings
from shared.db.models import Laterality
from shared.imaging.dicom import pixel_spacing_mm
from shared.imaging.formats import ImageRejected, MediaType, RejectCode
from shared.imaging.intake import Destination, IntakeHints, discard, patient_key, take_in
from shared.storage import Keys, ObjectStore


def test_a_dicom_file_is_gated_deidentified_and_stored_under_its_key(
    settings: Settings, store: ObjectStore, exam: list[SynthImage]
) -> None:
    tenant, batch = uuid.uuid4(), uuid.uuid4()
    synth = exam[0]
    original = pydicom.dcmread(synth.path)
    with synth.path.open("rb") as stream:
        image = take_in(
            stream,
            synth.path.name,
            to=Destination(settings, store, tenant, batch),
            hints=IntakeHints(),
        )

    assert image.stored.key == Keys.image(tenant, batch, image.image_id)
    assert image.media_type == MediaType.DICOM
    assert image.laterality == Laterality(synth.laterality)
    assert image.patient_key == patient_key(settings.patient_key_secret, tenant, synth.patient)
    stored = pydicom.dcmread(io.BytesIO(store.get_bytes(image.stored.key)))
    assert stored.PatientID == image.patient_key
    assert stored.StudyInstanceUID != original.StudyInstanceUID
    assert image.study_key == stored.StudyInstanceUID
    assert stored.PixelData == original.PixelData  # the pixels pass through byte for byte
    # Non-identifying acquisition metadata, kept on the row for drift and breakdowns.
    assert image.manufacturer == original.get("Manufacturer")
    assert image.pixel_spacing_mm == pytest.approx(float(original.PixelSpacing[0]))

    discard(store, [image])
    assert not store.exists(image.stored.key)


def test_a_refused_file_raises_its_code_and_stores_nothing(
    settings: Settings, store: ObjectStore
) -> None:
    with pytest.raises(ImageRejected) as refused:
        take_in(
            io.BytesIO(b"%PDF-1.7 not an image"),
            "report.pdf",
            to=Destination(settings, store, uuid.uuid4(), uuid.uuid4()),
            hints=IntakeHints(),
        )
    assert refused.value.code == RejectCode.UNSUPPORTED_MEDIA_TYPE
    assert list(store.list_keys(Keys.UPLOADS)) == []


def _rle_with_trailer(synth: SynthImage) -> tuple[bytes, int]:
    """The image RLE-compressed (encapsulated pixel data), with trailing padding after the
    pixel element; the offset where the pixel element's value starts."""
    ds = pydicom.dcmread(synth.path)
    ds.compress(RLELossless)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    value_at = data.rindex(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    # (FFFC,FFFC) Data Set Trailing Padding, OB, 4 bytes: what some archives append.
    return data + b"\xfc\xff\xfc\xffOB\x00\x00\x04\x00\x00\x00PAD!", value_at


def _take_in(data: bytes, settings: Settings, store: ObjectStore) -> bytes:
    image = take_in(
        io.BytesIO(data),
        "compressed.dcm",
        to=Destination(settings, store, uuid.uuid4(), uuid.uuid4()),
        hints=IntakeHints(),
    )
    return store.get_bytes(image.stored.key)


def test_compressed_pixels_are_stored_whole_and_what_follows_them_is_dropped(
    settings: Settings, store: ObjectStore, exam: list[SynthImage]
) -> None:
    data, _ = _rle_with_trailer(exam[0])
    stored = _take_in(data, settings, store)
    kept = pydicom.dcmread(io.BytesIO(stored))
    assert kept.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData
    assert b"PAD!" not in stored
    assert stored.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # the sequence delimiter
    assert (kept.pixel_array == pydicom.dcmread(exam[0].path).pixel_array).all()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("cut inside a fragment", "ends before its declared length"),
        ("no sequence delimiter", "ends before its declared length"),
        ("a non-item element among the fragments", "where a fragment item belongs"),
    ],
)
def test_damaged_compressed_pixels_are_refused_and_nothing_is_stored(
    settings: Settings, store: ObjectStore, exam: list[SynthImage], damage: str, message: str
) -> None:
    data, value_at = _rle_with_trailer(exam[0])
    delimiter_at = data.rindex(b"\xfe\xff\xdd\xe0")
    damaged = {
        "cut inside a fragment": data[: delimiter_at - 100],
        "no sequence delimiter": data[:delimiter_at],
        # The basic offset table item's tag turned into (FFFE,E00D), an item delimiter.
        "a non-item element among the fragments": data[:value_at]
        + b"\xfe\xff\x0d\xe0"
        + data[value_at + 4 :],
    }[damage]
    with pytest.raises(ImageRejected) as refused:
        _take_in(damaged, settings, store)
    assert refused.value.code == RejectCode.INVALID_DICOM
    assert message in refused.value.message
    assert list(store.list_keys(Keys.UPLOADS)) == []


def test_a_file_shorter_than_its_carrier_declared_is_refused_and_nothing_is_stored(
    settings: Settings, store: ObjectStore, exam: list[SynthImage]
) -> None:
    # A zip entry's header gives its size; a hostile or damaged archive may claim more than
    # the entry holds. The pixel element's own length is then in bounds of the claim only.
    data = exam[0].path.read_bytes()
    with pytest.raises(ImageRejected) as refused:
        take_in(
            io.BytesIO(data[:-1000]),
            "short.dcm",
            to=Destination(settings, store, uuid.uuid4(), uuid.uuid4()),
            hints=IntakeHints(),
            size=len(data),
        )
    assert refused.value.code == RejectCode.INVALID_DICOM
    assert "ends before its declared length" in refused.value.message
    assert list(store.list_keys(Keys.UPLOADS)) == []


@pytest.mark.parametrize(
    ("attributes", "spacing"),
    [
        ({"PixelSpacing": [0.07, 0.07], "ImagerPixelSpacing": [0.085, 0.085]}, 0.07),
        ({"ImagerPixelSpacing": [0.085, 0.085]}, 0.085),  # a view without calibration
        ({"PixelSpacing": "0.1"}, 0.1),  # one value where two belong: still read
        ({"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.05, 0.05]}, 0.05),
        ({}, None),
    ],
)
def test_the_pixel_spacing_is_read_from_either_attribute(
    attributes: dict[str, object], spacing: float | None
) -> None:
    ds = pydicom.Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    found = pixel_spacing_mm(ds)
    assert found == (pytest.approx(spacing) if spacing is not None else None)
