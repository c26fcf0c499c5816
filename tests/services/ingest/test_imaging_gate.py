"""The imaging quality gate and de-identification, through the real ingest API.

Uploads go through FastAPI into the real object store and Postgres; stored objects are read
back from the object store, never from the ingest process's memory.
"""

from __future__ import annotations

import csv
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from PIL import PngImagePlugin
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML, UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from shared.config import Settings
from shared.db.models import Image, ImageStatus, Study
from shared.imaging.deid import profile_tables
from shared.imaging.formats import RejectCode
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, screen_everything

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DOCUMENTED_CODES = {code.value for code in RejectCode}
# Identity planted in the uploads; none of it may reach object storage.
PLANTED = {
    "OperatorsName": "OPERATOR^PLANTED",
    "DeviceSerialNumber": "SERIAL-PLANTED-77",
    "InstitutionAddress": "1 Planted Street, Plantville",
    "PatientAddress": "2 Patient Lane, Plantville",
    "OtherPatientIDs": "OTHER-ID-PLANTED",
    "StudyID": "STUDYID-PLANTED",
    "PatientComments": "comment naming PLANTED-PERSON",
}
PRIVATE_VALUE = "PRIVATE-PLANTED-VALUE"
NESTED_PRIVATE_VALUE = "NESTED-PRIVATE-PLANTED-VALUE"
# Repeating groups (60xx overlays, 50xx curves): the profile names them by masks.
OVERLAY_COMMENT = "overlay naming OVERLAY-PLANTED"
CURVE_LABEL = "CURVE-PLANTED"
NESTED_OVERLAY_COMMENT = "nested overlay naming NESTED-OVERLAY-PLANTED"
NESTED_UID = "1.2.826.0.1.3680043.99.12345"


