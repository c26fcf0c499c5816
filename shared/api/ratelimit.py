"""Per-API-key rate limiting, counted in Redis so every process of every service shares it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio
from fastapi import Request

from shared.api.errors import ApiError
from shared.config import Settings

log = logging.getLogger(__name__)
WINDOW_S = 60


def rate_limit_client(settings: Settings) -> redis.Redis:
    """A Redis client with short timeouts (created lazily: no connection is opened here)."""
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1)


def async_rate_limit_client(settings: Settings) -> redis.asyncio.Redis:
    """`rate_limit_client` for an event loop (one loop's: make it in the app's lifespan)."""
    return redis.asyncio.Redis.from_url(
        settings.redis_url, socket_connect_timeout=1, socket_timeout=1
    )


Clock = Callable[[], float]
WALL_CLOCK: Clock = time.time  # apps keep theirs in app.state.clock; tests set their own


F = TypeVar("F", bound=Callable[..., Any])


def polls_cost_less(endpoint: F) -> F:
    """Mark a route whose conditional (If-None-Match) or long (`wait`) requests are polls:
    each counts as 1/rate_limit_polls_per_request of a request against the key's limit."""
    endpoint.__dict__["polls_cost_less"] = True
    return endpoint


def _is_poll(request: Request) -> bool:
    if not getattr(request.scope.get("endpoint"), "polls_cost_less", False):
        return False
    return bool(request.headers.get("if-none-match") or request.query_params.get("wait"))


def request_units(request: Request, settings: Settings) -> int:
    """What this request costs of its key's budget, in units of which a request costs
    `rate_limit_polls_per_request` and a poll costs one."""
    return 1 if _is_poll(request) else settings.rate_limit_polls_per_request


@dataclass(frozen=True)
class _Charge:
    """One request's charge against its key's window."""

    counter: str  # the window's Redis key
    units: int
    now: float
    window: int
    settings: Settings


def _charge(request: Request, key_prefix: str) -> _Charge | None:
    """This request's charge, or None when rate limits are off."""
    settings: Settings = request.app.state.settings
    if settings.rate_limit_per_minute == 0:
        return None
    now = request.app.state.clock()
    window = int(now // WINDOW_S)
    return _Charge(
        f"ratelimit:{key_prefix}:{window}",
        request_units(request, settings),
        now,
        window,
        settings,
    )


def _refuse_over_limit(charge: _Charge, spent: int) -> None:
    settings = charge.settings
    if spent <= settings.rate_limit_per_minute * settings.rate_limit_polls_per_request:
        return
    retry_after = max(1, int((charge.window + 1) * WINDOW_S - charge.now) + 1)
    raise ApiError(
        429,
        "rate_limited",
        f"more than {settings.rate_limit_per_minute} requests per minute with this API "
        f"key (a status poll with If-None-Match or wait counts as "
        f"1/{settings.rate_limit_polls_per_request}); retry after {retry_after} s",
        detail={
            "limit_per_minute": settings.rate_limit_per_minute,
            "polls_per_request": settings.rate_limit_polls_per_request,
        },
        headers={"Retry-After": str(retry_after)},
    )


def enforce_rate_limit(request: Request, key_prefix: str) -> None:
    """Count this request against its key's one-minute window; 429 once over the limit.

    The window counts units (a poll one, any other request `rate_limit_polls_per_request`),
    so a client that polls a batch's status cheaply can poll it often.

    If Redis is unreachable the request is let through (and logged): the limit protects
    the service, and must not itself take the service down.
    """
    charge = _charge(request, key_prefix)
    if charge is None:
        return
    client: redis.Redis = request.app.state.redis
    try:
        pipeline = client.pipeline()
        pipeline.incrby(charge.counter, charge.units)
        pipeline.expire(charge.counter, WINDOW_S * 2)
        spent = int(pipeline.execute()[0])
    except redis.RedisError as err:
        log.warning("rate limit not enforced, Redis unavailable: %s", err)
        return
    _refuse_over_limit(charge, spent)


async def enforce_rate_limit_async(
    request: Request, key_prefix: str, client: redis.asyncio.Redis
) -> None:
    """`enforce_rate_limit` on the event loop, for a request that needs no worker thread
    otherwise (a poll whose key the process has cached): the same window, the same count."""
    charge = _charge(request, key_prefix)
    if charge is None:
        return
    try:
        async with client.pipeline() as pipeline:
            pipeline.incrby(charge.counter, charge.units)
            pipeline.expire(charge.counter, WINDOW_S * 2)
            spent = int((await pipeline.execute())[0])
    except redis.RedisError as err:
        log.warning("rate limit not enforced, Redis unavailable: %s", err)
        return
    _refuse_over_limit(charge, spent)
