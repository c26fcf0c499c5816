from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.results.schemas import ExamsPage, ResultsPage
from shared.db.models import Laterality, View
from shared.lifecycle import claim_images, record_failure, record_prediction
from tests.factories import make_batch, make_image, make_model_version, make_tenant
from tests.helpers import auth


def test_results_page_through_every_image_exactly_once(
    results: TestClient, session: Session
) -> None:
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    images = [make_image(session, batch, study_key=f"s{i // 4}") for i in range(11)]
    version = make_model_version(session)
    claimed = claim_images(session=session, image_ids=[i.id for i in images[:6]], lease_s=60)
    for index, image in enumerate(claimed):
        record_prediction(
            session=session, image=image, model_version_id=version.id, score=index / 10
        )
    session.commit()

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = results.get(f"/v1/batches/{batch.id}/results", params=params, headers=auth(key))
        assert page.status_code == 200, page.text
        body = page.json()
        seen.extend(body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert [item["id"] for item in seen] == [str(i.id) for i in images]  # upload order
    scored = [item for item in seen if item["score"] is not None]
    assert len(scored) == 6
    assert {item["model_version"]["name"] for item in scored} == {version.name}
    assert all(item["status"] == "done" for item in scored)
    assert {item["status"] for item in seen[6:]} == {"queued"}
    required = {
        "id",
        "study_id",
        "laterality",
        "view",
        "status",
        "score",
        "error_code",
        "error_message",
        "model_version",
    }
    assert required <= set(seen[0])


def test_batch_detail_counts_and_untrained_warning(results: TestClient, session: Session) -> None:
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    images = [make_image(session, batch) for _ in range(3)]
    version = make_model_version(session, trained=False)
    first, second, _ = claim_images(session=session, image_ids=[i.id for i in images], lease_s=60)
    record_prediction(session=session, image=first, model_version_id=version.id, score=0.5)
    record_failure(session=session, image=second, code="decode_failed", message="bad pixels")
    session.commit()

    body = results.get(f"/v1/batches/{batch.id}", headers=auth(key)).json()
    assert body["counts"] == {"queued": 0, "running": 1, "done": 1, "failed": 1, "stored": 0}
    assert body["total_images"] == 3
    assert body["status"] == "open"
    assert [v["name"] for v in body["model_versions"]] == [version.name]
    assert any("untrained" in w for w in body["warnings"])

    failed = results.get(f"/v1/images/{second.id}", headers=auth(key)).json()
    assert (failed["status"], failed["error_code"], failed["score"]) == (
        "failed",
        "decode_failed",
        None,
    )


def test_trained_model_carries_no_untrained_warning(results: TestClient, session: Session) -> None:
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    (image,) = claim_images(session=session, image_ids=[make_image(session, batch).id], lease_s=60)
    record_prediction(
        session=session,
        image=image,
        model_version_id=make_model_version(session, trained=True).id,
        score=0.1,
    )
    session.commit()
    assert results.get(f"/v1/batches/{batch.id}", headers=auth(key)).json()["warnings"] == []


def test_batches_list_is_newest_first_and_paginated(results: TestClient, session: Session) -> None:
    tenant, key = make_tenant(session)
    for i in range(3):
        make_batch(session, tenant, name=f"b{i}")
    first = results.get("/v1/batches", params={"limit": 2}, headers=auth(key)).json()
    assert [b["name"] for b in first["items"]] == ["b2", "b1"]
    rest = results.get(
        "/v1/batches", params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth(key)
    ).json()
    assert [b["name"] for b in rest["items"]] == ["b0"]
    assert rest["next_cursor"] is None


def test_every_route_hides_another_tenants_rows(results: TestClient, session: Session) -> None:
    owner, owner_key = make_tenant(session)
    _, other_key = make_tenant(session)
    batch = make_batch(session, owner)
    image = make_image(session, batch)
    for path, code in (
        (f"/v1/batches/{batch.id}", "batch_not_found"),
        (f"/v1/batches/{batch.id}/results", "batch_not_found"),
        (f"/v1/batches/{batch.id}/exams", "batch_not_found"),
        (f"/v1/batches/{batch.id}/export", "batch_not_found"),
        (f"/v1/images/{image.id}", "image_not_found"),
    ):
        response = results.get(path, headers=auth(other_key))
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == code
    assert results.get("/v1/batches", headers=auth(other_key)).json()["items"] == []
    # The owner's pages hold the image: the 404s above are not those of an empty batch.
    for page in ("results", "exams"):
        owned = results.get(f"/v1/batches/{batch.id}/{page}", headers=auth(owner_key))
        assert len(owned.json()["items"]) == 1, page


def test_no_key_is_401_and_bad_cursor_is_422(results: TestClient, session: Session) -> None:
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    assert results.get(f"/v1/batches/{batch.id}").status_code == 401
    for cursor in ("garbage", "WyJub3QtYS11dWlkIl0"):
        response = results.get(
            f"/v1/batches/{batch.id}/results", params={"cursor": cursor}, headers=auth(key)
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_cursor"
    too_big = results.get(
        f"/v1/batches/{batch.id}/results", params={"limit": 10_000}, headers=auth(key)
    )
    assert too_big.status_code == 422


def test_pages_written_from_plain_data_are_exactly_what_their_models_say(
    results: TestClient, session: Session
) -> None:
    """Results and exams pages are serialized without building their models: each must
    still validate as its model and come out of it unchanged (every field, JSON types)."""
    tenant, key = make_tenant(session)
    batch = make_batch(session, tenant)
    calibrated = make_model_version(session, trained=True)
    calibrated.recall_threshold, calibrated.calibration = 0.3, {"a": 1.2, "b": -0.4}
    session.commit()
    views = [(Laterality.LEFT, View.CC), (Laterality.LEFT, View.MLO), (Laterality.RIGHT, View.CC)]
    scored = [make_image(session, batch, study_key="a", laterality=lat, view=v) for lat, v in views]
    failed = make_image(session, batch, study_key="b")
    make_image(session, batch, study_key="b", laterality=None, view=None)  # queued, no view
    claimed = claim_images(session=session, image_ids=[i.id for i in [*scored, failed]], lease_s=60)
    for image in claimed:
        if image.id == failed.id:
            record_failure(session=session, image=image, code="decode_failed", message="bad")
        else:
            record_prediction(
                session=session,
                image=image,
                model_version_id=calibrated.id,
                score=0.2 if image.laterality == Laterality.LEFT else 0.6,
                heatmap_key=f"heatmaps/{image.id}.png",
                warnings=["input_unlike_training_data"] if image.view == View.MLO else [],
                input_distance=1.5,
            )
    session.commit()

    exams = results.get(f"/v1/batches/{batch.id}/exams", headers=auth(key))
    images = results.get(f"/v1/batches/{batch.id}/results", headers=auth(key))
    assert exams.status_code == images.status_code == 200, (exams.text, images.text)
    for page, model in ((exams.json(), ExamsPage), (images.json(), ResultsPage)):
        assert model.model_validate(page).model_dump(mode="json") == page
    first, second = exams.json()["items"]
    assert first["recall"] == "recall"
    assert first["breasts"][1] == {
        "laterality": "R",
        "score": 0.6,
        "views": ["CC"],
    }
    assert first["warnings"] == ["input_unlike_training_data"]
    assert first["model_version"]["name"] == calibrated.name
    assert second["exam_score"] is None
    assert second["model_version"] is None
    assert [i["status"] for i in second["images"]] == ["failed", "queued"]
    assert {i["status"] for i in images.json()["items"]} == {"done", "failed", "queued"}
