"""Training runs in Postgres: creation, the worker's claim and heartbeat, the metric curve,
and the sweeper's step that resumes runs whose worker died. No torch here."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.base import utcnow
from shared.db.models import (
    Image,
    Laterality,
    Split,
    Study,
    TrainingEpoch,
    TrainingExample,
    TrainingLabel,
    TrainingRun,
    TrainingRunKind,
    TrainingStatus,
    View,
)
from shared.queue import Queue, TaskName

SWEEP_LIMIT = 100


def enqueue_training(producer: Celery, run_id: uuid.UUID) -> None:
    producer.send_task(TaskName.TRAIN_MODEL.value, args=[str(run_id)], queue=Queue.TRAINING.value)


def get_run(*, session: Session, tenant_id: uuid.UUID, run_id: uuid.UUID) -> TrainingRun | None:
    return session.scalar(
        select(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.tenant_id == tenant_id)
    )


def list_runs(*, session: Session, tenant_id: uuid.UUID, limit: int) -> list[TrainingRun]:
    """The tenant's runs as submitted (a cross-validation's folds are listed under it)."""
    return list(
        session.scalars(
            select(TrainingRun)
            .where(TrainingRun.tenant_id == tenant_id, TrainingRun.parent_id.is_(None))
            .order_by(TrainingRun.created_at.desc(), TrainingRun.id.desc())
            .limit(limit)
        )
    )


def metric_curve(*, session: Session, run_id: uuid.UUID) -> list[TrainingEpoch]:
    return list(
        session.scalars(
            select(TrainingEpoch)
            .where(TrainingEpoch.run_id == run_id)
            .order_by(TrainingEpoch.epoch)
        )
    )


@dataclass(frozen=True)
class DatasetImage:
    """A labelled image of a run, with what the worker needs to load it."""

    image_id: uuid.UUID
    object_key: str
    media_type: str
    patient_key: str
    study_key: str
    laterality: Laterality
    view: View
    label: TrainingLabel
    split: Split
    box: tuple[int, int, int, int] | None


def dataset_images(*, session: Session, run_id: uuid.UUID) -> list[DatasetImage]:
    rows = session.execute(
        select(TrainingExample, Image, Study)
        .join(Image, Image.id == TrainingExample.image_id)
        .join(Study, Study.id == Image.study_id)
        .where(TrainingExample.run_id == run_id)
        .order_by(Image.id)
    )
    images = []
    for example, image, study in rows:
        # Checked when the run was created.
        assert image.laterality is not None
        assert image.view is not None
        images.append(
            DatasetImage(
                image.id,
                image.object_key,
                image.media_type,
                study.patient_key,
                # The exam: studies are per batch, so the study row id is the exam's identity.
                str(study.id),
                image.laterality,
                image.view,
                example.label,
                example.split,
                tuple(example.box) if example.box else None,  # type: ignore[arg-type]
            )
        )
    return images


class RunNotClaimable(Exception):
    """The run is finished, or another worker is training it right now."""


def claim_run(
    *, session: Session, run_id: uuid.UUID, stale_s: float, max_attempts: int
) -> TrainingRun:
    """Take the run for this worker: queued, or running with a stopped heartbeat."""
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id).with_for_update())
    if run is None or run.status in (TrainingStatus.COMPLETED, TrainingStatus.FAILED):
        raise RunNotClaimable(f"training run {run_id} is finished or unknown")
    if run.kind == TrainingRunKind.CROSS_VALIDATION:
        raise RunNotClaimable(f"training run {run_id} is a cross-validation: its stages train")
    fresh = utcnow() - timedelta(seconds=stale_s)
    if (
        run.status == TrainingStatus.RUNNING
        and run.heartbeat_at is not None
        and run.heartbeat_at > fresh
    ):
        raise RunNotClaimable(f"training run {run_id} is being trained by another worker")
    if run.attempts >= max_attempts:
        fail_with_parent(
            session,
            run,
            code="too_many_attempts",
            message=f"the worker training this run stopped {run.attempts} times; it was not "
            "started again",
        )
        raise RunNotClaimable(f"training run {run_id} failed after {run.attempts} attempts")
    run.status = TrainingStatus.RUNNING
    run.attempts += 1
    run.started_at = run.started_at or utcnow()
    run.heartbeat_at = utcnow()
    session.flush()
    return run


def beat(*, session: Session, run_id: uuid.UUID, attempt: int) -> bool:
    """Renew the heartbeat; False when this attempt no longer owns the run."""
    result = session.execute(
        update(TrainingRun)
        .where(
            TrainingRun.id == run_id,
            TrainingRun.status == TrainingStatus.RUNNING,
            TrainingRun.attempts == attempt,
        )
        .values(heartbeat_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_epoch(
    *,
    session: Session,
    run: TrainingRun,
    epoch: int,
    metrics: dict[str, float | None],
    checkpoint_key: str,
) -> None:
    """One point of the curve and the checkpoint that follows it, in one transaction. A
    repeated epoch (a resumed run redoing one whose commit was lost) replaces its row."""
    values = {"run_id": run.id, "epoch": epoch, "attempt": run.attempts, **metrics}
    statement = insert(TrainingEpoch).values(created_at=utcnow(), **values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[TrainingEpoch.run_id, TrainingEpoch.epoch],
            set_={k: statement.excluded[k] for k in (*metrics, "attempt", "created_at")},
        )
    )
    run.epochs_done = epoch + 1
    run.checkpoint_key = checkpoint_key
    run.heartbeat_at = utcnow()


def fail_run(run: TrainingRun, *, code: str, message: str) -> None:
    run.status = TrainingStatus.FAILED
    run.error_code = code
    run.error_message = message
    run.finished_at = utcnow()


def fail_with_parent(session: Session, run: TrainingRun, *, code: str, message: str) -> None:
    """Fail the run, and the cross-validation it is a stage of: without every fold there is
    no pooled evaluation to judge a model on."""
    fail_run(run, code=code, message=message)
    if run.parent_id is not None:
        parent = session.get_one(TrainingRun, run.parent_id, with_for_update=True)
        if parent.status not in (TrainingStatus.COMPLETED, TrainingStatus.FAILED):
            stage = "the final model" if run.fold is None else f"fold {run.fold}"
            fail_run(parent, code=code, message=f"{stage} failed: {message}")


def stages(*, session: Session, parent_id: uuid.UUID) -> list[TrainingRun]:
    """A cross-validation's folds in order, then its final model (once it exists)."""
    return list(
        session.scalars(
            select(TrainingRun)
            .where(TrainingRun.parent_id == parent_id)
            .order_by(TrainingRun.kind, TrainingRun.fold)
        )
    )


