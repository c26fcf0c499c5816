"""Inference: screen a chunk of images in one batched forward pass."""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from celery import Task
from celery.signals import worker_shutting_down
from minio.error import S3Error
from sqlalchemy import select
from sqlalchemy.exc import OperationalError as DatabaseError
from urllib3.exceptions import HTTPError as StorageConnectionError

from services.worker.celery_app import app
from services.worker.leases import LeaseKeeper
from services.worker.models import LoadedModel, ModelCache, inference_cpu_threads
from services.worker.pipeline import BatchPolicy, Prefetcher
from shared.config import Settings, get_settings
from shared.db.base import session_scope
from shared.db.models import Image, InferenceBatch, Laterality
from shared.imaging.decode import StoredPixels, read_pixels
from shared.imaging.formats import ImageRejected, RejectCode
from shared.imaging.preprocess import (
    INPUT_STATISTICS,
    InputBatch,
    InputGeometry,
    heatmap_on_image,
)
from shared.imaging.renders import PREVIEW_SHRINK, grey_png, heatmap_pngs
from shared.lifecycle import (
    abandon_images,
    claim_images,
    claim_next_images,
    record_failure,
    record_prediction,
    refresh_batches,
    release_images,
)
from shared.logs import log_context
from shared.ml.imported import preprocess_for
from shared.ml.input_reference import INPUT_UNLIKE_TRAINING_DATA
from shared.ml.registry import ensure_active_model, shipped_model_dir
from shared.queue import Queue, TaskName
from shared.storage import MISSING_OBJECT_CODES, Keys, ObjectStore

log = logging.getLogger(__name__)

# Failures of a dependency that may succeed on a later attempt. Anything about the image
# itself (cannot be decoded, object missing) fails that image at once and is never retried.
TRANSIENT_ERRORS = (StorageConnectionError, DatabaseError, ConnectionError, TimeoutError)
MAX_RETRIES = 6
# The input statistic kept with each prediction for the weekly drift summary (shared/drift.py).
BREAST_INTENSITY = list(INPUT_STATISTICS).index("breast_median")

# Set in the worker's main process when a warm shutdown begins; created at import, before the
# pool forks, so the pool's children share it and stop claiming more work.
SHUTTING_DOWN = multiprocessing.Event()


@worker_shutting_down.connect
def _stop_claiming(**_: object) -> None:
    SHUTTING_DOWN.set()


@dataclass(frozen=True)
class WorkItem:
    id: uuid.UUID
    object_key: str
    media_type: str
    laterality: Laterality | None


