"""The sweeper: what makes a committed image always end `done` or `failed`.

It runs in every worker process (a thread in Celery's main process) and may run in several
at once: each step locks the rows it takes with FOR UPDATE SKIP LOCKED, so sweepers never
wait on or double-handle each other's rows.

1. Expired leases: a `running` image whose worker stopped renewing it (the worker died) goes
   back to `queued`, or to `failed` with `too_many_attempts` once it has been claimed
   `max_attempts` times (an image that kills its worker must not kill every worker).
2. Outbox relay: a `queued` image never handed to the broker (the broker was down when it
   was committed), or handed over longer than `requeue_after_s` ago and still not picked up
   (the message was lost), is sent again. Sending happens while the rows are locked, and the
   send is recorded only after the broker accepted it.
3. Training runs: a `running` run whose heartbeat stopped for `training_stale_s` (its worker
   died) is sent again and resumes from its last checkpoint; a `queued` run never sent (the
   broker was down) is sent.
4. DICOM studies: a study's open batch that received no instance for `dicom_study_quiet_s`
   is closed (shared/dicom_studies.py).
5. DICOM results: a completed exam's report and heatmap objects are rendered, and due
   deliveries to the site's destinations are sent, retried with backoff, and given up as
   `dead` after `export_max_attempts` (shared/dicom_export.py, shared/deliveries.py).
6. Orphan objects: an uploaded image's object (`Keys.UPLOADS`) older than `orphan_grace_s`
   with no image row (an upload whose commit failed and whose clean-up also failed) is
   deleted, and so are previews, heatmaps and DICOM results whose image or study is gone
   (written by a worker or the renderer while an erasure removed their rows).

The status changes themselves are `shared/lifecycle.py`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import httpx
from celery import Celery
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db.base import session_scope, utcnow
from shared.db.models import Batch, BatchPriority, Image, ImageStatus, Study
from shared.dicom_export import deliver_due as deliver_dicom_results
from shared.dicom_export import render_due as render_dicom_results
from shared.dicom_studies import close_quiet_studies
from shared.evaluations import resend_stalled_evaluations
from shared.lifecycle import expire_leases, mark_enqueued
from shared.queue import enqueue_screening
from shared.storage import Keys, ObjectStore
from shared.training_runs import resend_stalled_runs
from shared.webhooks import DELIVERY_TIMEOUT_S, deliver_due

log = logging.getLogger(__name__)

SWEEP_LIMIT = 1000  # rows per step per sweep; the next sweep takes the rest


@dataclass(frozen=True)
class SweepReport:
    requeued: int = 0
    failed: int = 0
    sent: int = 0
    orphans_deleted: int = 0
    training_runs_resent: int = 0
    studies_closed: int = 0
    results_rendered: int = 0
    results_delivered: int = 0
    evaluations_resent: int = 0


def relay_queued(
    *, session: Session, producer: Celery, chunk_size: int, requeue_after_s: float
) -> int:
    """Send queued images that were never sent or seem lost; returns how many were sent."""
    stale = utcnow() - timedelta(seconds=requeue_after_s)
    rows = session.execute(
        select(Image.id, Batch.priority == BatchPriority.URGENT)
        .join(Batch, Batch.id == Image.batch_id)
        .where(
            Image.status == ImageStatus.QUEUED,
            or_(Image.enqueued_at.is_(None), Image.enqueued_at < stale),
        )
        .order_by(Image.id)
        .limit(SWEEP_LIMIT)
        .with_for_update(of=Image, skip_locked=True)
    ).all()
    if not rows:
        return 0
    for urgent in (True, False):
        lane = [image_id for image_id, is_urgent in rows if bool(is_urgent) == urgent]
        enqueue_screening(producer, lane, chunk_size=chunk_size, urgent=urgent)
    ids = [image_id for image_id, _ in rows]
    mark_enqueued(session=session, image_ids=ids)
    return len(ids)


def delete_orphans(*, session: Session, store: ObjectStore, grace_s: float) -> int:
    """Delete objects older than the grace period that no row owns: uploaded images no image
    row names, and previews, heatmaps and DICOM results whose image or study is gone (an
    erasure that raced a worker or the renderer leaves those)."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    deleted = 0
    for prefix, owned in (
        (Keys.UPLOADS, _named_uploads),
        (Keys.PREVIEWS, _owned_by_images),
        (Keys.HEATMAPS, _owned_by_images),
        (Keys.DICOM_RESULTS, _owned_by_studies),
    ):
        page: list[str] = []
        for key in store.list_keys(prefix, older_than=cutoff):
            page.append(key)
            if len(page) >= 500:
                deleted += _delete_unowned(store, page, owned(session, page))
                page = []
        if page:
            deleted += _delete_unowned(store, page, owned(session, page))
    return deleted


