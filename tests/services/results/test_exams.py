"""Exams with missing views, and refused uploads, as the results API reports them."""

from __future__ import annotations

import io

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from shared.config import Settings
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, files_field, screen_everything


def test_an_exam_missing_a_view_is_scored_and_the_gap_and_refusals_are_reported(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    batch = ingest.post("/v1/batches", json={"name": "three views"}, headers=auth(key)).json()
    three_views = [s for s in exam if (s.laterality, s.view) != ("R", "MLO")]
    files = [
        *files_field([s.path for s in three_views]),
        ("files", ("notes.txt", b"hi", "text/plain")),
    ]
    upload = ingest.post(f"/v1/batches/{batch['id']}/images", files=files, headers=auth(key))
    assert upload.status_code == 202, upload.text
    # An upload refused outright (422, nothing stored) is recorded as well.
    refused_outright = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=[("files", ("scan.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 8, "application/dicom"))],
        headers=auth(key),
    )
    assert refused_outright.status_code == 422
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    screen_everything(session, settings, store)

    response = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(key))
    assert response.status_code == 200, response.text
    (exam_out,) = response.json()["items"]
    assert exam_out["views_present"] == ["L-CC", "L-MLO", "R-CC"]
    assert exam_out["missing_views"] == ["R-MLO"]
    assert len(exam_out["images"]) == 3
    assert all(i["status"] == "done" and 0 < i["score"] < 1 for i in exam_out["images"])
    assert exam[0].patient not in exam_out["patient_key"]
    score = {(i["laterality"], i["view"]): i["score"] for i in exam_out["images"]}
    left, right = exam_out["breasts"]
    assert (left["laterality"], left["views"]) == ("L", ["CC", "MLO"])
    assert left["score"] == pytest.approx((score["L", "CC"] + score["L", "MLO"]) / 2)
    assert (right["laterality"], right["views"], right["score"]) == ("R", ["CC"], score["R", "CC"])
    assert exam_out["exam_score"] == max(left["score"], right["score"])

    detail = results.get(f"/v1/batches/{batch['id']}", headers=auth(key)).json()
    assert detail["status"] == "completed"
    assert detail["rejected_files"] == 2
    refused = results.get(f"/v1/batches/{batch['id']}/rejections", headers=auth(key)).json()
    assert [(r["filename"], r["code"]) for r in refused["items"]] == [
        ("notes.txt", "unsupported_media_type"),
        ("scan.dcm", "invalid_dicom"),
    ]
    assert all(r["message"] for r in refused["items"])


def test_exam_pages_follow_cursors(
    ingest: TestClient, results: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    batch = ingest.post("/v1/batches", json={"name": "pages"}, headers=auth(key)).json()
    files = []
    for index, synth in enumerate(exam):  # four studies of one view each
        ds = pydicom.dcmread(synth.path)
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.99.{index + 1}"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        files.append(("files", (synth.path.name, buffer.getvalue(), "application/dicom")))
    response = ingest.post(f"/v1/batches/{batch['id']}/images", files=files, headers=auth(key))
    assert response.status_code == 202, response.text
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = results.get(f"/v1/batches/{batch['id']}/exams", params=params, headers=auth(key))
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) == 1
        seen += [e["id"] for e in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(set(seen)) == 4
