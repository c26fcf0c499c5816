"""The audit log: who read or changed which batch, study or image, and when."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Entry:
    """An event to record with the read it records (`recorded_by_read`)."""

    tenant_id: uuid.UUID | None
    key_prefix: str
    action: AuditAction
    resource_type: str
    resource_id: uuid.UUID | None
    detail: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict[str, Any]:
        """The bound parameters `recorded_by_read` names."""
        return {
            "audit_id": new_id(),
            "audit_tenant_id": self.tenant_id,
            "audit_key_prefix": self.key_prefix,
            "audit_action": self.action.value,
            "audit_resource_type": self.resource_type,
            "audit_resource_id": self.resource_id,
            "audit_detail": json.dumps(self.detail),
            "audit_at": utcnow(),
        }


def recorded_by_read(select_sql: str) -> str:
    """`select_sql` as one statement that also records an `Entry` (its parameters bound as
    `Entry.parameters` names them) when the read returns a row, and none when it finds
    nothing (a 404 reads nothing).

    For the reads polled most (a batch's status): the event lands in the read's own
    statement, not in a second round trip. Postgres runs a data-modifying WITH exactly once,
    whether or not the outer query reads it."""
    return f"""
        WITH read AS MATERIALIZED ({select_sql}),
        recorded AS (
            INSERT INTO {AuditEvent.__tablename__}
                (id, tenant_id, key_prefix, action, resource_type, resource_id, detail, at)
            SELECT :audit_id, :audit_tenant_id, :audit_key_prefix,
                   CAST(:audit_action AS audit_action), :audit_resource_type,
                   :audit_resource_id, CAST(:audit_detail AS jsonb), :audit_at
            WHERE EXISTS (SELECT FROM read)
        )
        SELECT * FROM read
    """  # noqa: S608


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
