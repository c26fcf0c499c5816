"""Training runs (status and metric curve) and the model registry, read-only."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from services.results.deps import CallerDep, SessionDep, SettingsDep
from services.results.presenters import drift_report
from services.results.schemas import (
    DriftReport,
    EpochPoint,
    ModelsPage,
    ModelVersionDetail,
    ModelVersionPublic,
    TrainingRunDetail,
    TrainingRunsPage,
    TrainingStage,
)
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import (
    COMMON_ERRORS,
    EvaluationPublic,
    OperatingPointsList,
    evaluation_public,
    operating_point_public,
)
from shared.db.models import AuditAction, ModelVersion, Scope, TrainingRun, TrainingRunKind
from shared.evaluations import get_evaluation
from shared.ml.registry import active_model, list_models
from shared.operating_points import operating_points, site_thresholds
from shared.shadow import shadow_agreement
from shared.training_runs import get_run, list_runs, metric_curve, stages

router = APIRouter(dependencies=[require_scope(Scope.READ)], prefix="/v1", responses=COMMON_ERRORS)


def _run_detail(session: Session, run: TrainingRun) -> TrainingRunDetail:
    version = session.get(ModelVersion, run.model_version_id) if run.model_version_id else None
    return TrainingRunDetail(
        id=run.id,
        name=run.name,
        status=run.status,
        seed=run.seed,
        hyperparameters=run.hyperparameters,
        split_sizes=run.split_sizes,
        attempts=run.attempts,
        epochs_done=run.epochs_done,
        evaluation=run.evaluation,
        model_version=ModelVersionPublic.model_validate(version) if version else None,
        error_code=run.error_code,
        error_message=run.error_message,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        curve=[EpochPoint.model_validate(p) for p in metric_curve(session=session, run_id=run.id)],
        kind=run.kind.value,
        parent_id=run.parent_id,
        fold=run.fold,
        stages=[
            TrainingStage(
                id=stage.id,
                kind=stage.kind.value,
                fold=stage.fold,
                status=stage.status,
                epochs_done=stage.epochs_done,
                exam_auc=(stage.evaluation or {}).get("exam_auc"),
            )
            for stage in stages(session=session, parent_id=run.id)
        ]
        if run.kind == TrainingRunKind.CROSS_VALIDATION
        else [],
    )


@router.get("/training-runs", response_model=TrainingRunsPage, tags=["training"])
def get_training_runs(
    session: SessionDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> TrainingRunsPage:
    runs = list_runs(session=session, tenant_id=caller.tenant.id, limit=limit)
    return TrainingRunsPage(items=[_run_detail(session, run) for run in runs])


@router.get("/training-runs/{run_id}", response_model=TrainingRunDetail, tags=["training"])
def get_training_run(
    run_id: uuid.UUID, session: SessionDep, caller: CallerDep
) -> TrainingRunDetail:
    """Status, split sizes, the per-epoch metric curve and, once finished, the evaluation."""
    run = get_run(session=session, tenant_id=caller.tenant.id, run_id=run_id)
    if run is None:
        raise ApiError(404, "training_run_not_found", f"no training run {run_id} for this key")
    caller.audit(session, AuditAction.READ, "training_run", run.id)
    session.commit()
    return _run_detail(session, run)


@router.get("/models", response_model=ModelsPage, tags=["models"])
def get_models(session: SessionDep, caller: CallerDep) -> ModelsPage:
    """Every registered model version, newest first, with metrics and model cards."""
    return ModelsPage(
        items=[ModelVersionDetail.model_validate(v) for v in list_models(session=session)]
    )


@router.get("/models/{version_id}", response_model=ModelVersionDetail, tags=["models"])
def get_model(version_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> ModelVersionDetail:
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise ApiError(404, "model_not_found", f"no model version {version_id}")
    return ModelVersionDetail.model_validate(version)


@router.get("/evaluations/{evaluation_id}", response_model=EvaluationPublic, tags=["evaluations"])
def get_evaluation_result(
    evaluation_id: uuid.UUID, session: SessionDep, caller: CallerDep
) -> EvaluationPublic:
    """An evaluation's status and, once completed, its figures (POST /v1/evaluations)."""
    evaluation = get_evaluation(
        session=session, tenant_id=caller.tenant.id, evaluation_id=evaluation_id
    )
    if evaluation is None:
        raise ApiError(
            404, "evaluation_not_found", f"no evaluation {evaluation_id} exists for this API key"
        )
    caller.audit(session, AuditAction.READ, "evaluation", evaluation.id)
    session.commit()
    return evaluation_public(evaluation)


@router.get("/operating-points", response_model=OperatingPointsList, tags=["models"])
def get_operating_points(session: SessionDep, caller: CallerDep) -> OperatingPointsList:
    """This tenant's own recall thresholds, per model version (PUT
    /v1/models/{id}/operating-point on the ingest service sets one)."""
    return OperatingPointsList(
        items=[operating_point_public(row) for row in operating_points(session, caller.tenant.id)]
    )


@router.get("/models/{version_id}/shadow", tags=["models"])
def get_shadow_agreement(
    version_id: uuid.UUID, session: SessionDep, caller: CallerDep
) -> dict[str, Any]:
    """How the version, in shadow mode, agrees with the active one on this tenant's exams
    both scored: recall agreement (each at its threshold, or this tenant's operating point)
    and rank correlation of exam scores. Shadow scores appear nowhere else."""
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise ApiError(404, "model_not_found", f"no model version {version_id}")
    active = active_model(session=session)
    if active is None or active.id == version.id:
        raise ApiError(
            409, "not_in_shadow", f"{version.name} is active; agreement compares a shadow to it"
        )
    return shadow_agreement(
        session, caller.tenant.id, version, active, site_thresholds(session, caller.tenant.id)
    )


@router.get("/drift", response_model=DriftReport, tags=["models"])
def get_drift(
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
    weeks: Annotated[int, Query(ge=1, le=104)] = 12,
) -> DriftReport:
    """This tenant's weekly drift figures, newest first: each week's exam scores against the
    screening version's held-out reference (population stability index; `alarm` above
    `psi_threshold` from `min_exams` exams on) and what its inputs looked like. The
    workers recompute the current and the previous week every drift_interval_s."""
    return drift_report(session, settings, caller.tenant.id, weeks)
