"""Per-API-key rate limiting, counted in Redis so every process of every service shares it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from fastapi import Request

from shared.api.errors import ApiError
from shared.config import Settings

log = logging.getLogger(__name__)
WINDOW_S = 60


def rate_limit_client(settings: Settings) -> redis.Redis:
    """A Redis client with short timeouts (created lazily: no connection is opened here)."""
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1)


Clock = Callable[[], float]
WALL_CLOCK: Clock = time.time  # apps keep theirs in app.state.clock; tests set their own


def enforce_rate_limit(request: Request, key_prefix: str) -> None:
    """Count this request against its key's one-minute window; 429 once over the limit.

    If Redis is unreachable the request is let through (and logged): the limit protects
    the service, and must not itself take the service down.
    """
    settings: Settings = request.app.state.settings
    if settings.rate_limit_per_minute == 0:
        return
    client: redis.Redis = request.app.state.redis
    now = request.app.state.clock()
    window = int(now // WINDOW_S)
    counter = f"ratelimit:{key_prefix}:{window}"
    try:
        pipeline = client.pipeline()
        pipeline.incr(counter)
        pipeline.expire(counter, WINDOW_S * 2)
        count = int(pipeline.execute()[0])
    except redis.RedisError as err:
        log.warning("rate limit not enforced, Redis unavailable: %s", err)
        return
    if count > settings.rate_limit_per_minute:
        retry_after = max(1, int((window + 1) * WINDOW_S - now) + 1)
        raise ApiError(
            429,
            "rate_limited",
            f"more than {settings.rate_limit_per_minute} requests per minute with this API "
            f"key; retry after {retry_after} s",
            detail={"limit_per_minute": settings.rate_limit_per_minute},
            headers={"Retry-After": str(retry_after)},
        )
