"""The exam rule: from an exam's images and their predictions to breast and exam scores and
the recall recommendation. The results API, the viewer and the DICOM report all say what this
says; none of them computes it on its own."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.db.models import Laterality, ModelStatus, View
from shared.scores import BreastScore, ViewScore, breast_scores, calibrated_probability, exam_score

# The four views of a screening exam, as "L-CC" ... "R-MLO".
SCREENING_VIEWS = tuple(f"{lat.value}-{view.value}" for lat in Laterality for view in View)


class ExamView(Protocol):
    """What the rule reads of an image: an `Image` row, or a page's `PageImage`."""

    @property
    def id(self) -> uuid.UUID: ...
    # A Laterality and a View, or their values (the enums are str): a page reads the text.
    @property
    def laterality(self) -> str | None: ...
    @property
    def view(self) -> str | None: ...


NO_SITE_THRESHOLDS: Mapping[uuid.UUID, float] = {}


class ScoringVersion(Protocol):
    """What the rule, and what shows its answer, read of a model version: a `ModelVersion`
    row, or a page's `PageVersion`."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> ModelStatus: ...
    @property
    def trained(self) -> bool: ...
    @property
    def rejection_reason(self) -> str | None: ...
    @property
    def recall_threshold(self) -> float | None: ...
    @property
    def calibration(self) -> dict[str, float] | None: ...


class ViewPrediction(Protocol):
    """What the rule reads of an image's prediction: a `Prediction` row, or a page's
    `LatestPrediction`."""

    @property
    def malignancy_score(self) -> float: ...
    @property
    def model_version(self) -> ScoringVersion: ...


@dataclass(frozen=True)
class Recommendation:
    """What the model that scored the exam says of it."""

    model_version: ScoringVersion
    recall: bool | None  # None: the version has no threshold (an untrained model)
    recall_threshold: float | None
    exam_probability: float | None  # None: the version has no calibration
    # "site": the tenant's own operating point (shared/operating_points.py); "model": the
    # version's; None: no threshold.
    threshold_source: str | None = None


@dataclass(frozen=True)
class ExamAssessment:
    views_present: list[str]
    missing_views: list[str]
    breasts: list[BreastScore]
    exam_score: float | None
    # Only when one model version scored every scored view: a threshold and a calibration
    # belong to one model's score scale.
    recommendation: Recommendation | None


def assess_exam(
    images: Sequence[ExamView],
    predictions: Mapping[uuid.UUID, ViewPrediction],
    site_thresholds: Mapping[uuid.UUID, float] = NO_SITE_THRESHOLDS,
) -> ExamAssessment:
    """Score an exam from its images' latest predictions (`predictions` by image id); an exam
    may lack views, or have views not scored yet, and still be scored from those that are.
    `site_thresholds`: the tenant's own recall thresholds by model version id."""
    return assess_views([(image, predictions.get(image.id)) for image in images], site_thresholds)


def assess_views(
    views: Sequence[tuple[ExamView, ViewPrediction | None]],
    site_thresholds: Mapping[uuid.UUID, float] = NO_SITE_THRESHOLDS,
) -> ExamAssessment:
    """`assess_exam` for (image, its latest prediction or None) pairs, as pages hold them."""
    present = sorted({f"{i.laterality}-{i.view}" for i, _ in views if i.laterality and i.view})
    breasts = breast_scores(
        ViewScore(i.laterality, i.view, p.malignancy_score)
        for i, p in views
        if p is not None and i.laterality is not None and i.view is not None
    )
    score = exam_score(breasts)
    return ExamAssessment(
        views_present=present,
        missing_views=[v for v in SCREENING_VIEWS if v not in present],
        breasts=breasts,
        exam_score=score,
        recommendation=recommend(score, [p for _, p in views if p is not None], site_thresholds),
    )


def recommend(
    score: float | None,
    predictions: Sequence[ViewPrediction],
    site_thresholds: Mapping[uuid.UUID, float] = NO_SITE_THRESHOLDS,
) -> Recommendation | None:
    """Recall or routine, from the model that scored the exam: only when one model version
    made every prediction; at the tenant's own threshold for it where it set one."""
    versions = {p.model_version.id: p.model_version for p in predictions}
    if score is None or len(versions) != 1:
        return None
    (version,) = versions.values()
    site_threshold = site_thresholds.get(version.id)
    threshold = version.recall_threshold if site_threshold is None else site_threshold
    source = None if threshold is None else ("model" if site_threshold is None else "site")
    return Recommendation(
        model_version=version,
        recall=None if threshold is None else score >= threshold,
        recall_threshold=threshold,
        exam_probability=(
            None
            if version.calibration is None
            else calibrated_probability(score, version.calibration)
        ),
        threshold_source=source,
    )
