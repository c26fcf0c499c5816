"""A model version measured at a site: exam AUC with its bootstrap interval, the ROC curve,
the figures at the version's recall threshold, calibration with its reliability curve, the
same broken down by what the images carry (manufacturer, model name, views), and for two
versions the paired AUC difference. Plain numpy (the results service reads the output).

An exam is malignant when any outcome the site reported for it says so; its score is the
exam rule's (shared/scores.py: the worse breast, each the mean of its views).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.ml.evaluation import (
    bootstrap_auc_interval,
    calibration_error,
    paired_auc_difference,
    sensitivity_specificity,
)
from shared.scores import calibrated_probability, roc_auc

CALIBRATION_BINS = 10
# Fewest exams of each class for a breakdown group to get an AUC of its own.
MIN_GROUP_PER_CLASS = 2


@dataclass(frozen=True)
class EvaluatedExam:
    exam_id: str
    malignant: bool
    scores: Mapping[str, float]  # by model version id
    # What the exam's images carry, e.g. {"manufacturer": "HOLOGIC", "views": "4"}.
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionUnderTest:
    id: str
    name: str
    threshold: float | None  # the version's recall threshold (None: none chosen)
    calibration: Mapping[str, float] | None


def roc_points(scores: Sequence[float], labels: Sequence[bool]) -> dict[str, list[Any]]:
    """Every point of the ROC curve, one per distinct score from the highest down, after a
    first point (0, 0) with no threshold: what scikit-learn's roc_curve gives with
    drop_intermediate=False (its first threshold is infinite)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    ranked = np.asarray(scores, dtype=np.float64)[order]
    hits = np.asarray(labels, dtype=bool)[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    true_positives = np.cumsum(hits)[last_of_each]
    false_positives = (last_of_each + 1) - true_positives
    positives, negatives = hits.sum(), len(hits) - hits.sum()
    return {
        "fpr": [0.0, *(false_positives / negatives).tolist()],
        "tpr": [0.0, *(true_positives / positives).tolist()],
        "thresholds": [None, *ranked[last_of_each].tolist()],
    }


def reliability_curve(
    probabilities: Sequence[float], labels: Sequence[bool]
) -> list[dict[str, float]]:
    """Per non-empty equal-width probability bin: the mean predicted probability, the observed
    malignant fraction, and the exams in it (scikit-learn's calibration_curve, uniform)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    index = np.searchsorted(edges[1:-1], p, side="right")
    curve = []
    for b in range(CALIBRATION_BINS):
        members = index == b
        if members.any():
            curve.append(
                {
                    "mean_predicted": float(p[members].mean()),
                    "observed": float(y[members].mean()),
                    "exams": int(members.sum()),
                }
            )
    return curve


def _at_threshold(
    scores: Sequence[float], labels: Sequence[bool], threshold: float
) -> dict[str, Any]:
    sensitivity, specificity = sensitivity_specificity(scores, labels, threshold)
    recalled = [s >= threshold for s in scores]
    true_recalls = sum(r and y for r, y in zip(recalled, labels, strict=True))
    return {
        "threshold": threshold,
        "sensitivity": _finite(sensitivity),
        "specificity": _finite(specificity),
        "ppv": true_recalls / sum(recalled) if any(recalled) else None,
        "recall_rate": sum(recalled) / len(recalled),
    }


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _auc_or_none(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    positives = sum(labels)
    if min(positives, len(labels) - positives) < MIN_GROUP_PER_CLASS:
        return None
    return roc_auc(scores, labels)


def version_figures(
    exams: Sequence[EvaluatedExam], version: VersionUnderTest, *, seed: int
) -> dict[str, Any]:
    scores = [exam.scores[version.id] for exam in exams]
    labels = [exam.malignant for exam in exams]
    low, high = bootstrap_auc_interval(scores, labels, seed=seed)
    probabilities = (
        [calibrated_probability(s, version.calibration) for s in scores]
        if version.calibration
        else scores
    )
    figures: dict[str, Any] = {
        "model_version": {"id": version.id, "name": version.name},
        "exams": len(exams),
        "malignant_exams": sum(labels),
        "exam_auc": roc_auc(scores, labels),
        "exam_auc_ci95": [low, high],
        "roc": roc_points(scores, labels),
        "at_model_threshold": (
            _at_threshold(scores, labels, version.threshold)
            if version.threshold is not None
            else None
        ),
        "calibration": {
            # Of the version's calibrated probability (its Platt scaling), else the raw score.
            "calibrated": version.calibration is not None,
            "error": calibration_error(probabilities, labels, bins=CALIBRATION_BINS),
            "curve": reliability_curve(probabilities, labels),
        },
        "by": {},
    }
    attributes = sorted({name for exam in exams for name in exam.attributes})
    for attribute in attributes:
        groups: dict[str, list[int]] = {}
        for i, exam in enumerate(exams):
            groups.setdefault(exam.attributes.get(attribute, "unknown"), []).append(i)
        figures["by"][attribute] = {
            value: _group_figures(
                [scores[i] for i in members], [labels[i] for i in members], version
            )
            for value, members in sorted(groups.items())
        }
    return figures


def _group_figures(
    scores: list[float], labels: list[bool], version: VersionUnderTest
) -> dict[str, Any]:
    group: dict[str, Any] = {
        "exams": len(scores),
        "malignant_exams": sum(labels),
        "exam_auc": _auc_or_none(scores, labels),
    }
    if version.threshold is not None:
        group["at_model_threshold"] = _at_threshold(scores, labels, version.threshold)
    return group


def site_figures(
    exams: Sequence[EvaluatedExam], versions: Sequence[VersionUnderTest], *, seed: int
) -> dict[str, Any]:
    """Each version's figures on the same exams; with two, how much better the first is."""
    figures: dict[str, Any] = {
        "versions": [version_figures(exams, version, seed=seed) for version in versions]
    }
    if len(versions) == 2:
        a, b = versions
        difference, low, high = paired_auc_difference(
            [exam.scores[a.id] for exam in exams],
            [exam.scores[b.id] for exam in exams],
            [exam.malignant for exam in exams],
            seed=seed,
        )
        figures["comparison"] = {
            "a": a.name,
            "b": b.name,
            "auc_difference": difference,
            "auc_difference_ci95": [low, high],
        }
    return figures
