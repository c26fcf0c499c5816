"""Training runs on the `training` queue: load the labelled images, train with a checkpoint
after every epoch, evaluate on the held-out split, register a candidate model version.

A run is idempotent and resumable: the task claims the run row (a finished run, or one another
worker is training, is left alone); every epoch's checkpoint goes to object storage before the
epoch's row commits; a run sent again after its worker died restores the last checkpoint and
continues with the next epoch, making the same random draws it would have made.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from sqlalchemy import select

from services.worker.celery_app import app
from services.worker.cross_validation import cross_validated_figures, fold_evaluation
from services.worker.distributed import (
    LostRun,
    RanksKeptFailing,
    RankSpec,
    train_distributed,
    training_device,
)
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
from shared.drift import fit_score_reference
from shared.imaging.decode import decode_image
from shared.imaging.formats import ImageRejected
from shared.imaging.preprocess import InputGeometry, Preprocess, box_in_input
from shared.logs import log_context
from shared.ml.checkpoint import checkpoint_bytes
from shared.ml.config import Example, TrainingConfig
from shared.ml.data import InputCache, RecentRecords, Scanned, TrainingSplit
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
from shared.ml.training import Placement, Trainer, model_config, outcomes_for, predict
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


class RunCannotFinish(Exception):
    """The run fails with this code and message (an unusable data set, a warm start that
    cannot load, processes that keep dying); no retry would do better."""

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


def local_placement(settings: Settings) -> Placement:
    """A single training process: on a GPU when there is one (or as `training_device` says)."""
    return Placement(device=training_device(settings, local_rank=0, local_world_size=1))


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
            attempt, seed = run.attempts, run.seed
            kind, parent_id, fold = run.kind, run.parent_id, run.fold
            config = TrainingConfig.from_dict(run.hyperparameters)
            images = dataset_images(session=session, run_id=run_id)
    except RunNotClaimable as reason:
        log.info("not training: %s", reason)
        return "skipped"
    heartbeat = Heartbeat(settings, run_id, attempt)
    heartbeat.start()
    try:
        held_out = kind != TrainingRunKind.FINAL
        scanned = scan_images(images, config, settings=settings, store=store)
        splits = build_splits(
            images, scanned, config, settings=settings, store=store, held_out=held_out
        )
        init_from, init_weights = initial_weights(config, settings=settings, store=store)
        if settings.training_processes > 1:
            # The processes train and checkpoint; this one judges and registers the result.
            try:
                train_distributed(
                    RankSpec(run_id, attempt, seed, config, images, scanned, held_out, settings),
                    lost=heartbeat.lost,
                )
            except RanksKeptFailing as err:
                raise RunCannotFinish("training_processes_failed", str(err)) from err
        trainer = Trainer(
            config,
            seed=seed,
            train=splits[Split.TRAIN],
            validation=splits.get(Split.VALIDATION),
            init_weights=init_weights,
            placement=None if settings.training_processes > 1 else local_placement(settings),
        )
        restore_last_checkpoint(trainer, run_id, settings=settings, store=store)
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
    except RunCannotFinish as err:
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
        raise RunCannotFinish(err.code, err.message) from err
    payload = torch.load(io.BytesIO(store.get_bytes(key)), map_location="cpu", weights_only=True)
    log.info("warm start from %s", name)
    return name, payload["state_dict"]


def finish_fold(
    trainer: Trainer,
    test: TrainingSplit,
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
    splits: dict[Split, TrainingSplit],
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
        held_out_scores=[o.score for o in pooled],
        init_from=init_from,
        parent_id=parent_id,
    )


@lru_cache(maxsize=4)
def input_cache(max_bytes: int) -> InputCache:
    """The training process's cache of prepared inputs (one per size asked for)."""
    return InputCache(max_bytes)


# Images whose placement (crop geometry) and input statistics the process keeps: a few
# hundred bytes each, so every image of a large data set, while the inputs themselves are
# bounded by `training_cache_bytes`.
PLACEMENTS_KEPT = 200_000


@lru_cache(maxsize=1)
def placements() -> RecentRecords:
    """The training process's record of each image's crop geometry and input statistics by
    (object, preprocess): the stages of one run (a cross-validation's folds and its final
    model) scan the same images, and need not decode them again to know their boxes."""
    return RecentRecords(PLACEMENTS_KEPT)


