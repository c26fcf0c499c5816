"""Batch changes as Postgres announces them: long polls sleep until their batch changes.

The triggers of migration 0013 NOTIFY `batch_changed` with the batch id whenever a
transaction that changed a batch's images, predictions, rejected files or status commits.
Each results process keeps one connection LISTENing, and wakes the long polls waiting on that
batch, which then read its state once. An idle long poll costs the database nothing.

While that connection is down (Postgres restarting, say) nobody would be woken, so waiting
requests fall back to re-reading every `FALLBACK_RECHECK_S`, and all of them are woken once
it is back (they may have missed a change meanwhile).

The same connection LISTENs for `auth_changed` (keys or tenants changed): the process's key
cache (shared/api/keycache.py) is trusted only while it is connected, and cleared on each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator

import psycopg
from sqlalchemy.engine import make_url

from shared.api import keycache
from shared.api.keycache import KeyCache

log = logging.getLogger(__name__)

CHANNEL = "batch_changed"
FALLBACK_RECHECK_S = 0.5
RECONNECT_S = 1.0


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL (postgresql+psycopg://...) as psycopg itself takes it."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


class BatchChanges:
    """Wakes waiters when Postgres announces a change to their batch."""

    def __init__(self, database_url: str, key_cache: KeyCache | None = None) -> None:
        self.url = libpq_url(database_url)
        self.key_cache = key_cache
        self.waiters: dict[uuid.UUID, set[asyncio.Event]] = {}
        self.listening = asyncio.Event()  # set while LISTEN is in force
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, batch_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set on the batch's next change. Watch before reading the batch, so a
        change committed between the read and the wait still wakes it."""
        event = asyncio.Event()
        self.waiters.setdefault(batch_id, set()).add(event)
        try:
            yield event
        finally:
            waiting = self.waiters.get(batch_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self.waiters[batch_id]

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Until `event` is set or `timeout` passes (while nobody listens, a recheck interval
        at most); whether the batch should be read again."""
        listening = self.listening.is_set()
        if not listening:
            timeout = min(timeout, FALLBACK_RECHECK_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        changed = event.is_set()
        event.clear()
        return changed or not listening

    def _trust_keys(self, listening: bool) -> None:
        if self.key_cache is not None:
            self.key_cache.trust(listening)

    def _wake(self, batch_ids: list[uuid.UUID] | None) -> None:
        """Wake the waiters of these batches (None: every waiter)."""
        for batch_id in list(self.waiters) if batch_ids is None else batch_ids:
            for event in self.waiters.get(batch_id, ()):
                event.set()

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    await connection.execute(f"LISTEN {keycache.CHANNEL}")
                    self.listening.set()
                    self._trust_keys(True)
                    self._wake(None)  # they may have missed a change while nobody listened
                    async for notice in connection.notifies():
                        if notice.channel == keycache.CHANNEL:
                            self._trust_keys(True)  # forget them all: one may be revoked
                            continue
                        try:
                            self._wake([uuid.UUID(notice.payload)])
                        except ValueError:
                            log.warning("ignored a %s notice: %r", CHANNEL, notice.payload)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as err:
                log.warning("not listening for batch changes (%s); retrying", err)
            finally:
                self.listening.clear()
                self._trust_keys(False)
            self._wake(None)
            await asyncio.sleep(RECONNECT_S)
