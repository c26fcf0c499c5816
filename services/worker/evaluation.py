"""Evaluations (the trainer's queue): one or two model versions measured on a tenant's exams
that have outcomes.

A version's score of an image is the prediction it made when it screened the image; where it
has not screened it (a candidate, a retired version, a training batch's stored images), the
image is scored here with the inference code's own preprocessing and forward pass, and the
score kept in the evaluation only: it never becomes a prediction, so it reaches no result,
export or webhook. The trainer's process is not the inference workers', so an evaluation
never delays screening.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Callable

import pydicom
from minio.error import S3Error
from pydicom.errors import InvalidDicomError

from services.worker.celery_app import app
from services.worker.models import ModelCache
from services.worker.scoring import score_images
from services.worker.training import trainer_context
from shared.config import Settings
from shared.db.base import session_scope
from shared.db.models import ModelVersion
from shared.evaluations import (
    EvaluationImage,
    ExamWithOutcome,
    claim_evaluation,
    exams_with_outcomes,
    existing_scores,
    finish_evaluation,
    touch,
    versions_by_id,
)
from shared.imaging.formats import MediaType
from shared.logs import log_context
from shared.ml.site_evaluation import EvaluatedExam, VersionUnderTest, site_figures
from shared.queue import Queue, TaskName
from shared.scores import ViewScore, breast_scores, exam_score
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

# The header attributes an evaluation breaks its figures down by (non-identifying; the
# de-identified copy keeps them), read from the first bytes of each stored DICOM image.
HEADER_ATTRIBUTES = {"manufacturer": "Manufacturer", "model_name": "ManufacturerModelName"}
HEADER_BYTES = 64 * 1024


class CannotEvaluate(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@app.task(name=TaskName.EVALUATE_MODELS.value, queue=Queue.TRAINING.value, acks_late=True)
def evaluate_models(evaluation_id: str) -> str:
    ctx = trainer_context()
    with log_context(evaluation_id=evaluation_id):
        return run_evaluation(uuid.UUID(evaluation_id), settings=ctx.settings, store=ctx.store)


def run_evaluation(evaluation_id: uuid.UUID, *, settings: Settings, store: ObjectStore) -> str:
    with session_scope(settings.database_url) as session:
        evaluation = claim_evaluation(session, evaluation_id)
        if evaluation is None:
            return "skipped"
        exams = exams_with_outcomes(session, evaluation)
        versions = versions_by_id(session, evaluation.model_version_ids)
        ordered = [versions[v] for v in evaluation.model_version_ids if v in versions]
        seed = evaluation.seed
        session.expunge_all()
    try:
        if len(ordered) != len(evaluation.model_version_ids):
            raise CannotEvaluate("model_not_found", "a model version asked for is gone")
        _require_both_classes(exams)
        scores = {v.id: _scores(v, exams, evaluation_id, settings, store) for v in ordered}
        attributes = _attributes(exams, store, lambda: _touch(settings, evaluation_id))
        evaluated = [
            EvaluatedExam(
                str(exam.study_id),
                exam.malignant,
                {str(v): _exam_score(exam, scores[v]) for v in scores},
                attributes[exam.study_id],
            )
            for exam in exams
        ]
        figures = site_figures(evaluated, [_under_test(v) for v in ordered], seed=seed)
    except CannotEvaluate as err:
        with session_scope(settings.database_url) as session:
            finish_evaluation(session, evaluation_id, error=(err.code, err.message))
        return "failed"
    with session_scope(settings.database_url) as session:
        finish_evaluation(session, evaluation_id, figures=figures)
    log.info("evaluation %s: %d exams, %d versions", evaluation_id, len(exams), len(ordered))
    return "completed"


def _require_both_classes(exams: list[ExamWithOutcome]) -> None:
    malignant = sum(exam.malignant for exam in exams)
    if malignant == 0 or malignant == len(exams):
        raise CannotEvaluate(
            "too_few_outcomes",
            f"{len(exams)} exams with outcomes here, {malignant} of them malignant: an "
            "evaluation needs both malignant and non-malignant exams; record more outcomes "
            "or widen the batches or dates",
        )


def _under_test(version: ModelVersion) -> VersionUnderTest:
    return VersionUnderTest(
        str(version.id), version.name, version.recall_threshold, version.calibration
    )


def _exam_score(exam: ExamWithOutcome, scores: dict[uuid.UUID, float]) -> float:
    views = [ViewScore(i.laterality, i.view, scores[i.image_id]) for i in exam.images]
    score = exam_score(breast_scores(views))
    assert score is not None  # every exam here has at least one scored image
    return score


def _scores(
    version: ModelVersion,
    exams: list[ExamWithOutcome],
    evaluation_id: uuid.UUID,
    settings: Settings,
    store: ObjectStore,
) -> dict[uuid.UUID, float]:
    """Every image's score by `version`: its prediction where it screened the image, its
    shadow score where it scored it in shadow mode, else computed now. An image that cannot
    be read now fails the evaluation with its reason."""
    images = [image for exam in exams for image in exam.images]
    with session_scope(settings.database_url) as session:
        scores = existing_scores(session, [i.image_id for i in images], version.id)
    missing = [image for image in images if image.image_id not in scores]
    if not missing:
        return scores
    log.info("scoring %d images with model version %s", len(missing), version.name)
    computed, unreadable = score_images(
        model_cache(settings, store).get(version),
        missing,
        settings=settings,
        store=store,
        alive=lambda: _touch(settings, evaluation_id),
    )
    if unreadable:
        image_id, code = next(iter(unreadable.items()))
        raise CannotEvaluate(
            "image_unreadable",
            f"{len(unreadable)} images cannot be scored now (image {image_id}: {code}); "
            "evaluate batches whose images are all readable",
        )
    return {**scores, **computed}


def _touch(settings: Settings, evaluation_id: uuid.UUID) -> None:
    with session_scope(settings.database_url) as session:
        touch(session, evaluation_id)


_MODEL_CACHES: dict[int, ModelCache] = {}


def model_cache(settings: Settings, store: ObjectStore) -> ModelCache:
    """One per trainer process: a version is loaded once however many evaluations use it."""
    key = id(store)
    if key not in _MODEL_CACHES:
        _MODEL_CACHES[key] = ModelCache(settings, store)
    return _MODEL_CACHES[key]


def _attributes(
    exams: list[ExamWithOutcome], store: ObjectStore, alive: Callable[[], None]
) -> dict[uuid.UUID, dict[str, str]]:
    """Per exam: its number of screening views, and the manufacturer and model name its
    DICOM images name (when they agree; "mixed" when they do not, "unknown" when none)."""
    found: dict[uuid.UUID, dict[str, str]] = {}
    for n, exam in enumerate(exams, start=1):
        if n % 256 == 0:
            alive()
        headers = [
            _header_attributes(i, store) for i in exam.images if i.media_type == MediaType.DICOM
        ]
        attributes = {"views": str(len({(i.laterality, i.view) for i in exam.images}))}
        for name in HEADER_ATTRIBUTES:
            values = {h[name] for h in headers if h.get(name)}
            attributes[name] = (
                values.pop() if len(values) == 1 else ("mixed" if values else "unknown")
            )
        found[exam.study_id] = attributes
    return found


def _header_attributes(image: EvaluationImage, store: ObjectStore) -> dict[str, str]:
    try:
        head = store.get_bytes(image.object_key, length=HEADER_BYTES)
        dataset = pydicom.dcmread(
            io.BytesIO(head),
            stop_before_pixels=True,
            specific_tags=list(HEADER_ATTRIBUTES.values()),
        )
    except (InvalidDicomError, S3Error, EOFError, OSError, ValueError):
        return {}  # a header longer than the bytes read: the attributes are "unknown"
    return {
        name: str(dataset.get(keyword, "") or "").strip()
        for name, keyword in HEADER_ATTRIBUTES.items()
    }