def _batch(ingest: TestClient, key: str) -> str:
    response = ingest.post("/v1/batches", json={"name": "imaging"}, headers=auth(key))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _upload(
    ingest: TestClient, key: str, batch: str, files: list[tuple[str, bytes]], **form: str
) -> dict[str, object]:
    response = ingest.post(
        f"/v1/batches/{batch}/images",
        files=[("files", (name, data, "application/octet-stream")) for name, data in files],
        data=form,
        headers=auth(key),
    )
    assert response.status_code in (202, 422), response.text
    body = response.json()
    if response.status_code == 422:
        assert body["error"]["code"] == "no_acceptable_files"
        return {"accepted": [], "rejected": body["error"]["detail"]["rejected"]}
    return dict(body)


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_identity(path: Path, syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    """A synthetic mammogram carrying the identity a real one would: private tags included,
    in a sequence's item too; in `syntax` (implicit VR: no element states its VR)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    block = ds.private_block(0x0029, "PLANTED VENDOR 1.0", create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)
    ds.add_new(0x60004000, "LT", OVERLAY_COMMENT)  # Overlay Comments
    ds.add_new(0x50022500, "LO", CURVE_LABEL)  # Curve Label (retired)
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = NESTED_UID
    reference.add_new(0x60024000, "LT", NESTED_OVERLAY_COMMENT)
    reference.private_block(0x0031, "NESTED VENDOR 1.0", create=True).add_new(
        0x01, "LO", NESTED_PRIVATE_VALUE
    )
    ds.SourceImageSequence = Sequence([reference])
    return ds


def _private_tags(ds: Dataset) -> list[str]:
    found: list[str] = []
    ds.walk(lambda _d, elem: found.append(str(elem.tag)) if elem.tag.is_private else None)
    return found


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_stored_dicom_has_no_basic_profile_phi_and_no_private_tags(
    ingest: TestClient, session: Session, store: ObjectStore, exam: list[SynthImage], syntax: UID
) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    originals = {s.path.name: _with_identity(s.path, syntax) for s in exam}
    body = _upload(ingest, key, batch, [(n, _bytes(ds)) for n, ds in originals.items()])
    assert len(body["accepted"]) == 4  # type: ignore[arg-type]

    tables = profile_tables()
    removed = {t for t in tables["X_TAGS"] if len(t) == 2}
    remapped = {t for t in tables["U_TAGS"] if len(t) == 2}
    profile = {t for t in tables["ALL_TAGS"] if len(t) == 2}
    rows = session.scalars(select(Image).where(Image.batch_id == batch)).all()
    for row in rows:
        raw = store.get_bytes(row.object_key)
        original = originals[row.filename]
        stored = pydicom.dcmread(io.BytesIO(raw))
        checked = 0
        for tag in profile:
            if tag not in original or not original[tag].value:
                continue
            checked += 1
            if tag in removed:
                assert tag not in stored, f"{tag} should have been removed"
            elif tag in stored and stored[tag].value:
                assert stored[tag].value != original[tag].value, f"{tag} kept its value"
        assert checked >= 15, "the upload should carry plenty of profile elements"
        assert _private_tags(stored) == []
        planted = (*PLANTED.values(), OVERLAY_COMMENT, CURVE_LABEL, NESTED_OVERLAY_COMMENT)
        private = (PRIVATE_VALUE, NESTED_PRIVATE_VALUE)
        for value in (*planted, *private, NESTED_UID, original.PatientID):
            assert str(value).encode() not in raw, f"{value} reached object storage"
        for tag in remapped & set(stored.keys()):
            assert str(stored[tag].value).startswith("2.25."), tag
        assert stored.PatientIdentityRemoved == "YES"
        assert stored.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert stored.file_meta.MediaStorageSOPInstanceUID == stored.SOPInstanceUID
        # Pixels and what screening needs are untouched.
        assert stored.PixelData == original.PixelData
        assert (stored.ImageLaterality, stored.ViewPosition, stored.Modality) == (
            original.ImageLaterality,
            original.ViewPosition,
            "MG",
        )
        # The study key in the database is the pseudonymous study UID, not the original.
        study = session.get(Study, row.study_id)
        assert study is not None
        assert study.study_key == stored.StudyInstanceUID != original.StudyInstanceUID
        assert stored.PatientID == study.patient_key


def test_same_patient_same_key_across_uploads_and_other_patients_differ(
    ingest: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    first, second = _batch(ingest, key), _batch(ingest, key)
    _upload(ingest, key, first, [(exam[0].path.name, exam[0].path.read_bytes())])
    _upload(ingest, key, second, [(exam[1].path.name, exam[1].path.read_bytes())])
    other = pydicom.dcmread(exam[2].path)
    other.PatientID = "SOMEONE-ELSE"
    other.StudyInstanceUID = "1.2.826.0.1.3680043.99.777"
    _upload(ingest, key, second, [("other.dcm", _bytes(other))])

    studies = session.scalars(select(Study).order_by(Study.created_at)).all()
    assert len(studies) == 3
    assert studies[0].patient_key == studies[1].patient_key
    assert studies[0].study_key == studies[1].study_key  # same study UID, remapped alike
    assert studies[2].patient_key != studies[0].patient_key
    assert exam[0].patient not in studies[0].patient_key

    # Another tenant's identical patient id gives a different key: no cross-site linkage.
    _, other_key = make_tenant(session, name="other site")
    third = _batch(ingest, other_key)
    _upload(ingest, other_key, third, [(exam[0].path.name, exam[0].path.read_bytes())])
    newest = session.scalars(select(Study).order_by(Study.created_at.desc())).first()
    assert newest is not None
    assert newest.patient_key != studies[0].patient_key


def _variant(template: Path, **changes: object) -> bytes:
    ds = pydicom.dcmread(template)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _bytes(ds)


def _multi_frame(template: Path) -> bytes:
    ds = pydicom.dcmread(template)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return _bytes(ds)


def _colour(template: Path) -> bytes:
    ds = pydicom.dcmread(template)
    grey = ds.pixel_array
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    return _bytes(ds)


def _thirty_two_bit(template: Path) -> bytes:
    ds = pydicom.dcmread(template)
    values = ds.pixel_array.astype(np.uint32)
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelData = values.tobytes()
    return _bytes(ds)


def _unsupported_syntax(template: Path) -> bytes:
    ds = pydicom.dcmread(template)
    ds.PixelData = encapsulate([ds.PixelData])  # any payload: the syntax is the point
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    return _bytes(ds)


def _truncated(template: Path) -> bytes:
    return template.read_bytes()[:-1000]


def _structured_report(template: Path) -> bytes:
    ds = pydicom.dcmread(template)
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.Modality = "SR"
    return _bytes(ds)


def _view_code(code: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
    return Sequence([item])


def test_every_header_rejection_code_and_the_tag_fallbacks(
    ingest: TestClient, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    template = exam[0].path  # L CC
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    refused = {
        "ct.dcm": (_variant(template, Modality="CT"), "not_mammography"),
        "no_modality.dcm": (_variant(template, Modality=None), "not_mammography"),
        "mpeg.dcm": (_unsupported_syntax(template), "unsupported_transfer_syntax"),
        "tomo.dcm": (_multi_frame(template), "multi_frame"),
        "rgb.dcm": (_colour(template), "not_greyscale"),
        "palette.dcm": (
            _variant(template, PhotometricInterpretation="PALETTE COLOR"),
            "not_greyscale",
        ),
        "float32.dcm": (_thirty_two_bit(template), "unsupported_bit_depth"),
        "raw.dcm": (
            _variant(template, PresentationIntentType="FOR PROCESSING"),
            "not_for_presentation",
        ),
        "no_side.dcm": (
            _variant(template, ImageLaterality=None, Laterality=None),
            "unknown_laterality",
        ),
        "both.dcm": (
            _variant(template, ImageLaterality="B", Laterality=None),
            "unknown_laterality",
        ),
        "ml.dcm": (_variant(template, ViewPosition="ML"), "unknown_view"),
        "sr.dcm": (_structured_report(template), "not_dicom_image"),
        "cut.dcm": (_truncated(template), "invalid_dicom"),
    }
    accepted = {
        # Laterality only in (0020,0060); view only as a code; a CR mammogram; "RMLO" style.
        "laterality_tag.dcm": (_variant(template, ImageLaterality=None, Laterality="L"), "L", "CC"),
        "view_code.dcm": (
            _variant(
                template,
                ViewPosition=None,
                ViewCodeSequence=_view_code("399368009", "medio-lateral oblique"),
            ),
            "L",
            "MLO",
        ),
        "cr.dcm": (_variant(template, Modality="CR", BodyPartExamined="BREAST"), "L", "CC"),
        "rmlo.dcm": (
            _variant(template, ImageLaterality=None, Laterality=None, ViewPosition="RMLO"),
            "R",
            "MLO",
        ),
    }
    files = [(n, d) for n, (d, _) in refused.items()] + [
        (n, d) for n, (d, _, _) in accepted.items()
    ]
    body = _upload(ingest, key, batch, files)
    codes = {r["filename"]: r["code"] for r in body["rejected"]}  # type: ignore[attr-defined]
    assert codes == {name: code for name, (_, code) in refused.items()}
    got = {a["filename"]: (a["laterality"], a["view"]) for a in body["accepted"]}  # type: ignore[attr-defined]
    assert got == {name: (lat, view) for name, (_, lat, view) in accepted.items()}
    # Refused files left nothing behind: rows and objects are the accepted ones only.
    rows = session.scalars(select(Image)).all()
    assert {r.filename for r in rows} == set(accepted)
    objects = list(store.client.list_objects(store.bucket, prefix="tenants/", recursive=True))
    assert len(objects) == len(accepted)


def test_every_pydicom_test_file_is_screened_or_refused_with_a_documented_code(
    ingest: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
) -> None:
    """pydicom's own test files, as shipped, and relabelled as mammograms so that their
    encodings (every transfer syntax pydicom ships) reach the worker too."""
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    paths = sorted(PYDICOM_TEST_FILES.glob("*.dcm"))
    assert len(paths) > 60
    files: list[tuple[str, bytes]] = [(p.name, p.read_bytes()) for p in paths]
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: S112 - unreadable as shipped: uploaded as such above
            continue
        meta = getattr(ds, "file_meta", None)
        if "PixelData" not in ds or meta is None or "TransferSyntaxUID" not in meta:
            continue
        ds.Modality, ds.ImageLaterality, ds.ViewPosition = "MG", "R", "CC"
        try:
            files.append((f"mg_{path.name}", _bytes(ds)))
        except Exception:  # noqa: S112 - some broken files cannot be written back
            continue
    outcome: dict[str, str] = {}
    for start in range(0, len(files), 40):
        body = _upload(ingest, key, batch, files[start : start + 40])
        for rejected in body["rejected"]:  # type: ignore[attr-defined]
            assert rejected["code"] in DOCUMENTED_CODES, rejected
            assert rejected["message"]
            outcome[rejected["filename"]] = rejected["code"]

    images = session.scalars(select(Image)).all()
    assert len(images) >= 15, "relabelled single-frame greyscale files must get through"
    screen_everything(session, settings, store)
    for image in session.scalars(select(Image)):
        assert image.status in (ImageStatus.DONE, ImageStatus.FAILED), image.filename
        if image.status == ImageStatus.FAILED:
            assert image.error_code in DOCUMENTED_CODES, (image.filename, image.error_code)
        outcome[image.filename] = (
            image.status.value if image.error_code is None else str(image.error_code)
        )
    screened = sorted(name for name, result in outcome.items() if result == "done")
    syntaxes = {
        UID(pydicom.dcmread(PYDICOM_TEST_FILES / name[3:]).file_meta.TransferSyntaxUID).keyword
        for name in screened
    }
    kinds = sorted(set(outcome.values()))
    print(f"\n{len(outcome)} files: {len(screened)} screened; outcomes {kinds}")
    print(f"screened transfer syntaxes: {sorted(syntaxes)}")
    assert len(outcome) == len(files)
    assert {
        "JPEG2000",
        "JPEG2000Lossless",
        "JPEGExtended12Bit",
        "JPEGLSLossless",
        "JPEGLSNearLossless",
        "RLELossless",
        "ExplicitVRBigEndian",
        "ImplicitVRLittleEndian",
        "DeflatedExplicitVRLittleEndian",
    } <= syntaxes


def _png(array: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def _breast_png(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((96, 80), 20, dtype=np.uint16)
    image[10:86, :50] = rng.integers(20000, 40000, (76, 50), dtype=np.uint16)
    return image


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _manifest(rows: list[dict[str, str]]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["file", "study", "patient", "laterality", "view"])
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def test_zip_of_pngs_with_a_manifest_and_png_text_is_stripped(
    ingest: TestClient, session: Session, store: ObjectStore
) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    names = ["scans/a.png", "scans/b.png", "c.png", "d.png"]
    views = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    entries = {
        name: _png(_breast_png(i), {"Patient": "Jane PLANTED-NAME Doe"})
        for i, name in enumerate(names)
    }
    entries["unlisted.png"] = _png(_breast_png(9))  # no manifest row, no naming convention
    rows = [
        {"file": n, "study": "exam-42", "patient": "P42", "laterality": lat, "view": view}
        for n, (lat, view) in zip(names, views, strict=True)
    ]
    rows.append(
        {"file": "ghost.png", "study": "exam-42", "patient": "P42", "laterality": "L", "view": "CC"}
    )
    entries["manifest.csv"] = _manifest(rows)
    body = _upload(ingest, key, batch, [("exam42.zip", _zip(entries))])

    got = {a["filename"]: (a["laterality"], a["view"]) for a in body["accepted"]}  # type: ignore[attr-defined]
    assert got == {Path(n).name: v for n, v in zip(names, views, strict=True)}
    codes = {r["filename"]: r["code"] for r in body["rejected"]}  # type: ignore[attr-defined]
    assert codes == {
        "exam42.zip/unlisted.png": "unknown_laterality",
        "exam42.zip/ghost.png": "manifest_file_missing",
    }
    studies = session.scalars(select(Study)).all()
    assert len(studies) == 1  # four views, one exam
    for image in session.scalars(select(Image)):
        raw = store.get_bytes(image.object_key)
        assert b"PLANTED-NAME" not in raw
        assert b"tEXt" not in raw
        original = entries[next(n for n in names if n.endswith(image.filename))]
        with PILImage.open(io.BytesIO(raw)) as stored, PILImage.open(io.BytesIO(original)) as o:
            assert np.array_equal(np.asarray(stored), np.asarray(o))


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (b"name,laterality\na.png,L\n", "no `file` column"),
        (b"file,laterality,view\na.png,left-ish,CC\n", "laterality 'left-ish'"),
        (b"file,laterality,view\na.png,L,SPOT\n", "view 'SPOT'"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ],
)
def test_a_bad_manifest_refuses_the_whole_archive(
    ingest: TestClient, session: Session, store: ObjectStore, manifest: bytes, problem: str
) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    archive = _zip({"a.png": _png(_breast_png(1)), "manifest.csv": manifest})
    body = _upload(ingest, key, batch, [("bad.zip", archive)])
    (rejected,) = body["rejected"]  # type: ignore[misc]
    assert rejected["code"] == "invalid_manifest"
    assert problem in rejected["message"]
    assert session.scalars(select(Image)).all() == []
    assert list(store.client.list_objects(store.bucket, prefix="tenants/", recursive=True)) == []


def test_jpeg_comments_and_exif_are_dropped_and_pixels_kept(
    ingest: TestClient, session: Session, store: ObjectStore
) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    buffer = io.BytesIO()
    grey = (_breast_png(3) >> 8).astype(np.uint8)
    PILImage.fromarray(grey).save(buffer, "JPEG", quality=95, comment=b"PLANTED-COMMENT")
    jpeg = buffer.getvalue()
    # An APP1 (EXIF-style) segment with a name in it, right after SOI.
    app1_payload = b"Exif\x00\x00PLANTED-EXIF-NAME"
    jpeg = (
        jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1_payload) + 2) + app1_payload + jpeg[2:]
    )
    body = _upload(ingest, key, batch, [("scan_R_CC.jpg", jpeg)])
    assert len(body["accepted"]) == 1  # type: ignore[arg-type]
    (image,) = session.scalars(select(Image)).all()
    raw = store.get_bytes(image.object_key)
    assert b"PLANTED" not in raw
    with PILImage.open(io.BytesIO(raw)) as stored, PILImage.open(io.BytesIO(jpeg)) as original:
        assert np.array_equal(np.asarray(stored), np.asarray(original))


def test_docs_list_every_rejection_code() -> None:
    text = (Path(__file__).parents[3] / "docs" / "imaging.md").read_text()
    missing = [code for code in DOCUMENTED_CODES if f"`{code}`" not in text]
    assert missing == [], f"docs/imaging.md does not document {missing}"


def test_png_without_any_laterality_source_is_refused(ingest: TestClient, session: Session) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    png = _png(_breast_png(5))
    body = _upload(ingest, key, batch, [("scan.png", png)])
    assert [r["code"] for r in body["rejected"]] == ["unknown_laterality"]  # type: ignore[attr-defined]
    body = _upload(ingest, key, batch, [("scan.png", png)], laterality="R")
    assert [r["code"] for r in body["rejected"]] == ["unknown_view"]  # type: ignore[attr-defined]
    body = _upload(ingest, key, batch, [("scan.png", png)], laterality="R", view="MLO")
    assert [(a["laterality"], a["view"]) for a in body["accepted"]] == [("R", "MLO")]  # type: ignore[attr-defined]
