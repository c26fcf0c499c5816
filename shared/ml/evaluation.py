"""Exam-level evaluation: AUC with a bootstrap interval, an operating point chosen for a
target sensitivity, calibration, and the model card. Plain numpy: no torch needed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.db.models import Laterality, View
from shared.scores import ViewScore, breast_scores, calibrated_probability, exam_score, roc_auc


@dataclass(frozen=True)
class ScoredView:
    study: str
    laterality: Laterality
    view: View
    score: float  # the model's probability for this view
    malignant: bool


@dataclass(frozen=True)
class ExamOutcome:
    study: str
    score: float
    malignant: bool


def exam_outcomes(views: Iterable[ScoredView]) -> list[ExamOutcome]:
    """Aggregate views to exams exactly as the results service does (shared.scores); an exam
    is malignant when any of its views is."""
    by_study: dict[str, list[ScoredView]] = {}
    for item in views:
        by_study.setdefault(item.study, []).append(item)
    outcomes = []
    for study in sorted(by_study):
        items = by_study[study]
        breasts = breast_scores(ViewScore(i.laterality, i.view, i.score) for i in items)
        score = exam_score(breasts)
        assert score is not None  # every study here has at least one view
        outcomes.append(ExamOutcome(study, score, any(i.malignant for i in items)))
    return outcomes


def bootstrap_auc_interval(
    scores: Sequence[float], labels: Sequence[bool], *, seed: int, resamples: int = 1000
) -> tuple[float, float]:
    """Percentile 95% interval of the AUC over exams resampled with replacement."""
    score_array = np.asarray(scores, dtype=np.float64)
    label_array = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(score_array), len(score_array))
        sample_labels = label_array[pick]
        if sample_labels.all() or not sample_labels.any():
            continue  # a resample with one class has no AUC
        values.append(roc_auc(score_array[pick].tolist(), sample_labels.tolist()))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def paired_auc_difference(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    labels: Sequence[bool],
    *,
    seed: int,
    resamples: int = 1000,
) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same exams, with a percentile 95% interval from resampling
    exams (both models' scores of an exam move together, so the interval is paired)."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    label_array = np.asarray(labels, dtype=bool)
    difference = roc_auc(a.tolist(), label_array.tolist()) - roc_auc(
        b.tolist(), label_array.tolist()
    )
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(a), len(a))
        sample = label_array[pick].tolist()
        if all(sample) or not any(sample):
            continue
        values.append(roc_auc(a[pick].tolist(), sample) - roc_auc(b[pick].tolist(), sample))
    if not values:  # too few exams of a class to resample; the review rejects on count
        return difference, difference, difference
    low, high = np.percentile(values, [2.5, 97.5])
    return difference, float(low), float(high)


@dataclass(frozen=True)
class ActiveComparison:
    """The active version's scores of the same held-out exams, in the candidate's order."""

    name: str
    scores: list[float]


@dataclass(frozen=True)
class Review:
    """Whether a candidate may be promoted without --force, and why not."""

    rejected: bool
    reason: str | None
    comparison: dict[str, Any] | None


# Fewest held-out exams of each class (malignant, and not) that a review accepts as evidence:
# with fewer, a resampling interval is no interval (three malignant exams that happen to
# score highest give "AUC 1.000, 95% CI 1.000-1.000"). Cross-validation pools every exam's
# out-of-fold score, which is how a small data set reaches it.
MIN_HELD_OUT_PER_CLASS = 10


def review_candidate(
    held_out: Sequence[ExamOutcome],
    *,
    auc_interval: tuple[float, float],
    evidence: str,
    active: ActiveComparison | None,
    seed: int,
    min_per_class: int = MIN_HELD_OUT_PER_CLASS,
) -> Review:
    """Honest promotion: a candidate is rejected when its held-out exams (`evidence` says
    which: the test split, or pooled cross-validation) are too few to judge it, when the 95%
    interval of its exam AUC does not lie above 0.5, or when on the same held-out exams it
    ranks worse than the active version."""
    scores = [o.score for o in held_out]
    labels = [o.malignant for o in held_out]
    auc = roc_auc(scores, labels)
    low, high = auc_interval
    comparison: dict[str, Any] | None = None
    difference = diff_low = diff_high = 0.0
    if active is not None:
        difference, diff_low, diff_high = paired_auc_difference(
            scores, active.scores, labels, seed=seed
        )
        comparison = {
            "active_version": active.name,
            "exams": len(held_out),
            "candidate_exam_auc": auc,
            "active_exam_auc": roc_auc(active.scores, labels),
            "difference": difference,
            "difference_ci95": [diff_low, diff_high],
        }
    malignant, other = sum(labels), len(labels) - sum(labels)
    if min(malignant, other) < min_per_class:
        return Review(
            True,
            f"its {evidence} holds {malignant} malignant and {other} other exams; judging a "
            f"model takes at least {min_per_class} of each. Label more exams, or train with "
            "cross-validation folds, which judge every exam once.",
            comparison,
        )
    if low <= 0.5:
        return Review(
            True,
            f"its {evidence} exam AUC is {auc:.3f} with a 95% interval of {low:.3f}-{high:.3f},"
            f" which does not lie above 0.5 (chance) on {len(held_out)} exams. Label more "
            "exams, warm-start from a trained version, or use cross-validation folds.",
            comparison,
        )
    if active is not None and comparison is not None and difference < 0:
        return Review(
            True,
            f"on the same {len(held_out)} held-out exams its exam AUC is {auc:.3f}, below the "
            f"active version {active.name}'s "
            f"{comparison['active_exam_auc']:.3f} (difference {difference:+.3f},"
            f" 95% interval {diff_low:+.3f} to {diff_high:+.3f}).",
            comparison,
        )
    return Review(False, None, comparison)


def threshold_for_sensitivity(
    scores: Sequence[float], labels: Sequence[bool], target: float
) -> float:
    """The highest threshold whose sensitivity (score >= threshold) reaches `target`."""
    positives = sorted((s for s, y in zip(scores, labels, strict=True) if y), reverse=True)
    if not positives:
        raise ValueError("choosing an operating point needs at least one malignant exam")
    needed = max(1, math.ceil(target * len(positives) - 1e-9))
    return positives[needed - 1]


def sensitivity_specificity(
    scores: Sequence[float], labels: Sequence[bool], threshold: float
) -> tuple[float, float]:
    flagged = [s >= threshold for s in scores]
    positives = [f for f, y in zip(flagged, labels, strict=True) if y]
    negatives = [not f for f, y in zip(flagged, labels, strict=True) if not y]
    return (
        sum(positives) / len(positives) if positives else float("nan"),
        sum(negatives) / len(negatives) if negatives else float("nan"),
    )


def _logit(p: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    result: np.ndarray = np.log(clipped / (1 - clipped))
    return result


def fit_calibration(scores: Sequence[float], labels: Sequence[bool]) -> dict[str, float]:
    """Platt scaling: a, b minimising log loss of sigmoid(a * logit(score) + b), by Newton's
    method with step halving (plain Newton overshoots on this loss) and a small ridge so that
    separable data still gives finite values."""
    x = _logit(np.asarray(scores, dtype=np.float64))
    y = np.asarray(labels, dtype=np.float64)
    ridge = 1e-3

    def loss(params: np.ndarray) -> float:
        z = params[0] * x + params[1]
        # log(1 + e^z) - y z, computed without overflow
        return float(np.sum(np.logaddexp(0, z) - y * z) + ridge / 2 * np.sum(params**2))

    params = np.array([1.0, 0.0])
    current = loss(params)
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(params[0] * x + params[1], -500, 500)))
        w = p * (1 - p)
        gradient = np.array([np.sum((p - y) * x), np.sum(p - y)]) + ridge * params
        hessian = np.array(
            [[np.sum(w * x * x) + ridge, np.sum(w * x)], [np.sum(w * x), np.sum(w) + ridge]]
        )
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and loss(params - scale * step) > current:
            scale /= 2
        params = params - scale * step
        improved, current = current - loss(params), loss(params)
        if improved < 1e-10:
            break
    return {"a": float(params[0]), "b": float(params[1])}


def calibration_error(
    probabilities: Sequence[float], labels: Sequence[bool], bins: int = 10
) -> float:
    """Expected calibration error: the count-weighted mean |observed rate - mean probability|
    over equal-width probability bins."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.sum() / len(p) * abs(y[members].mean() - p[members].mean())
    return float(error)


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    calibration: dict[str, float]
    validation_sensitivity: float
    validation_specificity: float


