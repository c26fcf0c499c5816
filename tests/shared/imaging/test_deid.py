"""The de-identifier leaves elements no rule touched as they were read, unparsed, so the header
writer copies their bytes: the result must be the header a fully parsed dataset gives, with
the profile applied at every depth."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from shared.imaging.deid import Deidentifier

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REFERENCED_UID = "1.2.826.0.1.3680043.8.498.2"
# Explicit and implicit VR, big endian, sequences (nested, private, of VR UN) and a report.
FILES = (
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "rtplan.dcm",
    "priv_SQ.dcm",
    "nested_priv_SQ.dcm",
    "UN_sequence.dcm",
    "reportsi.dcm",
)


def _header(name: str) -> Dataset:
    dataset = pydicom.dcmread(PYDICOM_TEST_FILES / name, stop_before_pixels=True, force=True)
    if "SOPInstanceUID" not in dataset:  # the sequence samples are fragments, not instances
        dataset.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    if "SOPClassUID" not in dataset:
        dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    return dataset


def _written(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, dataset, enforce_file_format=True)
    return out.getvalue()


def _private_tags(dataset: Dataset) -> list[str]:
    found: list[str] = []
    dataset.walk(lambda _d, elem: found.append(str(elem.tag)) if elem.tag.is_private else None)
    return found


@pytest.mark.parametrize("name", FILES)
def test_unparsed_elements_are_written_as_a_parsed_dataset_would_be(name: str) -> None:
    deidentifier = Deidentifier("secret")
    as_read = _header(name)
    parsed = _header(name)
    parsed.walk(lambda _dataset, _element: None)  # reading every element parses it
    if "TransferSyntaxUID" not in getattr(as_read, "file_meta", {}):
        pytest.fail(f"{name} should carry its transfer syntax")
    for dataset in (as_read, parsed):
        deidentifier.apply(dataset, patient_key="patient-key")

    written = _written(as_read)
    assert written == _written(parsed)
    stored = pydicom.dcmread(io.BytesIO(written))
    assert _private_tags(stored) == []
    assert stored.PatientID == "patient-key"
    assert stored.PatientIdentityRemoved == "YES"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_private_elements_inside_a_public_sequence_are_removed(syntax: UID) -> None:
    source = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = REFERENCED_UID
    item.private_block(0x0031, "NESTED VENDOR 1.0", create=True).add_new(0x01, "LO", "NESTED")
    source.SourceImageSequence = Sequence([item])
    source.file_meta.TransferSyntaxUID = syntax
    sent = io.BytesIO()
    source.save_as(sent, enforce_file_format=True)
    header = pydicom.dcmread(io.BytesIO(sent.getvalue()), stop_before_pixels=True)

    Deidentifier("secret").apply(header, patient_key="patient-key")

    stored = pydicom.dcmread(io.BytesIO(_written(header)))
    assert _private_tags(stored) == []
    (kept,) = stored.SourceImageSequence
    assert kept.ReferencedSOPInstanceUID != REFERENCED_UID  # the item was de-identified too


def test_a_public_sequence_sent_as_un_is_de_identified_inside() -> None:
    """Some senders write a sequence with VR UN (its items in implicit VR): the profile must
    still reach its items, as it does when the element is parsed."""
    source = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = REFERENCED_UID
    item.private_block(0x0031, "NESTED VENDOR 1.0", create=True).add_new(0x01, "LO", "NESTED")
    holder = Dataset()
    holder.ViewCodeSequence = Sequence([item])
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, holder)
    value = encoded.getvalue()[8:]  # after the element's own tag and length
    tag = Tag("ViewCodeSequence")  # no rule of the profile names it
    source[tag] = RawDataElement(tag, VR.UN, len(value), value, 0, False, True)
    sent = io.BytesIO()
    source.save_as(sent, enforce_file_format=True)
    assert REFERENCED_UID.encode() in sent.getvalue()
    header = pydicom.dcmread(io.BytesIO(sent.getvalue()), stop_before_pixels=True)

    Deidentifier("secret").apply(header, patient_key="patient-key")

    written = _written(header)
    assert REFERENCED_UID.encode() not in written
    assert b"NESTED VENDOR" not in written
