"""Evaluations: model versions measured on a tenant's exams with outcomes, through the API,
the queued task and the real servers; the figures checked against scikit-learn's."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from devstack.synth import Finding, Style, SynthImage, SynthOptions, generate_exams
from services.worker.evaluation import run_evaluation
from shared.config import Settings
from shared.db.base import utcnow
from shared.db.models import Evaluation, ModelStatus, ModelVersion, Prediction, TrainingStatus
from shared.evaluations import resend_stalled_evaluations
from shared.ml.registry import active_model, ensure_active_model, shipped_model_dir
from shared.queue import make_celery
from shared.scores import calibrated_probability
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, files_field, queued_task_args, screen_everything

SMALL = dict(height=256, width=208, pixel_spacing_mm=0.8)


@pytest.fixture(scope="module")
def site_exams(tmp_path_factory: pytest.TempPathFactory) -> list[SynthImage]:
    """Two vendors' exams (one writes no Manufacturer), about a third of them malignant."""
    folder = tmp_path_factory.mktemp("site")
    vendor = SynthOptions(**SMALL, style=Style.VENDOR, malignant_prevalence=0.35)  # type: ignore[arg-type]
    plain = SynthOptions(**SMALL, malignant_prevalence=0.35)  # type: ignore[arg-type]
    return [
        *generate_exams(folder / "vendor", exams=14, seed=71, options=vendor),
        *generate_exams(folder / "plain", exams=14, seed=72, options=plain, first_index=100),
    ]


def _submit_and_screen(
    ingest: TestClient,
    key: str,
    images: list[SynthImage],
    settings: Settings,
    session: Session,
    store: ObjectStore,
) -> str:
    batch = ingest.post("/v1/batches", json={"name": "site"}, headers=auth(key)).json()
    for start in range(0, len(images), 16):
        chunk = [i.path for i in images[start : start + 16]]
        answer = ingest.post(
            f"/v1/batches/{batch['id']}/images", files=files_field(chunk), headers=auth(key)
        )
        assert answer.status_code == 202, answer.text
        assert not answer.json()["rejected"]
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    screen_everything(session, settings, store)
    return str(batch["id"])


def _record_truth(ingest: TestClient, key: str, images: list[SynthImage]) -> dict[str, bool]:
    malignant: dict[str, bool] = {}
    for image in images:
        malignant[image.study] = (
            malignant.get(image.study, False) or image.label == Finding.MALIGNANT
        )
    rows = [
        {
            "study_key": study,
            "truth": "malignant" if is_malignant else "normal",
            "breast": "both",
            "source": "biopsy" if is_malignant else "follow_up",
            "date": "2026-10-02",
        }
        for study, is_malignant in malignant.items()
    ]
    assert (
        ingest.post("/v1/outcomes", json={"outcomes": rows}, headers=auth(key)).status_code == 200
    )
    return malignant


def _evaluate(
    ingest: TestClient,
    results: TestClient,
    key: str,
    body: dict[str, Any],
    settings: Settings,
    store: ObjectStore,
) -> dict[str, Any]:
    return _evaluated(ingest, results, key, body, settings, store)[1]


def _evaluated(
    ingest: TestClient,
    results: TestClient,
    key: str,
    body: dict[str, Any],
    settings: Settings,
    store: ObjectStore,
) -> tuple[str, dict[str, Any]]:
    asked = ingest.post("/v1/evaluations", json=body, headers=auth(key))
    assert asked.status_code == 202, asked.text
    evaluation_id = asked.json()["id"]
    assert asked.json()["status"] == "queued"
    assert evaluation_id in queued_task_args(settings, "training")
    assert run_evaluation(uuid.UUID(evaluation_id), settings=settings, store=store) == "completed"
    # The task comes again (a redelivery): nothing is done twice.
    assert run_evaluation(uuid.UUID(evaluation_id), settings=settings, store=store) == "skipped"
    answer = results.get(f"/v1/evaluations/{evaluation_id}", headers=auth(key))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed"
    figures: dict[str, Any] = answer.json()["figures"]
    return evaluation_id, figures