def choose_operating_point(
    validation: Sequence[ExamOutcome], target_sensitivity: float
) -> OperatingPoint:
    scores = [o.score for o in validation]
    labels = [o.malignant for o in validation]
    threshold = threshold_for_sensitivity(scores, labels, target_sensitivity)
    sensitivity, specificity = sensitivity_specificity(scores, labels, threshold)
    return OperatingPoint(threshold, fit_calibration(scores, labels), sensitivity, specificity)


def evaluate_exams(
    outcomes: Sequence[ExamOutcome], point: OperatingPoint, *, seed: int
) -> dict[str, Any]:
    """The held-out figures the model card reports."""
    scores = [o.score for o in outcomes]
    labels = [o.malignant for o in outcomes]
    low, high = bootstrap_auc_interval(scores, labels, seed=seed)
    sensitivity, specificity = sensitivity_specificity(scores, labels, point.threshold)
    probabilities = [calibrated_probability(s, point.calibration) for s in scores]
    return {
        "exams": len(outcomes),
        "malignant_exams": sum(labels),
        "exam_auc": roc_auc(scores, labels),
        "exam_auc_ci95": [low, high],
        "sensitivity": sensitivity,
        "specificity": specificity,
        "calibration_error_raw": calibration_error(scores, labels),
        "calibration_error_calibrated": calibration_error(probabilities, labels),
        "brier_calibrated": float(np.mean((np.asarray(probabilities) - np.asarray(labels)) ** 2)),
    }


