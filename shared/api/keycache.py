"""Authenticated API keys remembered per process, for as long as Postgres would say if they
changed.

Every request authenticates its key, and a poller's requests are mostly cheap: the lookup
and its transaction were a third of a status answer's cost. A process that LISTENs for
`auth_changed` (migration 0014's triggers NOTIFY it when a transaction that changed api_keys
or tenants commits) may skip it: the cache is used only while that listener is connected,
forgets everything on each notice and whenever the listener drops, and never keeps an entry
longer than `ttl_s` anyway. A revoked key therefore stops working as soon as the notice
arrives, as it did before within the next request.

A key looked up while a notice arrived is not remembered (the lookup may predate the change):
`generation` counts the clears, and `remember` takes the generation read before the lookup.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.db.models import Tenant

CHANNEL = "auth_changed"
DEFAULT_TTL_S = 30.0
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class AuthenticatedKey:
    """What a request needs of its live key. The tenant is detached and may be shared by
    concurrent requests: read its columns only (never add it to a session)."""

    prefix: str
    scopes: frozenset[str]
    tenant: Tenant


class KeyCache:
    def __init__(
        self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[str, tuple[float, AuthenticatedKey]] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._trusted = False  # set while the listener is connected

    @staticmethod
    def _digest(secret: str) -> str:
        # The secret itself is never kept in memory longer than its request.
        return hashlib.sha256(secret.encode()).hexdigest()

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, secret: str) -> AuthenticatedKey | None:
        if not self._trusted:
            return None
        entry = self._entries.get(self._digest(secret))
        if entry is None or self.clock() - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def remember(self, secret: str, key: AuthenticatedKey, generation: int) -> None:
        with self._lock:
            if not self._trusted or generation != self._generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[self._digest(secret)] = (self.clock(), key)

    def clear(self) -> None:
        """Forget every key (a notice said keys or tenants changed)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def trust(self, listening: bool) -> None:
        """The listener connected (True) or dropped (False): either way, what was remembered
        may have missed a notice."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._trusted = listening
