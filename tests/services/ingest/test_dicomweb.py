"""STOW-RS on the ingest service, with bodies built as PS3.18 describes them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pydicom
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from shared.db.models import Batch, BatchSource, Image
from tests.factories import make_tenant
from tests.helpers import auth

BOUNDARY = "mammoscreen-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def related(*files: Path) -> bytes:
    body = b""
    for path in files:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += path.read_bytes() + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def _uids(item: dict[str, dict[str, list[str]]]) -> str:
    return item["00081155"]["Value"][0]


def test_a_study_is_stored_and_a_ct_in_it_fails_with_its_reason(
    ingest: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    answer = ingest.post(
        "/dicomweb/studies",
        content=related(*(s.path for s in exam), ct),
        headers={**auth(key), "Content-Type": CONTENT_TYPE},
    )
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    body = answer.json()
    stored = {_uids(i) for i in body["00081199"]["Value"]}
    assert stored == {str(pydicom.dcmread(s.path).SOPInstanceUID) for s in exam}
    (failed,) = body["00081198"]["Value"]
    assert _uids(failed) == str(pydicom.dcmread(ct).SOPInstanceUID)
    assert failed["00081197"]["Value"] == [0x0122]  # SOP class not supported

    batches = session.scalars(select(Batch).where(Batch.source == BatchSource.DICOMWEB)).all()
    assert len(batches) == 2  # the exam's study, and the CT's (holding its refusal)
    assert session.scalar(select(func.count()).select_from(Image)) == 4

    # Posting the same again (a retry) stores nothing twice.
    again = ingest.post(
        "/dicomweb/studies",
        content=related(*(s.path for s in exam)),
        headers={**auth(key), "Content-Type": CONTENT_TYPE},
    )
    assert again.status_code == 200
    assert session.scalar(select(func.count()).select_from(Image)) == 4


def test_instances_of_another_study_fail_and_none_stored_is_409(
    ingest: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    other_study = f"2.25.{uuid.uuid4().int}"
    answer = ingest.post(
        f"/dicomweb/studies/{other_study}",
        content=related(exam[0].path),
        headers={**auth(key), "Content-Type": CONTENT_TYPE},
    )
    assert answer.status_code == 409
    (failed,) = answer.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    assert session.scalar(select(func.count()).select_from(Image)) == 0


def test_stow_refuses_other_bodies_with_a_clear_error(
    ingest: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    wrong_type = ingest.post(
        "/dicomweb/studies",
        content=exam[0].path.read_bytes(),
        headers={**auth(key), "Content-Type": "application/dicom"},
    )
    assert (wrong_type.status_code, wrong_type.json()["error"]["code"]) == (
        415,
        "unsupported_media_type",
    )
    cut = related(exam[0].path)[:-200]
    truncated = ingest.post(
        "/dicomweb/studies", content=cut, headers={**auth(key), "Content-Type": CONTENT_TYPE}
    )
    assert (truncated.status_code, truncated.json()["error"]["code"]) == (400, "invalid_multipart")
    unauthenticated = ingest.post(
        "/dicomweb/studies", content=related(exam[0].path), headers={"Content-Type": CONTENT_TYPE}
    )
    assert unauthenticated.status_code == 401
