"""DICOM nodes: the PACS, modalities and routers allowed to send a tenant's studies.

A node is a calling AE title, optionally tied to a host: then only that host may use the
title. An association from a title (and host) that no node names is refused at association
time. The node's tenant owns everything it sends.
"""

from __future__ import annotations

import uuid

from sqlalchemy import delete, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db.models import DicomNode

AE_TITLE_CHARACTERS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


class NodeError(ValueError):
    """A node that cannot be registered; the message says what to fix."""


def valid_ae_title(title: str) -> str:
    """The title without padding, or NodeError: 1-16 characters of the default repertoire,
    no backslash or control characters (PS3.5 AE VR)."""
    stripped = title.strip()
    if not 1 <= len(stripped) <= 16 or not set(stripped) <= AE_TITLE_CHARACTERS:
        raise NodeError(
            f"AE title {title!r} is not valid: use 1 to 16 letters, digits, spaces, '_', '-' or '.'"
        )
    return stripped


def add_node(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    ae_title: str,
    host: str | None = None,
    port: int | None = None,
) -> DicomNode:
    if port is not None and not 1 <= port <= 65535:
        raise NodeError(f"port {port} is not a TCP port (1-65535)")
    node = DicomNode(tenant_id=tenant_id, ae_title=valid_ae_title(ae_title), host=host, port=port)
    session.add(node)
    try:
        session.flush()
    except IntegrityError as err:
        session.rollback()
        where = f" at {host}" if host else ""
        raise NodeError(f"AE title {node.ae_title!r}{where} is registered already") from err
    return node


def list_nodes(*, session: Session, tenant_id: uuid.UUID | None = None) -> list[DicomNode]:
    query = select(DicomNode).order_by(DicomNode.created_at)
    if tenant_id is not None:
        query = query.where(DicomNode.tenant_id == tenant_id)
    return list(session.scalars(query))


def remove_node(
    *, session: Session, tenant_id: uuid.UUID, ae_title: str, host: str | None = None
) -> bool:
    result = session.execute(
        delete(DicomNode).where(
            DicomNode.tenant_id == tenant_id,
            DicomNode.ae_title == ae_title.strip(),
            DicomNode.host.is_(None) if host is None else DicomNode.host == host,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def titles_allowed_from(*, session: Session, host: str) -> set[str]:
    """The calling AE titles a peer at `host` may associate with."""
    rows = session.scalars(
        select(DicomNode.ae_title).where(or_(DicomNode.host.is_(None), DicomNode.host == host))
    )
    return set(rows)


def node_for(*, session: Session, ae_title: str, host: str) -> DicomNode | None:
    """The node a calling AE title at `host` is: the one tied to that host, else the one
    registered for any host."""
    candidates = session.scalars(
        select(DicomNode).where(
            DicomNode.ae_title == ae_title.strip(),
            or_(DicomNode.host.is_(None), DicomNode.host == host),
        )
    ).all()
    return next((n for n in candidates if n.host == host), None) or next(iter(candidates), None)
