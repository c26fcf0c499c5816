"""The exam rule, on rows built in memory: no database is needed to apply it."""

from __future__ import annotations

import uuid

import pytest

from shared.db.models import Image, Laterality, ModelVersion, Prediction, View
from shared.exams import SCREENING_VIEWS, assess_exam
from shared.scores import calibrated_probability

L, R = Laterality.LEFT, Laterality.RIGHT
CC, MLO = View.CC, View.MLO


def _version(
    threshold: float | None = 0.5, calibration: dict[str, float] | None = None
) -> ModelVersion:
    return ModelVersion(
        id=uuid.uuid4(),
        name="m",
        architecture={},
        checkpoint_key="k",
        trained=threshold is not None,
        recall_threshold=threshold,
        calibration=calibration,
    )


def _exam(
    scores: dict[tuple[Laterality, View], float | None], version: ModelVersion
) -> tuple[list[Image], dict[uuid.UUID, Prediction]]:
    images, predictions = [], {}
    for (laterality, view), score in scores.items():
        image = Image(id=uuid.uuid4(), laterality=laterality, view=view)
        images.append(image)
        if score is not None:
            predictions[image.id] = Prediction(
                image_id=image.id, malignancy_score=score, model_version=version
            )
    return images, predictions


def test_the_exam_is_its_worse_breast_and_is_recalled_at_the_models_threshold() -> None:
    version = _version(threshold=0.5, calibration={"a": 2.0, "b": -1.0})
    images, predictions = _exam({(L, CC): 0.2, (L, MLO): 0.4, (R, CC): 0.9, (R, MLO): 0.5}, version)

    assessment = assess_exam(images, predictions)

    assert [(b.laterality, b.score) for b in assessment.breasts] == [
        (L, pytest.approx(0.3)),
        (R, pytest.approx(0.7)),
    ]
    assert assessment.exam_score == pytest.approx(0.7)
    assert assessment.missing_views == []
    advice = assessment.recommendation
    assert advice is not None
    assert (advice.model_version, advice.recall, advice.recall_threshold) == (version, True, 0.5)
    assert advice.exam_probability == pytest.approx(
        calibrated_probability(0.7, {"a": 2.0, "b": -1.0})
    )


def test_an_exam_below_the_threshold_is_routine_and_missing_views_are_named() -> None:
    images, predictions = _exam({(L, CC): 0.1, (R, MLO): 0.2}, _version(threshold=0.5))
    assessment = assess_exam(images, predictions)
    assert assessment.recommendation is not None
    assert assessment.recommendation.recall is False
    assert assessment.recommendation.exam_probability is None  # no calibration
    assert assessment.views_present == ["L-CC", "R-MLO"]
    assert assessment.missing_views == [v for v in SCREENING_VIEWS if v not in ("L-CC", "R-MLO")]


def test_no_recommendation_when_two_model_versions_scored_the_exam() -> None:
    images, predictions = _exam({(L, CC): 0.9, (R, CC): 0.1}, _version())
    predictions[images[1].id].model_version = _version()  # another version, another scale
    assessment = assess_exam(images, predictions)
    assert assessment.exam_score == pytest.approx(0.9)
    assert assessment.recommendation is None


def test_an_untrained_model_scores_but_does_not_recommend_and_unscored_exams_have_no_score() -> (
    None
):
    images, predictions = _exam({(L, CC): 0.9}, _version(threshold=None))
    advice = assess_exam(images, predictions).recommendation
    assert advice is not None
    assert advice.recall is None
    unscored, none = _exam({(L, CC): None, (R, CC): None}, _version())
    assessment = assess_exam(unscored, none)
    assert (assessment.exam_score, assessment.breasts, assessment.recommendation) == (
        None,
        [],
        None,
    )
