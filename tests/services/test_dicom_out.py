"""DICOM out, on the real servers and with tools the team did not write: dicom3tools'
dciodvfy and dcmtk's dsrdump judge the objects, Orthanc (with its DICOMweb plugin) receives
them as the site's PACS; the identity vault keeps the originals out of storage, logs and API
answers."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from devstack.servers import free_port
from devstack.synth import SynthImage
from services.ingest.app import create_app as create_ingest
from services.results.app import create_app as create_results
from shared.config import Settings
from shared.db.base import session_scope, utcnow
from shared.db.models import (
    AuditEvent,
    ExamExport,
    ExportDelivery,
    IdentityRecord,
    Image,
    Scope,
    Tenant,
)
from shared.deliveries import add_destination
from shared.dicom_export import deliver_due, render_due
from shared.dicom_nodes import add_node
from shared.storage import ObjectStore
from shared.vault import new_key
from tests.factories import make_tenant
from tests.helpers import (
    auth,
    dciodvfy_errors,
    files_field,
    run_orthanc,
    screen_everything,
    sr_number,
)

# Identifiers no de-identified output may contain: planted in the exam's headers.
PLANTED = {
    "PatientID": "PLANTED-PID-7731",
    "PatientName": "PLANTEDNAME^ZELDA",
    "AccessionNumber": "PLANTACC9913",
    "ReferringPhysicianName": "PLANTEDREF^OTTO",
    "StudyID": "PLANTSTUDY5",
    "PatientBirthDate": "19580317",
}
ORIGINAL_STUDY_UID = "1.2.826.0.1.3680043.8.498.4242424242424242"
READER = [Scope.SUBMIT, Scope.READ]
IDENTIFIED = [Scope.READ, Scope.EXPORT_IDENTIFIED, Scope.AUDIT]


def add_unreachable_destination(
    session: Session, tenant_id: uuid.UUID, *, secondary_capture: bool = False
) -> None:
    """A STOW-RS destination nothing listens at (deliveries to it fail), committed."""
    add_destination(
        session=session,
        tenant_id=tenant_id,
        name="down",
        url=f"http://127.0.0.1:{free_port()}/dicom-web",
        secondary_capture=secondary_capture,
    )
    session.commit()


def with_keys(
    settings: Settings, keys: dict[str, str], active: str | None, **more: Any
) -> Settings:
    return settings.model_copy(
        update={"vault_keys": json.dumps(keys), "vault_active_key": active, **more}
    )


@pytest.fixture
def keys() -> dict[str, str]:
    return {"k1": new_key(), "k2": new_key()}


@pytest.fixture
def vault_settings(settings: Settings, keys: dict[str, str]) -> Settings:
    return with_keys(settings, {"k1": keys["k1"]}, "k1")


def plant_identifiers(
    exam: list[SynthImage], folder: Path, study_uid: str = ORIGINAL_STUDY_UID
) -> list[Path]:
    """Copies of the exam in `folder` with PLANTED in every header, under `study_uid`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(exam):
        ds = pydicom.dcmread(image.path)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = f"{study_uid}.{index + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / image.path.name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def planted(exam: list[SynthImage], tmp_path: Path) -> list[Path]:
    """The session's exam with distinctive identifiers planted in every header."""
    return plant_identifiers(exam, tmp_path)


@contextlib.contextmanager
def apps(settings: Settings) -> Iterator[tuple[TestClient, TestClient]]:
    with (
        TestClient(create_ingest(settings), raise_server_exceptions=False) as ingest,
        TestClient(create_results(settings), raise_server_exceptions=False) as results,
    ):
        yield ingest, results


def screen_and_render(
    ingest: TestClient, key: str, paths: list[Path], settings: Settings, store: ObjectStore
) -> dict[str, Any]:
    """Upload an exam, close its batch, screen it in-process and render its DICOM results;
    returns the batch."""
    batch = ingest.post("/v1/batches", json={"name": "dicom out"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images", files=files_field(paths), headers=auth(key)
    )
    assert upload.status_code == 202, upload.text
    assert ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key)).status_code == 200
    with session_scope(settings.database_url) as session:
        screen_everything(session, settings, store)
    with session_scope(settings.database_url) as session:
        while render_due(session, settings=settings, store=store):
            pass
    return dict(batch)


