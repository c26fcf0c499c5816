"""Out-of-distribution warnings with the shipped model: images of its training mix pass,
scanned films and vendor-processed views are flagged, and the flag reaches the results API,
the batch, the export, the viewer and /metrics."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from bench.model import folder_statistics
from devstack.synth import DEMO_VARIANTS, SynthOptions, generate_exams
from shared.config import Settings
from shared.db.base import session_scope
from shared.dicom_export import render_due
from shared.ml.input_reference import INPUT_UNLIKE_TRAINING_DATA, InputReference
from shared.ml.registry import shipped_model_dir
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, dciodvfy_errors, files_field, screen_everything
from tests.services.test_metrics import scrape, value

FILM = SynthOptions(style="film", views=("MLO",))
VENDOR = SynthOptions(style="vendor")


def _shipped_reference(settings: Settings) -> InputReference:
    directory = shipped_model_dir(settings)
    assert directory is not None
    record = json.loads((directory / "version.json").read_text())
    reference = InputReference.from_dict(record.get("input_reference"))
    assert reference is not None, "the shipped model carries no input reference"
    return reference


def _flag_rate(reference: InputReference, folder: Path) -> float:
    statistics = folder_statistics(folder, 512, 416, processes=2)
    return float(np.mean([reference.unlike(reference.distance(s)) for s in statistics]))


@pytest.mark.slow
def test_fresh_exams_of_the_training_mix_pass_and_other_domains_are_flagged(
    settings: Settings, tmp_path: Path
) -> None:
    reference = _shipped_reference(settings)
    # Seeds the shipped model never saw (it trained on seed 11), in its training mix of
    # vendor encodings.
    generate_exams(tmp_path / "digital", exams=40, seed=71, variants=DEMO_VARIANTS)
    generate_exams(tmp_path / "film", exams=20, seed=72, options=FILM)
    generate_exams(tmp_path / "vendor", exams=10, seed=73, options=VENDOR)
    assert _flag_rate(reference, tmp_path / "digital") <= 0.01  # 160 images
    assert _flag_rate(reference, tmp_path / "film") >= 0.9  # 40 images
    assert _flag_rate(reference, tmp_path / "vendor") >= 0.9  # 40 images


def test_the_flag_reaches_results_batch_export_viewer_and_metrics(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    digital = generate_exams(tmp_path / "digital", exams=3, seed=81, variants=DEMO_VARIANTS)
    film = generate_exams(tmp_path / "film", exams=3, seed=82, options=FILM, first_index=100)
    _, key = make_tenant(session)
    batch = ingest.post("/v1/batches", json={"name": "two domains"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in digital + film]),
        headers=auth(key),
    ).json()
    film_names = {i.path.name for i in film}
    film_ids = {a["id"] for a in upload["accepted"] if a["filename"] in film_names}
    assert len(film_ids) == 6
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    screen_everything(session, settings, store)

    page = results.get(f"/v1/batches/{batch['id']}/results", headers=auth(key)).json()
    flagged = {r["id"] for r in page["items"] if INPUT_UNLIKE_TRAINING_DATA in r["warnings"]}
    assert flagged == film_ids
    threshold = _shipped_reference(settings).threshold
    for result in page["items"]:
        assert result["input_distance"] is not None
        assert (result["input_distance"] > threshold) is (result["id"] in film_ids)
        assert result["score"] is not None  # flagged, and still scored

    detail = results.get(f"/v1/batches/{batch['id']}", headers=auth(key)).json()
    assert detail["warning_counts"] == {INPUT_UNLIKE_TRAINING_DATA: 6}
    assert any(w.startswith("6 image(s) look unlike") for w in detail["warnings"])

    exams = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(key)).json()["items"]
    film_exams = [e for e in exams if {i["id"] for i in e["images"]} <= film_ids]
    assert len(film_exams) == 3
    assert all(e["warnings"] == [INPUT_UNLIKE_TRAINING_DATA] for e in film_exams)
    assert all(e["warnings"] == [] for e in exams if e not in film_exams)

    export = results.get(
        f"/v1/batches/{batch['id']}/export", params={"format": "csv"}, headers=auth(key)
    )
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert {r["image_id"] for r in rows if r["warnings"] == INPUT_UNLIKE_TRAINING_DATA} == film_ids

    assert (
        value(scrape(results), "screening_input_warnings_total", code=INPUT_UNLIKE_TRAINING_DATA)
        == 6
    )

    # The DICOM report says it too, per flagged image, and stays a valid SR.
    with session_scope(settings.database_url) as rendering:
        while render_due(rendering, settings=settings, store=store):
            pass
    for exam in exams:
        report = results.get(f"/v1/exams/{exam['id']}/report.dcm", headers=auth(key))
        assert report.status_code == 200, report.text
        path = tmp_path / f"{exam['id']}.dcm"
        path.write_bytes(report.content)
        assert dciodvfy_errors(path) == []
        flagged = _sr_items(pydicom.dcmread(path), "Input unlike the model's training data")
        expected = 2 if exam in film_exams else 0  # two MLO views per film exam
        assert [i.ConceptCodeSequence[0].CodeMeaning for i in flagged] == ["Yes"] * expected


def _sr_items(report: pydicom.Dataset, meaning: str) -> list[pydicom.Dataset]:
    found: list[pydicom.Dataset] = []
    stack = list(report.ContentSequence)
    while stack:
        item = stack.pop(0)
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeMeaning == meaning:
            found.append(item)
        stack.extend(item.get("ContentSequence", []))
    return found


@pytest.mark.parametrize("page", ["batch", "exam"])
def test_the_viewer_shows_the_flag(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    tmp_path: Path,
    page: str,
) -> None:
    film = generate_exams(tmp_path / "film", exams=1, seed=83, options=FILM)
    _, key = make_tenant(session)
    batch = ingest.post("/v1/batches", json={"name": "film"}, headers=auth(key)).json()
    ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in film]),
        headers=auth(key),
    )
    screen_everything(session, settings, store)
    login = results.post("/viewer/login", data={"api_key": key}, follow_redirects=False)
    assert login.status_code in (302, 303)
    html = results.get(f"/viewer/batches/{batch['id']}").text
    if page == "exam":
        exam_id = html.split('href="/viewer/exams/')[1].split('"')[0]
        html = results.get(f"/viewer/exams/{exam_id}").text
    else:
        assert "2 image(s) look unlike the images the model was trained on" in html
    assert "unlike training data" in html
