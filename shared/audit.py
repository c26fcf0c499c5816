"""The audit log: who read or changed which batch, study or image, and when."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, or_, select
from sqlalchemy.orm import Session

from shared.db.base import new_id, utcnow
from shared.db.models import AuditAction, AuditEvent


def record(
    *,
    session: Session,
    tenant_id: uuid.UUID | None,
    key_prefix: str,
    action: AuditAction,
    resource_type: str,
    resource_id: uuid.UUID | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one event to the caller's transaction (it lands if and only if the work does).

    A plain INSERT, not an ORM object to flush: every read of patient data writes one, and
    the unit of work cost more than the read it records (and so would the ORM's path for an
    INSERT statement: it runs on the session's connection, in its transaction)."""
    session.connection().execute(
        _INSERT,
        {
            "id": new_id(),
            "tenant_id": tenant_id,
            "key_prefix": key_prefix,
            "action": action,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "detail": detail or {},
            "at": utcnow(),
        },
    )


_INSERT = insert(AuditEvent)


def list_events(
    *, session: Session, tenant_id: uuid.UUID, limit: int, before: uuid.UUID | None
) -> list[AuditEvent]:
    """The tenant's events and the system's (model promotions, which change every tenant's
    results), newest first, keyset-paginated on id (time-ordered)."""
    query = select(AuditEvent).where(
        or_(AuditEvent.tenant_id == tenant_id, AuditEvent.tenant_id.is_(None))
    )
    if before is not None:
        query = query.where(AuditEvent.id < before)
    return list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)))