@dataclass(frozen=True)
class PreparedImage:
    """What a loader thread hands the model: the stored values with their grey table and
    where the input comes from. A GPU makes the inputs per batch from those; where the model
    runs on the CPU the loader makes this image's input too (`made`), so that the work stays
    on the loader threads, beside the forward pass, and not in front of it."""

    pixels: StoredPixels
    geometry: InputGeometry
    made: InputBatch | None = None


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
    models = ModelCache(settings, store)
    if models.device.type == "cpu":
        torch.set_num_threads(inference_cpu_threads(settings))
    return WorkerContext(settings, store, models)


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
        with log_context(task_id=self.request.id):
            return run_screening(ids, worker_context())
    except TRANSIENT_ERRORS as err:
        if self.request.retries >= MAX_RETRIES:
            log.error("giving up on %d images after %d retries: %s", len(ids), MAX_RETRIES, err)
            with session_scope(get_settings().database_url) as session:
                abandon_images(
                    session=session,
                    image_ids=ids,
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
        items = [_work_item(i) for i in claimed]
        version = ensure_active_model(
            session=session, store=ctx.store, shipped=shipped_model_dir(ctx.settings)
        )
    if not items:
        return {"done": 0, "failed": 0}
    # Held from the claim on: loading the model may take longer than a short lease.
    unfinished = {item.id: item for item in items}
    with LeaseKeeper(ctx.settings, unfinished.keys()):
        run = ScreeningRun(ctx, ctx.models.get(version), unfinished)
        return _screen_or_hand_back(run, items)


def _screen_or_hand_back(run: ScreeningRun, items: list[WorkItem]) -> dict[str, int]:
    ctx = run.ctx
    try:
        return run.screen(items)
    except TRANSIENT_ERRORS:
        # Hand the claims back at once so the retry (or another worker) can take them,
        # rather than leaving them to wait for their lease to expire.
        try:
            with session_scope(ctx.settings.database_url) as session:
                release_images(session=session, image_ids=list(run.unfinished))
        except TRANSIENT_ERRORS:
            log.warning(
                "could not release %d images; their leases will expire", len(run.unfinished)
            )
        raise


def _work_item(image: Image) -> WorkItem:
    return WorkItem(image.id, image.object_key, image.media_type, image.laterality)


class ScreeningRun:
    """One task's work: its own images, then (while it may) more queued work, urgent first.

    Images flow through loader threads into dynamic batches; each batch's results are written
    in one transaction. When the loaders run low, the run claims the next queued images from
    Postgres (urgent batches first, SKIP LOCKED), so one task keeps the model busy across the
    many small tasks of a bulk batch, and an urgent exam submitted behind a bulk batch is
    claimed by the running task within a batch or two. The images' own tasks, when they come,
    find nothing left to claim.
    """

    def __init__(
        self, ctx: WorkerContext, loaded: LoadedModel, unfinished: dict[uuid.UUID, WorkItem]
    ) -> None:
        self.ctx = ctx
        self.loaded = loaded
        self.preprocess = preprocess_for(loaded.model)
        self.policy = BatchPolicy(
            max_batch=ctx.settings.inference_batch_size,
            max_wait_s=ctx.settings.inference_max_wait_s,
        )
        # What it holds and has not recorded (its LeaseKeeper renews their leases).
        self.unfinished = unfinished
        self.started = time.monotonic()
        # Heatmap uploads of a batch run in parallel; the batch commits after they finish.
        self.writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="heatmap-writer")

    def prepare(self, item: WorkItem) -> PreparedImage:
        """Runs in a loader thread: read, parse, find the breast on a coarse view (the
        host's part of preprocessing). ImageRejected fails the image."""
        try:
            data = self.ctx.store.get_bytes(item.object_key)
        except S3Error as err:
            if err.code not in MISSING_OBJECT_CODES:
                raise StorageConnectionError(str(err)) from err
            raise ImageRejected.missing_object(item.object_key) from err
        pixels = read_pixels(data, item.media_type, max_pixels=self.ctx.settings.max_image_pixels)
        geometry = self.preprocess.place(pixels, item.laterality)
        if self.loaded.device.type != "cpu":
            return PreparedImage(pixels, geometry)
        return PreparedImage(pixels, geometry, self._make_inputs([(pixels, geometry)]))

    def _make_inputs(self, images: list[tuple[StoredPixels, InputGeometry]]) -> InputBatch:
        return self.preprocess.make_inputs(
            images,
            self.loaded.device,
            statistics=self.loaded.reference is not None,
            preview_shrink=PREVIEW_SHRINK,
        )

    def _may_claim_more(self) -> bool:
        settings = self.ctx.settings
        return (
            settings.worker_claim_queued
            and not SHUTTING_DOWN.is_set()
            and time.monotonic() - self.started < settings.worker_max_task_s
        )

    def _claim_more(self, loaders: Prefetcher[WorkItem, PreparedImage]) -> None:
        """Top the loaders up: any queued work when they run low, else urgent work only."""
        urgent_only = loaders.pending >= 2 * self.policy.max_batch
        with session_scope(self.ctx.settings.database_url) as session:
            claimed = claim_next_images(
                session=session,
                limit=self.policy.max_batch,
                lease_s=self.ctx.settings.lease_s,
                urgent_only=urgent_only,
            )
            urgent = [_work_item(i) for i, is_urgent in claimed if is_urgent]
            normal = [_work_item(i) for i, is_urgent in claimed if not is_urgent]
        self._feed(loaders, urgent, urgent=True)
        self._feed(loaders, normal)

    def screen(self, items: list[WorkItem]) -> dict[str, int]:
        totals = {"done": 0, "failed": 0}
        loaders = Prefetcher(self.prepare, threads=self.ctx.settings.worker_loader_threads)
        try:
            self._feed(loaders, items)
            while loaders.pending:
                # Keep about two batches in the loaders, so the next is ready when the
                # forward pass of this one ends; urgent work is taken at every batch.
                if self._may_claim_more():
                    self._claim_more(loaders)
                done, failed = self._screen_batch(loaders.next_batch(self.policy))
                totals["done"] += done
                totals["failed"] += failed
        finally:
            loaders.close()
            self.writers.shutdown(wait=True)
        return totals

    def _feed(
        self,
        loaders: Prefetcher[WorkItem, PreparedImage],
        items: list[WorkItem],
        *,
        urgent: bool = False,
    ) -> None:
        self.unfinished.update((item.id, item) for item in items)
        loaders.submit(items, urgent=urgent)

    def _forward(
        self, ready: list[tuple[WorkItem, PreparedImage]]
    ) -> tuple[list[float], list[str | None], list[np.ndarray | None]]:
        """Scores, the keys of the heatmaps written to object storage (when enabled), and
        each input's statistics (when the version has a reference to compare them with).

        The inputs, previews and statistics are made on the model's device from the stored
        values. Each image's preview, and its heatmap with the heatmap's colour overlay, are
        written now, while the pixels are at hand, so the results service only streams
        stored bytes.
        """
        if not ready:
            return [], [], []
        store = self.ctx.store
        version_id = self.loaded.version_id
        made = [prepared.made for _, prepared in ready if prepared.made is not None]
        if len(made) == len(ready):
            batch = InputBatch.joined(made)
        else:
            batch = self._make_inputs([(p.pixels, p.geometry) for _, p in ready])
        with_heatmaps = self.ctx.settings.worker_heatmaps and self.loaded.has_heatmaps
        if with_heatmaps:
            scores, maps = self.loaded.predictor.with_heatmaps(batch.inputs)
        else:
            scores = self.loaded.predictor(batch.inputs)

        def write(index: int) -> str | None:
            item, prepared = ready[index]
            preview = grey_png(batch.previews[index])
            store.put_bytes(Keys.preview(item.id), preview, content_type="image/png")
            if not with_heatmaps:
                return None
            grey, overlay = heatmap_pngs(heatmap_on_image(maps[index], prepared.geometry))
            overlay_key = Keys.heatmap_overlay(item.id, version_id)
            store.put_bytes(overlay_key, overlay, content_type="image/png")
            key = Keys.heatmap(item.id, version_id)
            store.put_bytes(key, grey, content_type="image/png")
            return key

        statistics: list[np.ndarray | None] = (
            list(batch.statistics) if batch.statistics is not None else [None] * len(ready)
        )
        return scores, list(self.writers.map(write, range(len(ready)))), statistics

    def _drop_what_erased_images_left(self, image_ids: list[uuid.UUID]) -> None:
        """Of the images whose result was not recorded, those whose row is gone were erased
        while this task screened them (shared/erasure.py): delete the preview and heatmaps
        written for them meanwhile, so the erasure stays complete. (An image that is there
        but was not recorded went back to the queue, and its next screening owns them.)"""
        with session_scope(self.ctx.settings.database_url) as session:
            alive = set(session.scalars(select(Image.id).where(Image.id.in_(image_ids))))
        erased = [image_id for image_id in image_ids if image_id not in alive]
        for image_id in erased:
            log.info(
                "image erased while it was screened; its result is dropped",
                extra={"image_id": image_id},
            )
        if erased:
            store = self.ctx.store
            heatmaps = store.list_keys_under([Keys.heatmaps_of(i) for i in erased])
            store.delete_many([*(Keys.preview(i) for i in erased), *heatmaps])

    def _input_check(self, statistics: np.ndarray | None) -> tuple[float | None, list[str]]:
        """The input's distance from the version's training inputs, and the warning when it
        is too far for the score to mean what the version's evaluation says."""
        reference = self.loaded.reference
        if reference is None or statistics is None:
            return None, []
        distance = reference.distance(statistics)
        return distance, [INPUT_UNLIKE_TRAINING_DATA] if reference.unlike(distance) else []

    def _screen_batch(
        self, batch: list[tuple[WorkItem, PreparedImage | BaseException]]
    ) -> tuple[int, int]:
        ready: list[tuple[WorkItem, PreparedImage]] = []
        failures: dict[uuid.UUID, ImageRejected] = {}
        for item, outcome in batch:
            if isinstance(outcome, ImageRejected):
                failures[item.id] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome  # a transient error: the caller hands back what is unfinished
            else:
                ready.append((item, outcome))
        started = time.perf_counter()
        scores, heatmap_keys, statistics = self._forward(ready)
        forward_s = time.perf_counter() - started
        with session_scope(self.ctx.settings.database_url) as session:
            ids = [item.id for item, _ in batch]
            rows = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_(ids)))}
            results = zip(ready, scores, heatmap_keys, statistics, strict=True)
            unrecorded = [item.id for item, _ in batch if item.id not in rows]
            for (item, _), score, key, described in results:
                if item.id not in rows:
                    continue  # erased while it was screened
                distance, warnings = self._input_check(described)
                recorded = record_prediction(
                    session=session,
                    image=rows[item.id],
                    model_version_id=self.loaded.version_id,
                    score=score,
                    heatmap_key=key,
                    input_distance=distance,
                    input_intensity=(
                        float(described[BREAST_INTENSITY]) if described is not None else None
                    ),
                    warnings=warnings,
                )
                if not recorded:
                    unrecorded.append(item.id)
            failed = 0
            for image_id, failure in failures.items():
                if image_id not in rows:
                    continue
                log.info(
                    "image failed: %s",
                    failure.code.value,
                    extra={"image_id": image_id, "batch_id": rows[image_id].batch_id},
                )
                failed += record_failure(
                    session=session,
                    image=rows[image_id],
                    code=failure.code.value,
                    message=failure.message,
                )
            if ready:
                session.add(
                    InferenceBatch(
                        model_version_id=self.loaded.version_id,
                        images=len(ready),
                        forward_seconds=forward_s,
                        device=str(self.loaded.device),
                    )
                )
            refresh_batches(session=session, batch_ids=[r.batch_id for r in rows.values()])
        if unrecorded:
            self._drop_what_erased_images_left(unrecorded)
        for item, _ in batch:
            self.unfinished.pop(item.id, None)
        done = len(ready) - len(set(unrecorded) & {item.id for item, _ in ready})
        log.info(
            "screened %d images (%d failed) in a batch of %d, forward %.3fs, model %s",
            done,
            failed,
            len(batch),
            forward_s,
            self.loaded.name,
        )
        return done, failed
