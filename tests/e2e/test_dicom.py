"""DICOM in, end to end, with the hospital's tools: Orthanc as the PACS pushing studies to the
gateway by C-STORE, and dicomweb-client posting a study by STOW-RS."""

from __future__ import annotations

import json
import os
import shutil
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

from devstack.servers import free_port, stop_pid
from devstack.stack import StackState, down, up
from devstack.synth import DEMO_VARIANTS, generate_exams
from mammoscreen_client import Client
from shared.config import CONNECTION_FIELDS, Settings, settings_to_environ
from tests.factories import SMALL_SYNTH
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def dicom_stack(settings: Settings, tmp_path: Path) -> Iterator[StackState]:
    """The local stack with short DICOM study quiet periods and sweeps."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    environ.update(settings_to_environ(settings, CONNECTION_FIELDS))
    environ["SCREENING_DICOM_STUDY_QUIET_S"] = "2"
    environ["SCREENING_SWEEP_INTERVAL_S"] = "0.5"
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
def orthanc(tmp_path: Path, dicom_stack: StackState) -> Iterator[str]:
    """Debian's Orthanc as the site PACS, on free ports, knowing the gateway as a modality."""
    assert shutil.which("Orthanc"), "Orthanc is missing: `make dicom-tools` installs it"
    http_port, dicom_port = free_port(), free_port()
    storage = tmp_path / "orthanc"
    storage.mkdir()
    config = {
        "Name": "SITEPACS",
        "DicomAet": "SITEPACS",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {
            "mammoscreen": [
                dicom_stack.env["SCREENING_DICOM_AE_TITLE"],
                "127.0.0.1",
                int(dicom_stack.env["SCREENING_DICOM_PORT"]),
            ]
        },
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("wb")
    process = subprocess.Popen(
        ["Orthanc", str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{http_port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout=60, what="Orthanc")
        yield url
    finally:
        stop_pid(process.pid)
        log.close()


def _dicom_batches(client: Client) -> list[dict[str, Any]]:
    return [b for b in client.batches(limit=200) if b["source"] != "api"]


def test_orthanc_pushes_studies_to_the_gateway_and_they_are_screened(
    dicom_stack: StackState, orthanc: str, tmp_path: Path
) -> None:
    env = dicom_stack.env
    added = screening(env, "admin", "dicom-node", "add", "demo", "--ae-title", "SITEPACS",
                      "--host", "127.0.0.1")  # fmt: skip
    assert "SITEPACS from 127.0.0.1" in added
    exams = generate_exams(tmp_path / "exams", exams=2, seed=31, options=SMALL_SYNTH,
                           variants=DEMO_VARIANTS[2:4])  # fmt: skip
    studies = set()
    for exam in exams:
        stored = httpx.post(f"{orthanc}/instances", content=exam.path.read_bytes(), timeout=30)
        assert stored.status_code == 200, stored.text
        studies.add(stored.json()["ParentStudy"])

    pushed = httpx.post(
        f"{orthanc}/modalities/mammoscreen/store",
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
        for batch in batches:
            status = client.batch(batch["id"])
            assert status["counts"]["done"] == 4
            (exam,) = client.iter_exams(batch["id"])
            assert exam["exam_score"] is not None
            assert exam["recall"] in ("recall", "routine")


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
