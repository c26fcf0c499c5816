"""The one intake, called directly as the DICOM gateway will call it: no HTTP in between."""

from __future__ import annotations

import io
import uuid

import pydicom
import pytest

from devstack.synth import SynthImage
from shared.config import Settings
from shared.db.models import Laterality
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