def _delete_unowned(store: ObjectStore, page: list[str], owned: set[str]) -> int:
    orphans = [key for key in page if key not in owned]
    store.delete_many(orphans)
    for key in orphans:
        log.warning("deleted orphaned object %s", key)
    return len(orphans)


def _named_uploads(session: Session, keys: list[str]) -> set[str]:
    return set(session.scalars(select(Image.object_key).where(Image.object_key.in_(keys))))


def _owned_by(session: Session, keys: list[str], table: type[Image] | type[Study]) -> set[str]:
    """The keys whose image or study row exists, and any key that names none (not ours to
    judge: left alone)."""
    owners = {key: Keys.owner_id(key) for key in keys}
    ids = {owner for owner in owners.values() if owner is not None}
    alive = set(session.scalars(select(table.id).where(table.id.in_(ids))))
    return {key for key, owner in owners.items() if owner is None or owner in alive}


def _owned_by_images(session: Session, keys: list[str]) -> set[str]:
    return _owned_by(session, keys, Image)


def _owned_by_studies(session: Session, keys: list[str]) -> set[str]:
    return _owned_by(session, keys, Study)


def export_dicom_results(settings: Settings, store: ObjectStore) -> tuple[int, int]:
    """Render and deliver DICOM results, a few exams per transaction, for at most
    `export_sweep_budget_s` per sweep (the other steps must not wait longer)."""
    deadline = time.monotonic() + settings.export_sweep_budget_s
    rendered = delivered = 0
    while True:
        with session_scope(settings.database_url) as session:
            done_now = render_dicom_results(session, settings=settings, store=store)
        with session_scope(settings.database_url) as session:
            sent_now = deliver_dicom_results(session, settings=settings, store=store)
        rendered, delivered = rendered + done_now, delivered + sent_now
        if not (done_now or sent_now) or time.monotonic() > deadline:
            return rendered, delivered


def sweep_once(
    settings: Settings,
    *,
    store: ObjectStore,
    producer: Celery,
    orphans: bool = False,
    exports: bool = True,
) -> SweepReport:
    """One round of every step; `exports=False` leaves DICOM results to a loop of their own
    (a worker's exporter thread), so rendering a backlog never delays the leases and queue
    steps of the next round."""
    with session_scope(settings.database_url) as session:
        requeued, failed = expire_leases(
            session=session, max_attempts=settings.max_attempts, limit=SWEEP_LIMIT
        )
    with session_scope(settings.database_url) as session:
        sent = relay_queued(
            session=session,
            producer=producer,
            chunk_size=settings.inference_chunk_size,
            requeue_after_s=settings.requeue_after_s,
        )
    with session_scope(settings.database_url) as session:
        runs_resent = resend_stalled_runs(
            session=session,
            producer=producer,
            stale_s=settings.training_stale_s,
            requeue_after_s=settings.requeue_after_s,
        )
    with session_scope(settings.database_url) as session:
        evaluations_resent = resend_stalled_evaluations(
            session,
            producer,
            stale_s=settings.training_stale_s,
            max_attempts=settings.max_attempts,
            now=utcnow(),
        )
    with session_scope(settings.database_url) as session:
        studies_closed = close_quiet_studies(session=session, quiet_s=settings.dicom_study_quiet_s)
    with (
        session_scope(settings.database_url) as session,
        httpx.Client(timeout=DELIVERY_TIMEOUT_S) as http,
    ):
        deliver_due(session, http)
    rendered, delivered = export_dicom_results(settings, store) if exports else (0, 0)
    orphans_deleted = 0
    if orphans:
        with session_scope(settings.database_url) as session:
            orphans_deleted = delete_orphans(
                session=session, store=store, grace_s=settings.orphan_grace_s
            )
    report = SweepReport(
        requeued,
        failed,
        sent,
        orphans_deleted,
        runs_resent,
        studies_closed,
        rendered,
        delivered,
        evaluations_resent,
    )
    if report != SweepReport():
        log.info("sweep: %s", report)
    return report