def model_card(
    *,
    name: str,
    architecture: dict[str, Any],
    hyperparameters: dict[str, Any],
    split_sizes: dict[str, Any],
    point: OperatingPoint,
    test_metrics: dict[str, Any],
    target_sensitivity: float,
    epochs_trained: int,
) -> dict[str, Any]:
    return {
        "name": name,
        "intended_use": (
            "Research and engineering evaluation of a screening-mammography triage pipeline: "
            "ranks exams by a view-level malignancy score aggregated to breasts and exams."
        ),
        "not_for_clinical_use": True,
        "warning": "NOT FOR CLINICAL USE. Not a medical device; not validated on patients.",
        "data": {
            "split_sizes": split_sizes,
            "split": "patient-level: no patient appears in two splits",
            "label": "malignant (positive) versus benign or normal (negative), per image",
        },
        "architecture": architecture,
        "hyperparameters": hyperparameters,
        "epochs_trained": epochs_trained,
        "operating_point": {
            "target_sensitivity": target_sensitivity,
            "threshold": point.threshold,
            "chosen_on": "validation split, exam level",
            "validation_sensitivity": point.validation_sensitivity,
            "validation_specificity": point.validation_specificity,
        },
        "calibration": {"method": "Platt scaling on the validation split", **point.calibration},
        "test_metrics": test_metrics,
        "limitations": [
            "Exam score is the worse breast; a breast's score is the mean of its views.",
            "Metrics come from the run's own held-out test split; they say nothing about "
            "other scanners, populations or prevalence.",
        ],
    }
