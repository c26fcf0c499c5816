"""/metrics on the web services after a real batch: every series the operators need."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from shared.config import Settings
from shared.db.models import Image
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth, screen_everything, upload_batch


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[name, tuple(sorted(labels.items()))]


def test_metrics_after_a_batch(
    ingest: TestClient,
    results: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    _, key = make_tenant(session)
    batch, _ = upload_batch(ingest, key, [s.path for s in exam], name="metrics")
    assert ingest.get("/v1/nothing-here", headers=auth(key)).status_code == 404
    # One image's object disappears before screening: it fails with object_missing.
    lost = session.scalars(select(Image).order_by(Image.id)).first()
    assert lost is not None
    store.delete(lost.object_key)
    before = scrape(results)
    assert value(before, "screening_queue_depth", queue="inference") == 1  # one task of 4 ids
    assert value(before, "screening_images", status="queued") == 4
    screen_everything(session, settings, store)
    results.get(f"/v1/batches/{batch['id']}", headers=auth(key))

    ingest_samples = scrape(ingest)
    posted = value(
        ingest_samples,
        "screening_http_requests_total",
        service="ingest",
        method="POST",
        route="/v1/batches/{batch_id}/images",
        status="202",
    )
    assert posted == 1
    assert (
        value(
            ingest_samples,
            "screening_http_requests_total",
            service="ingest",
            method="GET",
            route="unmatched",
            status="404",
        )
        == 1
    )
    latency_count = value(
        ingest_samples,
        "screening_http_request_duration_seconds_count",
        service="ingest",
        method="POST",
        route="/v1/batches/{batch_id}/images",
    )
    assert latency_count == 1

    samples = scrape(results)
    assert value(samples, "screening_images", status="done") == 3
    assert value(samples, "screening_images_screened_total") == 3
    assert value(samples, "screening_image_failures_total", code="object_missing") == 1
    assert value(samples, "screening_forward_passes_total") >= 1
    assert value(samples, "screening_inference_batch_size_sum") == 3
    assert value(samples, "screening_inference_seconds_count") >= 1
    assert value(samples, "screening_inference_seconds_sum") > 0
    assert value(samples, "screening_queue_depth", queue="training") == 0
    assert (
        value(
            samples,
            "screening_http_requests_total",
            service="results",
            method="GET",
            route="/v1/batches/{batch_id}",
            status="200",
        )
        == 1
    )
