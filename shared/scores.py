"""From image scores to breast and exam scores.

A breast's score is the mean of its views' malignancy probabilities (CC and MLO see the same
lesion from two angles; averaging them is how multi-view screening models such as the NYU
ones report a breast); with one view missing, the view that is there. An exam's score is its
worse breast: a screening exam is recalled for either breast. No model call happens here,
so the results service (which never loads torch) can compute these on read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from shared.db.models import Laterality


# Named tuples: a page of 100 exams makes hundreds of these, and a frozen dataclass's
# __init__ (a setattr per field) cost more than the rule itself.
class ViewScore(NamedTuple):
    # A Laterality and a View, or their values as a page reads them (the enums are str).
    laterality: str
    view: str
    score: float


class BreastScore(NamedTuple):
    laterality: Laterality
    score: float
    views: tuple[str, ...]  # the views (View values) the score was computed from


def breast_scores(view_scores: Iterable[ViewScore]) -> list[BreastScore]:
    """One score per breast that has at least one scored view, left before right."""
    by_breast: dict[str, dict[str, list[float]]] = {}
    for item in view_scores:
        by_breast.setdefault(item.laterality, {}).setdefault(item.view, []).append(item.score)
    breasts = []
    for laterality in (Laterality.LEFT, Laterality.RIGHT):
        views = by_breast.get(laterality)
        if not views:
            continue
        # A view uploaded twice counts once (its images averaged), so it cannot outweigh
        # the other view.
        per_view = [sum(scores) / len(scores) for scores in views.values()]
        breasts.append(BreastScore(laterality, sum(per_view) / len(per_view), tuple(sorted(views))))
    return breasts


def exam_score(breasts: Iterable[BreastScore]) -> float | None:
    scores = [b.score for b in breasts]
    return max(scores) if scores else None


def calibrated_probability(score: float, calibration: Mapping[str, float]) -> float:
    """A model's score as a probability, through its Platt scaling: sigmoid(a * logit(s) + b)
    (the score clipped to [1e-6, 1 - 1e-6] first, as when the scaling was fitted)."""
    clipped = min(max(score, 1e-6), 1 - 1e-6)
    logit = math.log(clipped / (1 - clipped))
    return 1 / (1 + math.exp(-(calibration["a"] * logit + calibration["b"])))


def roc_auc(scores: Iterable[float], labels: Iterable[bool]) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative
    (ties count half). Rank-based, O(n log n)."""
    pairs = sorted(zip(scores, labels, strict=True))
    positives = sum(1 for _, label in pairs if label)
    negatives = len(pairs) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    rank_sum, index = 0.0, 0
    while index < len(pairs):
        end = index
        while end < len(pairs) and pairs[end][0] == pairs[index][0]:
            end += 1
        mean_rank = (index + 1 + end) / 2  # ranks index+1 .. end share their mean
        rank_sum += mean_rank * sum(1 for _, label in pairs[index:end] if label)
        index = end
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
