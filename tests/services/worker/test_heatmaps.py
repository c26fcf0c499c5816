"""Heatmaps and recall recommendations from the shipped trained model, through the APIs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from devstack.synth import Finding, SynthOptions, generate_exams
from shared.config import Settings
from shared.ml.registry import shipped_model_dir
from shared.scores import roc_auc
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, files_field, screen_everything

SHRINK = 4  # heatmaps are stored at 1/4 of the image's size


def test_the_shipped_model_is_there(settings: Settings) -> None:
    assert shipped_model_dir(settings) is not None, "models/screening-synthetic is missing"


def test_heatmaps_peak_inside_the_lesion_and_exams_carry_a_recommendation(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    malignant_only = SynthOptions(malignant_prevalence=1.0, benign_prevalence=0.0)
    normal_only = SynthOptions(malignant_prevalence=0.0, benign_prevalence=0.0)
    images = generate_exams(tmp_path / "malignant", exams=6, seed=91, options=malignant_only)
    normals = generate_exams(tmp_path / "normal", exams=6, seed=92, options=normal_only)
    _, key = make_tenant(session)
    batch = ingest.post("/v1/batches", json={"name": "heatmaps"}, headers=auth(key)).json()
    upload = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in images]),
        headers=auth(key),
    ).json()
    ids = {a["filename"]: a["id"] for a in upload["accepted"]}
    malignant_studies = {a["study_id"] for a in upload["accepted"]}
    ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in normals]),
        headers=auth(key),
    )
    screen_everything(session, settings, store)

    lesions = [i for i in images if i.label == Finding.MALIGNANT]
    assert len(lesions) == 12
    hits = 0
    for synth in lesions:
        result = results.get(f"/v1/images/{ids[synth.path.name]}", headers=auth(key)).json()
        assert result["model_version"]["trained"] is True
        assert result["heatmap_url"] == f"/v1/images/{ids[synth.path.name]}/heatmap.png"
        grey = results.get(result["heatmap_url"], params={"style": "grey"}, headers=auth(key))
        assert grey.headers["content-type"] == "image/png"
        heat = np.asarray(PILImage.open(io.BytesIO(grey.content)))
        assert heat.shape == (1024 // SHRINK, 832 // SHRINK)
        # No hotter than the view's score; a confidently scored view still shows its lesion
        # (the overlay draws from 0.5 up).
        assert heat.max() / 255 <= result["score"] + 1 / 255
        if result["score"] >= 0.8:
            assert heat.max() / 255 >= 0.6
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        assert synth.box is not None
        x0, y0, x1, y1 = synth.box
        hits += x0 <= col * SHRINK + SHRINK / 2 <= x1 and y0 <= row * SHRINK + SHRINK / 2 <= y1
    assert hits >= 0.75 * len(lesions), f"heatmap peak inside the lesion box in {hits}/12"

    overlay = results.get(result["heatmap_url"], headers=auth(key))
    rgba = PILImage.open(io.BytesIO(overlay.content))
    assert (rgba.mode, rgba.size) == ("RGBA", (832 // SHRINK, 1024 // SHRINK))

    exams = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(key)).json()["items"]
    assert len(exams) == 12
    for exam in exams:
        assert exam["model_version"]["trained"] is True
        assert exam["recall"] in ("recall", "routine")
        assert exam["recall"] == (
            "recall" if exam["exam_score"] >= exam["recall_threshold"] else "routine"
        )
        assert 0 < exam["exam_probability"] < 1
        assert all(i["heatmap_url"] for i in exam["images"])
    for exam in exams:
        for image in exam["images"]:
            grey = results.get(image["heatmap_url"], params={"style": "grey"}, headers=auth(key))
            peak = np.asarray(PILImage.open(io.BytesIO(grey.content))).max() / 255
            assert peak <= image["score"] + 1 / 255, "a map hotter than its score"
    malignant = [e for e in exams if e["id"] in malignant_studies]
    normal = [e for e in exams if e["id"] not in malignant_studies]
    recalled = sum(e["recall"] == "recall" for e in malignant)
    false_recalls = sum(e["recall"] == "recall" for e in normal)
    assert recalled > false_recalls, (recalled, false_recalls)
    assert false_recalls <= 1
    auc = roc_auc([e["exam_score"] for e in exams], [e["id"] in malignant_studies for e in exams])
    assert auc >= 0.8, f"exam AUC on 6 malignant and 6 normal exams: {auc:.2f}"


def test_a_missing_heatmap_is_a_clear_404(results: TestClient, session: Session) -> None:
    _, key = make_tenant(session)
    response = results.get(
        "/v1/images/00000000-0000-0000-0000-000000000000/heatmap.png", headers=auth(key)
    )
    assert (response.status_code, response.json()["error"]["code"]) == (404, "image_not_found")
