"""Shadow mode: the version in shadow scores every image the active version has screened
since it went into shadow, on a loop in the trainer's process (never the inference workers',
so it never delays a screening), oldest first. Its scores go to shadow_scores only: no
prediction, so no result, export or webhook shows them; evaluations and the agreement view
(shared/shadow.py) read them. It pulls its work from Postgres, so no message can be lost and
a restart goes on where it stopped."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime

from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from services.worker.evaluation import model_cache
from services.worker.scoring import score_images
from shared.config import Settings
from shared.db.base import session_scope, utcnow
from shared.db.models import Image, ImageStatus, ShadowScore
from shared.evaluations import EvaluationImage
from shared.ml.registry import shadow_model
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

ROUND_IMAGES = 64


def pending_images(
    session: Session, version_id: uuid.UUID, since: datetime, limit: int
) -> list[tuple[EvaluationImage, uuid.UUID]]:
    """Images screened since `since` that the shadow version has not scored, oldest first,
    with their tenant."""
    rows = session.execute(
        select(
            Image.id,
            Image.object_key,
            Image.media_type,
            Image.laterality,
            Image.view,
            Image.tenant_id,
        )
        .where(
            Image.status == ImageStatus.DONE,
            Image.finished_at >= since,
            ~exists().where(
                ShadowScore.image_id == Image.id, ShadowScore.model_version_id == version_id
            ),
        )
        .order_by(Image.finished_at, Image.id)
        .limit(limit)
    )
    return [
        (EvaluationImage(i, key, media, lat.value, view.value), tenant)
        for i, key, media, lat, view, tenant in rows
        if lat is not None and view is not None
    ]


def shadow_round(settings: Settings, store: ObjectStore, *, limit: int = ROUND_IMAGES) -> int:
    """Score up to `limit` pending images with the shadow version; how many were recorded."""
    with session_scope(settings.database_url) as session:
        version = shadow_model(session=session)
        if version is None or version.shadow_since is None:
            return 0
        pending = pending_images(session, version.id, version.shadow_since, limit)
        session.expunge(version)
    if not pending:
        return 0
    images = [image for image, _ in pending]
    scores, unreadable = score_images(
        model_cache(settings, store).get(version), images, settings=settings, store=store
    )
    rows = [
        {
            "image_id": image.image_id,
            "model_version_id": version.id,
            "tenant_id": tenant_id,
            "score": scores.get(image.image_id),
            "error_code": unreadable.get(image.image_id),
            "created_at": utcnow(),
        }
        for image, tenant_id in pending
    ]
    with session_scope(settings.database_url) as session:
        # A round that overlapped another (two trainers) records each image once.
        session.execute(insert(ShadowScore).on_conflict_do_nothing(), rows)
    return len(rows)


class ShadowThread(threading.Thread):
    """The trainer process's shadow scorer: rounds back to back while there is work, else
    one every `sweep_interval_s`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="shadow-scorer", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()

    def run(self) -> None:
        store = ObjectStore(self.settings)
        busy = False
        while not self.stopping.wait(0 if busy else self.settings.sweep_interval_s):
            try:
                scored = shadow_round(self.settings, store)
            except Exception:  # an outage must not end the loop; it tries again next round
                log.exception("shadow round failed; retrying")
                busy = False
                continue
            busy = scored > 0
            if busy:
                log.info("shadow version scored %d images", scored)
