"""A tenant's own operating point per model version: chosen on one of its evaluations for a
target sensitivity or recall rate (shared/operating_points.py), or cleared."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from services.ingest.deps import CallerDep, SessionDep
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import (
    COMMON_ERRORS,
    OperatingPointPublic,
    OperatingPointSet,
    error_responses,
    operating_point_public,
)
from shared.db.models import AuditAction, ModelVersion, Scope, TrainingStatus
from shared.evaluations import get_evaluation
from shared.operating_points import (
    TargetUnreachable,
    choose_threshold,
    clear_operating_point,
    set_operating_point,
)

router = APIRouter(
    dependencies=[require_scope(Scope.SUBMIT)],
    prefix="/v1",
    tags=["models"],
    responses={**COMMON_ERRORS, **error_responses(404, 409)},
)


@router.put("/models/{version_id}/operating-point", response_model=OperatingPointPublic)
def put_operating_point(
    version_id: uuid.UUID, body: OperatingPointSet, session: SessionDep, caller: CallerDep
) -> OperatingPointPublic:
    """Use this tenant's own recall threshold for the version from now on, chosen on the
    named evaluation's exams for the target; every result then says `threshold_source:
    site`. The answer shows what the threshold gives on those exams."""
    if session.get(ModelVersion, version_id) is None:
        raise ApiError(404, "model_not_found", f"no model version {version_id}")
    evaluation = get_evaluation(
        session=session, tenant_id=caller.tenant.id, evaluation_id=body.evaluation_id
    )
    if evaluation is None:
        raise ApiError(
            404,
            "evaluation_not_found",
            f"no evaluation {body.evaluation_id} exists for this API key",
        )
    if evaluation.status != TrainingStatus.COMPLETED or evaluation.figures is None:
        raise ApiError(
            409,
            "evaluation_not_completed",
            f"evaluation {evaluation.id} is {evaluation.status.value}; choose an operating "
            "point on a completed one",
        )
    figures = next(
        (v for v in evaluation.figures["versions"] if v["model_version"]["id"] == str(version_id)),
        None,
    )
    if figures is None:
        raise ApiError(
            422,
            "version_not_evaluated",
            f"evaluation {evaluation.id} did not measure model version {version_id}; "
            "evaluate it first (POST /v1/evaluations)",
        )
    try:
        chosen = choose_threshold(figures, body.target, body.value)
    except TargetUnreachable as err:
        raise ApiError(422, "target_unreachable", f"{err}; choose a looser target") from err
    row = set_operating_point(
        session,
        tenant_id=caller.tenant.id,
        model_version_id=version_id,
        evaluation_id=evaluation.id,
        target=body.target,
        target_value=body.value,
        threshold=chosen.threshold,
        chosen_by=caller.key_prefix,
    )
    caller.audit(
        session,
        AuditAction.SET_OPERATING_POINT,
        "model_version",
        version_id,
        target=body.target.value,
        value=body.value,
        threshold=chosen.threshold,
        evaluation=str(evaluation.id),
    )
    session.commit()
    on_evaluation = {
        "sensitivity": chosen.sensitivity,
        "specificity": chosen.specificity,
        "recall_rate": chosen.recall_rate,
    }
    return operating_point_public(row, on_evaluation)


@router.delete("/models/{version_id}/operating-point", status_code=204)
def delete_operating_point(
    version_id: uuid.UUID, session: SessionDep, caller: CallerDep
) -> Response:
    """Back to the version's own threshold for this tenant."""
    if not clear_operating_point(session, tenant_id=caller.tenant.id, model_version_id=version_id):
        raise ApiError(
            404,
            "operating_point_not_found",
            f"this tenant has no operating point of its own for model version {version_id}",
        )
    caller.audit(
        session, AuditAction.SET_OPERATING_POINT, "model_version", version_id, cleared=True
    )
    session.commit()
    return Response(status_code=204)
