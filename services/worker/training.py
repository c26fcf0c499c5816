"""Training runs on the `training` queue: load the labelled images, train with a checkpoint
after every epoch, evaluate on the held-out split, register a candidate model version.

A run is idempotent and resumable: the task claims the run row (a finished run, or one another
worker is training, is left alone); every epoch's checkpoint goes to object storage before the
epoch's row commits; a run sent again after its worker died restores the last checkpoint and
continues with the next epoch, making the same random draws it would have made.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from services.worker.celery_app import app
from services.worker.cross_validation import cross_validated_figures, fold_evaluation
from shared.config import Settings, get_settings
from shared.db.base import session_scope, utcnow
from shared.db.models import (
    ModelStatus,
    ModelVersion,
    Split,
    TrainingLabel,
    TrainingRun,
    TrainingRunKind,
)
from shared.imaging.decode import decode_image
from shared.imaging.formats import ImageRejected
from shared.imaging.preprocess import Preprocess, box_in_input
from shared.logs import log_context
from shared.ml.checkpoint import checkpoint_bytes
from shared.ml.config import Example, TrainingConfig
from shared.ml.evaluation import (
    ActiveComparison,
    OperatingPoint,
    Review,
    choose_operating_point,
    evaluate_exams,
    model_card,
    review_candidate,
)
from shared.ml.imported import load_model, preprocess_for
from shared.ml.input_reference import fit_reference
from shared.ml.registry import RegistryError, active_model, find_model, resolve_init_from
from shared.ml.training import (
    LoadedSplit,
    Trainer,
    model_config,
    outcomes_for,
    predict,
)
from shared.queue import Queue, TaskName, producer
from shared.storage import Keys, ObjectStore
from shared.training_runs import (
    DatasetImage,
    RunNotClaimable,
    beat,
    claim_run,
    complete_fold,
    complete_run,
    dataset_images,
    enqueue_training,
    fail_with_parent,
    fold_evaluations,
    record_epoch,
)

log = logging.getLogger(__name__)


class LostRun(Exception):
    """Another attempt took the run over (this worker's heartbeat lapsed)."""


class DatasetUnusable(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def training_cpu_threads(settings: Settings) -> int:
    """Threads for training on the CPU: the trainer's own setting, or every core.

    Not the inference worker's count: that leaves a core to its image loaders, while a
    training epoch is all forward and backward passes over images already in memory.
    """
    return settings.training_torch_threads or os.cpu_count() or 1


@dataclass(frozen=True)
class TrainerContext:
    settings: Settings
    store: ObjectStore


@lru_cache(maxsize=1)
def trainer_context() -> TrainerContext:
    """Built once per trainer process, on its first run."""
    settings = get_settings()
    torch.set_num_threads(training_cpu_threads(settings))
    return TrainerContext(settings, ObjectStore(settings))


@app.task(name=TaskName.TRAIN_MODEL.value, queue=Queue.TRAINING.value, acks_late=True)
def train_model(run_id: str) -> str:
    ctx = trainer_context()
    with log_context(run_id=run_id):
        return run_training(uuid.UUID(run_id), settings=ctx.settings, store=ctx.store)


class Heartbeat(threading.Thread):
    """Renews the run's heartbeat while the task works; notices when the run was taken over."""

    def __init__(self, settings: Settings, run_id: uuid.UUID, attempt: int) -> None:
        super().__init__(name=f"heartbeat-{run_id}", daemon=True)
        self.settings, self.run_id, self.attempt = settings, run_id, attempt
        self.stopping = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.settings.training_heartbeat_s):
            try:
                with session_scope(self.settings.database_url) as session:
                    if not beat(session=session, run_id=self.run_id, attempt=self.attempt):
                        self.lost.set()
                        return
            except Exception:  # a database blip: the next beat tries again
                log.warning("heartbeat of training run %s failed", self.run_id, exc_info=True)


def run_training(run_id: uuid.UUID, *, settings: Settings, store: ObjectStore) -> str:
    try:
        with session_scope(settings.database_url) as session:
            run = claim_run(
                session=session,
                run_id=run_id,
                stale_s=settings.training_stale_s,
                max_attempts=settings.max_attempts,
            )
            attempt, seed, resume_from = run.attempts, run.seed, run.checkpoint_key
            kind, parent_id, fold = run.kind, run.parent_id, run.fold
            config = TrainingConfig.from_dict(run.hyperparameters)
            images = dataset_images(session=session, run_id=run_id)
    except RunNotClaimable as reason:
        log.info("not training: %s", reason)
        return "skipped"
    heartbeat = Heartbeat(settings, run_id, attempt)
    heartbeat.start()
    try:
        splits = load_splits(
            images,
            config,
            settings=settings,
            store=store,
            held_out=kind != TrainingRunKind.FINAL,
        )
        init_from, init_weights = initial_weights(config, settings=settings, store=store)
        trainer = Trainer(
            config,
            seed=seed,
            train=splits[Split.TRAIN],
            validation=splits.get(Split.VALIDATION),
            init_weights=init_weights,
        )
        if resume_from is not None:
            state = torch.load(io.BytesIO(store.get_bytes(resume_from)), weights_only=True)
            trainer.restore(state)
            log.info("training run %s resumes at epoch %d", run_id, trainer.next_epoch)
        train_epochs(
            trainer,
            run_id=run_id,
            attempt=attempt,
            settings=settings,
            store=store,
            heartbeat=heartbeat,
        )
        if kind == TrainingRunKind.FOLD:
            assert fold is not None
            finish_fold(
                trainer, splits[Split.TEST], fold, run_id=run_id, attempt=attempt, settings=settings
            )
        elif kind == TrainingRunKind.FINAL:
            assert parent_id is not None
            register_cross_validated(
                trainer,
                splits,
                images,
                run_id=run_id,
                parent_id=parent_id,
                attempt=attempt,
                settings=settings,
                store=store,
                init_from=init_from,
            )
        else:
            register(
                trainer,
                splits,
                images,
                run_id=run_id,
                attempt=attempt,
                settings=settings,
                store=store,
                init_from=init_from,
            )
        return "completed"
    except DatasetUnusable as err:
        with session_scope(settings.database_url) as session:
            run = session.get_one(TrainingRun, run_id, with_for_update=True)
            if run.attempts == attempt:
                fail_with_parent(session, run, code=err.code, message=err.message)
        return "failed"
    except LostRun:
        log.warning("training run %s was taken over by another attempt; stopping", run_id)
        return "lost"
    finally:
        heartbeat.stopping.set()


def initial_weights(
    config: TrainingConfig, *, settings: Settings, store: ObjectStore
) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """The version a run starts from (resolved when the run was created; "auto" here only
    for a run made another way) and its weights; (None, None) from scratch."""
    try:
        with session_scope(settings.database_url) as session:
            name = resolve_init_from(session=session, config=config)
            if name is None:
                return None, None
            key = find_model(session=session, name_or_id=name).checkpoint_key
    except RegistryError as err:
        raise DatasetUnusable(err.code, err.message) from err
    payload = torch.load(io.BytesIO(store.get_bytes(key)), map_location="cpu", weights_only=True)
    log.info("warm start from %s", name)
    return name, payload["state_dict"]


def finish_fold(
    trainer: Trainer,
    test: LoadedSplit,
    fold: int,
    *,
    run_id: uuid.UUID,
    attempt: int,
    settings: Settings,
) -> None:
    """Store the fold's out-of-fold predictions; the last fold to finish queues the final
    model's run (sent after the commit; the sweeper sends it if this process dies first)."""
    evaluation = fold_evaluation(trainer, test, fold)
    with session_scope(settings.database_url) as session:
        run = session.get_one(TrainingRun, run_id, with_for_update=True)
        if run.attempts != attempt:
            raise LostRun()
        final_id = complete_fold(session=session, run=run, evaluation=evaluation)
    log.info(
        "training run %s (fold %d): held-out exam AUC %.3f", run_id, fold, evaluation["exam_auc"]
    )
    if final_id is not None:
        try:
            enqueue_training(producer(settings), final_id)
            with session_scope(settings.database_url) as session:
                session.get_one(TrainingRun, final_id).enqueued_at = utcnow()
        except Exception:  # the broker or database blinked: the sweeper sends queued runs
            log.warning(
                "final model run %s not sent yet; the sweeper will", final_id, exc_info=True
            )


def register_cross_validated(
    trainer: Trainer,
    splits: dict[Split, LoadedSplit],
    images: list[DatasetImage],
    *,
    run_id: uuid.UUID,
    parent_id: uuid.UUID,
    attempt: int,
    settings: Settings,
    store: ObjectStore,
    init_from: str | None,
) -> None:
    """Register the final model, judged on the pooled out-of-fold scores of its folds (and
    against the active version on every exam: none of them trained it)."""
    with session_scope(settings.database_url) as session:
        folds = fold_evaluations(session=session, parent_id=parent_id)
    pooled, point, figures = cross_validated_figures(
        folds, target_sensitivity=trainer.config.target_sensitivity, seed=trainer.seed
    )
    active = active_comparison(splits[Split.TRAIN], images, settings=settings, store=store)
    if active is not None and len(active.scores) != len(pooled):
        active = None  # an image decoded for one and not the other: no like-for-like
    low, high = figures["exam_auc_ci95"]
    review = review_candidate(
        pooled,
        auc_interval=(low, high),
        evidence="pooled out-of-fold",
        active=active,
        seed=trainer.seed,
    )
    save_version(
        trainer,
        splits,
        run_id=run_id,
        attempt=attempt,
        settings=settings,
        store=store,
        point=point,
        review=review,
        held_out={"cross_validation": figures},
        init_from=init_from,
        parent_id=parent_id,
    )


# A model input (float16), its lesion box in input pixels, and its statistics.
Loaded = tuple[np.ndarray, tuple[float, float, float, float] | None, np.ndarray]


def load_inputs(
    images: list[DatasetImage],
    preprocess: Preprocess,
    *,
    settings: Settings,
    store: ObjectStore,
) -> list[Loaded | None]:
    """Each image as a model input of (height, width), float16, with its lesion box in input
    pixels and its statistics; None for an image that cannot be decoded (logged and left
    out)."""

    def load(image: DatasetImage) -> Loaded | None:
        try:
            pixels = decode_image(
                store.get_bytes(image.object_key),
                image.media_type,
                max_pixels=settings.max_image_pixels,
            )
            inputs, geometry, statistics = preprocess.prepare(pixels, image.laterality)
        except ImageRejected as err:
            log.warning("training image %s left out: %s", image.image_id, err.message)
            return None
        box = box_in_input(image.box, geometry) if image.box else None
        return inputs.astype(np.float16), box, statistics

    with ThreadPoolExecutor(max_workers=max(1, settings.worker_loader_threads)) as pool:
        return list(pool.map(load, images))


def load_splits(
    images: list[DatasetImage],
    config: TrainingConfig,
    *,
    settings: Settings,
    store: ObjectStore,
    held_out: bool = True,
) -> dict[Split, LoadedSplit]:
    """The run's splits in memory. Without `held_out` (a cross-validation's final model)
    every image is in the training split and there is no other."""
    loaded = load_inputs(
        images, Preprocess(config.input_height, config.input_width), settings=settings, store=store
    )
    stride = model_config(config).output_stride
    splits = {}
    for split in Split if held_out else (Split.TRAIN,):
        members = [
            (i, a)
            for i, a in zip(images, loaded, strict=True)
            if i.split == split and a is not None
        ]
        labels = {i.label == TrainingLabel.MALIGNANT for i, _ in members}
        if labels != {True, False}:
            raise DatasetUnusable(
                "dataset_unusable",
                f"after leaving out images that could not be decoded, the {split.value} split "
                "has no malignant or no non-malignant image; add labelled images",
            )
        examples = [
            Example(i.image_id, i.patient_key, i.study_key, i.laterality, i.view, i.label)
            for i, _ in members
        ]
        splits[split] = LoadedSplit.build(
            examples,
            [a[0] for _, a in members if a is not None],
            [a[1] for _, a in members if a is not None],
            stride=stride,
        )
        splits[split].statistics = np.stack([a[2] for _, a in members if a is not None])
    return splits


def train_epochs(
    trainer: Trainer,
    *,
    run_id: uuid.UUID,
    attempt: int,
    settings: Settings,
    store: ObjectStore,
    heartbeat: Heartbeat,
) -> None:
    while not trainer.finished:
        if heartbeat.lost.is_set():
            raise LostRun()
        result = trainer.run_epoch()
        buffer = io.BytesIO()
        torch.save(trainer.state(), buffer)
        key = Keys.training_checkpoint(run_id, result.epoch)
        store.put_bytes(key, buffer.getvalue(), content_type="application/octet-stream")
        with session_scope(settings.database_url) as session:
            run = session.get_one(TrainingRun, run_id, with_for_update=True)
            if run.attempts != attempt:
                raise LostRun()
            previous = run.checkpoint_key
            record_epoch(
                session=session,
                run=run,
                epoch=result.epoch,
                metrics={
                    "train_loss": result.train_loss,
                    "validation_loss": result.validation_loss,
                    "validation_auc": result.validation_auc,
                    "seconds": result.seconds,
                },
                checkpoint_key=key,
            )
        if previous is not None and previous != key:
            store.delete(previous)  # the newest checkpoint holds everything a resume needs
        log.info(
            "training run %s epoch %d: loss %.4f, validation AUC %s (%.0fs)",
            run_id,
            result.epoch,
            result.train_loss,
            "-" if result.validation_auc is None else f"{result.validation_auc:.3f}",
            result.seconds,
        )


def active_comparison(
    test: LoadedSplit, images: list[DatasetImage], *, settings: Settings, store: ObjectStore
) -> ActiveComparison | None:
    """The active trained version's exam scores of the test split, preprocessed for its own
    input size; None when no trained version is active."""
    with session_scope(settings.database_url) as session:
        active = active_model(session=session)
        if active is None or not active.trained:
            return None
        name, checkpoint_key, architecture = (
            active.name,
            active.checkpoint_key,
            active.architecture,
        )
    model = load_model(architecture, store.get_bytes(checkpoint_key), device=torch.device("cpu"))
    by_id = {image.image_id: image for image in images}
    loaded = load_inputs(
        [by_id[example.image_id] for example in test.examples],
        preprocess_for(model),
        settings=settings,
        store=store,
    )
    inputs = torch.from_numpy(np.stack([item[0] for item in loaded if item is not None]))
    if len(inputs) != len(test.examples):
        return None  # an image decoded for the candidate and not now: no fair comparison
    _, probabilities = predict(model, inputs)
    return ActiveComparison(name, [o.score for o in outcomes_for(test, probabilities)])


def register(
    trainer: Trainer,
    splits: dict[Split, LoadedSplit],
    images: list[DatasetImage],
    *,
    run_id: uuid.UUID,
    attempt: int,
    settings: Settings,
    store: ObjectStore,
    init_from: str | None,
) -> None:
    """Evaluate the best epoch's weights on the held-out test split and register them."""
    config = trainer.config
    model = trainer.best_model()
    _, validation_probabilities = predict(model, splits[Split.VALIDATION].inputs)
    _, test_probabilities = predict(model, splits[Split.TEST].inputs)
    point = choose_operating_point(
        outcomes_for(splits[Split.VALIDATION], validation_probabilities),
        config.target_sensitivity,
    )
    test_outcomes = outcomes_for(splits[Split.TEST], test_probabilities)
    test_metrics = evaluate_exams(test_outcomes, point, seed=trainer.seed)
    low, high = test_metrics["exam_auc_ci95"]
    review = review_candidate(
        test_outcomes,
        auc_interval=(low, high),
        evidence="test-split",
        active=active_comparison(splits[Split.TEST], images, settings=settings, store=store),
        seed=trainer.seed,
    )
    save_version(
        trainer,
        splits,
        run_id=run_id,
        attempt=attempt,
        settings=settings,
        store=store,
        point=point,
        review=review,
        held_out={"test": test_metrics},
        init_from=init_from,
    )


def split_sizes_of(splits: dict[Split, LoadedSplit]) -> dict[str, Any]:
    return {
        split.value: {
            "images": len(loaded.examples),
            "exams": len({e.study_key for e in loaded.examples}),
            "patients": len({e.patient_key for e in loaded.examples}),
            "malignant_images": int(loaded.malignant.sum()),
        }
        for split, loaded in splits.items()
    }


def save_version(
    trainer: Trainer,
    splits: dict[Split, LoadedSplit],
    *,
    run_id: uuid.UUID,
    attempt: int,
    settings: Settings,
    store: ObjectStore,
    point: OperatingPoint,
    review: Review,
    held_out: dict[str, Any],
    init_from: str | None,
    parent_id: uuid.UUID | None = None,
) -> None:
    """Register the best epoch's weights as a model version (candidate, or rejected by its
    review) with its card and input reference, and complete the run (and the cross-validation
    it ends, `parent_id`). `held_out`: the figures it was judged on ("test" or
    "cross_validation", with what goes with them)."""
    config = trainer.config
    model = trainer.best_model()
    name = f"run-{run_id.hex[:12]}"
    train_statistics = splits[Split.TRAIN].statistics
    reference = fit_reference(train_statistics) if train_statistics is not None else None
    split_sizes = split_sizes_of(splits)
    judged_on = held_out.get("test") or held_out["cross_validation"]
    card = model_card(
        name=name,
        architecture=model.config.to_dict(),
        hyperparameters=config.to_dict(),
        split_sizes=split_sizes,
        point=point,
        test_metrics=judged_on,
        target_sensitivity=config.target_sensitivity,
        epochs_trained=trainer.next_epoch,
    )
    key = Keys.model_checkpoint(name)
    store.put_bytes(
        key,
        checkpoint_bytes(model, extra={"trained": True, "training_run_id": str(run_id)}),
        content_type="application/octet-stream",
    )
    evaluation = {
        "best_epoch": trainer.best_epoch,
        "best_validation_auc": trainer.best_auc if trainer.validation is not None else None,
        "epochs_trained": trainer.next_epoch,
        **held_out,
        "recall_threshold": point.threshold,
        "init_from": init_from,
        "review": {
            "rejected": review.rejected,
            "reason": review.reason,
            "comparison_with_active": review.comparison,
        },
    }
    card.update({k: v for k, v in held_out.items() if k != "test"})
    card["init_from"] = init_from or "none: trained from scratch"
    card["review"] = evaluation["review"]
    card["input_reference"] = (
        {
            "images": reference.images,
            "threshold": reference.threshold,
            "statistics": reference.statistics,
            "use": "images farther than the threshold are flagged input_unlike_training_data",
        }
        if reference
        else "none: fewer training images than a reference needs; no input warnings"
    )
    with session_scope(settings.database_url) as session:
        run = session.get_one(TrainingRun, run_id, with_for_update=True)
        if run.attempts != attempt:
            raise LostRun()
        run.split_sizes = split_sizes
        version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if version is None:
            version = ModelVersion(name=name)
            session.add(version)
        version.status = ModelStatus.REJECTED if review.rejected else ModelStatus.CANDIDATE
        version.rejection_reason = review.reason
        version.architecture = model.config.to_dict()
        version.checkpoint_key = key
        version.trained = True
        version.metrics = {
            **held_out,
            "best_validation_auc": evaluation["best_validation_auc"],
            "comparison_with_active": review.comparison,
        }
        version.recall_threshold = point.threshold
        version.calibration = point.calibration
        version.model_card = card
        version.input_reference = reference.to_dict() if reference else None
        version.training_run_id = run_id
        session.flush()
        complete_run(run, model_version_id=version.id, evaluation=evaluation)
        if parent_id is not None:
            parent = session.get_one(TrainingRun, parent_id, with_for_update=True)
            parent.split_sizes = {**parent.split_sizes, "all": split_sizes[Split.TRAIN.value]}
            complete_run(parent, model_version_id=version.id, evaluation=evaluation)
    log.info(
        "training run %s registered %s (%s): held-out exam AUC %.3f",
        run_id,
        name,
        "rejected" if review.rejected else "candidate",
        judged_on["exam_auc"],
    )