def the_exam(results: TestClient, key: str, batch_id: str) -> dict[str, Any]:
    (exam,) = results.get(f"/v1/batches/{batch_id}/exams", headers=auth(key)).json()["items"]
    return dict(exam)


def test_the_report_and_heatmaps_are_valid_dicom_with_the_apis_scores(
    vault_settings: Settings,
    session: Session,
    store: ObjectStore,
    planted: list[Path],
    tmp_path: Path,
) -> None:
    tenant, key = make_tenant(session, scopes=READER)
    add_unreachable_destination(session, tenant.id, secondary_capture=True)
    with apps(vault_settings) as (ingest, results):
        batch = screen_and_render(ingest, key, planted, vault_settings, store)
        exam = the_exam(results, key, batch["id"])
        answer = results.get(f"/v1/exams/{exam['id']}/report.dcm", headers=auth(key))
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Mammoscreen-Identified"] == "false"
        report_path = tmp_path / "report.dcm"
        report_path.write_bytes(answer.content)
        heatmaps = []
        for image in exam["images"]:
            got = results.get(f"/v1/images/{image['id']}/heatmap.dcm", headers=auth(key))
            assert got.status_code == 200, got.text
            heatmaps.append((image, pydicom.dcmread(io.BytesIO(got.content))))
            (tmp_path / f"heatmap-{image['id']}.dcm").write_bytes(got.content)

    assert dciodvfy_errors(report_path) == []
    dump = subprocess.run(
        ["dsrdump", str(report_path)], capture_output=True, text=True, check=True
    ).stdout
    assert "Imaging Measurement Report" in dump
    assert "Exam malignancy score" in dump
    assert "Recommended CAD Operating Point" in dump
    report = pydicom.dcmread(report_path)
    assert sr_number(report, "Exam malignancy score") == pytest.approx(exam["exam_score"], abs=1e-9)
    assert sr_number(report, "Recommended CAD Operating Point") == pytest.approx(
        exam["recall_threshold"], abs=1e-9
    )
    assert sr_number(report, "Probability of cancer") == pytest.approx(
        exam["exam_probability"], abs=1e-9
    )
    verdict = (
        "Recall for imaging findings" if exam["recall"] == "recall" else "Normal interval follow-up"
    )
    assert verdict in dump
    image_scores = sorted(
        round(float(i.MeasuredValueSequence[0].NumericValue), 9)
        for group in report.ContentSequence
        for i in _walk(group)
        if i.get("ValueType") == "NUM"
        and i.ConceptNameCodeSequence[0].CodeMeaning == "Image malignancy score"
    )
    assert image_scores == sorted(round(i["score"], 9) for i in exam["images"])
    # De-identified: the stored images' pseudonymous study, no planted identifier.
    assert report.StudyInstanceUID == exam["study_key"]
    assert not any(value.encode() in report_path.read_bytes() for value in PLANTED.values())

    stored = {i.id: i for i in session.scalars(select(Image))}
    for image, heatmap in heatmaps:
        path = tmp_path / f"heatmap-{image['id']}.dcm"
        assert dciodvfy_errors(path) == []
        source = pydicom.dcmread(
            io.BytesIO(store.get_bytes(stored[uuid.UUID(image["id"])].object_key))
        )
        assert heatmap.SegmentationType == "FRACTIONAL"
        assert heatmap.SegmentationFractionalType == "PROBABILITY"
        assert (heatmap.Rows, heatmap.Columns) == (source.Rows, source.Columns)
        assert heatmap.PatientOrientation == source.PatientOrientation
        (referenced,) = heatmap.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    export = session.scalar(select(ExamExport))
    assert export is not None
    captures = [o for o in export.objects if o["kind"] == "capture"]
    assert len(captures) == 4
    for item in captures:
        path = tmp_path / "capture.dcm"
        path.write_bytes(store.get_bytes(item["key"]))
        assert dciodvfy_errors(path) == []
        assert pydicom.dcmread(path).BurnedInAnnotation == "YES"


