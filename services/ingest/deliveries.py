"""Sending an exam's DICOM results again: a dead delivery, retried on request."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from services.ingest.deps import CallerDep, SessionDep
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import COMMON_ERRORS, DeliveryPublic, error_responses
from shared.db.models import AuditAction, ExportDeliveryStatus, Scope
from shared.deliveries import get_delivery, retry_delivery

router = APIRouter(
    dependencies=[require_scope(Scope.SUBMIT)],
    prefix="/v1",
    tags=["dicom results"],
    responses={**COMMON_ERRORS, **error_responses(409)},
)


@router.post("/deliveries/{delivery_id}/retry", status_code=202, response_model=DeliveryPublic)
def post_delivery_retry(
    delivery_id: uuid.UUID, session: SessionDep, caller: CallerDep
) -> DeliveryPublic:
    """Send a dead delivery again, with a fresh set of attempts; its objects keep their SOP
    Instance UIDs, so the destination never holds two copies."""
    delivery = get_delivery(
        session=session, tenant_id=caller.tenant.id, delivery_id=delivery_id, for_update=True
    )
    if delivery is None:
        raise ApiError(
            404, "delivery_not_found", f"no delivery {delivery_id} exists for this API key"
        )
    if delivery.status != ExportDeliveryStatus.DEAD:
        raise ApiError(
            409,
            "delivery_not_dead",
            f"delivery {delivery_id} is {delivery.status.value}; only a dead delivery is "
            "retried by request (a pending one is retried on its own)",
        )
    retry_delivery(delivery)
    caller.audit(session, AuditAction.EXPORT, "delivery", delivery.id, retry=True)
    session.commit()
    return DeliveryPublic.of(delivery)
