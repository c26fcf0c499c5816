"""DICOM in, end to end, with the hospital's tools: Orthanc as the PACS pushing studies to the
gateway by C-STORE, and dicomweb-client posting a study by STOW-RS."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from devstack.stack import StackState, down, up
from devstack.synth import DEMO_VARIANTS, generate_exams
from mammoscreen_client import Client
from shared.config import Settings
from tests.factories import SMALL_SYNTH
from tests.helpers import (
    Orthanc,
    dciodvfy_errors,
    run_orthanc,
    sr_number,
    stack_environ,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def dicom_stack(settings: Settings, tmp_path: Path) -> Iterator[StackState]:
    """The local stack with short DICOM study quiet periods and sweeps."""
    environ = stack_environ(
        settings, {"SCREENING_DICOM_STUDY_QUIET_S": "2", "SCREENING_SWEEP_INTERVAL_S": "0.5"}
    )
    state = up(tmp_path / "stack", environ=environ)
    yield state
    assert down(tmp_path / "stack") == []


def screening(env: dict[str, str], *args: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def orthanc(tmp_path: Path, dicom_stack: StackState) -> Iterator[Orthanc]:
    """Debian's Orthanc as the site PACS, knowing the gateway as a modality."""
    gateway = (
        dicom_stack.env["SCREENING_DICOM_AE_TITLE"],
        "127.0.0.1",
        int(dicom_stack.env["SCREENING_DICOM_PORT"]),
    )
    with run_orthanc(tmp_path / "orthanc", modalities={"mammoscreen": gateway}) as pacs:
        yield pacs


def _dicom_batches(client: Client) -> list[dict[str, Any]]:
    return [b for b in client.batches(limit=200) if b["source"] != "api"]


def test_orthanc_pushes_studies_to_the_gateway_and_gets_the_results_back_into_them(
    dicom_stack: StackState, orthanc: Orthanc, tmp_path: Path
) -> None:
    env = dicom_stack.env
    added = screening(env, "admin", "dicom-node", "add", "demo", "--ae-title", "SITEPACS",
                      "--host", "127.0.0.1", "--port", str(orthanc.dicom_port))  # fmt: skip
    assert "SITEPACS from 127.0.0.1" in added
    screening(env, "admin", "destination", "add", "demo", "pacs", "--ae-title", "SITEPACS")
    exams = generate_exams(tmp_path / "exams", exams=2, seed=31, options=SMALL_SYNTH,
                           variants=DEMO_VARIANTS[2:4])  # fmt: skip
    originals: dict[str, str] = {}  # StudyInstanceUID -> PatientID, as the PACS holds them
    for exam in exams:
        stored = httpx.post(f"{orthanc.url}/instances", content=exam.path.read_bytes(), timeout=30)
        assert stored.status_code == 200, stored.text
        originals[exam.study] = exam.patient
    studies = [s["ID"] for s in orthanc.studies()]

    pushed = httpx.post(
        f"{orthanc.url}/modalities/mammoscreen/store",
        json={"Resources": sorted(studies), "Synchronous": True},
        timeout=120,
    )
    assert pushed.status_code == 200, pushed.text
    assert pushed.json()["InstancesCount"] == 8

    with Client.from_env(env) as client:
        wait_for(
            lambda: (
                len(_dicom_batches(client)) == 2
                and all(b["status"] == "completed" for b in _dicom_batches(client))
            ),
            timeout=180,
            what="both pushed studies to be screened",
        )
        batches = _dicom_batches(client)
        assert {b["source"] for b in batches} == {"dicom"}
        assert {b["sent_by"] for b in batches} == {"SITEPACS"}
        exam_scores = {}
        for batch in batches:
            status = client.batch(batch["id"])
            assert status["counts"]["done"] == 4
            (exam,) = client.iter_exams(batch["id"])
            assert exam["recall"] in ("recall", "routine")
            exam_scores[exam["id"]] = exam["exam_score"]

        def delivered() -> bool:
            rows = [d for b in batches for d in client.deliveries(b["id"])]
            return len(rows) == 2 and all(d["status"] == "delivered" for d in rows)

        wait_for(delivered, timeout=120, what="both exams' results to be delivered to the PACS")
        for batch in batches:
            (delivery,) = client.deliveries(batch["id"])
            assert delivery["identified"] is True
            assert delivery["last_status_code"] == 0

    # No original identifier in any service's log (gateway, ingest, worker, results).
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "stack" / "logs").iterdir())
    for uid, patient in originals.items():
        assert uid not in logs
        assert patient not in logs

    # The same objects as files, de-identified for this key (submit and read).
    out = tmp_path / "dicom-results"
    screening(env, "results", batches[0]["id"], "--format", "dicom", "--output", str(out))
    files = sorted(p.name.split("-")[0] for p in out.iterdir())
    assert files == ["heatmap"] * 4 + ["report"]
    for path in out.iterdir():
        assert dciodvfy_errors(path) == [], path.name

    # Back in the PACS: each original study holds its images, our SR and our heatmaps.
    listing = orthanc.studies()
    assert len(listing) == 2
    for study in listing:
        tags = study["MainDicomTags"]
        uid = tags["StudyInstanceUID"]
        assert study["PatientMainDicomTags"]["PatientID"] == originals[uid]
        instances: dict[str, int] = {}
        for series in study["Series"]:
            info = httpx.get(f"{orthanc.url}/series/{series}", timeout=30).json()
            modality = info["MainDicomTags"]["Modality"]
            instances[modality] = instances.get(modality, 0) + len(info["Instances"])
        # The four views, one report, and a heatmap per view.
        assert instances == {"MG": 4, "SR": 1, "SEG": 4}, instances
        report = _report_of(orthanc, study)
        assert report.StudyInstanceUID == uid
        assert report.PatientID == originals[uid]
        exam_id = next(e for e, score in exam_scores.items() if score == pytest.approx(
            sr_number(report, "Exam malignancy score")))  # fmt: skip
        assert exam_id in exam_scores


