"""FastAPI dependencies common to both services: settings, database session, tenant."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from shared import audit
from shared.api.errors import ApiError
from shared.api.keycache import AuthenticatedKey, KeyCache
from shared.api.ratelimit import enforce_rate_limit, enforce_rate_limit_async
from shared.audit import Entry as AuditEntry
from shared.config import Settings
from shared.db.base import read_session_factory, session_factory
from shared.db.models import AuditAction, Scope, Tenant
from shared.storage import ObjectStore
from shared.tenants import authenticate_key

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")


# Dependencies that do no I/O are async: FastAPI runs a sync one in a worker thread, and
# the hop cost more than what they do (a poll passes through several of them).
async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def _close(session: Session) -> None:
    """A request's session opens no connection until used; one that committed holds none
    at the end, so closing it then needs no worker thread."""
    if session.in_transaction():
        await run_in_threadpool(session.close)  # returns its connection: a round trip
    else:
        session.close()


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        await _close(session)


SessionDep = Annotated[Session, Depends(get_session)]


async def get_read_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """`get_session` for an endpoint that only reads (and records that it did): each
    statement commits on its own (`shared.db.base.read_session_factory`)."""
    session = read_session_factory(settings.database_url)()
    try:
        yield session
    finally:
        await _close(session)


ReadSessionDep = Annotated[Session, Depends(get_read_session)]


async def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


StoreDep = Annotated[ObjectStore, Depends(get_store)]


def _live_key(request: Request, secret: str) -> AuthenticatedKey | None:
    """The live key for `secret`, from the process's key cache where it has one and trusts
    it (shared/api/keycache.py), else from Postgres in a short transaction of its own."""
    cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
    found = cache.get(secret) if cache is not None else None
    if found is not None:
        return found
    generation = cache.generation if cache is not None else 0
    settings: Settings = request.app.state.settings
    with session_factory(settings.database_url)() as session:
        api_key = authenticate_key(session=session, secret=secret)
        if api_key is None:
            return None
        found = AuthenticatedKey(api_key.prefix, frozenset(api_key.scopes), api_key.tenant)
    if cache is not None:
        cache.remember(secret, found, generation)
    return found


def _authenticate(request: Request, secret: str) -> AuthenticatedKey | None:
    api_key = _live_key(request, secret)
    if api_key is not None:
        enforce_rate_limit(request, api_key.prefix)
    return api_key


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    if credentials is None:
        raise ApiError(
            401,
            "missing_api_key",
            "send your API key as 'Authorization: Bearer <api key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # A key the process has cached and an app with an event-loop Redis client (the results
    # service's): the rate limit's round trip on the loop, no worker thread (a trial without
    # the hop gave status p99 of 23-26 ms under load against 27-29 with it). Otherwise one worker
    # thread for the lookup and the round trip. No connection is held past it: between this
    # dependency and the endpoint a request may wait for a thread, and connections held
    # across that wait by many requests (200 long polls arriving at once) would starve the
    # threads that run.
    cache: KeyCache | None = getattr(request.app.state, "key_cache", None)
    loop_redis: redis.asyncio.Redis | None = getattr(request.app.state, "loop_redis", None)
    cached = cache.get(credentials.credentials) if cache is not None else None
    if cached is not None and loop_redis is not None:
        await enforce_rate_limit_async(request, cached.prefix, loop_redis)
        api_key: AuthenticatedKey | None = cached
    else:
        api_key = await run_in_threadpool(_authenticate, request, credentials.credentials)
    if api_key is None:
        raise ApiError(
            401,
            "invalid_api_key",
            "the API key is unknown or revoked",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.api_key_prefix = api_key.prefix
    request.state.api_key_scopes = api_key.scopes
    return api_key.tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant and the visible prefix of the key used (for the audit log)."""

    tenant: Tenant
    key_prefix: str
    scopes: frozenset[str] = frozenset()

    def may(self, scope: Scope) -> bool:
        return scope.value in self.scopes

    def audit(
        self,
        session: Session,
        action: AuditAction,
        resource_type: str,
        resource_id: uuid.UUID | None,
        **detail: Any,
    ) -> None:
        """Record what this caller did in the session's transaction (see shared/audit.py)."""
        audit.record(
            session=session,
            tenant_id=self.tenant.id,
            key_prefix=self.key_prefix,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            detail=detail,
        )

    def audit_entry(
        self,
        action: AuditAction,
        resource_type: str,
        resource_id: uuid.UUID | None,
        **detail: Any,
    ) -> AuditEntry:
        """`audit`'s event, for a read that records it in its own statement."""
        return AuditEntry(
            self.tenant.id, self.key_prefix, action, resource_type, resource_id, detail
        )


async def current_caller(request: Request, tenant: TenantDep) -> Caller:
    return Caller(
        tenant=tenant,
        key_prefix=request.state.api_key_prefix,
        scopes=request.state.api_key_scopes,
    )


CallerDep = Annotated[Caller, Depends(current_caller)]


def missing_scope(scope: Scope) -> ApiError:
    return ApiError(
        403,
        "missing_scope",
        f"this API key lacks the '{scope.value}' scope; use a key issued with it "
        f"(screening admin key create TENANT --scope {scope.value})",
    )


def require_scope(scope: Scope) -> Any:
    """A route (or router) dependency: the caller's key must have `scope`."""

    async def check(caller: CallerDep) -> None:
        if not caller.may(scope):
            raise missing_scope(scope)

    return Depends(check)
