"""Jobs each worker's main process runs on a loop of their own, apart from the sweeper (a
job that scans a tenant's week or purges a batch must never hold up lease expiry): drift
figures (shared/drift.py) and retention (shared/retention.py). Every worker runs them; the
drift computation takes an advisory lock and skips a round another worker did, the purge
locks what it works on, so running in several workers costs nothing but an idle query."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import func, select

from shared.config import Settings
from shared.db.base import session_scope, utcnow
from shared.db.models import ScoreDriftWeek
from shared.drift import refresh_drift
from shared.retention import purge_due
from shared.storage import ObjectStore

log = logging.getLogger(__name__)


def refresh_drift_if_due(settings: Settings) -> int:
    """Recompute unless another worker did within the interval; how many weeks it wrote."""
    with session_scope(settings.database_url) as session:
        latest = session.scalar(select(func.max(ScoreDriftWeek.computed_at)))
        if latest is not None and utcnow() - latest < timedelta(seconds=settings.drift_interval_s):
            return 0
        return len(refresh_drift(session, settings=settings))


def purge_what_is_due(settings: Settings) -> int:
    """Retention's round: batches past result retention erased, images past image retention
    purged; how many of either."""
    report = purge_due(settings.database_url, ObjectStore(settings), now=utcnow())
    if report.batches_erased or report.images_purged:
        log.info(
            "retention: %d batches erased, %d images purged, %d objects deleted",
            report.batches_erased,
            report.images_purged,
            report.objects,
        )
    return report.batches_erased + report.images_purged


class PeriodicThread(threading.Thread):
    def __init__(self, name: str, interval_s: float, job: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self.job = job
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.job()
            except Exception:  # an outage must not end the loop; the next round tries again
                log.exception("%s failed; retrying in %.0fs", self.name, self.interval_s)


def periodic_threads(settings: Settings) -> list[PeriodicThread]:
    return [
        PeriodicThread("drift", settings.drift_interval_s, lambda: refresh_drift_if_due(settings)),
        PeriodicThread(
            "retention", settings.retention_interval_s, lambda: purge_what_is_due(settings)
        ),
    ]
