"""Webhooks: a signed POST to a batch's callback_url when it completes.

Completion writes a delivery row in the same transaction that marks the batch completed (an
outbox: no completion is announced twice, none is lost); the sweeper in every worker posts due
deliveries, retrying with exponential backoff, and records each attempt.

Signature: header `X-Mammoscreen-Signature: t=<unix seconds>,v1=<hex>` where hex is
HMAC-SHA256(tenant webhook secret, "<t>.<raw body>"). `verify_signature` below is the
documented check (README "Webhooks"); a receiver should also reject old timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.base import new_id, utcnow
from shared.db.models import Batch, DeliveryStatus, Tenant, WebhookDelivery

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Mammoscreen-Signature"
EVENT_HEADER = "X-Mammoscreen-Event"
MAX_ATTEMPTS = 8
DELIVERY_TIMEOUT_S = 10.0
TOLERANCE_S = 300


def tenant_secret(session: Session, tenant: Tenant) -> str:
    """The tenant's signing secret, made on first use."""
    if tenant.webhook_secret is None:
        tenant.webhook_secret = secrets.token_hex(32)
        session.flush()
    return tenant.webhook_secret


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """True when `header` signs exactly `body` with `secret`, and is recent."""
    try:
        parts = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def announce_completion(session: Session, batch: Batch, counts: dict[str, int]) -> None:
    """Queue the completion notice of `batch` (no-op without a callback URL, or if queued)."""
    if not batch.callback_url:
        return
    payload: dict[str, Any] = {
        "event": "batch.completed",
        "batch_id": str(batch.id),
        "name": batch.name,
        "status": batch.status.value,
        "counts": counts,
        "completed_at": batch.completed_at.isoformat() if batch.completed_at else None,
    }
    session.execute(
        insert(WebhookDelivery)
        .values(
            id=new_id(),
            tenant_id=batch.tenant_id,
            batch_id=batch.id,
            url=batch.callback_url,
            payload=payload,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=utcnow(),
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[WebhookDelivery.batch_id])
    )


def backoff(attempts: int) -> timedelta:
    """10 s, 20 s, 40 s ... capped at one hour."""
    return timedelta(seconds=min(3600, 10 * 2 ** (attempts - 1)))


def deliver_due(session: Session, http: httpx.Client, *, limit: int = 20) -> int:
    """POST the deliveries that are due; returns how many were delivered now."""
    due = list(
        session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at <= utcnow(),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    delivered = 0
    for delivery in due:
        tenant = session.get(Tenant, delivery.tenant_id)
        assert tenant is not None  # a foreign key
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: str(delivery.payload.get("event", "")),
            SIGNATURE_HEADER: sign(tenant_secret(session, tenant), int(time.time()), body),
        }
        delivery.attempts += 1
        try:
            response = http.post(delivery.url, content=body, headers=headers)
            delivery.last_status_code = response.status_code
            delivery.last_error = None if response.is_success else response.text[:500]
            ok = response.is_success
        except httpx.HTTPError as err:
            delivery.last_error = f"{type(err).__name__}: {err}"[:500]
            ok = False
        if ok:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = utcnow()
            delivered += 1
        elif delivery.attempts >= MAX_ATTEMPTS:
            delivery.status = DeliveryStatus.FAILED
            log.warning(
                "webhook for batch %s failed %d times; giving up", delivery.batch_id, MAX_ATTEMPTS
            )
        else:
            delivery.next_attempt_at = utcnow() + backoff(delivery.attempts)
    return delivered