@dataclass(frozen=True)
class PreparedImages:
    """Model inputs of a run's images prepared by `preprocess` (the inference code's), on
    demand, through the process's cache bounded in bytes."""

    preprocess: Preprocess
    settings: Settings
    store: ObjectStore

    @property
    def cache(self) -> InputCache:
        return input_cache(self.settings.training_cache_bytes)

    def _prepare(self, image: DatasetImage) -> tuple[np.ndarray, Scanned]:
        pixels = decode_image(
            self.store.get_bytes(image.object_key),
            image.media_type,
            max_pixels=self.settings.max_image_pixels,
        )
        inputs, geometry, statistics = self.preprocess.prepare(pixels, image.laterality)
        prepared = inputs.astype(np.float16)
        key = (image.object_key, self.preprocess)
        self.cache.put(key, prepared)
        placements().put(key, (geometry, statistics))
        return prepared, _scanned(image, geometry, statistics)

    def fetch(self, image: DatasetImage) -> np.ndarray:
        """Raises ImageRejected when the image cannot be prepared."""
        cached = self.cache.get((image.object_key, self.preprocess))
        return cached if cached is not None else self._prepare(image)[0]

    def scan(self, images: list[DatasetImage]) -> list[Scanned | None]:
        """Every image's box and statistics, or None for an image that cannot be decoded
        (logged and left out): from the placements where an earlier stage of the run found
        them, else by preparing the image (filling the cache as far as it goes)."""

        def scan_one(image: DatasetImage) -> Scanned | None:
            placed = placements().get((image.object_key, self.preprocess))
            if placed is not None:
                geometry, statistics = cast(tuple[InputGeometry, np.ndarray], placed)
                return _scanned(image, geometry, statistics)
            try:
                return self._prepare(image)[1]
            except ImageRejected as err:
                log.warning("training image %s left out: %s", image.image_id, err.message)
                return None

        threads = max(1, self.settings.worker_loader_threads)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(scan_one, images))

    def split(
        self,
        images: list[DatasetImage],
        boxes: list[tuple[float, float, float, float] | None],
        *,
        stride: int,
    ) -> TrainingSplit:
        examples = [
            Example(i.image_id, i.patient_key, i.study_key, i.laterality, i.view, i.label)
            for i in images
        ]
        return TrainingSplit(
            examples,
            boxes,
            lambda index: self.fetch(images[index]),
            (self.preprocess.height, self.preprocess.width),
            stride,
            loader_threads=self.settings.worker_loader_threads,
            read_ahead=self.settings.training_read_ahead,
        )


def _scanned(image: DatasetImage, geometry: InputGeometry, statistics: np.ndarray) -> Scanned:
    return Scanned(box_in_input(image.box, geometry) if image.box else None, statistics)


def scan_images(
    images: list[DatasetImage], config: TrainingConfig, *, settings: Settings, store: ObjectStore
) -> list[Scanned | None]:
    return PreparedImages(
        Preprocess(config.input_height, config.input_width), settings, store
    ).scan(images)


def build_splits(
    images: list[DatasetImage],
    scanned: list[Scanned | None],
    config: TrainingConfig,
    *,
    settings: Settings,
    store: ObjectStore,
    held_out: bool = True,
) -> dict[Split, TrainingSplit]:
    """The run's splits, streamed. Without `held_out` (a cross-validation's final model)
    every image is in the training split and there is no other."""
    source = PreparedImages(Preprocess(config.input_height, config.input_width), settings, store)
    stride = model_config(config).output_stride
    splits = {}
    for split in Split if held_out else (Split.TRAIN,):
        members = [
            (i, a)
            for i, a in zip(images, scanned, strict=True)
            if i.split == split and a is not None
        ]
        labels = {i.label == TrainingLabel.MALIGNANT for i, _ in members}
        if labels != {True, False}:
            raise RunCannotFinish(
                "dataset_unusable",
                f"after leaving out images that could not be decoded, the {split.value} split "
                "has no malignant or no non-malignant image; add labelled images",
            )
        splits[split] = source.split(
            [i for i, _ in members], [a.box for _, a in members], stride=stride
        )
        splits[split].statistics = np.stack([a.statistics for _, a in members])
    return splits


