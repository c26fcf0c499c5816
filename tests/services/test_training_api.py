"""POST /v1/training-runs through the ingest app, the training task in-process, and the
results API's view of runs and models, on the real servers."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import generate_exams
from services.worker.training import run_training
from shared.config import Settings
from shared.db.models import Image, ImageStatus, ModelVersion, TrainingExample
from shared.ml.registry import RegistryError, ensure_active_model, promote, shipped_model_dir
from shared.storage import ObjectStore
from tests.factories import SMALL_SYNTH, TINY_TRAINING, make_tenant
from tests.helpers import auth, queued_task_args, training_batch, training_labels

SMALL = SMALL_SYNTH
TINY = {**TINY_TRAINING, "epochs": 3}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("labelled")
    generate_exams(folder, exams=24, seed=17, options=SMALL)
    return folder


def _run(
    ingest: TestClient, key: str, batch_id: str, labels: list[dict[str, Any]], **extra: Any
) -> Any:
    body = {
        "name": "tiny",
        "seed": 3,
        "dataset": {"batch_id": batch_id, "labels": labels},
        "hyperparameters": TINY,
        **extra,
    }
    return ingest.post("/v1/training-runs", json=body, headers=auth(key))


def test_a_run_trains_evaluates_registers_and_is_reproducible(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    labelled: Path,
) -> None:
    _, key = make_tenant(session)
    shipped = ensure_active_model(session=session, store=store, shipped=shipped_model_dir(settings))
    session.commit()
    batch_id = training_batch(ingest, key, labelled)
    detail = results.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
    # Training images are kept, not screened: nothing queued for inference, batch complete.
    assert detail["counts"]["stored"] == 96
    assert detail["status"] == "completed"
    assert queued_task_args(settings, "inference") == []
    assert {i.status for i in session.scalars(select(Image))} == {ImageStatus.STORED}

    labels = training_labels(labelled)
    accepted = _run(ingest, key, batch_id, labels)
    assert accepted.status_code == 202, accepted.text
    run_id = accepted.json()["id"]
    sizes = accepted.json()["split_sizes"]
    assert sum(s["images"] for s in sizes.values()) == 96
    assert all(0 < s["malignant_images"] < s["images"] for s in sizes.values())
    assert queued_task_args(settings, "training") == [run_id]  # the task carries only the id
    # No patient in two splits.
    splits_by_study: dict[uuid.UUID, set[str]] = {}
    for example, image in session.execute(
        select(TrainingExample, Image).join(Image, Image.id == TrainingExample.image_id)
    ):
        splits_by_study.setdefault(image.study_id, set()).add(example.split.value)
    assert all(len(s) == 1 for s in splits_by_study.values())

    assert run_training(uuid.UUID(run_id), settings=settings, store=store) == "completed"
    # A second delivery of the same task finds the run finished and does nothing.
    assert run_training(uuid.UUID(run_id), settings=settings, store=store) == "skipped"

    run = results.get(f"/v1/training-runs/{run_id}", headers=auth(key)).json()
    assert run["status"] == "completed"
    assert [p["epoch"] for p in run["curve"]] == [0, 1, 2]
    assert all(0 <= p["validation_auc"] <= 1 and p["train_loss"] > 0 for p in run["curve"])
    test = run["evaluation"]["test"]
    assert test["exams"] == sizes["test"]["images"] // 4
    low, high = test["exam_auc_ci95"]
    assert low <= test["exam_auc"] <= high
    version = run["model_version"]
    # Three epochs of a tiny network, judged on a handful of test exams: too few to show it
    # better than chance or than the active (shipped) model, so it is registered rejected.
    assert (version["status"], version["trained"]) == ("rejected", True)
    review = run["evaluation"]["review"]
    assert review["rejected"] is True
    assert version["rejection_reason"] == review["reason"]
    assert "judging a model takes at least 10 of each" in review["reason"]
    comparison = review["comparison_with_active"]
    assert comparison["active_version"] == shipped.name
    assert comparison["exams"] == test["exams"]
    assert comparison["candidate_exam_auc"] == pytest.approx(test["exam_auc"])
    with pytest.raises(RegistryError, match="rejected at registration"):
        promote(
            session=session,
            version=session.get_one(ModelVersion, uuid.UUID(version["id"])),
            actor="operator:test",
        )
    session.rollback()

    models = results.get("/v1/models", headers=auth(key)).json()["items"]
    (registered,) = [m for m in models if m["id"] == version["id"]]
    assert registered["recall_threshold"] is not None
    assert set(registered["calibration"]) == {"a", "b"}
    card = registered["model_card"]
    assert card["not_for_clinical_use"] is True
    assert card["data"]["split_sizes"]["test"]["images"] == sizes["test"]["images"]
    assert card["operating_point"]["target_sensitivity"] == 0.9
    # A handful of test exams is too few to cut a drift reference from: none, no index.
    assert session.get_one(ModelVersion, uuid.UUID(version["id"])).score_reference is None

    # The same data, hyperparameters and seed on the CPU: the same curve.
    again = _run(ingest, key, batch_id, labels).json()["id"]
    assert run_training(uuid.UUID(again), settings=settings, store=store) == "completed"
    rerun = results.get(f"/v1/training-runs/{again}", headers=auth(key)).json()
    assert [p["train_loss"] for p in rerun["curve"]] == [p["train_loss"] for p in run["curve"]]
    assert [p["validation_auc"] for p in rerun["curve"]] == [
        p["validation_auc"] for p in run["curve"]
    ]
    assert session.scalars(select(ModelVersion)).all()  # both registered


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        (
            lambda labels: [*labels, {"file": "missing.dcm", "label": "normal"}],
            422,
            "unknown_image",
        ),
        (
            lambda labels: [{**x, "label": "normal"} | {"box": None} for x in labels],
            422,
            "dataset_too_small",
        ),
        (lambda labels: [*labels, labels[0]], 422, "duplicate_label"),
        (lambda labels: [{**labels[0], "label": "suspicious"}], 422, "invalid_request"),
        (
            lambda labels: [{"file": labels[0]["file"], "label": "normal", "box": [1, 1, 5, 5]}],
            422,
            "invalid_request",
        ),
        (
            lambda labels: [{"file": labels[0]["file"], "label": "benign", "box": [9, 1, 5, 5]}],
            422,
            "invalid_request",
        ),
    ],
)
def test_bad_training_requests_get_a_clear_error_and_create_nothing(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    labelled: Path,
    change: Any,
    status: int,
    code: str,
) -> None:
    _, key = make_tenant(session)
    batch_id = training_batch(ingest, key, labelled)
    response = _run(ingest, key, batch_id, change(training_labels(labelled)))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert results.get("/v1/training-runs", headers=auth(key)).json()["items"] == []
    assert queued_task_args(settings, "training") == []


def test_runs_and_their_data_belong_to_one_tenant(
    ingest: TestClient, results: TestClient, session: Session, labelled: Path
) -> None:
    _, key = make_tenant(session)
    _, other_key = make_tenant(session)
    batch_id = training_batch(ingest, key, labelled)
    # Another tenant cannot train on this tenant's batch ...
    stolen = _run(ingest, other_key, batch_id, training_labels(labelled))
    assert (stolen.status_code, stolen.json()["error"]["code"]) == (404, "batch_not_found")
    # ... nor read its run.
    run_id = _run(ingest, key, batch_id, training_labels(labelled)).json()["id"]
    hidden = results.get(f"/v1/training-runs/{run_id}", headers=auth(other_key))
    assert (hidden.status_code, hidden.json()["error"]["code"]) == (404, "training_run_not_found")
    assert results.get(f"/v1/training-runs/{run_id}", headers=auth(key)).status_code == 200


@pytest.mark.parametrize(
    ("hyperparameters", "code"),
    [
        ({"init_from": "no-such-version"}, "model_not_found"),
        # The shipped model's layers are wider than the tiny network's.
        ({"init_from": "SHIPPED"}, "init_from_mismatch"),
        ({"folds": 50}, "invalid_request"),
        # Twelve folds of 24 patients: some fold's splits lack a malignant patient.
        ({"folds": 12}, "dataset_too_small"),
    ],
)
def test_a_run_that_cannot_start_as_asked_is_refused_before_anything_is_queued(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    labelled: Path,
    hyperparameters: dict[str, Any],
    code: str,
) -> None:
    shipped = ensure_active_model(session=session, store=store, shipped=shipped_model_dir(settings))
    session.commit()
    if hyperparameters.get("init_from") == "SHIPPED":
        hyperparameters = {**hyperparameters, "init_from": shipped.name}
    _, key = make_tenant(session)
    batch_id = training_batch(ingest, key, labelled)
    response = _run(
        ingest,
        key,
        batch_id,
        training_labels(labelled),
        hyperparameters={**TINY, **hyperparameters},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert results.get("/v1/training-runs", headers=auth(key)).json()["items"] == []
    assert queued_task_args(settings, "training") == []