def fold_evaluations(*, session: Session, parent_id: uuid.UUID) -> list[dict[str, Any]]:
    return [
        run.evaluation
        for run in stages(session=session, parent_id=parent_id)
        if run.kind == TrainingRunKind.FOLD and run.evaluation is not None
    ]


def complete_fold(
    *, session: Session, run: TrainingRun, evaluation: dict[str, Any]
) -> uuid.UUID | None:
    """Complete a fold; when it is the last of its cross-validation, create the final model's
    run (every image for training, for the folds' median best epoch count) and return its id
    for the caller to send after the commit. Idempotent: the parent row is locked, and a
    final run is made once."""
    complete_run(run, model_version_id=None, evaluation=evaluation)
    assert run.parent_id is not None
    parent = session.get_one(TrainingRun, run.parent_id, with_for_update=True)
    session.flush()
    children = stages(session=session, parent_id=parent.id)
    folds = [c for c in children if c.kind == TrainingRunKind.FOLD]
    if parent.status == TrainingStatus.FAILED or any(
        c.status != TrainingStatus.COMPLETED for c in folds
    ):
        return None
    if any(c.kind == TrainingRunKind.FINAL for c in children):
        return None
    best_epochs = sorted(int(c.evaluation["best_epoch"]) for c in folds if c.evaluation)
    epochs = max(1, best_epochs[len(best_epochs) // 2] + 1)
    final = TrainingRun(
        tenant_id=parent.tenant_id,
        name=f"{parent.name} (final model)",
        kind=TrainingRunKind.FINAL,
        parent_id=parent.id,
        hyperparameters={**parent.hyperparameters, "epochs": epochs, "folds": 1},
        seed=parent.seed,
        split_sizes={},
    )
    session.add(final)
    session.flush()
    for example in session.scalars(
        select(TrainingExample).where(TrainingExample.run_id == folds[0].id)
    ):
        session.add(
            TrainingExample(
                run_id=final.id,
                image_id=example.image_id,
                label=example.label,
                split=Split.TRAIN,
                box=example.box,
            )
        )
    return final.id


def complete_run(
    run: TrainingRun, *, model_version_id: uuid.UUID | None, evaluation: dict[str, Any]
) -> None:
    run.status = TrainingStatus.COMPLETED
    run.model_version_id = model_version_id
    run.evaluation = evaluation
    run.finished_at = utcnow()


def resend_stalled_runs(
    *, session: Session, producer: Celery, stale_s: float, requeue_after_s: float
) -> int:
    """Send again: running runs whose heartbeat stopped (their worker died; they resume from
    the last checkpoint), and queued runs never sent or never picked up."""
    now = utcnow()
    stale: datetime = now - timedelta(seconds=stale_s)
    unsent: datetime = now - timedelta(seconds=requeue_after_s)
    runs: Sequence[TrainingRun] = list(
        session.scalars(
            select(TrainingRun)
            .where(
                or_(
                    (TrainingRun.status == TrainingStatus.RUNNING)
                    & (TrainingRun.heartbeat_at < stale),
                    (TrainingRun.status == TrainingStatus.QUEUED)
                    & (TrainingRun.enqueued_at.is_(None) | (TrainingRun.enqueued_at < unsent)),
                ),
                # A cross-validation is trained by its stages, which are sent themselves.
                TrainingRun.kind != TrainingRunKind.CROSS_VALIDATION,
            )
            .order_by(TrainingRun.created_at)
            .limit(SWEEP_LIMIT)
            .with_for_update(skip_locked=True)
        )
    )
    for run in runs:
        enqueue_training(producer, run.id)
        run.status = TrainingStatus.QUEUED
        run.enqueued_at = now
    session.flush()
    return len(runs)
