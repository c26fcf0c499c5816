"""Outcomes a site reports for its exams: one at a time or imported in bulk, by our exam id or
by the site's own study key, replaced rather than repeated, per tenant, all or nothing, and
audited."""

from __future__ import annotations

import io
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cli.outcomes import OutcomeFileError, import_outcomes, read_outcomes
from devstack.synth import SynthImage
from mammoscreen_client import Client
from shared.db.models import AuditEvent, ExamOutcome, Scope
from tests.factories import make_tenant
from tests.helpers import auth, files_field

BIOPSY_DAY = date(2026, 10, 2)


def _exam_ids(ingest: TestClient, results: TestClient, key: str, **upload: Any) -> list[str]:
    """A batch holding the upload; the ids of its exams."""
    batch = ingest.post("/v1/batches", json={"name": "outcomes"}, headers=auth(key)).json()
    response = ingest.post(f"/v1/batches/{batch['id']}/images", headers=auth(key), **upload)
    assert response.status_code == 202, response.text
    exams = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(key)).json()["items"]
    return [exam["id"] for exam in exams]


def _outcomes(results: TestClient, key: str, exam_id: str) -> list[dict[str, Any]]:
    response = results.get(f"/v1/exams/{exam_id}/outcomes", headers=auth(key))
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def _png() -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_outcome_is_recorded_listed_and_replaced_not_repeated(
    ingest: TestClient, results: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    _, other_key = make_tenant(session)
    (exam_id,) = _exam_ids(ingest, results, key, files=files_field([s.path for s in exam]))
    outcome = {"truth": "malignant", "breast": "left", "source": "biopsy", "date": "2026-10-02"}

    recorded = ingest.post(f"/v1/exams/{exam_id}/outcome", json=outcome, headers=auth(key))
    assert recorded.status_code == 201, recorded.text
    assert {k: recorded.json()[k] for k in outcome} == outcome
    assert recorded.json()["exam_id"] == exam_id
    # The same exam, breast and source again: a correction, which replaces the first.
    corrected = {**outcome, "truth": "benign", "date": "2026-10-05"}
    assert (
        ingest.post(f"/v1/exams/{exam_id}/outcome", json=corrected, headers=auth(key)).status_code
        == 201
    )
    follow_up = {"truth": "normal", "breast": "right", "source": "follow_up", "date": "2026-11-20"}
    ingest.post(f"/v1/exams/{exam_id}/outcome", json=follow_up, headers=auth(key))
    listed = _outcomes(results, key, exam_id)
    assert [{k: o[k] for k in outcome} for o in listed] == [follow_up, corrected]

    # Another tenant neither sees the exam nor can record on it.
    assert results.get(f"/v1/exams/{exam_id}/outcomes", headers=auth(other_key)).status_code == 404
    refused = ingest.post(f"/v1/exams/{exam_id}/outcome", json=outcome, headers=auth(other_key))
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "exam_not_found"
    assert len(_outcomes(results, key, exam_id)) == 2

    # Bad input: a clear 422 naming the field, nothing written.
    future = (date.today() + timedelta(days=3)).isoformat()
    for bad, field in (
        ({**outcome, "truth": "suspicious"}, "truth"),
        ({**outcome, "breast": "L"}, "breast"),
        ({**outcome, "date": future}, "date"),
    ):
        answer = ingest.post(f"/v1/exams/{exam_id}/outcome", json=bad, headers=auth(key))
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "invalid_request"
        assert field in answer.json()["error"]["message"]
    assert len(_outcomes(results, key, exam_id)) == 2

    # A read-only key cannot record.
    _, reader = make_tenant(session, scopes=[Scope.READ])
    assert (
        ingest.post(f"/v1/exams/{exam_id}/outcome", json=outcome, headers=auth(reader)).status_code
        == 403
    )


def test_a_bulk_import_by_study_key_reaches_every_exam_of_that_study_for_that_tenant_only(
    ingest: TestClient, results: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    tenant, key = make_tenant(session, scopes=[Scope.SUBMIT, Scope.READ, Scope.AUDIT])
    other, other_key = make_tenant(session)
    dicom = {"files": files_field([s.path for s in exam])}
    # The same study screened twice (two exams), and a namesake at another tenant.
    first, second = (_exam_ids(ingest, results, key, **dicom)[0] for _ in range(2))
    (namesake,) = _exam_ids(ingest, results, other_key, **dicom)
    # A non-DICOM exam, named by the study key the site gave with it.
    (raster,) = _exam_ids(
        ingest,
        results,
        key,
        files=[("files", ("scan_L_CC.png", _png(), "image/png"))],
        data={"study_key": "ACC-2026-0042"},
    )
    study_uid = exam[0].study
    rows = [
        # Keyed by the StudyInstanceUID the site sent (we keep only its pseudonym).
        {"study_key": study_uid, "truth": "malignant", "breast": "right", "source": "biopsy"},
        {"study_key": "ACC-2026-0042", "truth": "normal", "breast": "both", "source": "follow_up"},
        {"exam_id": first, "truth": "benign", "breast": "left", "source": "biopsy"},
    ]
    body = {"outcomes": [{**row, "date": BIOPSY_DAY.isoformat()} for row in rows]}

    imported = ingest.post("/v1/outcomes", json=body, headers=auth(key))
    assert imported.status_code == 200, imported.text
    assert imported.json() == {"recorded": 4, "exams": 3}
    assert {(o["breast"], o["truth"]) for o in _outcomes(results, key, first)} == {
        ("right", "malignant"),
        ("left", "benign"),
    }
    assert [(o["breast"], o["truth"]) for o in _outcomes(results, key, second)] == [
        ("right", "malignant")
    ]
    assert [o["truth"] for o in _outcomes(results, key, raster)] == ["normal"]
    assert _outcomes(results, other_key, namesake) == []

    # Again: the same rows are replaced, not added.
    assert ingest.post("/v1/outcomes", json=body, headers=auth(key)).json()["recorded"] == 4
    count = select(func.count()).select_from(ExamOutcome)
    assert session.scalar(count.where(ExamOutcome.tenant_id == tenant.id)) == 4
    assert session.scalar(count.where(ExamOutcome.tenant_id == other.id)) == 0

    # All or nothing: one row naming no exam of this tenant (the namesake's, an unknown study
    # key) and none is recorded; the answer says which rows.
    changed = [
        {**body["outcomes"][0], "truth": "benign"},
        {"exam_id": namesake, "truth": "malignant", "breast": "left", "source": "biopsy"},
        {"study_key": "no-such-study", "truth": "normal", "breast": "both", "source": "other"},
    ]
    refused = ingest.post(
        "/v1/outcomes",
        json={"outcomes": [{"date": "2026-10-03", **row} for row in changed]},
        headers=auth(key),
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "unknown_exams"
    assert refused.json()["error"]["detail"]["rows"] == [1, 2]
    assert ("right", "malignant") in {
        (o["breast"], o["truth"]) for o in _outcomes(results, key, second)
    }
    # Each row names its exam once: by id or by study key.
    both = {**body["outcomes"][2], "study_key": study_uid}
    ambiguous = ingest.post("/v1/outcomes", json={"outcomes": [both]}, headers=auth(key))
    assert ambiguous.status_code == 422
    assert "exactly one of exam_id and study_key" in ambiguous.json()["error"]["message"]

    # Audited with counts, never the study keys the site named.
    events = session.scalars(
        select(AuditEvent).where(
            AuditEvent.tenant_id == tenant.id, AuditEvent.action == "record_outcome"
        )
    ).all()
    assert [e.detail for e in events] == [{"outcomes": 4, "exams": 3}] * 2
    assert study_uid not in str([e.detail for e in events])


def test_a_file_sent_in_several_requests_says_which_lines_failed_and_what_went_in_before(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    exam: list[SynthImage],
    tmp_path: Path,
) -> None:
    _, key = make_tenant(session)
    (exam_id,) = _exam_ids(ingest, results, key, files=files_field([s.path for s in exam]))
    lines = [
        "exam_id,study_key,truth,breast,source,date",
        f"{exam_id},,malignant,right,biopsy,2026-10-02",
        f",{exam[0].study},benign,left,biopsy,2026-10-02",
        f"{exam_id},,normal,both,follow_up,2026-11-02",
        ",not-a-study-of-ours,normal,both,follow_up,2026-11-02",
    ]
    path = tmp_path / "outcomes.csv"
    path.write_text("\n".join(lines) + "\n")
    rows = read_outcomes(path)

    def send(outcomes: list[dict[str, str]]) -> dict[str, Any]:
        answer = ingest.post("/v1/outcomes", json={"outcomes": outcomes}, headers=auth(key))
        return Client._json(answer)  # the client's own handling: ApiClientError on 4xx

    with pytest.raises(OutcomeFileError) as refused:
        import_outcomes(rows, send, per_request=2)
    assert str(refused.value) == (
        "no exam of yours has the exam_id or study_key of line(s) 5; the 2 rows before "
        "line 4 were recorded (importing the file again replaces them)"
    )
    assert {(o["breast"], o["truth"]) for o in _outcomes(results, key, exam_id)} == {
        ("right", "malignant"),
        ("left", "benign"),
    }
    path.write_text("\n".join(lines[:-1]) + "\n")
    assert import_outcomes(read_outcomes(path), send, per_request=2) == (3, 2)
    assert len(_outcomes(results, key, exam_id)) == 3
