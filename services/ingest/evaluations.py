"""Evaluations: a tenant asks for model versions to be measured on its exams with outcomes;
the work is queued on the trainer's queue (services/worker/evaluation.py)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from services.ingest.deps import CallerDep, ProducerDep, SessionDep
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import (
    COMMON_ERRORS,
    EvaluationCreate,
    EvaluationPublic,
    error_responses,
    evaluation_public,
)
from shared.db.models import AuditAction, Batch, Evaluation, Scope
from shared.evaluations import enqueue_evaluation, versions_by_id
from shared.ml.registry import active_model

router = APIRouter(
    dependencies=[require_scope(Scope.SUBMIT)],
    prefix="/v1",
    tags=["evaluations"],
    responses={**COMMON_ERRORS, **error_responses(404)},
)


@router.post("/evaluations", status_code=202, response_model=EvaluationPublic)
def post_evaluation(
    body: EvaluationCreate, session: SessionDep, caller: CallerDep, producer: ProducerDep
) -> EvaluationPublic:
    """Measure one model version (or two, compared on the same exams) on this tenant's exams
    that have outcomes. Queued: poll GET /v1/evaluations/{id} on the results service."""
    version_ids = body.model_versions
    if not version_ids:
        active = active_model(session=session)
        if active is None:
            raise ApiError(404, "model_not_found", "no model version is active; name one")
        version_ids = [active.id]
    missing = set(version_ids) - set(versions_by_id(session, version_ids))
    if missing:
        raise ApiError(
            404,
            "model_not_found",
            f"no model version {', '.join(sorted(str(v) for v in missing))}; "
            "GET /v1/models lists them",
        )
    if body.batch_ids:
        owned = set(
            session.scalars(
                select(Batch.id).where(
                    Batch.tenant_id == caller.tenant.id, Batch.id.in_(body.batch_ids)
                )
            )
        )
        unknown = sorted(str(b) for b in set(body.batch_ids) - owned)
        if unknown:
            raise ApiError(
                404, "batch_not_found", f"no batch {', '.join(unknown)} exists for this API key"
            )
    evaluation = Evaluation(
        tenant_id=caller.tenant.id,
        model_version_ids=version_ids,
        batch_ids=list(dict.fromkeys(body.batch_ids)),
        outcomes_from=body.outcomes_from,
        outcomes_to=body.outcomes_to,
        seed=body.seed,
    )
    session.add(evaluation)
    session.flush()
    caller.audit(session, AuditAction.CREATE, "evaluation", evaluation.id)
    session.commit()
    # After the commit: the worker must find the row. A message lost here is resent by the
    # sweeper once the row has waited training_stale_s.
    enqueue_evaluation(producer, evaluation.id)
    return evaluation_public(evaluation)
