"""Shadow mode: a candidate scores every image screened after it went into shadow, in the
trainer's loop, its scores kept apart: never in results, exams, exports or webhooks; shown
only to evaluations and the agreement view (checked against scipy's Spearman)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from scipy.stats import spearmanr
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage, SynthOptions, generate_exams
from services.worker.shadow import shadow_round
from shared.config import Settings
from shared.db.models import (
    Image,
    Prediction,
    ShadowScore,
    WebhookDelivery,
)
from shared.evaluations import existing_scores
from shared.ml.registry import (
    RegistryError,
    active_model,
    ensure_active_model,
    set_shadow,
    shipped_model_dir,
)
from shared.scores import ViewScore, breast_scores, exam_score
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, files_field, screen_everything, shadow_of_active

SMALL = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)


def test_a_shadow_version_scores_new_images_apart_and_shows_only_in_the_agreement_view(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
    tmp_path: Path,
) -> None:
    ensure_active_model(session=session, store=store, shipped=shipped_model_dir(settings))
    session.commit()
    active = active_model(session=session)
    assert active is not None
    _, key = make_tenant(session)
    before = ingest.post("/v1/batches", json={"name": "before shadow"}, headers=auth(key)).json()
    ingest.post(
        f"/v1/batches/{before['id']}/images",
        files=files_field([s.path for s in exam]),
        headers=auth(key),
    )
    screen_everything(session, settings, store)

    shadow = shadow_of_active(session, store, noise=0.05)
    with pytest.raises(RegistryError):
        set_shadow(session=session, version=active, actor="operator:test")
    session.rollback()
    set_shadow(session=session, version=shadow, actor="operator:test")
    session.commit()
    images = generate_exams(tmp_path / "after", exams=6, seed=91, options=SMALL)
    batch = ingest.post(
        "/v1/batches",
        json={"name": "after shadow", "callback_url": "https://site.example/hook"},
        headers=auth(key),
    ).json()
    ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in images]),
        headers=auth(key),
    )
    ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(key))
    screen_everything(session, settings, store)

    # The trainer's loop scores what was screened since, once; nothing from before.
    assert shadow_round(settings, store, limit=16) == 16
    assert shadow_round(settings, store, limit=16) == 8
    assert shadow_round(settings, store) == 0
    shadowed = dict(
        session.execute(
            select(ShadowScore.image_id, ShadowScore.score).where(
                ShadowScore.model_version_id == shadow.id
            )
        ).all()
    )
    after_ids = set(
        session.scalars(select(Image.id).where(Image.batch_id == uuid.UUID(batch["id"])))
    )
    assert set(shadowed) == after_ids
    active_scores = dict(
        session.execute(
            select(Prediction.image_id, Prediction.malignancy_score).where(
                Prediction.image_id.in_(after_ids)
            )
        ).all()
    )
    # Its own weights: scores unlike the active version's.
    assert all(abs(shadowed[i] - active_scores[i]) > 1e-6 for i in after_ids)

    # Nowhere in what the tenant sees: no prediction, and results, exams, export and the
    # webhook show the active version only.
    assert (
        session.scalar(
            select(func.count())
            .select_from(Prediction)
            .where(Prediction.model_version_id == shadow.id)
        )
        == 0
    )
    page = results.get(f"/v1/batches/{batch['id']}/results", headers=auth(key)).json()["items"]
    assert {item["model_version"]["name"] for item in page} == {active.name}
    assert {item["id"]: item["score"] for item in page} == {
        str(i): pytest.approx(s) for i, s in active_scores.items()
    }
    exams = results.get(f"/v1/batches/{batch['id']}/exams", headers=auth(key)).json()["items"]
    assert {e["model_version"]["name"] for e in exams} == {active.name}
    export = results.get(f"/v1/batches/{batch['id']}/export", headers=auth(key)).text
    status = results.get(f"/v1/batches/{batch['id']}", headers=auth(key)).text
    (hook,) = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.batch_id == uuid.UUID(batch["id"]))
    ).all()
    for shown in (export, status, str(page), str(exams), str(hook.payload)):
        assert shadow.name not in shown
        assert str(shadow.id) not in shown

    # The agreement view, before any outcome: Spearman as scipy computes it.
    agreement = results.get(f"/v1/models/{shadow.id}/shadow", headers=auth(key))
    assert agreement.status_code == 200, agreement.text
    figures = agreement.json()
    assert figures["exams"] == len(exams) == 6
    by_exam_active = sorted((e["id"], e["exam_score"]) for e in exams)
    shadow_exam = {
        e["id"]: exam_score(
            breast_scores(
                ViewScore(i["laterality"], i["view"], shadowed[uuid.UUID(i["id"])])
                for i in e["images"]
            )
        )
        for e in exams
    }
    expected = spearmanr(
        [s for _, s in by_exam_active], [shadow_exam[i] for i, _ in by_exam_active]
    )
    assert figures["rank_correlation"] == pytest.approx(expected.statistic)
    recalls = figures["recall_agreement"]
    assert (
        recalls["both_recall"]
        + recalls["active_only"]
        + recalls["shadow_only"]
        + recalls["neither"]
        == 6
    )
    # Another tenant has no exams both scored.
    _, other_key = make_tenant(session)
    assert (
        results.get(f"/v1/models/{shadow.id}/shadow", headers=auth(other_key)).json()["exams"] == 0
    )

    # Evaluations read the shadow scores instead of scoring again.
    assert existing_scores(session, sorted(after_ids), shadow.id) == pytest.approx(
        {i: shadowed[i] for i in after_ids}
    )
    # Promoting it ends shadow mode; off, nothing more is scored.
    set_shadow(session=session, version=None, actor="operator:test")
    session.commit()
    session.refresh(shadow)
    assert shadow.shadow_since is None
