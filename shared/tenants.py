"""Tenants and their API keys. A key is shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import ApiKey, Tenant

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


def issue_api_key(*, session: Session, tenant: Tenant) -> IssuedKey:
    prefix = f"{KEY_SCHEME}_{secrets.token_hex(4)}"
    secret = f"{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(secret))
    session.add(api_key)
    session.flush()
    return IssuedKey(api_key=api_key, secret=secret)


def authenticate(*, session: Session, secret: str) -> Tenant | None:
    """The tenant owning a live key, or None; compares hashes in constant time."""
    prefix = _split_key(secret)
    if prefix is None:
        return None
    api_key = session.scalar(
        select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    )
    if api_key is None or not hmac.compare_digest(api_key.key_hash, hash_key(secret)):
        return None
    return session.get(Tenant, api_key.tenant_id)
