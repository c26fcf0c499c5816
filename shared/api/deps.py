"""FastAPI dependencies common to both services: settings, database session, tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from shared import audit
from shared.api.errors import ApiError
from shared.api.ratelimit import enforce_rate_limit
from shared.config import Settings
from shared.db.base import session_factory
from shared.db.models import AuditAction, Scope, Tenant
from shared.storage import ObjectStore
from shared.tenants import authenticate_key

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_factory(settings.database_url)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


StoreDep = Annotated[ObjectStore, Depends(get_store)]


def current_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    if credentials is None:
        raise ApiError(
            401,
            "missing_api_key",
            "send your API key as 'Authorization: Bearer <api key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    api_key = authenticate_key(session=session, secret=credentials.credentials)
    if api_key is None:
        raise ApiError(
            401,
            "invalid_api_key",
            "the API key is unknown or revoked",
            headers={"WWW-Authenticate": "Bearer"},
        )
    enforce_rate_limit(request, api_key.prefix)
    # Hand the connection back before the endpoint runs: between this dependency and the
    # endpoint the request waits for a worker thread, and a connection held across that wait
    # by each of many requests (200 long polls arriving at once) leaves the threads waiting
    # for connections that the waiting requests hold. The endpoint takes one again (the key
    # and tenant stay loaded).
    session.commit()
    request.state.api_key_prefix = api_key.prefix
    request.state.api_key_scopes = frozenset(api_key.scopes)
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


def current_caller(request: Request, tenant: TenantDep) -> Caller:
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

    def check(caller: CallerDep) -> None:
        if not caller.may(scope):
            raise missing_scope(scope)

    return Depends(check)
