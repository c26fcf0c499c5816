"""Training: patient-level splits, anatomy-respecting augmentation, a seeded epoch loop with
early stopping on validation AUC, and state that lets an interrupted run resume exactly.

Reproducibility: every random draw of epoch `e` comes from generators seeded with
(seed, e), never from a generator carried across epochs, so a run resumed at epoch `e` from
its checkpoint makes the same draws an uninterrupted run would have made.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.db.models import View
from shared.ml.config import Example, TrainingConfig
from shared.ml.evaluation import ExamOutcome, ScoredView, exam_outcomes
from shared.ml.model import ScreeningNet, ScreeningNetConfig, build_model
from shared.scores import roc_auc


def model_config(config: TrainingConfig) -> ScreeningNetConfig:
    return ScreeningNetConfig(
        input_height=config.input_height,
        input_width=config.input_width,
        stem_channels=config.stem_channels,
        stage_channels=config.stage_channels,
    )


def dense_target(
    example: Example,
    lesion_box: tuple[float, float, float, float] | None,
    grid: tuple[int, int],
    stride: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position targets (2, h, w) for the two outputs' maps, and which of the two are
    known (2,). A normal image is negative everywhere for both; a benign one is negative
    everywhere for malignancy; a labelled box marks its lesion's positions positive. A
    lesion without a box leaves that output's map unsupervised."""
    target = np.zeros((2, *grid), dtype=np.float32)
    known = np.array([not example.malignant, not example.lesion], dtype=bool)
    if example.lesion and lesion_box is not None:
        left, top, right, bottom = lesion_box
        x0, y0 = int(left // stride), int(top // stride)
        region = (
            slice(y0, max(y0 + 1, int(np.ceil(bottom / stride)))),
            slice(x0, max(x0 + 1, int(np.ceil(right / stride)))),
        )
        target[1][region] = 1.0
        known[1] = True
        if example.malignant:
            target[0][region] = 1.0
            known[0] = True
    return target, known


@dataclass
class LoadedSplit:
    """A split's preprocessed inputs, held in memory as float16 (N, H, W); its targets
    (N, 2): malignant, and any lesion (the auxiliary output); and the per-position targets
    of both outputs' maps (N, 2, h, w) with which of them are known (N, 2)."""

    examples: list[Example]
    inputs: torch.Tensor
    targets: torch.Tensor
    dense: torch.Tensor
    dense_known: torch.Tensor
    # Each input's statistics (N, len(INPUT_STATISTICS)), when loaded by the trainer: the
    # training split's become the version's input reference.
    statistics: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        examples: list[Example],
        arrays: list[np.ndarray],
        boxes: list[tuple[float, float, float, float] | None],
        *,
        stride: int,
    ) -> LoadedSplit:
        inputs = torch.from_numpy(np.stack(arrays).astype(np.float16))
        targets = torch.tensor([[float(e.malignant), float(e.lesion)] for e in examples])
        grid = (inputs.shape[1] // stride, inputs.shape[2] // stride)
        dense, known = zip(
            *(dense_target(e, b, grid, stride) for e, b in zip(examples, boxes, strict=True)),
            strict=True,
        )
        return cls(
            examples,
            inputs,
            targets,
            torch.from_numpy(np.stack(dense)),
            torch.from_numpy(np.stack(known)),
        )

    @property
    def malignant(self) -> torch.Tensor:
        return self.targets[:, 0]


def augment_batch(
    inputs: torch.Tensor,
    dense: torch.Tensor,
    views: Sequence[View],
    generator: torch.Generator,
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Changes a reader would accept as the same anatomy (applied to the per-position targets
    alike): a small shift along the chest wall,
    exposure (contrast and brightness) jitter, and an up-down flip of CC views only (a CC has
    no up or down; an MLO's pectoral muscle does). Never left-right: after canonical
    orientation the chest wall is always on the left. `strength` scales the shift and the
    jitter (the small-data recipe uses more)."""
    batch, height, _ = inputs.shape
    stride = height // dense.shape[2]
    out, out_dense = inputs.clone(), dense.clone()
    reach = max(1, round(2 * strength))
    for index in range(batch):
        # Whole map cells, so the per-position targets move with the image.
        cells = int(torch.randint(-reach, reach + 1, (1,), generator=generator))
        out[index] = torch.roll(out[index], shifts=cells * stride, dims=0)
        out_dense[index] = torch.roll(out_dense[index], shifts=cells, dims=1)
        if views[index] == View.CC and torch.rand(1, generator=generator).item() < 0.5:
            out[index] = torch.flip(out[index], dims=(0,))
            out_dense[index] = torch.flip(out_dense[index], dims=(1,))
    jitter = 0.1 * strength
    contrast = 1 + jitter * (torch.rand(batch, 1, 1, generator=generator) * 2 - 1)
    brightness = jitter * (torch.rand(batch, 1, 1, generator=generator) * 2 - 1)
    return out * contrast + brightness, out_dense


def predict(
    model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 32
) -> tuple[list[float], list[float]]:
    """(logits, probabilities) for float16 inputs (N, H, W), in eval mode."""
    model.eval()
    logits: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size].float().unsqueeze(1)
            logits.extend(model(chunk).tolist())
    probabilities = [1 / (1 + math.exp(-x)) for x in logits]
    return logits, probabilities


def outcomes_for(split: LoadedSplit, probabilities: Sequence[float]) -> list[ExamOutcome]:
    return exam_outcomes(
        ScoredView(e.study_key, e.laterality, e.view, p, e.malignant)
        for e, p in zip(split.examples, probabilities, strict=True)
    )


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    validation_loss: float | None  # None without a validation split
    validation_auc: float | None  # exam level
    seconds: float
    improved: bool


class Trainer:
    """The epoch loop. `state()` / `restore()` carry everything a resumed run needs.

    Without a validation split (a cross-validation's final model, whose epochs the folds
    chose), every epoch counts as the best so far: the last one's weights are the model.
    With `init_weights` (a warm start from a registered version) the small-data recipe of the
    config applies: its fine-tuning learning rate, the stem and first stage frozen for
    `freeze_epochs`, and augmentation of `fine_tune_augment_strength`.
    """

    def __init__(
        self,
        config: TrainingConfig,
        *,
        seed: int,
        train: LoadedSplit,
        validation: LoadedSplit | None,
        init_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config
        self.seed = seed
        self.train = train
        self.validation = validation
        torch.manual_seed(seed)
        self.model = build_model(model_config(config))
        self.warm = init_weights is not None
        if init_weights is not None:
            self.model.load_state_dict(init_weights)
        self.augment_strength = config.fine_tune_augment_strength if self.warm else 1.0
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.fine_tune_learning_rate if self.warm else config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, config.epochs)
        )
        # Screening data is imbalanced (few malignant views): weight positives up so they
        # count as much as negatives in the loss.
        positives = train.targets.sum(0).clamp(min=1.0)
        pos_weight = (len(train.targets) - positives) / positives
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.malignancy_loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight[0])
        # Positions inside lesion boxes are rare among the known ones: weight them up alike.
        known = train.dense_known[:, :, None, None].expand_as(train.dense)
        dense_positives = (train.dense * known).sum((0, 2, 3)).clamp(min=1.0)
        dense_total = known.sum((0, 2, 3)).clamp(min=1.0)
        self.dense_pos_weight = ((dense_total - dense_positives) / dense_positives).view(1, 2, 1, 1)
        self.next_epoch = 0
        self.best_auc = -1.0
        self.best_epoch = -1
        self.best_weights: dict[str, torch.Tensor] = self._copy_weights()
        self.elapsed_s = 0.0

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def finished(self) -> bool:
        config = self.config
        if self.next_epoch >= config.epochs:
            return True
        if self.best_epoch >= 0 and self.next_epoch - 1 - self.best_epoch >= config.patience:
            return True
        return config.time_budget_s is not None and self.elapsed_s >= config.time_budget_s

    def _early_layers(self) -> list[nn.Module]:
        return [self.model.stem, self.model.stages[0]]

    def run_epoch(self) -> EpochResult:
        epoch = self.next_epoch
        started = time.perf_counter()
        torch.manual_seed(self.seed * 10_007 + epoch)  # dropout draws of this epoch
        generator = torch.Generator().manual_seed(self.seed * 10_009 + epoch)
        order = torch.randperm(len(self.train.targets), generator=generator)
        self.model.train()
        # A warm start first adapts the later layers to the new images while the early
        # (generic edge and texture) filters, and their batch-norm statistics, stay put.
        frozen = self.warm and epoch < self.config.freeze_epochs
        for module in self._early_layers():
            module.requires_grad_(not frozen)
            if frozen:
                module.eval()
        total, count = 0.0, 0
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            if len(index) < 2:
                continue  # batch norm needs two samples
            inputs = self.train.inputs[index].float()
            dense = self.train.dense[index]
            if self.config.augment:
                views = [self.train.examples[int(i)].view for i in index]
                inputs, dense = augment_batch(
                    inputs, dense, views, generator, self.augment_strength
                )
            outputs, maps = self.model.outputs_and_maps(inputs.unsqueeze(1))
            loss = self.loss(outputs, self.train.targets[index])
            known = self.train.dense_known[index][:, :, None, None].expand_as(dense).float()
            if known.sum() > 0:
                per_position = nn.functional.binary_cross_entropy_with_logits(
                    maps, dense, pos_weight=self.dense_pos_weight, reduction="none"
                )
                loss = loss + self.config.dense_weight * (per_position * known).sum() / known.sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(index)
            count += len(index)
        self.scheduler.step()
        validation_loss: float | None = None
        auc: float | None = None
        if self.validation is not None:
            logits, probabilities = predict(self.model, self.validation.inputs)
            validation_loss = float(
                self.malignancy_loss(torch.tensor(logits), self.validation.malignant)
            )
            outcomes = outcomes_for(self.validation, probabilities)
            auc = roc_auc([o.score for o in outcomes], [o.malignant for o in outcomes])
        improved = auc is None or auc > self.best_auc
        if improved:
            self.best_auc, self.best_epoch = (-1.0 if auc is None else auc), epoch
            self.best_weights = self._copy_weights()
        seconds = time.perf_counter() - started
        self.elapsed_s += seconds
        self.next_epoch = epoch + 1
        return EpochResult(epoch, total / max(1, count), validation_loss, auc, seconds, improved)

    def best_model(self) -> ScreeningNet:
        model = build_model(model_config(self.config))
        model.load_state_dict(self.best_weights)
        return model.eval()

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "next_epoch": self.next_epoch,
            "best_auc": self.best_auc,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "elapsed_s": self.elapsed_s,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.next_epoch = int(state["next_epoch"])
        self.best_auc = float(state["best_auc"])
        self.best_epoch = int(state["best_epoch"])
        self.best_weights = state["best_weights"]
        self.elapsed_s = float(state["elapsed_s"])