def _walk(item: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)


def test_only_an_export_identified_key_gets_the_originals_and_each_opening_is_audited(
    vault_settings: Settings, session: Session, store: ObjectStore, planted: list[Path]
) -> None:
    tenant, key = make_tenant(session, scopes=READER)
    from shared.tenants import issue_api_key

    identified_key = issue_api_key(session=session, tenant=tenant, scopes=IDENTIFIED).secret
    session.commit()
    with apps(vault_settings) as (ingest, results):
        batch = screen_and_render(ingest, key, planted, vault_settings, store)
        exam = the_exam(results, identified_key, batch["id"])
        assert exam["original"] == {
            "patient_id": PLANTED["PatientID"],
            "accession_number": PLANTED["AccessionNumber"],
        }
        assert the_exam(results, key, batch["id"])["original"] is None
        answer = results.get(f"/v1/exams/{exam['id']}/report.dcm", headers=auth(identified_key))
        assert answer.headers["X-Mammoscreen-Identified"] == "true"
        report = pydicom.dcmread(io.BytesIO(answer.content))
        image = exam["images"][0]
        heatmap = pydicom.dcmread(
            io.BytesIO(
                results.get(
                    f"/v1/images/{image['id']}/heatmap.dcm", headers=auth(identified_key)
                ).content
            )
        )
        audit = results.get("/v1/audit", headers=auth(identified_key)).json()["items"]

    assert report.StudyInstanceUID == ORIGINAL_STUDY_UID
    assert (report.PatientID, str(report.PatientName)) == (
        PLANTED["PatientID"],
        PLANTED["PatientName"],
    )
    assert report.AccessionNumber == PLANTED["AccessionNumber"]
    assert "PatientIdentityRemoved" not in report
    referenced = {
        r.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }
    assert referenced == {f"{ORIGINAL_STUDY_UID}.{i}" for i in range(1, 5)}
    assert heatmap.StudyInstanceUID == ORIGINAL_STUDY_UID
    (source,) = heatmap.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert source.ReferencedSOPInstanceUID.startswith(f"{ORIGINAL_STUDY_UID}.")
    openings = [e for e in audit if e["action"] == "decrypt_identity"]
    assert len(openings) == 3  # the exams page, the report, the heatmap
    assert {e["detail"]["purpose"] for e in openings} == {"view", "download"}
    assert {e["key_prefix"] for e in openings} == {"_".join(identified_key.split("_")[:2])}


