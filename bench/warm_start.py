"""`make bench-warm-start`: does warm start beat training from scratch on a small data set of
another domain, and by how much, with the recipe the trainer uses?

A site's first labelled set is a few hundred images, often not from the detector the shipped
model knows. Here: `--exams` film-scan exams (MLO views only, two images per woman; the
generator's `film` style), scored by 5-fold patient-level cross-validation (the trainer's own
folds, fold models and pooled out-of-fold evaluation, run in this process without the
stack), once per recipe:

- scratch: a new network at the default learning rate;
- warm: the shipped model's weights, the small-data recipe of TrainingConfig (lower learning
  rate, stem and first stage frozen for the first epochs, stronger augmentation);
- warm-plain: the shipped weights at the default learning rate, nothing frozen, standard
  augmentation (what the recipe's parts add).

Writes `bench/warm_start.json`: pooled exam AUC with its 95% bootstrap interval and the
per-fold spread for each recipe.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import write_and_print
from devstack.synth import SynthOptions, generate_exams
from services.worker.cross_validation import cross_validated_figures, fold_evaluation
from shared.db.models import Laterality, Split, TrainingLabel, View
from shared.imaging.decode import decode_image
from shared.imaging.preprocess import Preprocess, box_in_input
from shared.ml.config import Example, TrainingConfig, fold_split, stratified_folds
from shared.ml.data import TrainingSplit
from shared.ml.registry import REPO_ROOT
from shared.ml.training import Trainer, model_config

SHIPPED = REPO_ROOT / "models" / "screening-synthetic" / "checkpoint.pt"


def load_folder(folder: Path, config: TrainingConfig) -> tuple[list[Example], list[Any]]:
    preprocess = Preprocess(config.input_height, config.input_width)
    examples, loaded = [], []
    with open(folder / "labels.csv", newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            pixels = decode_image(
                (folder / row["file"]).read_bytes(), "application/dicom", max_pixels=10**8
            )
            laterality = Laterality(row["laterality"])
            inputs, geometry = preprocess.with_geometry(pixels, laterality)
            box = None
            if row["box_x0"]:
                raw = tuple(int(row[f"box_{c}"]) for c in ("x0", "y0", "x1", "y1"))
                box = box_in_input(raw, geometry)  # type: ignore[arg-type]
            examples.append(
                Example(
                    uuid.UUID(int=index),
                    row["patient"],
                    row["study"],
                    laterality,
                    View(row["view"]),
                    TrainingLabel(row["label"]),
                )
            )
            loaded.append((inputs.astype(np.float16), box))
    return examples, loaded


def cross_validate(
    examples: list[Example],
    loaded: list[Any],
    config: TrainingConfig,
    *,
    folds: int,
    seed: int,
    init: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    fold_of = stratified_folds(
        [(e.image_id, e.patient_key, e.malignant) for e in examples], folds=folds, seed=seed
    )
    stride = model_config(config).output_stride
    evaluations = []
    for fold in range(folds):
        parts: dict[Split, list[int]] = {split: [] for split in Split}
        for index, example in enumerate(examples):
            parts[fold_split(fold_of[example.image_id], fold, folds)].append(index)
        splits = {
            split: TrainingSplit.in_memory(
                [examples[i] for i in members],
                [loaded[i][0] for i in members],
                [loaded[i][1] for i in members],
                stride=stride,
            )
            for split, members in parts.items()
        }
        trainer = Trainer(
            config,
            seed=seed,
            train=splits[Split.TRAIN],
            validation=splits[Split.VALIDATION],
            init_weights=init,
        )
        while not trainer.finished:
            trainer.run_epoch()
        evaluations.append(fold_evaluation(trainer, splits[Split.TEST], fold))
        print(f"    fold {fold}: exam AUC {evaluations[-1]['exam_auc']:.3f}", flush=True)
    _, _, figures = cross_validated_figures(
        evaluations, target_sensitivity=config.target_sensitivity, seed=seed
    )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-warm-start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exams", type=int, default=150, help="film exams (patients)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--recipes", default="scratch,warm,warm-plain")
    parser.add_argument("--hyperparameters", default="{}", help="JSON over TrainingConfig")
    parser.add_argument("--out", type=Path, default=Path("bench/warm_start.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = TrainingConfig.from_dict(json.loads(args.hyperparameters))
    shipped = torch.load(io.BytesIO(SHIPPED.read_bytes()), map_location="cpu", weights_only=True)
    recipes: dict[str, tuple[TrainingConfig, dict[str, torch.Tensor] | None]] = {
        "scratch": (config, None),
        "warm": (config, shipped["state_dict"]),
        "warm-plain": (
            replace(
                config,
                fine_tune_learning_rate=config.learning_rate,
                freeze_epochs=0,
                fine_tune_augment_strength=1.0,
            ),
            shipped["state_dict"],
        ),
    }
    figures: dict[str, Any] = {
        "exams": args.exams,
        "images": 2 * args.exams,
        "style": "film, MLO only",
        "folds": args.folds,
        "seed": args.seed,
        "hyperparameters": config.to_dict(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-warm-start-") as data:
        folder = Path(data) / "film"
        generate_exams(
            folder,
            exams=args.exams,
            seed=args.seed,
            options=SynthOptions(style="film", views=("MLO",)),
        )
        examples, loaded = load_folder(folder, config)
    for name in args.recipes.split(","):
        recipe, init = recipes[name]
        print(f"{name}:", flush=True)
        started = time.monotonic()
        result = cross_validate(
            examples, loaded, recipe, folds=args.folds, seed=args.seed, init=init
        )
        figures[name] = {
            "pooled_exam_auc": result["exam_auc"],
            "pooled_exam_auc_ci95": result["exam_auc_ci95"],
            "fold_auc_mean": result["fold_auc_mean"],
            "fold_auc_sd": result["fold_auc_sd"],
            "fold_auc_range": result["fold_auc_range"],
            "sensitivity": result["sensitivity"],
            "specificity": result["specificity"],
            "seconds": time.monotonic() - started,
        }
        print(f"  pooled exam AUC {result['exam_auc']:.3f} {result['exam_auc_ci95']}", flush=True)
    write_and_print(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