def train_epochs(
    trainer: Trainer,
    *,
    run_id: uuid.UUID,
    attempt: int,
    settings: Settings,
    store: ObjectStore,
    heartbeat: Heartbeat | None,
) -> None:
    """Epochs until the trainer is finished, each followed by its checkpoint and its row
    (written by rank 0 of a distributed run; the other ranks only train)."""
    writes = trainer.placement.rank == 0
    while not trainer.finished:
        if heartbeat is not None and heartbeat.lost.is_set():
            raise LostRun()
        result = trainer.run_epoch()
        if settings.training_trace_dir:
            trace_epoch(trainer, result.epoch, run_id, Path(settings.training_trace_dir))
        if not writes:
            continue
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


def trace_epoch(trainer: Trainer, epoch: int, run_id: uuid.UUID, folder: Path) -> None:
    rank = trainer.placement.rank
    line = {
        "epoch": epoch,
        "rank": rank,
        "pid": os.getpid(),
        "images": [str(trainer.train.examples[i].image_id) for i in trainer.epoch_examples],
    }
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{run_id}-rank{rank}.jsonl").open("a") as trace:
        trace.write(json.dumps(line) + "\n")


def restore_last_checkpoint(
    trainer: Trainer, run_id: uuid.UUID, *, settings: Settings, store: ObjectStore
) -> None:
    """The run's newest checkpoint into `trainer`, if it has one."""
    with session_scope(settings.database_url) as session:
        key = session.get_one(TrainingRun, run_id).checkpoint_key
    if key is not None:
        state = torch.load(io.BytesIO(store.get_bytes(key)), map_location="cpu", weights_only=True)
        trainer.restore(state)
        log.info("training run %s resumes at epoch %d", run_id, trainer.next_epoch)


def active_comparison(
    test: TrainingSplit, images: list[DatasetImage], *, settings: Settings, store: ObjectStore
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
    members = [by_id[example.image_id] for example in test.examples]
    source = PreparedImages(preprocess_for(model), settings, store)
    split = source.split(members, [None] * len(members), stride=test.stride)
    try:
        _, probabilities = predict(model, split)
    except ImageRejected:
        return None  # an image decoded for the candidate and not now: no fair comparison
    return ActiveComparison(name, [o.score for o in outcomes_for(test, probabilities)])


def register(
    trainer: Trainer,
    splits: dict[Split, TrainingSplit],
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
    _, validation_probabilities = predict(model, splits[Split.VALIDATION])
    _, test_probabilities = predict(model, splits[Split.TEST])
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
        held_out_scores=[o.score for o in test_outcomes],
        init_from=init_from,
    )


def split_sizes_of(splits: dict[Split, TrainingSplit]) -> dict[str, Any]:
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
    splits: dict[Split, TrainingSplit],
    *,
    run_id: uuid.UUID,
    attempt: int,
    settings: Settings,
    store: ObjectStore,
    point: OperatingPoint,
    review: Review,
    held_out: dict[str, Any],
    held_out_scores: list[float],
    init_from: str | None,
    parent_id: uuid.UUID | None = None,
) -> None:
    """Register the best epoch's weights as a model version (candidate, or rejected by its
    review) with its card and input reference, and complete the run (and the cross-validation
    it ends, `parent_id`). `held_out`: the figures it was judged on ("test" or
    "cross_validation", with what goes with them); `held_out_scores`: those exams' scores,
    the version's drift reference."""
    config = trainer.config
    model = trainer.best_model()
    name = f"run-{run_id.hex[:12]}"
    train_statistics = splits[Split.TRAIN].statistics
    reference = fit_reference(train_statistics) if train_statistics is not None else None
    split_sizes = split_sizes_of(splits)
    judged_on = held_out.get("test") or held_out["cross_validation"]
    score_reference = fit_score_reference(
        held_out_scores,
        source=f"{'test split' if 'test' in held_out else 'pooled out-of-fold'} exams of run "
        f"{run_id}",
    )
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
        version.score_reference = score_reference.to_dict() if score_reference else None
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