def test_no_original_identifier_reaches_storage_logs_or_api_answers(
    vault_settings: Settings,
    session: Session,
    store: ObjectStore,
    planted: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    tenant, key = make_tenant(session, scopes=[*READER, Scope.AUDIT])
    add_unreachable_destination(session, tenant.id)
    answers: list[bytes] = []
    with apps(vault_settings) as (ingest, results):
        batch = screen_and_render(ingest, key, planted, vault_settings, store)
        with session_scope(vault_settings.database_url) as db:
            deliver_due(db, settings=vault_settings, store=store)  # fails, and logs
        exam = the_exam(results, key, batch["id"])
        image_id = exam["images"][0]["id"]
        for path in (
            "/v1/batches",
            f"/v1/batches/{batch['id']}",
            f"/v1/batches/{batch['id']}/results",
            f"/v1/batches/{batch['id']}/exams",
            f"/v1/images/{image_id}",
            f"/v1/batches/{batch['id']}/deliveries",
            "/v1/audit",
            f"/v1/batches/{batch['id']}/export?format=csv",
            f"/v1/batches/{batch['id']}/export?format=json",
            f"/v1/exams/{exam['id']}/report.dcm",
            f"/v1/images/{image_id}/heatmap.dcm",
            f"/v1/images/{image_id}/heatmap.png",
            "/metrics",
        ):
            got = results.get(path, headers=auth(key))
            assert got.status_code == 200, (path, got.text)
            answers.append(got.content)
    assert session.scalar(select(IdentityRecord.key_id)) == "k1"
    planted_values = [*PLANTED.values(), ORIGINAL_STUDY_UID]
    objects = list(store.list_keys(""))
    assert len(objects) >= 4 + 4 + 4 + 1  # images, heatmaps, previews, the report ...
    for object_key in objects:
        data = store.get_bytes(object_key)
        assert not [v for v in planted_values if v.encode() in data], object_key
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not [v for v in planted_values if v in logged]
    for answer in answers:
        assert not [v for v in planted_values if v.encode() in answer]


def test_a_rotated_out_key_still_opens_while_configured_and_a_missing_one_fails_clearly(
    settings: Settings,
    keys: dict[str, str],
    session: Session,
    store: ObjectStore,
    planted: list[Path],
    exam: list[SynthImage],
) -> None:
    tenant, key = make_tenant(session, scopes=[*READER, Scope.EXPORT_IDENTIFIED])
    add_unreachable_destination(session, tenant.id)
    first = with_keys(settings, {"k1": keys["k1"]}, "k1")
    rotated = with_keys(settings, keys, "k2")
    rotated_out = with_keys(settings, {"k2": keys["k2"]}, "k2")
    with apps(first) as (ingest, _):
        old = screen_and_render(ingest, key, planted, first, store)
    with apps(rotated) as (ingest, results):
        new = screen_and_render(ingest, key, [e.path for e in exam], rotated, store)
        old_exam, new_exam = (the_exam(results, key, b["id"]) for b in (old, new))
        for each in (old_exam, new_exam):
            got = results.get(f"/v1/exams/{each['id']}/report.dcm", headers=auth(key))
            assert got.headers["X-Mammoscreen-Identified"] == "true"
    assert sorted(session.scalars(select(IdentityRecord.key_id))) == ["k1"] * 4 + ["k2"] * 4
    assert old_exam["original"]["patient_id"] == PLANTED["PatientID"]

    with apps(rotated_out) as (_, results):
        refused = results.get(f"/v1/exams/{old_exam['id']}/report.dcm", headers=auth(key))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "vault_key_missing"
        assert "k1" in refused.json()["error"]["message"]
        # Nothing else breaks: the newer exam, the results, the exams page.
        newer = results.get(f"/v1/exams/{new_exam['id']}/report.dcm", headers=auth(key))
        assert newer.status_code == 200
        assert newer.headers["X-Mammoscreen-Identified"] == "true"
        assert results.get(f"/v1/batches/{old['id']}/results", headers=auth(key)).status_code == 200
        page = results.get(f"/v1/batches/{old['id']}/exams", headers=auth(key))
        assert page.status_code == 200
        assert page.json()["items"][0]["original"] is None
        assert page.json()["items"][0]["original_error"] == "vault_key_missing"
        with session_scope(rotated_out.database_url) as db:
            deliver_due(db, settings=rotated_out, store=store)
        errors = {
            b["id"]: results.get(f"/v1/batches/{b['id']}/deliveries", headers=auth(key)).json()[
                "items"
            ][0]["last_error"]
            for b in (old, new)
        }
    # The delivery of the older exam says which key is missing; the newer one got as far as
    # the (absent) destination.
    assert "vault key 'k1' is not configured" in errors[old["id"]]
    assert "STOW-RS" in errors[new["id"]]


def test_a_tenant_without_the_vault_keeps_nothing_and_exports_say_so(
    vault_settings: Settings, session: Session, store: ObjectStore, planted: list[Path]
) -> None:
    tenant, key = make_tenant(session, scopes=[*READER, Scope.EXPORT_IDENTIFIED])
    tenant.identity_vault = False
    session.commit()
    with apps(vault_settings) as (ingest, results):
        batch = screen_and_render(ingest, key, planted, vault_settings, store)
        exam = the_exam(results, key, batch["id"])
        got = results.get(f"/v1/exams/{exam['id']}/report.dcm", headers=auth(key))
    assert session.scalar(select(IdentityRecord.image_id)) is None
    assert got.headers["X-Mammoscreen-Identified"] == "false"
    report = pydicom.dcmread(io.BytesIO(got.content))
    assert report.StudyInstanceUID == exam["study_key"]
    assert exam["original"] is None


def test_results_reach_orthanc_by_c_store_and_stow_rs_once(
    vault_settings: Settings,
    session: Session,
    store: ObjectStore,
    planted: list[Path],
    tmp_path: Path,
) -> None:
    tenant, key = make_tenant(session, scopes=READER)
    with run_orthanc(tmp_path / "orthanc") as pacs, apps(vault_settings) as (ingest, results):
        node = add_node(
            session=session,
            tenant_id=tenant.id,
            ae_title="SITEPACS",
            host="127.0.0.1",
            port=pacs.dicom_port,
        )
        add_destination(session=session, tenant_id=tenant.id, name="pacs", node=node)
        add_destination(session=session, tenant_id=tenant.id, name="web", url=pacs.dicomweb)
        session.commit()
        batch = screen_and_render(ingest, key, planted, vault_settings, store)
        with session_scope(vault_settings.database_url) as db:
            assert deliver_due(db, settings=vault_settings, store=store) == 2
        deliveries = results.get(f"/v1/batches/{batch['id']}/deliveries", headers=auth(key))
        exam = the_exam(results, key, batch["id"])
        (study,) = pacs.studies()
        # Both destinations sent the same objects (the same SOP Instance UIDs): one copy.
        assert pacs.instance_count() == 5
        sr_series = [
            httpx.get(f"{pacs.url}/series/{s}", timeout=30).json() for s in study["Series"]
        ]
        (report_id,) = next(
            s["Instances"] for s in sr_series if s["MainDicomTags"]["Modality"] == "SR"
        )
        report = pydicom.dcmread(
            io.BytesIO(httpx.get(f"{pacs.url}/instances/{report_id}/file", timeout=30).content)
        )
    rows = deliveries.json()["items"]
    assert {(d["destination"], d["transport"], d["status"]) for d in rows} == {
        ("pacs", "dimse", "delivered"),
        ("web", "stow-rs", "delivered"),
    }
    assert {d["last_status_code"] for d in rows} == {0, 200}
    assert all(d["identified"] for d in rows)
    assert study["MainDicomTags"]["StudyInstanceUID"] == ORIGINAL_STUDY_UID
    assert study["MainDicomTags"]["AccessionNumber"] == PLANTED["AccessionNumber"]
    assert study["PatientMainDicomTags"]["PatientID"] == PLANTED["PatientID"]
    assert sorted(s["MainDicomTags"]["Modality"] for s in sr_series) == ["SEG", "SR"]
    assert sr_number(report, "Exam malignancy score") == pytest.approx(exam["exam_score"])


def test_a_destination_down_at_first_gets_the_results_once_and_one_down_for_good_is_dead(
    vault_settings: Settings,
    session: Session,
    store: ObjectStore,
    planted: list[Path],
    tmp_path: Path,
) -> None:
    settings = vault_settings.model_copy(
        update={"export_max_attempts": 3, "export_retry_base_s": 0.01, "export_timeout_s": 5}
    )
    tenant, key = make_tenant(session, scopes=READER)
    late_port, dead_port = free_port(), free_port()
    late = add_node(
        session=session, tenant_id=tenant.id, ae_title="LATEPACS", host="127.0.0.1", port=late_port
    )
    gone = add_node(
        session=session, tenant_id=tenant.id, ae_title="GONEPACS", host="127.0.0.1", port=dead_port
    )
    add_destination(session=session, tenant_id=tenant.id, name="late", node=late)
    add_destination(session=session, tenant_id=tenant.id, name="gone", node=gone)
    session.commit()

    def sweep() -> int:
        with session_scope(settings.database_url) as db:
            db.execute(
                update(ExportDelivery)
                .values(next_attempt_at=utcnow() - timedelta(seconds=1))
                .where(ExportDelivery.status == "pending")
            )
        with session_scope(settings.database_url) as db:
            return deliver_due(db, settings=settings, store=store)

    def by_name(results: TestClient, batch_id: str) -> dict[str, dict[str, Any]]:
        answer = results.get(f"/v1/batches/{batch_id}/deliveries", headers=auth(key))
        return {d["destination"]: d for d in answer.json()["items"]}

    with apps(settings) as (ingest, results):
        batch = screen_and_render(ingest, key, planted, settings, store)
        assert sweep() == 0  # both down
        first = by_name(results, batch["id"])
        assert [first[n]["status"] for n in ("late", "gone")] == ["pending", "pending"]
        assert first["late"]["attempts"] == 1
        assert first["late"]["last_error"]
        with run_orthanc(tmp_path / "late", aet="LATEPACS", dicom_port=late_port) as pacs:
            assert sweep() == 1
            assert sweep() == 0  # delivered once: not sent again
            assert pacs.instance_count() == 5
        assert sweep() == 0
        after = by_name(results, batch["id"])
        assert after["late"]["status"] == "delivered"
        assert after["late"]["attempts"] == 2
        assert after["gone"]["status"] == "dead"
        assert after["gone"]["attempts"] == 3
        assert "GONEPACS" in after["gone"]["last_error"]
        metrics = results.get("/metrics").text
        assert 'screening_dicom_deliveries{status="dead"} 1.0' in metrics
        retried = ingest.post(f"/v1/deliveries/{after['gone']['id']}/retry", headers=auth(key))
        assert retried.status_code == 202, retried.text
        assert (retried.json()["status"], retried.json()["attempts"]) == ("pending", 0)
        again = ingest.post(f"/v1/deliveries/{after['late']['id']}/retry", headers=auth(key))
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "delivery_not_dead"
    with session_scope(settings.database_url) as db:
        assert db.scalar(select(Tenant.identity_vault).where(Tenant.id == tenant.id))
    assert session.scalar(select(AuditEvent.id).where(AuditEvent.resource_type == "delivery"))


def test_the_viewer_shows_ids_and_dicom_links_to_an_identified_key_only(
    vault_settings: Settings, session: Session, store: ObjectStore, planted: list[Path]
) -> None:
    from shared.tenants import issue_api_key

    tenant, key = make_tenant(session, scopes=READER)
    identified_key = issue_api_key(session=session, tenant=tenant, scopes=IDENTIFIED).secret
    audit_only = issue_api_key(session=session, tenant=tenant, scopes=[Scope.AUDIT]).secret
    session.commit()
    with apps(vault_settings) as (ingest, results):
        batch = screen_and_render(ingest, key, planted, vault_settings, store)
        exam = the_exam(results, key, batch["id"])
        refused = results.post("/viewer/login", data={"api_key": audit_only})
        assert refused.status_code == 401
        assert "read scope" in refused.text

        results.post("/viewer/login", data={"api_key": key}, follow_redirects=False)
        plain = results.get(f"/viewer/exams/{exam['id']}").text
        assert PLANTED["PatientID"] not in plain
        assert f"/viewer/exams/{exam['id']}/report.dcm" in plain
        deidentified = results.get(f"/viewer/exams/{exam['id']}/report.dcm")
        assert deidentified.headers["X-Mammoscreen-Identified"] == "false"

        results.post("/viewer/login", data={"api_key": identified_key}, follow_redirects=False)
        page = results.get(f"/viewer/exams/{exam['id']}").text
        assert PLANTED["PatientID"] in page
        assert PLANTED["AccessionNumber"] in page
        assert PLANTED["AccessionNumber"] in results.get(f"/viewer/batches/{batch['id']}").text
        report = results.get(f"/viewer/exams/{exam['id']}/report.dcm")
        assert report.headers["X-Mammoscreen-Identified"] == "true"
        assert pydicom.dcmread(io.BytesIO(report.content)).PatientID == PLANTED["PatientID"]
        heatmap = results.get(f"/viewer/images/{exam['images'][0]['id']}/heatmap.dcm")
        assert pydicom.dcmread(io.BytesIO(heatmap.content)).StudyInstanceUID == ORIGINAL_STUDY_UID


# Seed 3 draws a lesion in the left breast; seed 8 one in the right breast, which is stored
# mirrored (its chest wall on the image's right).
@pytest.mark.parametrize("seed", [3, 8])
def test_the_heatmap_segmentation_lies_on_the_lesion_in_the_images_own_geometry(
    vault_settings: Settings, session: Session, store: ObjectStore, tmp_path: Path, seed: int
) -> None:
    """The model sees each view flipped to a common orientation and cropped; the Segmentation
    must still put the heat where the lesion is in the stored image."""
    from devstack.synth import generate_exams
    from tests.factories import SMALL_SYNTH

    _, key = make_tenant(session, scopes=READER)
    views = generate_exams(tmp_path / "exam", exams=1, seed=seed, options=SMALL_SYNTH)
    lesions = [v for v in views if v.box is not None]
    assert lesions
    with apps(vault_settings) as (ingest, results):
        batch = screen_and_render(ingest, key, [v.path for v in views], vault_settings, store)
        exam = the_exam(results, key, batch["id"])
        maps = {}
        for image in exam["images"]:
            got = results.get(f"/v1/images/{image['id']}/heatmap.dcm", headers=auth(key))
            maps[image["laterality"], image["view"]] = pydicom.dcmread(io.BytesIO(got.content))
    for lesion in lesions:
        heat = maps[lesion.laterality, lesion.view].pixel_array.astype(float)
        x0, y0, x1, y1 = lesion.box
        inside = heat[y0:y1, x0:x1].mean()
        mirrored = heat[y0:y1, heat.shape[1] - x1 : heat.shape[1] - x0].mean()
        assert inside > 2 * heat.mean(), (inside, heat.mean())
        assert inside > mirrored, (inside, mirrored)


@contextlib.contextmanager
def busy_stow_rs() -> Iterator[tuple[str, list[str]]]:
    """A DICOMweb endpoint that answers every POST 503 Service Unavailable; its URL and the
    paths it was sent."""
    posts: list[str] = []

    class Busy(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            posts.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", posts
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_stow_rs_destination_gets_one_request_per_attempt_and_the_schedule_retries(
    vault_settings: Settings, session: Session, store: ObjectStore, planted: list[Path]
) -> None:
    # The HTTP client's own retries (five, 30 s of back-off) would hold the delivery loop,
    # and every other tenant's deliveries, on one busy PACS; the delivery schedule retries.
    settings = vault_settings.model_copy(
        update={"export_max_attempts": 2, "export_retry_base_s": 0.01, "export_timeout_s": 5}
    )
    tenant, key = make_tenant(session, scopes=READER)
    with busy_stow_rs() as (url, posts):
        add_destination(session=session, tenant_id=tenant.id, name="busy", url=url)
        session.commit()
        with apps(settings) as (ingest, results):
            batch = screen_and_render(ingest, key, planted, settings, store)
            with session_scope(settings.database_url) as db:
                assert deliver_due(db, settings=settings, store=store) == 0
            assert len(posts) == 1
            with session_scope(settings.database_url) as db:
                db.execute(update(ExportDelivery).values(next_attempt_at=utcnow()))
            with session_scope(settings.database_url) as db:
                assert deliver_due(db, settings=settings, store=store) == 0
            assert len(posts) == 2
            (delivery,) = results.get(
                f"/v1/batches/{batch['id']}/deliveries", headers=auth(key)
            ).json()["items"]
    assert (delivery["status"], delivery["attempts"]) == ("dead", 2)
    assert delivery["last_status_code"] == 503
