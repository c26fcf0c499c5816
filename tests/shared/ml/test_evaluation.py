from __future__ import annotations

import numpy as np
import pytest

from shared.db.models import Laterality, View
from shared.ml.evaluation import (
    ActiveComparison,
    ExamOutcome,
    ScoredView,
    bootstrap_auc_interval,
    calibration_error,
    choose_operating_point,
    evaluate_exams,
    exam_outcomes,
    fit_calibration,
    review_candidate,
    sensitivity_specificity,
    threshold_for_sensitivity,
)
from shared.scores import calibrated_probability, roc_auc

L, R = Laterality.LEFT, Laterality.RIGHT


def test_exam_outcome_is_the_worse_breast_of_view_means() -> None:
    views = [
        ScoredView("a", L, View.CC, 0.2, False),
        ScoredView("a", L, View.MLO, 0.4, False),
        ScoredView("a", R, View.CC, 0.9, True),
        ScoredView("a", R, View.MLO, 0.5, True),
        ScoredView("b", L, View.CC, 0.1, False),  # one view only
    ]
    outcomes = {o.study: o for o in exam_outcomes(views)}
    assert outcomes["a"].score == pytest.approx(0.7)
    assert outcomes["a"].malignant
    assert outcomes["b"].score == pytest.approx(0.1)
    assert not outcomes["b"].malignant


def _separable(n: int, seed: int, shift: float) -> tuple[list[float], list[bool]]:
    rng = np.random.default_rng(seed)
    labels = list(rng.random(n) < 0.3)
    scores = [float(1 / (1 + np.exp(-(rng.normal() + shift * y)))) for y in labels]
    return scores, labels


def test_bootstrap_interval_brackets_the_auc_and_narrows_with_more_exams() -> None:
    small = _separable(80, 1, 1.5)
    large = _separable(2000, 1, 1.5)
    low_s, high_s = bootstrap_auc_interval(*small, seed=0, resamples=300)
    low_l, high_l = bootstrap_auc_interval(*large, seed=0, resamples=300)
    assert low_s <= roc_auc(*small) <= high_s
    assert low_l <= roc_auc(*large) <= high_l
    assert high_l - low_l < (high_s - low_s) / 2


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_threshold_reaches_the_target_sensitivity_and_no_higher_threshold_does(
    target: float,
) -> None:
    scores, labels = _separable(300, 2, 1.0)
    threshold = threshold_for_sensitivity(scores, labels, target)
    sensitivity, _ = sensitivity_specificity(scores, labels, threshold)
    assert sensitivity >= target
    above = min(s for s in scores if s > threshold) if any(s > threshold for s in scores) else None
    if above is not None:
        assert sensitivity_specificity(scores, labels, above)[0] < target


def test_platt_scaling_fixes_an_overconfident_score() -> None:
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.05, 0.95, 4000)
    labels = list(rng.random(4000) < truth)
    logits = np.log(truth / (1 - truth))
    overconfident = list(1 / (1 + np.exp(-3 * logits)))  # true probability, sharpened
    calibration = fit_calibration(overconfident, labels)
    assert calibration["a"] == pytest.approx(1 / 3, abs=0.05)
    calibrated = [calibrated_probability(s, calibration) for s in overconfident]
    assert calibration_error(calibrated, labels) < calibration_error(overconfident, labels) / 2


def test_evaluation_reports_every_figure_of_the_model_card() -> None:
    scores, labels = _separable(400, 4, 2.0)
    outcomes = [
        ExamOutcome(str(i), s, y) for i, (s, y) in enumerate(zip(scores, labels, strict=True))
    ]
    point = choose_operating_point(outcomes[:200], 0.9)
    report = evaluate_exams(outcomes[200:], point, seed=0)
    assert report["exams"] == 200
    assert 0.5 < report["exam_auc"] <= 1
    low, high = report["exam_auc_ci95"]
    assert low <= report["exam_auc"] <= high
    assert point.validation_sensitivity >= 0.9
    assert 0 <= report["specificity"] <= 1
    assert report["calibration_error_calibrated"] <= report["calibration_error_raw"] + 0.05


def _outcomes(scores: list[float], labels: list[bool]) -> list[ExamOutcome]:
    return [
        ExamOutcome(f"s{i:03d}", s, y) for i, (s, y) in enumerate(zip(scores, labels, strict=False))
    ]


def test_review_rejects_a_candidate_whose_interval_reaches_chance() -> None:
    rng = np.random.default_rng(0)
    labels = [bool(i % 3 == 0) for i in range(60)]
    chance = _outcomes(rng.random(60).tolist(), labels)
    interval = bootstrap_auc_interval([o.score for o in chance], labels, seed=1)
    review = review_candidate(chance, auc_interval=interval, evidence="test", active=None, seed=1)
    assert review.rejected
    assert review.reason is not None
    assert "does not lie above 0.5" in review.reason

    good = _outcomes([float(y) * 0.5 + rng.random() * 0.6 for y in labels], labels)
    interval = bootstrap_auc_interval([o.score for o in good], labels, seed=1)
    assert interval[0] > 0.5
    accepted = review_candidate(good, auc_interval=interval, evidence="test", active=None, seed=1)
    assert (accepted.rejected, accepted.reason) == (False, None)

    few = good[:8] + [o for o in good if o.malignant][:3]
    interval = bootstrap_auc_interval([o.score for o in few], [o.malignant for o in few], seed=1)
    too_few = review_candidate(few, auc_interval=interval, evidence="test", active=None, seed=1)
    assert too_few.rejected
    assert too_few.reason is not None
    assert "at least 10 of each" in too_few.reason


def test_review_rejects_a_candidate_worse_than_the_active_version_on_the_same_exams() -> None:
    rng = np.random.default_rng(2)
    labels = [bool(i % 3 == 0) for i in range(90)]
    weaker = [float(y) * 0.4 + rng.random() for y in labels]
    stronger = [float(y) * 0.9 + rng.random() for y in labels]
    candidate = _outcomes(weaker, labels)
    interval = bootstrap_auc_interval(weaker, labels, seed=3)
    assert interval[0] > 0.5  # better than chance, and still not good enough
    review = review_candidate(
        candidate,
        auc_interval=interval,
        evidence="test",
        active=ActiveComparison("shipped", stronger),
        seed=3,
    )
    assert review.rejected
    assert review.reason is not None
    assert "below the active version shipped" in review.reason
    comparison = review.comparison
    assert comparison is not None
    assert comparison["difference"] == pytest.approx(
        roc_auc(weaker, labels) - roc_auc(stronger, labels)
    )
    low, high = comparison["difference_ci95"]
    assert low <= comparison["difference"] <= high

    flipped = review_candidate(
        _outcomes(stronger, labels),
        auc_interval=bootstrap_auc_interval(stronger, labels, seed=3),
        evidence="test",
        active=ActiveComparison("shipped", weaker),
        seed=3,
    )
    assert not flipped.rejected
    assert flipped.comparison is not None
    assert flipped.comparison["difference"] > 0
