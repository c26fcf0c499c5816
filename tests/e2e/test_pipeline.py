"""The whole pipeline as real processes: uvicorn (ingest, results) and a Celery worker."""

from __future__ import annotations

import signal
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.servers import pid_alive
from devstack.stack import StackState, down, kill_service, start_service_again, up
from devstack.synth import DEMO_VARIANTS, SynthImage, SynthOptions, generate_exams
from mammoscreen_client import ApiClientError, Client
from shared.config import Settings
from shared.db.models import Image, ImageStatus, Prediction, ShadowScore
from shared.ml.registry import ensure_active_model, set_shadow, shipped_model_dir
from shared.storage import ObjectStore
from tests.factories import SMALL_SYNTH, make_tenant
from tests.helpers import shadow_of_active

pytestmark = pytest.mark.e2e


def test_exam_uploaded_over_http_is_screened_and_scores_land_in_postgres(
    stack: StackState, session: Session, exam: list[SynthImage], tmp_path: Path
) -> None:
    env = stack.env
    with Client.from_env(env) as client:
        batch = client.create_batch("e2e")
        upload = client.upload(batch["id"], [i.path for i in exam])
        assert len(upload["accepted"]) == 4
        client.close_batch(batch["id"])
        status = client.wait(batch["id"], timeout=180, poll=0.5)
        rows = list(client.iter_results(batch["id"], page_size=3))

    assert status["counts"] == {"queued": 0, "running": 0, "done": 4, "failed": 0, "stored": 0}
    assert status["completed_at"] is not None
    assert len(rows) == 4
    api_scores = {row["id"]: row["score"] for row in rows}

    images = session.scalars(select(Image)).all()
    assert {str(i.id) for i in images} == set(api_scores)
    assert {i.status for i in images} == {ImageStatus.DONE}
    predictions = session.scalars(select(Prediction)).all()
    assert len(predictions) == 4
    assert {str(p.image_id): p.malignancy_score for p in predictions} == api_scores

    # Another tenant sees nothing of it; no key gets 401.
    _, other_key = make_tenant(session)
    with (
        Client(
            ingest_url=env["SCREENING_INGEST_URL"],
            results_url=env["SCREENING_RESULTS_URL"],
            api_key=other_key,
        ) as other,
        pytest.raises(ApiClientError) as caught,
    ):
        other.batch(batch["id"])
    assert (caught.value.status, caught.value.code) == (404, "batch_not_found")
    anonymous = httpx.get(f"{env['SCREENING_RESULTS_URL']}/v1/batches/{batch['id']}")
    assert anonymous.status_code == 401


def test_up_is_idempotent_and_down_stops_every_process(stack: StackState, tmp_path: Path) -> None:
    again = up(tmp_path / "stack")
    assert again.services == stack.services
    assert all(pid_alive(pid) for pid in stack.pids())
    env_file = (tmp_path / "stack" / "env").read_text()
    assert env_file.count("export SCREENING_") == 14
    assert "export SCREENING_VAULT_KEY_FILE=" in env_file
    for name in ("SCREENING_DICOM_HOST", "SCREENING_DICOM_PORT", "SCREENING_DICOM_AE_TITLE"):
        assert f"export {name}=" in env_file
    assert down(tmp_path / "stack") == []
    assert not any(pid_alive(pid) for pid in stack.pids())
    assert not (tmp_path / "stack" / "state.json").exists()


def test_the_demo_mix_of_vendor_encodings_is_screened_by_the_real_worker(
    stack: StackState, tmp_path: Path
) -> None:
    """MONOCHROME1, JPEG 2000, grey background with a burnt-in label: as `make demo` sends."""
    small = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
    images = generate_exams(tmp_path, exams=4, seed=12, options=small, variants=DEMO_VARIANTS)
    with Client.from_env(stack.env) as client:
        batch = client.create_batch("demo mix")
        upload = client.upload(batch["id"], [i.path for i in images])
        assert upload["rejected"] == []
        client.close_batch(batch["id"])
        status = client.wait(batch["id"], timeout=180, poll=0.5)
    assert status["counts"] == {"queued": 0, "running": 0, "done": 16, "failed": 0, "stored": 0}


def test_an_idle_worker_serves_urgent_tasks_before_bulk_ones_queued_earlier(
    stack: StackState, session: Session, settings: Settings, store: ObjectStore, tmp_path: Path
) -> None:
    # A version in shadow mode the whole time: the trainer's loop scores every screened
    # image after the active version, and the urgent lane does not notice.
    ensure_active_model(session=session, store=store, shipped=shipped_model_dir(settings))
    session.commit()
    shadow = shadow_of_active(session, store, noise=0.05)
    set_shadow(session=session, version=shadow, actor="operator:test")
    session.commit()
    bulk_paths = [
        i.path for i in generate_exams(tmp_path / "bulk", exams=3, seed=31, options=SMALL_SYNTH)
    ]
    urgent_paths = [
        i.path for i in generate_exams(tmp_path / "urgent", exams=1, seed=32, options=SMALL_SYNTH)
    ]
    kill_service(tmp_path / "stack", "worker", signal.SIGTERM)
    with Client.from_env(stack.env) as client:
        bulk = client.create_batch("bulk")
        client.upload(bulk["id"], bulk_paths)  # 12 images: 4 tasks of 3 on the bulk queue
        client.close_batch(bulk["id"])
        urgent = client.create_batch("urgent", priority="urgent")
        client.upload(urgent["id"], urgent_paths)  # then 2 tasks on the urgent queue
        client.close_batch(urgent["id"])
        # Each task screens only its own images, so the order of screening is the order in
        # which the worker took the tasks off the broker.
        start_service_again(
            tmp_path / "stack", "worker", overrides={"SCREENING_WORKER_CLAIM_QUEUED": "false"}
        )
        for batch in (urgent, bulk):
            assert client.wait(batch["id"], timeout=180, poll=0.5)["status"] == "completed"

    def started(batch_id: str) -> list[datetime]:
        query = select(Image.started_at).where(Image.batch_id == uuid.UUID(batch_id))
        return [t for t in session.scalars(query) if t is not None]

    assert len(started(urgent["id"])) == 4
    assert len(started(bulk["id"])) == 12
    assert max(started(urgent["id"])) < min(started(bulk["id"]))

    def shadowed() -> list[tuple[datetime, datetime | None]]:
        query = (
            select(ShadowScore.created_at, Image.finished_at)
            .join(Image, Image.id == ShadowScore.image_id)
            .where(ShadowScore.model_version_id == shadow.id)
        )
        return [(made, finished) for made, finished in session.execute(query)]

    deadline = time.monotonic() + 120
    while len(shadowed()) < 16 and time.monotonic() < deadline:
        time.sleep(0.5)
    scores = shadowed()
    assert len(scores) == 16  # every screened image, by the trainer's shadow loop
    assert all(finished is not None and made >= finished for made, finished in scores)
