"""Evaluations in Postgres: created by the ingest API, claimed and finished by the trainer's
worker (services/worker/evaluation.py), resent by the sweeper when one was lost; and the
exams, images and existing scores an evaluation reads."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.db.base import utcnow
from shared.db.models import (
    Evaluation,
    ExamOutcome,
    Image,
    ImageStatus,
    ModelVersion,
    OutcomeTruth,
    Prediction,
    ShadowScore,
    Study,
    TrainingStatus,
)
from shared.queue import Queue, TaskName

# Images an evaluation scores: screened ones, and those a training batch stored unscreened.
EVALUATED_STATUSES = (ImageStatus.DONE, ImageStatus.STORED)


def enqueue_evaluation(producer: Celery, evaluation_id: uuid.UUID) -> None:
    producer.send_task(
        TaskName.EVALUATE_MODELS.value, args=[str(evaluation_id)], queue=Queue.TRAINING.value
    )


def get_evaluation(
    *, session: Session, tenant_id: uuid.UUID, evaluation_id: uuid.UUID
) -> Evaluation | None:
    return session.scalar(
        select(Evaluation).where(Evaluation.id == evaluation_id, Evaluation.tenant_id == tenant_id)
    )


def claim_evaluation(session: Session, evaluation_id: uuid.UUID) -> Evaluation | None:
    """The evaluation, now running (attempts + 1), or None when it is finished already."""
    evaluation = session.get(Evaluation, evaluation_id, with_for_update=True)
    if evaluation is None or evaluation.status in (
        TrainingStatus.COMPLETED,
        TrainingStatus.FAILED,
    ):
        return None
    evaluation.status = TrainingStatus.RUNNING
    evaluation.attempts += 1
    evaluation.touched_at = utcnow()
    return evaluation


def finish_evaluation(
    session: Session,
    evaluation_id: uuid.UUID,
    *,
    figures: dict[str, object] | None = None,
    error: tuple[str, str] | None = None,
) -> None:
    evaluation = session.get_one(Evaluation, evaluation_id, with_for_update=True)
    evaluation.status = TrainingStatus.FAILED if error else TrainingStatus.COMPLETED
    evaluation.figures = figures
    evaluation.error_code, evaluation.error_message = error or (None, None)
    evaluation.finished_at = utcnow()


def resend_stalled_evaluations(
    session: Session, producer: Celery, *, stale_s: float, max_attempts: int, now: datetime
) -> int:
    """Evaluations queued or running untouched for `stale_s` (a lost message, a killed
    trainer): sent again, or failed after `max_attempts`. Returns how many were resent."""
    stalled = session.scalars(
        select(Evaluation)
        .where(
            Evaluation.status.in_((TrainingStatus.QUEUED, TrainingStatus.RUNNING)),
            Evaluation.touched_at < now - timedelta(seconds=stale_s),
        )
        .with_for_update(skip_locked=True)
    ).all()
    resend = []
    for evaluation in stalled:
        if evaluation.attempts >= max_attempts:
            evaluation.status = TrainingStatus.FAILED
            evaluation.error_code = "evaluation_kept_failing"
            evaluation.error_message = (
                f"the evaluation stopped {evaluation.attempts} times without finishing; "
                "see the trainer's log, then ask for it again"
            )
            evaluation.finished_at = now
        else:
            evaluation.touched_at = now
            resend.append(evaluation.id)
    session.commit()
    for evaluation_id in resend:
        enqueue_evaluation(producer, evaluation_id)
    return len(resend)


@dataclass(frozen=True)
class EvaluationImage:
    image_id: uuid.UUID
    object_key: str
    media_type: str
    laterality: str
    view: str


@dataclass(frozen=True)
class ExamWithOutcome:
    study_id: uuid.UUID
    malignant: bool
    images: list[EvaluationImage]


def exams_with_outcomes(session: Session, evaluation: Evaluation) -> list[ExamWithOutcome]:
    """The tenant's exams the evaluation covers: those with an outcome, in its batches, or
    with an outcome dated in its range; each malignant when any outcome says so."""
    outcomes = select(ExamOutcome.study_id, ExamOutcome.truth).where(
        ExamOutcome.tenant_id == evaluation.tenant_id
    )
    if evaluation.batch_ids:
        outcomes = outcomes.join(Study, Study.id == ExamOutcome.study_id).where(
            Study.batch_id.in_(evaluation.batch_ids)
        )
    if evaluation.outcomes_from is not None:
        outcomes = outcomes.where(ExamOutcome.outcome_date >= evaluation.outcomes_from)
    if evaluation.outcomes_to is not None:
        outcomes = outcomes.where(ExamOutcome.outcome_date <= evaluation.outcomes_to)
    malignant: dict[uuid.UUID, bool] = {}
    for study_id, truth in session.execute(outcomes):
        malignant[study_id] = malignant.get(study_id, False) or truth == OutcomeTruth.MALIGNANT
    images: dict[uuid.UUID, list[EvaluationImage]] = {}
    rows = session.execute(
        select(
            Image.study_id,
            Image.id,
            Image.object_key,
            Image.media_type,
            Image.laterality,
            Image.view,
        )
        .where(
            Image.tenant_id == evaluation.tenant_id,
            Image.study_id.in_(list(malignant)),
            Image.status.in_(EVALUATED_STATUSES),
        )
        .order_by(Image.id)
    )
    for study_id, image_id, key, media_type, laterality, view in rows:
        if laterality is None or view is None:
            continue
        images.setdefault(study_id, []).append(
            EvaluationImage(image_id, key, media_type, laterality.value, view.value)
        )
    return [
        ExamWithOutcome(study_id, malignant[study_id], images[study_id])
        for study_id in sorted(images)
    ]


def existing_scores(
    session: Session, image_ids: Sequence[uuid.UUID], version_id: uuid.UUID
) -> dict[uuid.UUID, float]:
    """Scores the version gave these images when it screened them, or in shadow mode."""
    found: dict[uuid.UUID, float] = {}
    for start in range(0, len(image_ids), 10_000):
        chunk = image_ids[start : start + 10_000]
        screened = select(Prediction.image_id, Prediction.malignancy_score).where(
            Prediction.model_version_id == version_id, Prediction.image_id.in_(chunk)
        )
        shadowed = select(ShadowScore.image_id, ShadowScore.score).where(
            ShadowScore.model_version_id == version_id,
            ShadowScore.image_id.in_(chunk),
            ShadowScore.score.is_not(None),
        )
        for rows in (session.execute(shadowed), session.execute(screened)):
            found.update({image_id: float(score) for image_id, score in rows if score is not None})
    return found


def versions_by_id(session: Session, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ModelVersion]:
    return {v.id: v for v in session.scalars(select(ModelVersion).where(ModelVersion.id.in_(ids)))}


def touch(session: Session, evaluation_id: uuid.UUID) -> None:
    """The evaluation is alive (a long scoring pass calls this), so the sweeper leaves it."""
    session.execute(
        update(Evaluation).where(Evaluation.id == evaluation_id).values(touched_at=utcnow())
    )
