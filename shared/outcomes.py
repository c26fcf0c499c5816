"""Exam outcomes: what a site learned later about the exams it screened (biopsy, surgery,
follow-up), the ground truth its evaluations are measured against.

A site names an exam by our id, or by its own study key: the StudyInstanceUID it sent (kept
only as a keyed pseudonym, which is derived here the same way) or the study key it gave with
a non-DICOM upload. A study key names every exam of the tenant made from that study (the
same study screened in two batches gets the outcome twice).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.base import new_id, utcnow
from shared.db.models import Breast, ExamOutcome, OutcomeSource, OutcomeTruth, Study
from shared.pseudonyms import pseudonymous_uid

MAX_OUTCOMES_PER_REQUEST = 10_000


@dataclass(frozen=True)
class OutcomeReport:
    """One outcome as a site reports it, naming its exam by `exam_id` or by `study_key`."""

    truth: OutcomeTruth
    breast: Breast
    source: OutcomeSource
    outcome_date: date
    exam_id: uuid.UUID | None = None
    study_key: str | None = None


class UnknownExams(Exception):
    """Reports that name no exam of the tenant: their positions in the request (from 0)."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"{len(rows)} outcomes name no exam")
        self.rows = rows


def _exams_by_study_key(
    session: Session, tenant_id: uuid.UUID, keys: set[str], secret: str
) -> dict[str, list[uuid.UUID]]:
    if not keys:
        return {}
    asked_as = {key: key for key in keys} | {pseudonymous_uid(secret, key): key for key in keys}
    found: dict[str, list[uuid.UUID]] = defaultdict(list)
    rows = session.execute(
        select(Study.study_key, Study.id).where(
            Study.tenant_id == tenant_id, Study.study_key.in_(list(asked_as))
        )
    )
    for stored_key, study_id in rows:
        found[asked_as[stored_key]].append(study_id)
    return found


def resolve_exams(
    session: Session, tenant_id: uuid.UUID, reports: Sequence[OutcomeReport], *, secret: str
) -> list[list[uuid.UUID]]:
    """Each report's exams of the tenant; raises UnknownExams naming every report with none."""
    ids = {r.exam_id for r in reports if r.exam_id is not None}
    known = (
        set(
            session.scalars(select(Study.id).where(Study.tenant_id == tenant_id, Study.id.in_(ids)))
        )
        if ids
        else set()
    )
    by_key = _exams_by_study_key(
        session, tenant_id, {r.study_key for r in reports if r.study_key is not None}, secret
    )
    exams = [
        ([r.exam_id] if r.exam_id in known else [])
        if r.exam_id is not None
        else by_key.get(r.study_key or "", [])
        for r in reports
    ]
    unknown = [row for row, found in enumerate(exams) if not found]
    if unknown:
        raise UnknownExams(unknown)
    return exams


def record_outcomes(
    session: Session,
    tenant_id: uuid.UUID,
    reports: Sequence[OutcomeReport],
    *,
    secret: str,
    recorded_by: str,
) -> list[ExamOutcome]:
    """Record every report, or none when one names no exam (UnknownExams). An outcome
    already recorded for the same exam, breast and source is replaced. Returns the rows
    written. The caller commits."""
    exams = resolve_exams(session, tenant_id, reports, secret=secret)
    now = utcnow()
    # One row per (exam, breast, source): a later report in the same request wins.
    rows = {
        (study_id, r.breast, r.source): {
            "id": new_id(),
            "tenant_id": tenant_id,
            "study_id": study_id,
            "truth": r.truth,
            "breast": r.breast,
            "source": r.source,
            "outcome_date": r.outcome_date,
            "recorded_by": recorded_by,
            "recorded_at": now,
        }
        for r, study_ids in zip(reports, exams, strict=True)
        for study_id in study_ids
    }
    statement = insert(ExamOutcome)
    upsert = statement.on_conflict_do_update(
        index_elements=["study_id", "breast", "source"],
        set_={
            "truth": statement.excluded.truth,
            "outcome_date": statement.excluded.outcome_date,
            "recorded_by": statement.excluded.recorded_by,
            "recorded_at": statement.excluded.recorded_at,
        },
    )
    return list(session.scalars(upsert.returning(ExamOutcome), list(rows.values())))


def outcomes_of(session: Session, tenant_id: uuid.UUID, study_id: uuid.UUID) -> list[ExamOutcome]:
    """An exam's outcomes, latest outcome date first."""
    return list(
        session.scalars(
            select(ExamOutcome)
            .where(ExamOutcome.tenant_id == tenant_id, ExamOutcome.study_id == study_id)
            .order_by(ExamOutcome.outcome_date.desc(), ExamOutcome.breast, ExamOutcome.source)
        )
    )
