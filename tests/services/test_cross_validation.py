"""A site's first small data set, of a domain the shipped model never saw: cross-validated
runs through the API and the real trainer, from scratch and warm-started from the shipped
model, on scanned-film exams (two MLO views per woman)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import SynthOptions, generate_exams
from services.worker.training import run_training
from shared.config import Settings
from shared.db.models import Split, TrainingExample, TrainingRun, TrainingStatus
from shared.ml.registry import ensure_active_model, shipped_model_dir
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, training_batch, training_labels

# About 300 images of 150 women, as a site's first labelled film archive.
FILM = SynthOptions(style="film", views=("MLO",))
EXAMS = 150
# A few epochs: enough to run every stage through the real trainer. What warm start buys, at
# full length, is measured by `make bench-warm-start` (README "Warm start").
QUICK: dict[str, Any] = {"epochs": 2, "patience": 2, "freeze_epochs": 1}


@pytest.fixture(scope="module")
def film_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("film")
    generate_exams(folder, exams=EXAMS, seed=21, options=FILM)
    return folder


def _train_all(session: Session, settings: Settings, store: ObjectStore, run_id: str) -> None:
    """What trainer workers do with the queue: train every stage of the run until none is
    left (the final model's stage appears when the last fold finishes)."""
    for _ in range(20):
        session.expire_all()
        waiting = session.scalars(
            select(TrainingRun.id)
            .where(
                TrainingRun.parent_id == uuid.UUID(run_id),
                TrainingRun.status == TrainingStatus.QUEUED,
            )
            .order_by(TrainingRun.fold)
        ).all()
        if not waiting:
            return
        for stage_id in waiting:
            assert run_training(stage_id, settings=settings, store=store) == "completed"
    raise AssertionError("stages kept appearing")


def test_a_small_data_set_is_cross_validated_warm_started_and_honestly_reviewed(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    film_set: Path,
) -> None:
    shipped = ensure_active_model(session=session, store=store, shipped=shipped_model_dir(settings))
    session.commit()
    _, key = make_tenant(session)
    batch_id = training_batch(ingest, key, film_set)
    labels = training_labels(film_set)
    assert len(labels) == 2 * EXAMS

    accepted = ingest.post(
        "/v1/training-runs",
        json={
            "name": "film archive",
            "seed": 4,
            "dataset": {"batch_id": batch_id, "labels": labels},
            "hyperparameters": QUICK,  # init_from and folds left to their defaults
        },
        headers=auth(key),
    )
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    # 150 patients: fewer than a single split can judge, so cross-validation by default; and
    # the active (shipped) model's layers fit, so a warm start from it.
    assert (body["kind"], body["folds"], body["init_from"]) == ("cross_validation", 5, shipped.name)
    assert sum(fold["images"] for fold in body["split_sizes"].values()) == 2 * EXAMS
    assert all(
        0 < fold["malignant_images"] < fold["images"] for fold in body["split_sizes"].values()
    )
    listed = results.get("/v1/training-runs", headers=auth(key)).json()["items"]
    assert [r["id"] for r in listed] == [body["id"]]  # its stages are listed under it
    _train_all(session, settings, store, body["id"])

    run = results.get(f"/v1/training-runs/{body['id']}", headers=auth(key)).json()
    assert run["status"] == "completed", run
    assert [(s["kind"], s["fold"], s["status"]) for s in run["stages"]] == [
        *(("fold", n, "completed") for n in range(5)),
        ("final", None, "completed"),
    ]
    # No patient held out twice: every image is in exactly one fold's test split.
    held_out = session.scalars(
        select(TrainingExample.image_id).where(TrainingExample.split == Split.TEST)
    ).all()
    assert len(held_out) == len(set(held_out)) == 2 * EXAMS
    final_id = run["stages"][-1]["id"]
    final = results.get(f"/v1/training-runs/{final_id}", headers=auth(key)).json()
    epochs = sorted(
        fold["best_epoch"] for fold in run["evaluation"]["cross_validation"]["per_fold"]
    )
    assert len(final["curve"]) == epochs[2] + 1  # the folds' median best epoch count
    assert all(p["validation_auc"] is None for p in final["curve"])  # no validation split

    cv = run["evaluation"]["cross_validation"]
    assert cv["exams"] == EXAMS  # every exam scored once, by a fold model that never saw it
    assert len(cv["per_fold"]) == 5
    low, high = cv["exam_auc_ci95"]
    assert low <= cv["exam_auc"] <= high
    assert cv["fold_auc_range"][0] <= cv["fold_auc_mean"] <= cv["fold_auc_range"][1]
    assert run["evaluation"]["init_from"] == shipped.name
    comparison = run["evaluation"]["review"]["comparison_with_active"]
    assert (comparison["active_version"], comparison["exams"]) == (shipped.name, EXAMS)

    version = run["model_version"]
    card = results.get(f"/v1/models/{version['id']}", headers=auth(key)).json()["model_card"]
    assert card["cross_validation"]["exam_auc"] == cv["exam_auc"]
    assert card["init_from"] == shipped.name
    # Two epochs of fine-tuning: whatever it reached, the review says so honestly.
    if low <= 0.5:
        assert version["status"] == "rejected"
        assert "pooled out-of-fold exam AUC" in version["rejection_reason"]
    elif comparison["difference"] < 0:
        assert version["status"] == "rejected"
    else:
        assert version["status"] == "candidate"
    print(
        f"5-fold pooled exam AUC {cv['exam_auc']:.3f} ({low:.3f}-{high:.3f}): {version['status']}"
    )
