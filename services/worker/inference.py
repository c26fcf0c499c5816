"""Inference: screen a chunk of images in one batched forward pass."""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from celery import Task
from minio.error import S3Error
from sqlalchemy import select
from sqlalchemy.exc import OperationalError as DatabaseError
from urllib3.exceptions import HTTPError as StorageConnectionError

from services.worker.celery_app import app
from services.worker.models import LoadedModel, ModelCache
from shared.batches import (
    claim_images,
    record_failure,
    record_prediction,
    refresh_batches,
    release_images,
)
from shared.config import Settings, get_settings
from shared.db.base import session_scope
from shared.db.models import Image, ImageStatus, Laterality, ModelVersion
from shared.imaging.decode import decode_image
from shared.imaging.formats import ImageRejected, RejectCode
from shared.imaging.preprocess import Preprocess
from shared.ml.registry import ensure_active_model
from shared.queue import Queue, TaskName
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

# Failures of a dependency that may succeed on a later attempt. Anything about the image
# itself (cannot be decoded, object missing) fails that image at once and is never retried.
TRANSIENT_ERRORS = (StorageConnectionError, DatabaseError, ConnectionError, TimeoutError)
MAX_RETRIES = 6
OBJECT_MISSING_CODES = ("NoSuchKey", "NoSuchObject")


@dataclass(frozen=True)
class WorkItem:
    id: uuid.UUID
    object_key: str
    media_type: str
    laterality: Laterality | None


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    store: ObjectStore
    models: ModelCache


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    """Built once per worker process, on its first task."""
    settings = get_settings()
    store = ObjectStore(settings)
    return WorkerContext(settings, store, ModelCache(settings, store))


def backoff_seconds(retries: int) -> float:
    """Exponential backoff with full jitter: 1, 2, 4 ... seconds, capped at 60."""
    return random.uniform(0.5, 1.0) * min(60.0, 2.0**retries)


@app.task(
    name=TaskName.SCREEN_IMAGES.value,
    queue=Queue.INFERENCE.value,
    bind=True,
    acks_late=True,
    max_retries=MAX_RETRIES,
)
def screen_images(self: Task, image_ids: list[str]) -> dict[str, int]:
    ids = [uuid.UUID(i) for i in image_ids]
    try:
        return run_screening(ids, worker_context())
    except TRANSIENT_ERRORS as err:
        if self.request.retries >= MAX_RETRIES:
            log.error("giving up on %d images after %d retries: %s", len(ids), MAX_RETRIES, err)
            fail_unfinished(
                ids,
                database_url=get_settings().database_url,
                code=RejectCode.DEPENDENCY_UNAVAILABLE.value,
                message=f"a dependency stayed unavailable after {MAX_RETRIES} "
                f"retries: {type(err).__name__}",
            )
            return {"done": 0, "failed": len(ids)}
        countdown = backoff_seconds(self.request.retries)
        log.warning(
            "transient failure (%s); retry %d in %.1fs", err, self.request.retries + 1, countdown
        )
        raise self.retry(exc=err, countdown=countdown) from err


def run_screening(image_ids: list[uuid.UUID], ctx: WorkerContext) -> dict[str, int]:
    with session_scope(ctx.settings.database_url) as session:
        claimed = claim_images(session=session, image_ids=image_ids, lease_s=ctx.settings.lease_s)
        items = [WorkItem(i.id, i.object_key, i.media_type, i.laterality) for i in claimed]
        version = ensure_active_model(session=session, store=ctx.store)
    if not items:
        return {"done": 0, "failed": 0}
    try:
        return _screen_claimed(items, version, ctx)
    except TRANSIENT_ERRORS:
        # Hand the claims back at once so the retry (or another worker) can take them,
        # rather than leaving them to wait for their lease to expire.
        try:
            with session_scope(ctx.settings.database_url) as session:
                release_images(session=session, image_ids=[i.id for i in items])
        except TRANSIENT_ERRORS:
            log.warning("could not release %d images; their leases will expire", len(items))
        raise


def _screen_claimed(
    items: list[WorkItem], version: ModelVersion, ctx: WorkerContext
) -> dict[str, int]:
    loaded = ctx.models.get(version)
    config = loaded.model.config
    preprocess = Preprocess(config.input_height, config.input_width)

    inputs: list[np.ndarray] = []
    ready: list[WorkItem] = []
    failures: dict[uuid.UUID, ImageRejected] = {}
    for item in items:
        try:
            data = ctx.store.get_bytes(item.object_key)
        except S3Error as err:
            if err.code not in OBJECT_MISSING_CODES:
                raise StorageConnectionError(str(err)) from err
            failures[item.id] = ImageRejected.missing_object(item.object_key)
            continue
        try:
            pixels = decode_image(data, item.media_type, max_pixels=ctx.settings.max_image_pixels)
            inputs.append(preprocess(pixels, item.laterality))
            ready.append(item)
        except ImageRejected as rejection:
            failures[item.id] = rejection

    scores = predict(loaded, inputs) if inputs else []
    with session_scope(ctx.settings.database_url) as session:
        ids = [item.id for item in items]
        rows = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_(ids)))}
        for item, score in zip(ready, scores, strict=True):
            record_prediction(
                session=session,
                image=rows[item.id],
                model_version_id=loaded.version_id,
                score=score,
            )
        for image_id, failure in failures.items():
            record_failure(
                session=session,
                image=rows[image_id],
                code=failure.code.value,
                message=failure.message,
            )
        refresh_batches(session=session, batch_ids=[r.batch_id for r in rows.values()])
    log.info("screened %d images, %d failed, model %s", len(ready), len(failures), loaded.name)
    return {"done": len(ready), "failed": len(failures)}


@torch.inference_mode()
def predict(loaded: LoadedModel, inputs: list[np.ndarray]) -> list[float]:
    """Malignancy probabilities for preprocessed (H, W) arrays, in one forward pass."""
    batch = torch.from_numpy(np.stack(inputs)[:, None]).to(loaded.device)  # (B, 1, H, W)
    logits = loaded.model(batch)  # (B,)
    return [float(p) for p in torch.sigmoid(logits).cpu()]


def fail_unfinished(
    image_ids: list[uuid.UUID], *, database_url: str, code: str, message: str
) -> None:
    """Last resort after retries: fail what is still running, so no image stays stuck."""
    with session_scope(database_url) as session:
        rows = list(
            session.scalars(
                select(Image).where(
                    Image.id.in_(image_ids),
                    Image.status.in_([ImageStatus.QUEUED, ImageStatus.RUNNING]),
                )
            )
        )
        for image in rows:
            image.status = ImageStatus.RUNNING  # the guarded transition starts from running
        session.flush()
        for image in rows:
            record_failure(session=session, image=image, code=code, message=message)
        refresh_batches(session=session, batch_ids=[r.batch_id for r in rows])
