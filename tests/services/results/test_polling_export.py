"""Cheap polling (ETag, If-None-Match, long polling) and streamed exports."""

from __future__ import annotations

import csv
import io
import json
import threading
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from services.results import routes
from services.results.app import create_app as create_results
from shared.batches import EXPORT_CHUNK, EXPORT_COLUMNS
from shared.config import Settings
from shared.db.models import AuditAction, AuditEvent
from shared.lifecycle import claim_images, record_failure, record_prediction
from shared.storage import ObjectStore
from tests.factories import make_batch, make_image, make_model_version, make_tenant
from tests.helpers import auth, files_field, screen_everything, wait_for


def _uploaded_batch(ingest: TestClient, key: str, exam: list[SynthImage]) -> str:
    batch = ingest.post("/v1/batches", json={"name": "poll"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([s.path for s in exam]),
        headers=auth(key),
    )
    assert upload.status_code == 202, upload.text
    return str(batch["id"])


def test_etag_gives_304_until_the_batch_changes(
    ingest: TestClient, results: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    batch_id = _uploaded_batch(ingest, key, exam)
    first = results.get(f"/v1/batches/{batch_id}", headers=auth(key))
    assert first.status_code == 200
    etag = first.headers["ETag"]
    same = results.get(f"/v1/batches/{batch_id}", headers={**auth(key), "If-None-Match": etag})
    assert same.status_code == 304
    assert same.headers["ETag"] == etag
    assert same.content == b""
    ingest.post(f"/v1/batches/{batch_id}/close", headers=auth(key))
    changed = results.get(f"/v1/batches/{batch_id}", headers={**auth(key), "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag
    assert changed.json()["status"] == "processing"


def _batch_reads(session: Session) -> int:
    session.rollback()  # a fresh snapshot: the reads are committed by the results service
    count = session.scalar(
        select(func.count())
        .select_from(AuditEvent)
        .where(AuditEvent.action == AuditAction.READ, AuditEvent.resource_type == "batch")
    )
    return int(count or 0)


def test_long_poll_returns_when_the_batch_changes_and_304_when_it_does_not(
    ingest: TestClient, results: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    batch_id = _uploaded_batch(ingest, key, exam)
    etag = results.get(f"/v1/batches/{batch_id}", headers=auth(key)).headers["ETag"]
    quiet = results.get(
        f"/v1/batches/{batch_id}",
        params={"wait": 1},
        headers={**auth(key), "If-None-Match": etag},
    )
    assert quiet.status_code == 304  # nothing happened within the wait

    answer: dict[str, httpx.Response] = {}

    def poll() -> None:
        answer["response"] = results.get(
            f"/v1/batches/{batch_id}",
            params={"wait": 30},
            headers={**auth(key), "If-None-Match": etag},
        )

    reads_before = _batch_reads(session)
    poller = threading.Thread(target=poll)
    poller.start()
    # The long poll audits its read before it starts waiting: then it is waiting.
    wait_for(lambda: _batch_reads(session) > reads_before, timeout=30, what="the poller")
    assert "response" not in answer
    ingest.post(f"/v1/batches/{batch_id}/close", headers=auth(key))
    poller.join(timeout=30)
    response = answer["response"]
    assert response.status_code == 200
    assert response.json()["status"] == "processing"  # it came back because of the change


def test_export_streams_one_row_per_image_as_csv_and_json(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    batch_id = _uploaded_batch(ingest, key, exam)
    ingest.post(f"/v1/batches/{batch_id}/close", headers=auth(key))
    screen_everything(session, settings, store)
    response = results.get(
        f"/v1/batches/{batch_id}/export", params={"format": "csv"}, headers=auth(key)
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert f"batch-{batch_id}.csv" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == len(exam)
    assert {r["filename"] for r in rows} == {s.path.name for s in exam}
    assert all(r["status"] == "done" and 0 < float(r["score"]) < 1 for r in rows)

    as_json = results.get(
        f"/v1/batches/{batch_id}/export", params={"format": "json"}, headers=auth(key)
    )
    items = json.loads(as_json.text)
    assert sorted(i["image_id"] for i in items) == sorted(r["image_id"] for r in rows)
    assert {i["score"] for i in items} == {float(r["score"]) for r in rows}
    # The CSV (written by Postgres) and the JSON (by Python) say the same of every column.
    assert list(rows[0]) == list(EXPORT_COLUMNS)
    by_id = {i["image_id"]: i for i in items}
    for row in rows:
        item = by_id[row["image_id"]]
        assert row == {key: "" if value is None else str(value) for key, value in item.items()}

    _, other_key = make_tenant(session)
    foreign = results.get(f"/v1/batches/{batch_id}/export", headers=auth(other_key))
    assert foreign.status_code == 404


def test_a_waiting_long_poll_reads_the_batch_only_when_postgres_announces_a_change(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    exam: list[SynthImage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[str] = []
    read_batch = routes._batch_detail

    def counted(*args: Any) -> Any:
        reads.append("read")
        return read_batch(*args)

    monkeypatch.setattr(routes, "_batch_detail", counted)
    _, key = make_tenant(session)
    batch_id = _uploaded_batch(ingest, key, exam)
    etag = results.get(f"/v1/batches/{batch_id}", headers=auth(key)).headers["ETag"]
    changes = results.app.state.batch_changes  # type: ignore[attr-defined]
    wait_for(changes.listening.is_set, timeout=30, what="the results app to LISTEN")
    reads.clear()
    quiet = results.get(
        f"/v1/batches/{batch_id}", params={"wait": 2}, headers={**auth(key), "If-None-Match": etag}
    )
    assert quiet.status_code == 304
    assert reads == ["read"]  # its first read only: re-polling would have read it 4 more times

    answer: dict[str, httpx.Response] = {}
    poller = threading.Thread(
        target=lambda: answer.update(
            response=results.get(
                f"/v1/batches/{batch_id}",
                params={"wait": 30},
                headers={**auth(key), "If-None-Match": etag},
            )
        )
    )
    reads.clear()
    poller.start()
    wait_for(lambda: reads == ["read"], timeout=30, what="the long poll's first read")
    ingest.post(f"/v1/batches/{batch_id}/close", headers=auth(key))
    poller.join(timeout=30)
    assert answer["response"].status_code == 200
    assert answer["response"].json()["status"] == "processing"
    assert reads == ["read", "read"]  # woken once, read once


def test_without_the_listener_a_long_poll_still_sees_the_change(
    settings: Settings, ingest: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    results = TestClient(create_results(settings))  # no lifespan: nobody LISTENs
    _, key = make_tenant(session)
    batch_id = _uploaded_batch(ingest, key, exam)
    etag = results.get(f"/v1/batches/{batch_id}", headers=auth(key)).headers["ETag"]
    closer = threading.Timer(
        1.0, lambda: ingest.post(f"/v1/batches/{batch_id}/close", headers=auth(key))
    )
    closer.start()
    response = results.get(
        f"/v1/batches/{batch_id}", params={"wait": 30}, headers={**auth(key), "If-None-Match": etag}
    )
    closer.join()
    assert response.status_code == 200
    assert response.json()["status"] == "processing"


def test_an_export_of_several_chunks_keeps_upload_order_and_every_column(
    results: TestClient, session: Session
) -> None:
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    version = make_model_version(session, trained=True)
    images = [make_image(session, batch, study_key=f"s{i // 4}") for i in range(EXPORT_CHUNK + 20)]
    claim_images(session=session, image_ids=[i.id for i in images[:3]], lease_s=60)
    record_prediction(
        session=session, image=images[0], model_version_id=version.id, score=0.25, warnings=["w1"]
    )
    record_failure(session=session, image=images[1], code="undecodable", message="no")
    session.commit()
    response = results.get(f"/v1/batches/{batch.id}/export", headers=auth(key))
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["image_id"] for r in rows] == [str(i.id) for i in images]  # upload order
    scored, failed, running = rows[:3]
    assert scored["status"] == "done"
    assert float(scored["score"]) == 0.25
    assert scored["model_version"] == version.name
    assert scored["warnings"] == "w1"
    assert datetime.fromisoformat(scored["finished_at"]).tzinfo is not None
    assert (failed["status"], failed["error_code"], failed["score"]) == (
        "failed",
        "undecodable",
        "",
    )
    assert (running["status"], running["finished_at"]) == ("running", "")
    assert rows[-1]["status"] == "queued"
    items = json.loads(
        results.get(
            f"/v1/batches/{batch.id}/export", params={"format": "json"}, headers=auth(key)
        ).text
    )
    assert [i["image_id"] for i in items] == [r["image_id"] for r in rows]
    assert items[0]["score"] == 0.25
    assert items[1]["score"] is None
