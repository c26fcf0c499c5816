"""The heartbeat of a worker's claims: while a task works, its leases are renewed.

A claim carries a lease so that a dead worker's images go back to the queue (the sweeper
requeues them once it expires). With the lease renewed every quarter of `lease_s` by the
task that holds it, the lease no longer has to outlast the longest task: it only has to
outlast a few missed renewals, and a killed worker's images are screened again within
about `lease_s` plus a sweep, not minutes later.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Collection
from types import TracebackType

from shared.config import Settings
from shared.db.base import session_scope
from shared.lifecycle import renew_leases

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of the images in `held` (a collection the task keeps up to date:
    added when it claims, removed when it records) every `lease_s / 4`, in a thread of its
    own, from entering until leaving. A renewal that fails (Postgres down) is logged and
    tried again at the next beat; the task's own writes fail the same way and hand its
    images back."""

    def __init__(self, settings: Settings, held: Collection[uuid.UUID]) -> None:
        self.settings = settings
        self.held = held
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stopping.wait(self.settings.lease_s / 4):
            ids = list(self.held)  # one call: the task's thread may change it meanwhile
            if not ids:
                continue
            try:
                with session_scope(self.settings.database_url) as session:
                    renew_leases(session=session, image_ids=ids, lease_s=self.settings.lease_s)
            except Exception as err:  # the next beat tries again
                log.warning("could not renew the leases of %d images: %s", len(ids), err)
