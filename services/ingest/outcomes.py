"""Outcomes a site reports for its exams (biopsy, surgery, follow-up): one, or a bulk import."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from services.ingest.deps import CallerDep, SessionDep, SettingsDep
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import (
    COMMON_ERRORS,
    OutcomeImport,
    OutcomeImportResult,
    OutcomeIn,
    OutcomePublic,
    error_responses,
    outcome_public,
)
from shared.db.models import AuditAction, Scope
from shared.outcomes import OutcomeReport, UnknownExams, record_outcomes

router = APIRouter(
    dependencies=[require_scope(Scope.SUBMIT)],
    prefix="/v1",
    tags=["outcomes"],
    responses={**COMMON_ERRORS, **error_responses(404)},
)


@router.post("/exams/{exam_id}/outcome", status_code=201, response_model=OutcomePublic)
def post_outcome(
    exam_id: uuid.UUID,
    body: OutcomeIn,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
) -> OutcomePublic:
    """Record what became of an exam, for one breast or both, from one source (biopsy,
    surgery, follow-up ...). Recording the same exam, breast and source again replaces it."""
    report = OutcomeReport(body.truth, body.breast, body.source, body.date, exam_id=exam_id)
    try:
        [row] = record_outcomes(
            session,
            caller.tenant.id,
            [report],
            secret=settings.patient_key_secret,
            recorded_by=caller.key_prefix,
        )
    except UnknownExams as err:
        raise ApiError(404, "exam_not_found", f"no exam {exam_id} exists for this API key") from err
    caller.audit(session, AuditAction.RECORD_OUTCOME, "study", exam_id, outcomes=1)
    session.commit()
    return outcome_public(row)


@router.post("/outcomes", response_model=OutcomeImportResult)
def post_outcomes(
    body: OutcomeImport, session: SessionDep, caller: CallerDep, settings: SettingsDep
) -> OutcomeImportResult:
    """Record many outcomes at once, each naming its exam by `exam_id` or by the site's
    `study_key` (the StudyInstanceUID it sent, or the study key given with an upload). All or
    nothing: when one names no exam, none is recorded and the answer lists which. Importing
    the same outcomes again replaces them, so an import can be repeated."""
    reports = [
        OutcomeReport(
            row.truth,
            row.breast,
            row.source,
            row.date,
            exam_id=row.exam_id,
            study_key=row.study_key,
        )
        for row in body.outcomes
    ]
    try:
        rows = record_outcomes(
            session,
            caller.tenant.id,
            reports,
            secret=settings.patient_key_secret,
            recorded_by=caller.key_prefix,
        )
    except UnknownExams as err:
        session.rollback()
        shown = err.rows[:20]
        raise ApiError(
            422,
            "unknown_exams",
            f"{len(err.rows)} of {len(reports)} outcomes name no exam of yours "
            f"(rows {', '.join(str(r) for r in shown)}{' ...' if len(err.rows) > 20 else ''}, "
            "counted from 0); nothing was recorded. Check their exam_id or study_key.",
            detail={"rows": err.rows},
        ) from err
    exams = len({row.study_id for row in rows})
    caller.audit(
        session, AuditAction.RECORD_OUTCOME, "outcomes", None, outcomes=len(rows), exams=exams
    )
    session.commit()
    return OutcomeImportResult(recorded=len(rows), exams=exams)
