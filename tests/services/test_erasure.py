"""Erasure on request (shared/erasure.py, services/ingest/erasure.py): after a patient's
erasure no row and no object refers to them, searched by their keys, ids and the original
identifiers planted in their headers; another tenant's patient of the same id and the
tenant's other patients are untouched; a screening task that was mid-flight for an erased
image ends cleanly and leaves nothing; a batch's erasure takes everything in it."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session
from urllib3 import PoolManager

from devstack.servers import free_port
from devstack.synth import SynthImage, SynthOptions, generate_exams
from services.worker.inference import WorkerContext, run_screening
from services.worker.models import ModelCache
from services.worker.sweeper import delete_orphans
from shared.config import Settings
from shared.db.base import Base, session_scope
from shared.db.models import AuditAction, AuditEvent, Image, Scope, Study
from shared.erasure import erase_patient, patient_keys
from shared.storage import ObjectStore
from shared.vault import new_key
from tests.factories import make_tenant
from tests.helpers import auth, files_field
from tests.services.test_dicom_out import (
    PLANTED,
    apps,
    plant_identifiers,
    screen_and_render,
    with_keys,
)

SMALL = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
ERASER = [Scope.SUBMIT, Scope.READ, Scope.ERASE]
PATIENT = PLANTED["PatientID"]


def _rows_mentioning(session: Session, needles: set[str]) -> dict[str, int]:
    """For every table but the audit log, how many rows' text holds one of `needles`."""
    found = {}
    for table in Base.metadata.sorted_tables:
        if table.name == "audit_events":
            continue
        for needle in needles:
            count = session.scalar(
                text(f"SELECT count(*) FROM {table.name} AS t WHERE t::text LIKE :needle"),  # noqa: S608
                {"needle": f"%{needle}%"},
            )
            if count:
                found[f"{table.name}:{needle}"] = int(count)
    return found


def _objects_mentioning(store: ObjectStore, needles: set[str]) -> list[str]:
    """Keys of objects whose key or bytes hold one of `needles`."""
    hits = []
    for key in store.list_keys(""):
        data = store.get_bytes(key)
        if any(n in key or n.encode() in data for n in needles):
            hits.append(key)
    return hits


