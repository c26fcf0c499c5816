from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pydicom
import pytest
import urllib3
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from services.worker.inference import TRANSIENT_ERRORS, WorkerContext, run_screening
from services.worker.models import ModelCache
from shared.config import Settings
from shared.db.base import session_scope
from shared.db.models import BatchStatus, Image, ImageStatus, ModelVersion, Prediction
from shared.lifecycle import close_batch, expire_leases
from shared.ml.registry import REPO_ROOT
from shared.storage import Keys, ObjectStore
from tests.factories import make_batch, make_image, make_stored_image, make_tenant


@pytest.fixture
def ctx(settings: Settings, store: ObjectStore) -> WorkerContext:
    return WorkerContext(settings, store, ModelCache(settings, store))


def _stored_exam(
    session: Session,
    store: ObjectStore,
    exam: list[SynthImage],
    batch: object,
) -> list[Image]:
    return [make_stored_image(session, store, batch, s.path.read_bytes()) for s in exam]  # type: ignore[arg-type]


def test_chunk_is_screened_in_one_pass_and_the_batch_completes(
    ctx: WorkerContext, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    images = _stored_exam(session, store, exam, batch)
    close_batch(session=session, batch=batch)
    session.commit()

    outcome = run_screening([i.id for i in images], ctx)

    assert outcome == {"done": 4, "failed": 0}
    session.expire_all()
    assert {i.status for i in session.scalars(select(Image))} == {ImageStatus.DONE}
    predictions = session.scalars(select(Prediction)).all()
    assert len(predictions) == 4
    assert all(0.0 < p.malignancy_score < 1.0 for p in predictions)
    (version,) = session.scalars(select(ModelVersion)).all()
    assert {p.model_version_id for p in predictions} == {version.id}
    # With none active, the worker registers the model shipped in the repository.
    assert version.trained is True
    assert (
        version.name
        == json.loads((REPO_ROOT / "models/screening-synthetic/version.json").read_text())["name"]
    )
    assert all(p.heatmap_key for p in predictions)
    session.refresh(batch)
    assert batch.status == BatchStatus.COMPLETED


def test_bad_images_fail_with_codes_and_the_rest_are_screened(
    ctx: WorkerContext, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    tenant, _ = make_tenant(session)
    batch = make_batch(session, tenant)
    good = _stored_exam(session, store, exam[:2], batch)
    store.put_bytes(
        "test/garbage", b"\x00" * 128 + b"DICM" + b"\xff" * 64, content_type="application/dicom"
    )
    corrupt = make_image(session, batch, object_key="test/garbage")
    missing = make_image(session, batch, object_key="test/never-uploaded")

    outcome = run_screening([i.id for i in (*good, corrupt, missing)], ctx)

    assert outcome == {"done": 2, "failed": 2}
    session.expire_all()
    failed = {
        i.id: i for i in session.scalars(select(Image).where(Image.status == ImageStatus.FAILED))
    }
    assert failed[corrupt.id].error_code == "decode_failed"
    assert failed[missing.id].error_code == "object_missing"
    assert all(i.error_message for i in failed.values())
    assert all(i.attempts == 1 for i in failed.values())  # never retried


def test_redelivered_chunk_changes_nothing(
    ctx: WorkerContext, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    tenant, _ = make_tenant(session)
    images = _stored_exam(session, store, exam, make_batch(session, tenant))
    ids = [i.id for i in images]
    run_screening(ids, ctx)
    assert run_screening(ids, ctx) == {"done": 0, "failed": 0}
    assert session.scalar(select(func.count()).select_from(Prediction)) == 4


def test_storage_outage_is_transient_and_a_later_attempt_completes(
    ctx: WorkerContext,
    settings: Settings,
    session: Session,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    tenant, _ = make_tenant(session)
    images = _stored_exam(session, store, exam[:1], make_batch(session, tenant))
    ids = [i.id for i in images]
    ctx.models.get(_active_version(ctx, session))  # model already cached, as in a warm worker
    down = settings.model_copy(update={"s3_endpoint": "http://127.0.0.1:1"})
    # No connection retries, so the outage surfaces at once instead of after minio's backoff.
    down_store = ObjectStore(down, http_client=urllib3.PoolManager(retries=0, timeout=2))
    with pytest.raises(TRANSIENT_ERRORS):
        run_screening(ids, WorkerContext(settings, down_store, ctx.models))
    session.expire_all()
    released = session.get(Image, ids[0])
    assert released is not None
    assert (released.status, released.lease_expires_at) == (ImageStatus.QUEUED, None)

    assert run_screening(ids, ctx) == {"done": 1, "failed": 0}
    session.expire_all()
    image = session.get(Image, ids[0])
    assert image is not None
    assert (image.status, image.attempts) == (ImageStatus.DONE, 2)


def _active_version(ctx: WorkerContext, session: Session) -> ModelVersion:
    from shared.ml.registry import ensure_active_model

    version = ensure_active_model(session=session, store=ctx.store)
    session.commit()
    return version


def test_model_is_loaded_once_per_version(ctx: WorkerContext, session: Session) -> None:
    version = _active_version(ctx, session)
    assert ctx.models.get(version) is ctx.models.get(version)


def test_truncated_pixel_data_fails_with_its_code_and_is_not_retried(
    ctx: WorkerContext, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    data = exam[0].path.read_bytes()
    truncated = data[: len(data) // 2]  # header intact, half the pixel data gone
    store.put_bytes("test/truncated", truncated, content_type="application/dicom")
    tenant, _ = make_tenant(session)
    image = make_image(session, make_batch(session, tenant), object_key="test/truncated")

    assert run_screening([image.id], ctx) == {"done": 0, "failed": 1}
    session.expire_all()
    failed = session.get(Image, image.id)
    assert failed is not None
    assert (failed.status, failed.error_code, failed.attempts) == (
        ImageStatus.FAILED,
        "decode_failed",
        1,
    )


def test_a_mammogram_with_nothing_but_background_fails_as_empty_breast_region(
    ctx: WorkerContext, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    """Passes every header check, decodes fine, and has no breast: a code, not a crash."""
    ds = pydicom.dcmread(exam[0].path)
    rng = np.random.default_rng(0)
    noise = rng.normal(2000, 30, (int(ds.Rows), int(ds.Columns)))
    noise[3, 3] = 9000  # one hot pixel, so the image is not blank
    ds.PixelData = np.clip(noise, 0, 16383).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer)
    store.put_bytes("test/background", buffer.getvalue(), content_type="application/dicom")
    tenant, _ = make_tenant(session)
    image = make_image(session, make_batch(session, tenant), object_key="test/background")

    assert run_screening([image.id], ctx) == {"done": 0, "failed": 1}
    session.expire_all()
    failed = session.get(Image, image.id)
    assert failed is not None
    assert (failed.status, failed.error_code) == (ImageStatus.FAILED, "empty_breast_region")


def test_screening_stores_each_images_preview_heatmap_and_overlay_once(
    ctx: WorkerContext, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    tenant, _ = make_tenant(session)
    images = _stored_exam(session, store, exam, make_batch(session, tenant))

    run_screening([i.id for i in images], ctx)

    for image, synth in zip(images, exam, strict=True):
        prediction = session.scalars(
            select(Prediction).where(Prediction.image_id == image.id)
        ).one()
        assert prediction.heatmap_key == Keys.heatmap(image.id, prediction.model_version_id)
        grey = PILImage.open(io.BytesIO(store.get_bytes(prediction.heatmap_key)))
        overlay_key = Keys.heatmap_overlay(image.id, prediction.model_version_id)
        overlay = PILImage.open(io.BytesIO(store.get_bytes(overlay_key)))
        preview = PILImage.open(io.BytesIO(store.get_bytes(Keys.preview(image.id))))
        header = pydicom.dcmread(synth.path, stop_before_pixels=True)
        quarter = (header.Columns // 4, header.Rows // 4)
        assert (grey.mode, grey.size) == ("L", quarter)
        assert (overlay.mode, overlay.size) == ("RGBA", quarter)
        assert (preview.mode, preview.size) == ("L", quarter)
        # The overlay is drawn from the very values of the stored greyscale map: transparent
        # wherever the map is at or below one half.
        heat = np.asarray(grey)
        alpha = np.asarray(overlay)[..., 3]
        assert np.all(alpha[heat <= 127] == 0)
        assert np.all(alpha[heat >= 140] > 0)


class _SlowStore(ObjectStore):
    """Reading an image takes `delay_s`: a task that works twice its lease."""

    delay_s = 4.0

    def get_bytes(self, key: str) -> bytes:
        time.sleep(self.delay_s)
        return super().get_bytes(key)


def test_a_task_keeps_its_images_while_it_works_longer_than_its_lease(
    ctx: WorkerContext,
    settings: Settings,
    session: Session,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    """The lease is renewed while the task works (services/worker/leases.py): a sweeper
    running all along never takes the images back, however short the lease."""
    tenant, _ = make_tenant(session)
    images = _stored_exam(session, store, exam[:2], make_batch(session, tenant))
    ctx.models.get(_active_version(ctx, session))  # model cached, as in a warm worker
    # Two seconds, not one: the keeper renews every half second, so only a stall of the whole
    # process longer than 1.5 s could lose the images (a loaded CI machine lost them at 1 s).
    short = settings.model_copy(update={"lease_s": 2.0})
    requeued: list[int] = []
    stop = threading.Event()

    def sweeper() -> None:
        while not stop.wait(0.2):
            with session_scope(settings.database_url) as sweeping:
                requeued.append(expire_leases(session=sweeping, max_attempts=5, limit=100)[0])

    sweeping_thread = threading.Thread(target=sweeper)
    sweeping_thread.start()
    try:
        outcome = run_screening(
            [i.id for i in images], WorkerContext(short, _SlowStore(short), ctx.models)
        )
    finally:
        stop.set()
        sweeping_thread.join()
    assert len(requeued) > 10  # the sweeper ran through the whole task
    assert sum(requeued) == 0
    assert outcome == {"done": 2, "failed": 0}
    session.expire_all()
    assert {(i.status, i.attempts) for i in session.scalars(select(Image))} == {
        (ImageStatus.DONE, 1)
    }
