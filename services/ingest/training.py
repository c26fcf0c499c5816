"""POST /v1/training-runs: a labelled dataset of stored images, hyperparameters and a seed.

Everything that can be wrong with the request is found here, before a run exists: unknown or
ambiguous images, images without laterality or view, and a dataset too small for each split
to hold malignant and non-malignant exams. The run, its examples (with their patient-level
split) and the outbox mark commit in one transaction; the task is sent after the commit.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import replace

from fastapi import APIRouter
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError as DatabaseError

from services.ingest.deps import CallerDep, ProducerDep, SessionDep
from services.ingest.schemas import LabelledImage, TrainingRunAccepted, TrainingRunCreate
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.schemas import COMMON_ERRORS, error_responses
from shared.batches import get_batch
from shared.db.base import utcnow
from shared.db.models import (
    AuditAction,
    Image,
    ImageStatus,
    Scope,
    Split,
    Study,
    TrainingExample,
    TrainingLabel,
    TrainingRun,
    TrainingRunKind,
    TrainingStatus,
)
from shared.ml.config import (
    TrainingConfig,
    fold_split,
    folds_for,
    split_by_patient,
    stratified_folds,
)
from shared.ml.registry import RegistryError, resolve_init_from
from shared.training_runs import enqueue_training

log = logging.getLogger(__name__)
router = APIRouter(
    dependencies=[require_scope(Scope.SUBMIT)],
    prefix="/v1",
    tags=["training"],
    responses={**COMMON_ERRORS, **error_responses(422)},
)

USABLE_STATUSES = (ImageStatus.STORED, ImageStatus.DONE, ImageStatus.QUEUED, ImageStatus.RUNNING)
MAX_LISTED = 10


def _resolve_images(
    spec: TrainingRunCreate, session: SessionDep, tenant_id: uuid.UUID
) -> list[tuple[Image, Study, LabelledImage]]:
    dataset = spec.dataset
    by_file: dict[str, list[tuple[Image, Study]]] = {}
    by_id: dict[uuid.UUID, tuple[Image, Study]] = {}
    if dataset.batch_id is not None:
        if get_batch(session=session, tenant_id=tenant_id, batch_id=dataset.batch_id) is None:
            raise ApiError(404, "batch_not_found", f"no batch {dataset.batch_id} for this key")
        for image, study in session.execute(
            select(Image, Study)
            .join(Study, Study.id == Image.study_id)
            .where(Image.batch_id == dataset.batch_id, Image.tenant_id == tenant_id)
        ):
            by_file.setdefault(image.filename, []).append((image, study))
    wanted_ids = [item.image_id for item in dataset.labels if item.image_id is not None]
    if wanted_ids:
        for image, study in session.execute(
            select(Image, Study)
            .join(Study, Study.id == Image.study_id)
            .where(Image.id.in_(wanted_ids), Image.tenant_id == tenant_id)
        ):
            by_id[image.id] = (image, study)
    resolved: list[tuple[Image, Study, LabelledImage]] = []
    unknown: list[str] = []
    ambiguous: list[str] = []
    for item in dataset.labels:
        if item.image_id is not None:
            found = by_id.get(item.image_id)
            if found is None:
                unknown.append(str(item.image_id))
                continue
        else:
            assert item.file is not None
            matches = by_file.get(item.file, [])
            if len(matches) != 1:
                (ambiguous if matches else unknown).append(item.file)
                continue
            found = matches[0]
        resolved.append((found[0], found[1], item))
    if unknown:
        raise ApiError(
            422,
            "unknown_image",
            f"{len(unknown)} labelled images are not stored for this key (first: "
            f"{', '.join(unknown[:MAX_LISTED])}); upload them first, or fix the names",
            detail={"unknown": unknown[:MAX_LISTED], "count": len(unknown)},
        )
    if ambiguous:
        raise ApiError(
            422,
            "ambiguous_file",
            f"{len(ambiguous)} file names occur more than once in the batch (first: "
            f"{', '.join(ambiguous[:MAX_LISTED])}); label those images by image_id",
            detail={"ambiguous": ambiguous[:MAX_LISTED], "count": len(ambiguous)},
        )
    repeated = [str(i) for i, n in Counter(img.id for img, _, _ in resolved).items() if n > 1]
    if repeated:
        raise ApiError(
            422,
            "duplicate_label",
            f"{len(repeated)} images are labelled more than once; label each image once",
            detail={"image_ids": repeated[:MAX_LISTED]},
        )
    unusable = [
        img.filename
        for img, _, _ in resolved
        if img.status not in USABLE_STATUSES or img.laterality is None or img.view is None
    ]
    if unusable:
        raise ApiError(
            422,
            "image_not_usable",
            f"{len(unusable)} images failed screening or lack laterality/view (first: "
            f"{', '.join(unusable[:MAX_LISTED])}); leave them out or upload them with "
            "laterality and view",
            detail={"files": unusable[:MAX_LISTED], "count": len(unusable)},
        )
    return resolved


def _check_splits(
    resolved: list[tuple[Image, Study, LabelledImage]],
    splits: dict[uuid.UUID, Split],
    *,
    fold: int | None = None,
) -> dict[str, dict[str, int]]:
    sizes: dict[str, dict[str, int]] = {
        split.value: {"images": 0, "malignant_images": 0} for split in Split
    }
    for image, _, item in resolved:
        entry = sizes[splits[image.id].value]
        entry["images"] += 1
        entry["malignant_images"] += int(item.label == "malignant")
    short = [
        name
        for name, entry in sizes.items()
        if entry["malignant_images"] == 0 or entry["malignant_images"] == entry["images"]
    ]
    if short:
        where = f"fold {fold}'s " if fold is not None else "the "
        raise ApiError(
            422,
            "dataset_too_small",
            f"{where}{', '.join(short)} split(s) would have no malignant or no non-malignant "
            "image; label more patients (at least a few malignant and a few other patients "
            "per split) or change validation_fraction/test_fraction (or folds)",
            detail={"split_sizes": sizes, "fold": fold},
        )
    return sizes


def _add_run(
    session: SessionDep,
    resolved: list[tuple[Image, Study, LabelledImage]],
    splits: dict[uuid.UUID, Split],
    **columns: object,
) -> TrainingRun:
    run = TrainingRun(**columns)
    session.add(run)
    session.flush()
    session.add_all(
        TrainingExample(
            run_id=run.id,
            image_id=image.id,
            label=TrainingLabel(item.label),
            split=splits[image.id],
            box=item.box,
        )
        for image, _, item in resolved
    )
    return run


@router.post(
    "/training-runs",
    status_code=202,
    response_model=TrainingRunAccepted,
    responses=error_responses(404),
)
def post_training_run(
    spec: TrainingRunCreate, session: SessionDep, caller: CallerDep, producer: ProducerDep
) -> TrainingRunAccepted:
    """Queue a training run on the `training` queue; poll GET /v1/training-runs/{id}.

    With fewer than 200 patients (or `folds` > 1) the run is a cross-validation: one queued
    run per fold, then a final model on all the data; this run reports them all."""
    tenant_id = caller.tenant.id
    resolved = _resolve_images(spec, session, tenant_id)
    config = TrainingConfig.from_dict(spec.hyperparameters.model_dump())
    labelled = [
        (image.id, study.patient_key, item.label == "malignant") for image, study, item in resolved
    ]
    folds = folds_for(config, len({patient for _, patient, _ in labelled}))
    try:
        init_from = resolve_init_from(session=session, config=config)
    except RegistryError as err:
        raise ApiError(422, err.code, err.message) from err
    # What the run will do, recorded: the workers never resolve "auto" themselves.
    config = replace(config, folds=folds, init_from=init_from or "none")
    common = {"tenant_id": tenant_id, "hyperparameters": config.to_dict(), "seed": spec.seed}
    if folds == 1:
        splits = split_by_patient(
            labelled,
            seed=spec.seed,
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
        )
        sizes = _check_splits(resolved, splits)
        run = _add_run(session, resolved, splits, name=spec.name, split_sizes=sizes, **common)
        queued = [run]
    else:
        fold_of = stratified_folds(labelled, folds=folds, seed=spec.seed)
        per_fold = [
            {image_id: fold_split(f, fold, folds) for image_id, f in fold_of.items()}
            for fold in range(folds)
        ]
        fold_sizes = [_check_splits(resolved, s, fold=n) for n, s in enumerate(per_fold)]
        sizes = {f"fold {n}": fold_sizes[n][Split.TEST.value] for n in range(folds)}
        run = TrainingRun(
            name=spec.name,
            kind=TrainingRunKind.CROSS_VALIDATION,
            status=TrainingStatus.RUNNING,
            started_at=utcnow(),
            split_sizes=sizes,
            **common,
        )
        session.add(run)
        session.flush()
        queued = [
            _add_run(
                session,
                resolved,
                per_fold[n],
                name=f"{spec.name} (fold {n})",
                kind=TrainingRunKind.FOLD,
                parent_id=run.id,
                fold=n,
                split_sizes=fold_sizes[n],
                **common,
            )
            for n in range(folds)
        ]
    caller.audit(
        session, AuditAction.CREATE, "training_run", run.id, images=len(resolved), folds=folds
    )
    session.commit()
    # Committed; now the worker may hear of it. If the broker is down, the sweeper sends it.
    try:
        for stage in queued:
            enqueue_training(producer, stage.id)
            stage.enqueued_at = utcnow()
        session.commit()
    except (BrokerError, DatabaseError) as err:
        session.rollback()
        log.warning("training run %s stored but not yet queued: %s", run.id, err)
    return TrainingRunAccepted(
        id=run.id,
        name=run.name,
        status=run.status,
        seed=run.seed,
        split_sizes=sizes,
        kind=run.kind.value,
        folds=folds,
        init_from=init_from,
    )