def test_erasing_a_patient_leaves_nothing_of_them_and_spares_everyone_else(
    settings: Settings, session: Session, store: ObjectStore, tmp_path: Path
) -> None:
    vault = with_keys(settings, {"k1": new_key()}, "k1")
    exams = generate_exams(tmp_path / "exams", exams=2, seed=61, options=SMALL)
    by_study: dict[str, list[SynthImage]] = {}
    for image in exams:
        by_study.setdefault(image.study, []).append(image)
    patient_exam, other_exam = by_study.values()
    erased_paths = plant_identifiers(
        patient_exam, tmp_path / "p", "1.2.826.0.1.3680043.8.498.77310001"
    )
    namesake_paths = plant_identifiers(
        patient_exam, tmp_path / "n", "1.2.826.0.1.3680043.8.498.77310002"
    )
    site, site_key = make_tenant(session, scopes=ERASER)
    other_site, other_key = make_tenant(session)
    with apps(vault) as (ingest, results):
        batch = screen_and_render(
            ingest, site_key, erased_paths + [i.path for i in other_exam], vault, store
        )
        other_batch = screen_and_render(ingest, other_key, namesake_paths, vault, store)
        exams_page = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(site_key))
        exam_ids = {e["id"] for e in exams_page.json()["items"]}
        with session_scope(settings.database_url) as reading:
            keys = patient_keys(settings.patient_key_secret, site.id, PATIENT)
            erased_study = reading.scalars(
                select(Study.id).where(Study.tenant_id == site.id, Study.patient_key.in_(keys))
            ).one()
            erased_images = list(
                reading.scalars(select(Image.id).where(Image.study_id == erased_study))
            )
            (patient_key_value,) = keys & set(reading.scalars(select(Study.patient_key)))
        outcome = ingest.post(
            f"/v1/exams/{erased_study}/outcome",
            json={"truth": "malignant", "breast": "left", "source": "biopsy", "date": "2026-11-02"},
            headers=auth(site_key),
        )
        assert outcome.status_code == 201, outcome.text
        assert len(erased_images) == 4
        assert str(erased_study) in exam_ids

        # A key without the erase scope may not.
        refused = ingest.post("/v1/erasures", json={"patient_id": PATIENT}, headers=auth(other_key))
        assert refused.status_code == 403

        erased = ingest.post("/v1/erasures", json={"patient_id": PATIENT}, headers=auth(site_key))
        assert erased.status_code == 200, erased.text
        report = erased.json()
        assert report["studies"] == 1
        assert report["images"] == 4
        assert report["predictions"] == 4
        assert report["identity_records"] == 4
        assert report["outcomes"] == 1
        assert report["dicom_results"] >= 1
        # the stored files, previews, heatmaps and overlays, and the exam's DICOM results
        assert report["objects"] >= 4 * 4 + 1

        # Nothing of theirs is left: no row names their images, study or key, no object their
        # ids or the planted identifiers (the audit log keeps its own ids, checked below).
        needles = {str(i) for i in erased_images} | {str(erased_study), patient_key_value}
        needles |= set(PLANTED.values())
        session.expire_all()
        assert _rows_mentioning(session, needles) == {}
        assert _objects_mentioning(store, needles) == []
        assert delete_orphans(session=session, store=store, grace_s=0) == 0

        # The tenant's other patient and the other tenant's namesake are as they were.
        site_exams = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(site_key))
        assert [len(e["images"]) for e in site_exams.json()["items"]] == [4]
        namesake = results.get(
            f"/v1/batches/{other_batch['id']}/results", headers=auth(other_key)
        ).json()["items"]
        assert [r["status"] for r in namesake] == ["done"] * 4
        for result in namesake:
            assert results.get(f"/v1/images/{result['id']}/heatmap.png", headers=auth(other_key))
        assert other_site.id != site.id
        status = results.get(f"/v1/batches/{batch['id']}", headers=auth(site_key)).json()
        assert status["counts"]["done"] == 4
        assert status["status"] == "completed"

        # Again: nothing left to erase.
        again = ingest.post("/v1/erasures", json={"patient_id": PATIENT}, headers=auth(site_key))
        assert again.status_code == 200
        assert set(again.json().values()) == {0}

    events = session.scalars(select(AuditEvent).where(AuditEvent.action == AuditAction.ERASE)).all()
    assert [e.resource_type for e in events] == ["patient", "patient"]
    assert events[0].detail["images"] == 4
    assert not any(PATIENT in str(e.detail) or patient_key_value in str(e.detail) for e in events)


class _ErasingStore(ObjectStore):
    """Erases the patient at the moment the worker writes its first preview: after the task
    read and scored the images, before it records them."""

    def __init__(self, settings: Settings, erase: Any) -> None:
        super().__init__(settings)
        self.erase = erase
        self.erased = threading.Event()

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> Any:
        if key.startswith("previews/") and not self.erased.is_set():
            self.erased.set()
            self.erase()
        return super().put_bytes(key, data, content_type=content_type)


