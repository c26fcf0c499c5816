"""Cross-validation's figures: a fold's out-of-fold predictions, and the pooled evaluation
of all folds that a cross-validated model version is judged on. No database here: the
trainer (training.py) stores and reads what these return."""

from __future__ import annotations

import statistics
from typing import Any

from shared.db.models import Laterality, View
from shared.ml.data import TrainingSplit
from shared.ml.evaluation import (
    ExamOutcome,
    OperatingPoint,
    ScoredView,
    choose_operating_point,
    evaluate_exams,
    exam_outcomes,
)
from shared.ml.training import Trainer, outcomes_for, predict
from shared.scores import roc_auc


def fold_evaluation(trainer: Trainer, test: TrainingSplit, fold: int) -> dict[str, Any]:
    """The fold's best weights on its held-out fold: every image's score (the out-of-fold
    predictions the pooled figures are made of) and the fold's own exam AUC."""
    _, probabilities = predict(trainer.best_model(), test)
    outcomes = outcomes_for(test, probabilities)
    return {
        "fold": fold,
        "best_epoch": trainer.best_epoch,
        "best_validation_auc": trainer.best_auc,
        "epochs_trained": trainer.next_epoch,
        "exams": len(outcomes),
        "exam_auc": roc_auc([o.score for o in outcomes], [o.malignant for o in outcomes]),
        "out_of_fold": [
            {
                "image_id": str(example.image_id),
                "study": example.study_key,
                "laterality": example.laterality.value,
                "view": example.view.value,
                "score": score,
                "malignant": example.malignant,
            }
            for example, score in zip(test.examples, probabilities, strict=True)
        ],
    }


def pooled_outcomes(folds: list[dict[str, Any]]) -> list[ExamOutcome]:
    """Every exam once, scored by the fold model that never saw it."""
    return exam_outcomes(
        ScoredView(
            row["study"],
            Laterality(row["laterality"]),
            View(row["view"]),
            row["score"],
            row["malignant"],
        )
        for fold in folds
        for row in fold["out_of_fold"]
    )


def cross_validated_figures(
    folds: list[dict[str, Any]], *, target_sensitivity: float, seed: int
) -> tuple[list[ExamOutcome], OperatingPoint, dict[str, Any]]:
    """Pooled out-of-fold outcomes, the operating point and calibration chosen on them (the
    final model has no held-out data of its own), and the figures of the model card: pooled
    exam AUC with its bootstrap interval, sensitivity and specificity at the threshold, and
    the spread of the folds' own AUCs."""
    pooled = pooled_outcomes(folds)
    point = choose_operating_point(pooled, target_sensitivity)
    metrics = evaluate_exams(pooled, point, seed=seed)
    aucs = [fold["exam_auc"] for fold in folds]
    metrics.update(
        {
            "folds": len(folds),
            "per_fold": [
                {k: fold[k] for k in ("fold", "exams", "exam_auc", "best_epoch")}
                for fold in sorted(folds, key=lambda f: f["fold"])
            ],
            "fold_auc_mean": statistics.fmean(aucs),
            "fold_auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "fold_auc_range": [min(aucs), max(aucs)],
            "note": "pooled out-of-fold scores; the threshold is chosen on the same pooled "
            "scores, so its sensitivity and specificity are optimistic",
        }
    )
    return pooled, point, metrics