def _report_of(orthanc: Orthanc, study: dict[str, Any]) -> pydicom.Dataset:
    for series in study["Series"]:
        info = httpx.get(f"{orthanc.url}/series/{series}", timeout=30).json()
        if info["MainDicomTags"]["Modality"] == "SR":
            (instance,) = info["Instances"]
            data = httpx.get(f"{orthanc.url}/instances/{instance}/file", timeout=30).content
            return pydicom.dcmread(io.BytesIO(data))
    raise AssertionError("no SR series in the study")


def test_a_study_stored_by_stow_rs_with_a_ct_in_it(dicom_stack: StackState, tmp_path: Path) -> None:
    env = dicom_stack.env
    exams = generate_exams(tmp_path / "exams", exams=1, seed=32, options=SMALL_SYNTH)
    ct = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    stow = DICOMwebClient(
        url=f"{env['SCREENING_INGEST_URL']}/dicomweb",
        headers={"Authorization": f"Bearer {env['SCREENING_API_KEY']}"},
    )
    answer = stow.store_instances([*(pydicom.dcmread(e.path) for e in exams), ct])

    stored = [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence]
    assert sorted(stored) == sorted(str(pydicom.dcmread(e.path).SOPInstanceUID) for e in exams)
    (failed,) = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert failed.FailureReason == 0x0122
    with Client.from_env(env) as client:
        wait_for(
            lambda: (
                any(
                    b["status"] == "completed" and b["source"] == "dicomweb"
                    for b in client.batches()
                )
                and all(b["status"] == "completed" for b in _dicom_batches(client))
            ),
            timeout=180,
            what="the posted study to be screened",
        )
        (batch,) = [b for b in _dicom_batches(client) if client.batch(b["id"])["total_images"]]
        assert client.batch(batch["id"])["counts"]["done"] == 4