def test_a_task_screening_the_patient_when_they_are_erased_ends_cleanly_and_leaves_nothing(
    ingest: TestClient,
    settings: Settings,
    session: Session,
    store: ObjectStore,
    exam: list[SynthImage],
    tmp_path: Path,
) -> None:
    site, key = make_tenant(session, scopes=ERASER)
    paths = plant_identifiers(exam, tmp_path / "p", "1.2.826.0.1.3680043.8.498.77310003")
    batch = ingest.post("/v1/batches", json={"name": "mid-flight"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images", files=files_field(paths), headers=auth(key)
    )
    assert upload.status_code == 202
    image_ids = [uuid.UUID(a["id"]) for a in upload.json()["accepted"]]
    reports = []

    def erase() -> None:
        with session_scope(settings.database_url) as erasing:
            keys = patient_keys(settings.patient_key_secret, site.id, PATIENT)
            reports.append(erase_patient(erasing, store, tenant_id=site.id, keys=keys))

    erasing_store = _ErasingStore(settings, erase)
    ctx = WorkerContext(settings, erasing_store, ModelCache(settings, erasing_store))
    outcome = run_screening(image_ids, ctx)  # must not raise

    assert erasing_store.erased.is_set()
    assert reports[0].images == 4
    assert outcome == {"done": 0, "failed": 0}
    session.expire_all()
    assert session.scalars(select(Image).where(Image.id.in_(image_ids))).all() == []
    needles = {str(i) for i in image_ids}
    assert _objects_mentioning(store, needles) == []  # the previews and heatmaps it wrote
    assert delete_orphans(session=session, store=store, grace_s=0) == 0


def test_erasing_a_batch_takes_everything_in_it_even_while_it_is_screened(
    ingest: TestClient,
    results: TestClient,
    settings: Settings,
    session: Session,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    _, key = make_tenant(session, scopes=ERASER)
    batch = ingest.post("/v1/batches", json={"name": "to erase"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in exam]),
        headers=auth(key),
    )
    image_ids = [a["id"] for a in upload.json()["accepted"]]
    # One image already claimed by a worker: the batch goes all the same.
    session.execute(
        text("UPDATE images SET status = 'running' WHERE id = :id"), {"id": image_ids[0]}
    )
    session.commit()

    erased = ingest.delete(f"/v1/batches/{batch['id']}", headers=auth(key))
    assert erased.status_code == 200, erased.text
    report = erased.json()
    assert (report["batches"], report["studies"], report["images"]) == (1, 1, 4)
    assert report["objects"] >= 4
    assert results.get(f"/v1/batches/{batch['id']}", headers=auth(key)).status_code == 404
    assert ingest.delete(f"/v1/batches/{batch['id']}", headers=auth(key)).status_code == 404
    assert list(store.list_keys("")) == []
    for table in inspect(session.get_bind()).get_table_names():
        columns = {c["name"] for c in inspect(session.get_bind()).get_columns(table)}
        if "batch_id" in columns and table != "audit_events":
            left = session.scalar(
                text(f"SELECT count(*) FROM {table} WHERE batch_id = :b"),  # noqa: S608
                {"b": batch["id"]},
            )
            assert left == 0, table


@pytest.mark.parametrize("body", [{}, {"patient_id": ""}, {"patient_id": "a\x00b"}])
def test_a_malformed_erasure_request_is_refused_and_erases_nothing(
    ingest: TestClient, session: Session, body: dict[str, str]
) -> None:
    _, key = make_tenant(session, scopes=ERASER)
    answer = ingest.post("/v1/erasures", json=body, headers=auth(key))
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_request"


def test_an_erasure_during_a_storage_outage_is_503_and_keeps_everything_for_the_retry(
    ingest: TestClient, settings: Settings, session: Session, store: ObjectStore, exam: Any
) -> None:
    _, key = make_tenant(session, scopes=ERASER)
    batch = ingest.post("/v1/batches", json={"name": "outage"}, headers=auth(key)).json()
    ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in exam]),
        headers=auth(key),
    )
    stored = sorted(store.list_keys(""))
    unreachable = settings.model_copy(update={"s3_endpoint": f"http://127.0.0.1:{free_port()}"})
    ingest.app.state.store = ObjectStore(unreachable, http_client=PoolManager(retries=False))  # type: ignore[attr-defined]

    refused = ingest.delete(f"/v1/batches/{batch['id']}", headers=auth(key))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "storage_unavailable"
    assert refused.headers["Retry-After"]
    assert sorted(store.list_keys("")) == stored
    assert session.scalar(select(func.count()).select_from(Image)) == len(exam)

    ingest.app.state.store = store  # type: ignore[attr-defined]
    erased = ingest.delete(f"/v1/batches/{batch['id']}", headers=auth(key))
    assert erased.status_code == 200, erased.text
    assert erased.json()["images"] == len(exam)
    assert list(store.list_keys("")) == []
