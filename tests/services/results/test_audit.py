from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from shared.db.models import Scope
from tests.factories import make_tenant
from tests.helpers import auth, files_field


def test_every_write_and_read_of_patient_data_is_recorded_with_its_key(
    ingest: TestClient, results: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session, scopes=[Scope.SUBMIT, Scope.READ, Scope.AUDIT])
    _, other_key = make_tenant(session, scopes=[Scope.READ, Scope.AUDIT])
    prefix = "_".join(key.split("_", 2)[:2])
    batch = ingest.post("/v1/batches", json={"name": "b"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images", files=files_field([exam[0].path]), headers=auth(key)
    ).json()
    image_id = upload["accepted"][0]["id"]
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    results.get(f"/v1/batches/{batch['id']}", headers=auth(key))
    results.get(f"/v1/batches/{batch['id']}/results", headers=auth(key))
    results.get(f"/v1/images/{image_id}", headers=auth(key))
    results.get(f"/v1/images/{image_id}", headers=auth(other_key))  # 404: nothing read
    # A status read records its event in its own statement; a 404 records none.
    assert results.get(f"/v1/batches/{batch['id']}", headers=auth(other_key)).status_code == 404

    log = results.get("/v1/audit", params={"limit": 4}, headers=auth(key)).json()
    rest = results.get("/v1/audit", params={"cursor": log["next_cursor"]}, headers=auth(key)).json()
    events = log["items"] + rest["items"]
    assert [(e["action"], e["resource_type"]) for e in events] == [
        ("read", "image"),
        ("read", "batch_results"),
        ("read", "batch"),
        ("close", "batch"),
        ("upload", "batch"),
        ("create", "batch"),
    ]
    assert {e["key_prefix"] for e in events} == {prefix}
    assert events[0]["resource_id"] == image_id
    assert (events[2]["resource_id"], events[2]["detail"]) == (batch["id"], {})
    assert events[4]["detail"]["image_ids"] == [image_id]
    assert results.get("/v1/audit", headers=auth(other_key)).json()["items"] == []


def test_the_audit_log_and_uploads_need_their_own_scopes(
    ingest: TestClient, results: TestClient, session: Session
) -> None:
    _, reader = make_tenant(session, scopes=[Scope.READ])
    refused = results.get("/v1/audit", headers=auth(reader))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "missing_scope"
    assert "audit" in refused.json()["error"]["message"]
    upload = ingest.post("/v1/batches", json={"name": "b"}, headers=auth(reader))
    assert upload.status_code == 403
    assert upload.json()["error"]["code"] == "missing_scope"
    assert results.get("/v1/batches", headers=auth(reader)).status_code == 200


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET key_prefix = 'forged'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ],
)
def test_the_audit_log_is_append_only_in_the_database(
    ingest: TestClient, session: Session, statement: str
) -> None:
    _, key = make_tenant(session)
    ingest.post("/v1/batches", json={"name": "b"}, headers=auth(key))
    with pytest.raises(DBAPIError, match="append-only"):
        session.execute(text(statement))
    session.rollback()
    assert session.scalar(text("SELECT count(*) FROM audit_events")) == 1
