"""Tenants and their API keys. A key is shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, joinedload

from shared.db.base import utcnow
from shared.db.models import DEFAULT_SCOPES, ApiKey, Scope, Tenant

KEY_SCHEME = "msk"


@dataclass(frozen=True)
class IssuedKey:
    """A freshly issued key: `secret` is the full key, returned to its owner exactly once."""

    api_key: ApiKey
    secret: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split_key(secret: str) -> str | None:
    """The public prefix of a well-formed key (`msk_<prefix>_<secret>`), else None."""
    parts = secret.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[1] or not parts[2]:
        return None
    return f"{parts[0]}_{parts[1]}"


def create_tenant(*, session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def issue_api_key(
    *, session: Session, tenant: Tenant, scopes: Iterable[Scope] = DEFAULT_SCOPES
) -> IssuedKey:
    prefix = f"{KEY_SCHEME}_{secrets.token_hex(4)}"
    secret = f"{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey(
        tenant_id=tenant.id,
        prefix=prefix,
        key_hash=hash_key(secret),
        scopes=sorted({Scope(s).value for s in scopes}),
    )
    session.add(api_key)
    session.flush()
    return IssuedKey(api_key=api_key, secret=secret)


# Built once: every request runs it. The tenant comes with it (every caller reads it).
_LIVE_KEY = (
    select(ApiKey)
    .where(ApiKey.prefix == bindparam("prefix"), ApiKey.revoked_at.is_(None))
    .options(joinedload(ApiKey.tenant))
)


def authenticate_key(*, session: Session, secret: str) -> ApiKey | None:
    """The live key matching `secret`, or None; compares hashes in constant time."""
    prefix = _split_key(secret)
    if prefix is None:
        return None
    api_key = session.scalar(_LIVE_KEY, {"prefix": prefix})
    if api_key is None or not hmac.compare_digest(api_key.key_hash, hash_key(secret)):
        return None
    return api_key


def authenticate(*, session: Session, secret: str) -> Tenant | None:
    """The tenant owning a live key, or None."""
    api_key = authenticate_key(session=session, secret=secret)
    return None if api_key is None else session.get(Tenant, api_key.tenant_id)


def find_tenant(*, session: Session, name_or_id: str) -> Tenant | None:
    """A tenant by its name or its id."""
    try:
        by_id = session.get(Tenant, uuid.UUID(name_or_id))
    except ValueError:
        by_id = None
    return by_id or session.scalar(select(Tenant).where(Tenant.name == name_or_id))


def list_api_keys(*, session: Session, tenant: Tenant) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)
        )
    )


def revoke_api_key(*, session: Session, tenant: Tenant, prefix: str) -> ApiKey | None:
    """Revoke the tenant's key with this prefix; it stops working on the next request."""
    api_key = session.scalar(
        select(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.prefix == prefix)
    )
    if api_key is not None and api_key.revoked_at is None:
        api_key.revoked_at = utcnow()
    return api_key