def test_an_evaluation_of_the_active_version_agrees_with_scikit_learn(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    site_exams: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    _, other_key = make_tenant(session)
    batch_id = _submit_and_screen(ingest, key, site_exams, settings, session, store)
    truth = _record_truth(ingest, key, site_exams)
    exams = results.get(
        f"/v1/batches/{batch_id}/exams", params={"limit": 100}, headers=auth(key)
    ).json()["items"]
    assert len(exams) == len(truth) == 28

    evaluation_id, figures = _evaluated(
        ingest, results, key, {"batch_ids": [batch_id], "seed": 3}, settings, store
    )
    (version,) = figures["versions"]
    active = active_model(session=session)
    assert active is not None
    assert version["model_version"]["id"] == str(active.id)

    # The oracle: the exam scores the results API gives, and the site's truth per exam.
    by_exam = {exam["id"]: exam["exam_score"] for exam in exams}
    study_of = {exam["id"]: exam["study_key"] for exam in exams}
    pseudonymous_truth = _truth_by_stored_key(truth, settings)
    ids = sorted(by_exam)
    scores = np.array([by_exam[i] for i in ids])
    labels = np.array([pseudonymous_truth[study_of[i]] for i in ids])
    assert version["exams"] == 28
    assert version["malignant_exams"] == labels.sum() > 0
    assert version["exam_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    low, high = version["exam_auc_ci95"]
    assert low <= version["exam_auc"] <= high
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    assert version["roc"]["fpr"] == pytest.approx(fpr.tolist())
    assert version["roc"]["tpr"] == pytest.approx(tpr.tolist())
    assert version["roc"]["thresholds"][1:] == pytest.approx(thresholds[1:].tolist())

    probabilities = (
        np.array([calibrated_probability(s, active.calibration) for s in scores])
        if active.calibration
        else scores
    )
    observed, predicted = calibration_curve(labels, probabilities, n_bins=10, strategy="uniform")
    curve = version["calibration"]["curve"]
    assert [b["observed"] for b in curve] == pytest.approx(observed.tolist())
    assert [b["mean_predicted"] for b in curve] == pytest.approx(predicted.tolist())
    assert sum(b["exams"] for b in curve) == 28

    threshold = version["at_model_threshold"]
    assert threshold["threshold"] == active.recall_threshold
    recalled = scores >= active.recall_threshold
    assert threshold["recall_rate"] == pytest.approx(recalled.mean())
    assert threshold["sensitivity"] == pytest.approx(recalled[labels].mean())
    assert threshold["specificity"] == pytest.approx((~recalled[~labels]).mean())

    # Broken down by what the images carry: the vendor's exams name it, the others do not.
    manufacturers = version["by"]["manufacturer"]
    assert {name: group["exams"] for name, group in manufacturers.items()} == {
        "Synthetic Vendor": 14,
        "unknown": 14,
    }
    vendor = {s.study for s in site_exams[: 14 * 4]}
    vendor_keys = set(_truth_by_stored_key({s: truth[s] for s in vendor}, settings))
    in_vendor = np.array([study_of[i] in vendor_keys for i in ids])
    vendor_group = manufacturers["Synthetic Vendor"]
    assert vendor_group["malignant_exams"] == labels[in_vendor].sum()
    if min(labels[in_vendor].sum(), (~labels[in_vendor]).sum()) >= 2:
        expected = roc_auc_score(labels[in_vendor], scores[in_vendor])
        assert vendor_group["exam_auc"] == pytest.approx(expected, abs=1e-12)
    assert {views: group["exams"] for views, group in version["by"]["views"].items()} == {"4": 28}

    # The viewer draws the curves (SVG plots, not tables), for this tenant only.
    results.post("/viewer/login", data={"api_key": other_key}, follow_redirects=False)
    assert results.get(f"/viewer/evaluations/{evaluation_id}").status_code == 404
    results.post("/viewer/login", data={"api_key": key}, follow_redirects=False)
    page = results.get(f"/viewer/evaluations/{evaluation_id}")
    assert page.status_code == 200, page.text
    assert '<svg id="roc-plot"' in page.text
    assert '<svg id="calibration-plot"' in page.text
    drawn = page.text.split('class="roc" points="')[1].split('"')[0].split()
    assert len(drawn) == len(fpr)
    assert page.text.count('class="model-point"') == 1
    assert page.text.count('class="bin"') == len(curve)
    assert f"AUC {version['exam_auc']:.3f}" in page.text


def _truth_by_stored_key(truth: dict[str, bool], settings: Settings) -> dict[str, bool]:
    from shared.pseudonyms import pseudonymous_uid

    return {pseudonymous_uid(settings.patient_key_secret, study): m for study, m in truth.items()}


def test_a_candidate_is_scored_for_the_evaluation_only_and_compared_on_the_same_exams(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    site_exams: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    batch_id = _submit_and_screen(ingest, key, site_exams[:40], settings, session, store)
    _record_truth(ingest, key, site_exams[:40])
    active = active_model(session=session)
    assert active is not None
    # A candidate with the active version's weights: it has screened nothing, so the
    # evaluation scores every image itself, and must find what screening found.
    candidate = ModelVersion(
        name="candidate-same-weights",
        architecture=active.architecture,
        checkpoint_key=active.checkpoint_key,
        trained=active.trained,
        status=ModelStatus.CANDIDATE,
        recall_threshold=active.recall_threshold,
        calibration=active.calibration,
    )
    session.add(candidate)
    session.commit()
    predictions_before = session.scalar(select(func.count()).select_from(Prediction))

    figures = _evaluate(
        ingest,
        results,
        key,
        {"model_versions": [str(candidate.id), str(active.id)], "batch_ids": [batch_id]},
        settings,
        store,
    )
    first, second = figures["versions"]
    assert first["model_version"]["name"] == "candidate-same-weights"
    assert first["exam_auc"] == pytest.approx(second["exam_auc"], abs=1e-6)
    assert first["roc"]["tpr"] == pytest.approx(second["roc"]["tpr"])
    comparison = figures["comparison"]
    assert comparison["auc_difference"] == pytest.approx(0.0, abs=1e-6)
    assert comparison["auc_difference_ci95"] == pytest.approx([0.0, 0.0], abs=1e-6)
    # Its scores stayed in the evaluation: no prediction of it anywhere.
    assert session.scalar(select(func.count()).select_from(Prediction)) == predictions_before
    assert (
        session.scalar(
            select(func.count())
            .select_from(Prediction)
            .where(Prediction.model_version_id == candidate.id)
        )
        == 0
    )


def test_bad_evaluation_requests_get_clear_errors_and_queue_nothing(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    ensure_active_model(session=session, store=store, shipped=shipped_model_dir(settings))
    _, key = make_tenant(session)
    _, other_key = make_tenant(session)
    other_batch = ingest.post(
        "/v1/batches", json={"name": "theirs"}, headers=auth(other_key)
    ).json()
    queued = len(queued_task_args(settings, "training"))
    for body, status, code in (
        ({"batch_ids": [other_batch["id"]]}, 404, "batch_not_found"),
        ({"model_versions": ["01234567-89ab-7def-8123-456789abcdef"]}, 404, "model_not_found"),
        ({"outcomes_from": "2026-10-02", "outcomes_to": "2026-10-01"}, 422, "invalid_request"),
        ({"model_versions": [str(uuid.UUID(int=7))] * 2}, 422, "invalid_request"),
    ):
        answer = ingest.post("/v1/evaluations", json=body, headers=auth(key))
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    assert len(queued_task_args(settings, "training")) == queued

    # Exams with outcomes of one class only: the evaluation fails, saying what to do.
    batch = ingest.post("/v1/batches", json={"name": "normal only"}, headers=auth(key)).json()
    ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([s.path for s in exam]),
        headers=auth(key),
    )
    row = {
        "study_key": exam[0].study,
        "truth": "normal",
        "breast": "both",
        "source": "follow_up",
        "date": "2026-10-02",
    }
    ingest.post("/v1/outcomes", json={"outcomes": [row]}, headers=auth(key))
    asked = ingest.post(
        "/v1/evaluations", json={"batch_ids": [batch["id"]]}, headers=auth(key)
    ).json()
    assert run_evaluation(uuid.UUID(asked["id"]), settings=settings, store=store) == "failed"
    answer = results.get(f"/v1/evaluations/{asked['id']}", headers=auth(key)).json()
    assert answer["status"] == "failed"
    assert answer["error"]["code"] == "too_few_outcomes"
    assert "both malignant and non-malignant" in answer["error"]["message"]
    assert results.get(f"/v1/evaluations/{asked['id']}", headers=auth(other_key)).status_code == 404


def test_a_lost_evaluation_is_sent_again_by_the_sweep_and_fails_after_max_attempts(
    session: Session, settings: Settings
) -> None:
    tenant, _ = make_tenant(session)
    evaluation = Evaluation(tenant_id=tenant.id, model_version_ids=[uuid.UUID(int=1)])
    fresh = Evaluation(tenant_id=tenant.id, model_version_ids=[uuid.UUID(int=1)])
    session.add_all([evaluation, fresh])
    session.commit()
    later = utcnow() + timedelta(seconds=settings.training_stale_s + 1)
    producer = make_celery(settings)

    resent = resend_stalled_evaluations(
        session, producer, stale_s=settings.training_stale_s, max_attempts=2, now=later
    )
    assert resent == 2
    assert queued_task_args(settings, "training").count(str(evaluation.id)) == 1
    # Too soon again: nothing; stalled again with its attempts spent: failed, not resent.
    assert (
        resend_stalled_evaluations(
            session, producer, stale_s=settings.training_stale_s, max_attempts=2, now=later
        )
        == 0
    )
    session.execute(update(Evaluation).where(Evaluation.id == evaluation.id).values(attempts=2))
    session.commit()
    much_later = later + timedelta(seconds=settings.training_stale_s + 1)
    assert (
        resend_stalled_evaluations(
            session, producer, stale_s=settings.training_stale_s, max_attempts=2, now=much_later
        )
        == 1
    )
    session.refresh(evaluation)
    assert evaluation.status == TrainingStatus.FAILED
    assert evaluation.error_code == "evaluation_kept_failing"
    assert queued_task_args(settings, "training").count(str(evaluation.id)) == 1


def _recalls(results: TestClient, key: str, batch_id: str) -> dict[str, dict[str, Any]]:
    page = results.get(
        f"/v1/batches/{batch_id}/exams", params={"limit": 100}, headers=auth(key)
    ).json()["items"]
    return {exam["study_key"]: exam for exam in page}


def test_a_site_operating_point_changes_that_tenants_recalls_only_and_results_say_so(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    site_exams: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    _, other_key = make_tenant(session)
    batch_id = _submit_and_screen(ingest, key, site_exams, settings, session, store)
    other_batch = _submit_and_screen(ingest, other_key, site_exams, settings, session, store)
    truth = _truth_by_stored_key(_record_truth(ingest, key, site_exams), settings)
    _record_truth(ingest, other_key, site_exams)
    evaluation_id, evaluation = _evaluated(
        ingest, results, key, {"batch_ids": [batch_id]}, settings, store
    )
    active = active_model(session=session)
    assert active is not None
    model_threshold = active.recall_threshold
    assert model_threshold is not None

    chosen = ingest.put(
        f"/v1/models/{active.id}/operating-point",
        json={"evaluation_id": evaluation_id, "target": "sensitivity", "value": 1.0},
        headers=auth(key),
    )
    assert chosen.status_code == 200, chosen.text
    site_threshold = chosen.json()["threshold"]
    exams = _recalls(results, key, batch_id)
    # Every malignant exam recalled at the highest threshold that does so.
    malignant_scores = [e["exam_score"] for k, e in exams.items() if truth[k]]
    assert site_threshold == pytest.approx(min(malignant_scores))
    assert chosen.json()["on_evaluation"]["sensitivity"] == 1.0
    assert evaluation["versions"][0]["exams"] == len(exams)
    for exam in exams.values():
        assert exam["recall_threshold"] == pytest.approx(site_threshold)
        assert exam["threshold_source"] == "site"
        assert exam["recall"] == ("recall" if exam["exam_score"] >= site_threshold else "routine")
    # The other tenant, same exams, same version: the model's threshold still.
    theirs = _recalls(results, other_key, other_batch)
    for exam in theirs.values():
        assert (exam["recall_threshold"], exam["threshold_source"]) == (model_threshold, "model")
        assert exam["recall"] == ("recall" if exam["exam_score"] >= model_threshold else "routine")
    assert {k: e["recall"] for k, e in exams.items()} != {k: e["recall"] for k, e in theirs.items()}
    listed = results.get("/v1/operating-points", headers=auth(key)).json()["items"]
    assert [(p["model_version_id"], p["threshold"]) for p in listed] == [
        (str(active.id), site_threshold)
    ]
    assert results.get("/v1/operating-points", headers=auth(other_key)).json()["items"] == []

    # A recall-rate target: the most sensitive threshold within it.
    by_rate = ingest.put(
        f"/v1/models/{active.id}/operating-point",
        json={"evaluation_id": evaluation_id, "target": "recall_rate", "value": 0.25},
        headers=auth(key),
    ).json()
    scores = np.array([e["exam_score"] for e in exams.values()])
    assert (scores >= by_rate["threshold"]).mean() <= 0.25
    assert by_rate["on_evaluation"]["recall_rate"] == pytest.approx(
        (scores >= by_rate["threshold"]).mean()
    )
    assert (scores >= scores[scores < by_rate["threshold"]].max()).mean() > 0.25

    # Refusals: another tenant's evaluation, a version it did not measure, a target no
    # threshold meets; and clearing goes back to the model's threshold.
    for body, version, status, code in (
        (
            {"evaluation_id": evaluation_id, "target": "sensitivity", "value": 0.9},
            active.id,
            404,
            "evaluation_not_found",
        ),
        (
            {"evaluation_id": evaluation_id, "target": "recall_rate", "value": 0.001},
            active.id,
            422,
            "target_unreachable",
        ),
    ):
        who = other_key if code == "evaluation_not_found" else key
        answer = ingest.put(f"/v1/models/{version}/operating-point", json=body, headers=auth(who))
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code)
    cleared = ingest.delete(f"/v1/models/{active.id}/operating-point", headers=auth(key))
    assert cleared.status_code == 204
    assert {e["threshold_source"] for e in _recalls(results, key, batch_id).values()} == {"model"}
    again = ingest.delete(f"/v1/models/{active.id}/operating-point", headers=auth(key))
    assert again.json()["error"]["code"] == "operating_point_not_found"
