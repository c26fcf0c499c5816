"""Recomputes the recent weeks' drift figures (shared/drift.py) every `drift_interval_s`, in a
thread of each worker's main process, apart from the sweeper: a site's week of exams takes a
scan of its predictions, which must never hold up the sweeper's leases. Every worker runs
one; a transaction-level advisory lock and the figures' age keep it to one computation per
interval across them."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import func, select

from shared.config import Settings
from shared.db.base import session_scope, utcnow
from shared.db.models import ScoreDriftWeek
from shared.drift import refresh_drift

log = logging.getLogger(__name__)


def refresh_if_due(settings: Settings) -> int:
    """Recompute unless another worker did within the interval; how many weeks it wrote."""
    with session_scope(settings.database_url) as session:
        latest = session.scalar(select(func.max(ScoreDriftWeek.computed_at)))
        if latest is not None and utcnow() - latest < timedelta(seconds=settings.drift_interval_s):
            return 0
        return len(refresh_drift(session, settings=settings))


class DriftThread(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="drift", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.settings.drift_interval_s):
            try:
                weeks = refresh_if_due(self.settings)
            except Exception:  # an outage must not end the loop; the next round tries again
                log.exception("drift figures failed; retrying")
                continue
            if weeks:
                log.info("drift figures recomputed for %d tenant weeks", weeks)
