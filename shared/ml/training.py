"""Training: patient-level splits, anatomy-respecting augmentation, a seeded epoch loop with
early stopping on validation AUC, and state that lets an interrupted run resume exactly.

Reproducibility: every random draw of epoch `e` comes from generators seeded with
(seed, e), never from a generator carried across epochs, so a run resumed at epoch `e` from
its checkpoint makes the same draws an uninterrupted run would have made.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.db.models import View
from shared.ml.config import TrainingConfig
from shared.ml.data import Step, TrainingSplit, epoch_plan, sample_generator
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


def augment_batch(
    inputs: torch.Tensor,
    dense: torch.Tensor,
    views: Sequence[View],
    generators: Sequence[torch.Generator],
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Changes a reader would accept as the same anatomy (applied to the per-position targets
    alike): a small shift along the chest wall,
    exposure (contrast and brightness) jitter, and an up-down flip of CC views only (a CC has
    no up or down; an MLO's pectoral muscle does). Never left-right: after canonical
    orientation the chest wall is always on the left. `strength` scales the shift and the
    jitter (the small-data recipe uses more). Each example draws from its own generator, so
    its augmentation does not depend on the batch or the rank it is in."""
    stride = inputs.shape[1] // dense.shape[2]
    out, out_dense = inputs.clone(), dense.clone()
    reach = max(1, round(2 * strength))
    jitter = 0.1 * strength
    contrast = torch.empty(len(inputs), 1, 1)
    brightness = torch.empty(len(inputs), 1, 1)
    for index, generator in enumerate(generators):
        # Whole map cells, so the per-position targets move with the image.
        cells = int(torch.randint(-reach, reach + 1, (1,), generator=generator))
        out[index] = torch.roll(out[index], shifts=cells * stride, dims=0)
        out_dense[index] = torch.roll(out_dense[index], shifts=cells, dims=1)
        if views[index] == View.CC and torch.rand(1, generator=generator).item() < 0.5:
            out[index] = torch.flip(out[index], dims=(0,))
            out_dense[index] = torch.flip(out_dense[index], dims=(1,))
        contrast[index] = 1 + jitter * (torch.rand(1, generator=generator) * 2 - 1)
        brightness[index] = jitter * (torch.rand(1, generator=generator) * 2 - 1)
    return out * contrast + brightness, out_dense


def predict(
    model: nn.Module,
    split: TrainingSplit,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    autocast: bool = False,
) -> tuple[list[float], list[float]]:
    """(logits, probabilities) of every example of `split`, streamed, in eval mode."""
    device = device or torch.device("cpu")
    model.eval()
    logits: list[float] = []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        for inputs in split.stream(split.in_batches(batch_size)):
            logits.extend(model(inputs.to(device).float().unsqueeze(1)).float().tolist())
    probabilities = [1 / (1 + math.exp(-x)) for x in logits]
    return logits, probabilities


def outcomes_for(split: TrainingSplit, probabilities: Sequence[float]) -> list[ExamOutcome]:
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


CPU = torch.device("cpu")


class TrainingForward(nn.Module):
    """The network's outputs and maps as a module's forward, so that a distributed wrapper
    (which synchronises gradients through forward) can wrap training's pass."""

    def __init__(self, net: ScreeningNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.outputs_and_maps(x)


@dataclass(frozen=True)
class Placement:
    """Where a trainer computes: its device, and its rank among `world_size` processes of a
    distributed run (whose process group the caller has set up)."""

    device: torch.device = CPU
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class Trainer:
    """The epoch loop. `state()` / `restore()` carry everything a resumed run needs.

    Without a validation split (a cross-validation's final model, whose epochs the folds
    chose), every epoch counts as the best so far: the last one's weights are the model.
    With `init_weights` (a warm start from a registered version) the small-data recipe of the
    config applies: its fine-tuning learning rate, the stem and first stage frozen for
    `freeze_epochs`, and augmentation of `fine_tune_augment_strength`.

    Distributed (`placement.world_size` > 1): each rank trains on its share of every step
    (see `epoch_plan`), gradients are averaged by DistributedDataParallel, and each rank's
    loss is scaled so the update equals one process's on the whole batch. Rank 0 validates
    and tells the others what it found, so every rank stops at the same epoch.
    """

    def __init__(
        self,
        config: TrainingConfig,
        *,
        seed: int,
        train: TrainingSplit,
        validation: TrainingSplit | None,
        init_weights: dict[str, torch.Tensor] | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.config = config
        self.seed = seed
        self.train = train
        self.validation = validation
        self.placement = placement or Placement()
        device = self.placement.device
        on_gpu = device.type == "cuda"
        self.autocast = config.mixed_precision == "bf16" or (
            config.mixed_precision == "auto" and on_gpu
        )
        self.channels_last = config.channels_last == "on" or (
            config.channels_last == "auto" and on_gpu
        )
        torch.manual_seed(seed)
        self.model = build_model(model_config(config))
        self.warm = init_weights is not None
        if init_weights is not None:
            self.model.load_state_dict(init_weights)
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.forward: nn.Module = TrainingForward(self.model)
        if self.placement.distributed:
            if on_gpu:  # batch statistics over the whole step (gloo has no CPU version)
                self.forward = nn.SyncBatchNorm.convert_sync_batchnorm(self.forward)
                self.model = self.forward.net  # type: ignore[assignment]
            self.forward = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[device.index] if on_gpu else None
            )
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
        self.pos_weight = ((len(train.targets) - positives) / positives).to(device)
        self.malignancy_loss = nn.BCEWithLogitsLoss(pos_weight=self.pos_weight[0].cpu())
        self.dense_pos_weight = train.dense_positive_weight().to(device)
        self.next_epoch = 0
        self.best_auc = -1.0
        self.best_epoch = -1
        self.best_weights: dict[str, torch.Tensor] = self._copy_weights()
        self.elapsed_s = 0.0
        self.epoch_examples: list[int] = []

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

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
        rank, world_size = self.placement.rank, self.placement.world_size
        torch.manual_seed(self.seed * 10_007 + epoch + 7_919 * rank)  # dropout draws
        plan = epoch_plan(
            self.train.examples,
            seed=self.seed,
            epoch=epoch,
            batch_size=self.config.batch_size,
            world_size=world_size,
        )
        # This rank's examples in this epoch, in order (an audit trail of what trained it).
        self.epoch_examples = [i for step in plan for i in step.ranks[rank]]
        self.forward.train()
        # A warm start first adapts the later layers to the new images while the early
        # (generic edge and texture) filters, and their batch-norm statistics, stay put.
        # Their gradients are dropped rather than not computed: a distributed run needs every
        # parameter's gradient in each all-reduce.
        frozen = self.warm and epoch < self.config.freeze_epochs
        frozen_parameters = [p for m in self._early_layers() for p in m.parameters()]
        if frozen:
            for module in self._early_layers():
                module.eval()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of step loss x images, images)
        shares = self.train.stream([step.ranks[rank] for step in plan])
        for step, inputs in zip(plan, shares, strict=True):
            step_loss = self._step(step, inputs, epoch)
            if frozen:
                for parameter in frozen_parameters:
                    parameter.grad = None
            self.optimizer.step()
            # The step's images counted once, by rank 0, when the ranks' sums are added.
            counted = float(step.size) if rank == 0 else 0.0
            loss_sum += torch.tensor([step_loss * step.size, counted], dtype=torch.float64)
        self.scheduler.step()
        if self.placement.distributed:
            torch.distributed.all_reduce(loss_sum)  # every rank's share of each step's loss
        validation_loss: float | None = None
        auc: float | None = None
        if self.validation is not None and rank == 0:
            logits, probabilities = predict(
                self.model, self.validation, device=self.placement.device, autocast=self.autocast
            )
            validation_loss = float(
                self.malignancy_loss(torch.tensor(logits), self.validation.malignant)
            )
            outcomes = outcomes_for(self.validation, probabilities)
            auc = roc_auc([o.score for o in outcomes], [o.malignant for o in outcomes])
        seconds = time.perf_counter() - started
        if self.placement.distributed:
            validation_loss, auc, seconds = self._from_rank_zero(validation_loss, auc, seconds)
        improved = auc is None or auc > self.best_auc
        if improved:
            self.best_auc, self.best_epoch = (-1.0 if auc is None else auc), epoch
            self.best_weights = self._copy_weights()
        self.elapsed_s += seconds
        self.next_epoch = epoch + 1
        train_loss = float(loss_sum[0] / loss_sum[1].clamp(min=1.0))
        return EpochResult(epoch, train_loss, validation_loss, auc, seconds, improved)

    def _step(self, step: Step, inputs: torch.Tensor, epoch: int) -> float:
        """Forward and backward of this rank's share of `step`, its gradient scaled so the
        ranks' average is the whole batch's; this rank's share of the step's loss."""
        indices = list(step.ranks[self.placement.rank])
        everyone = [i for share in step.ranks for i in share]
        # The whole step's denominators, from labels alone (every rank knows every label).
        cells = self.train.grid[0] * self.train.grid[1]
        known_positions = float(self.train.dense_known[everyone].sum()) * cells
        device = self.placement.device
        self.optimizer.zero_grad(set_to_none=True)
        parts = np.array_split(
            np.arange(len(indices)), max(1, min(self.config.accumulation_steps, len(indices) // 2))
        )
        share = 0.0
        for number, part in enumerate(parts):
            chosen = [indices[i] for i in part]
            x = inputs[torch.from_numpy(part)].float()
            dense, known = self.train.dense(chosen)
            if self.config.augment:
                x, dense = augment_batch(
                    x,
                    dense,
                    [self.train.examples[i].view for i in chosen],
                    [sample_generator(self.seed, epoch, i) for i in chosen],
                    self.augment_strength,
                )
            x = x.unsqueeze(1).to(device).contiguous(memory_format=self._memory_format)
            dense, known = dense.to(device), known.to(device)
            targets = self.train.targets[chosen].to(device)
            last = number == len(parts) - 1
            synchronise = (
                self.forward.no_sync()  # type: ignore[operator]
                if self.placement.distributed and not last
                else contextlib.nullcontext()
            )
            with synchronise:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    outputs, maps = self.forward(x)
                loss = nn.functional.binary_cross_entropy_with_logits(
                    outputs.float(), targets, pos_weight=self.pos_weight, reduction="sum"
                ) / (2 * step.size)
                if known_positions > 0:
                    per_position = nn.functional.binary_cross_entropy_with_logits(
                        maps.float(), dense, pos_weight=self.dense_pos_weight, reduction="none"
                    )
                    mask = known[:, :, None, None].expand_as(dense).float()
                    dense_loss = (per_position * mask).sum() / known_positions
                    loss = loss + self.config.dense_weight * dense_loss
                # DistributedDataParallel averages the ranks' gradients: scale up by their
                # number so the average is the sum over the whole step.
                (loss * self.placement.world_size).backward()
            share += float(loss.detach())
        return share

    def _from_rank_zero(
        self, validation_loss: float | None, auc: float | None, seconds: float
    ) -> tuple[float | None, float | None, float]:
        nan = float("nan")
        values = torch.tensor(
            [
                nan if validation_loss is None else validation_loss,
                nan if auc is None else auc,
                seconds,
            ],
            dtype=torch.float64,
        )
        torch.distributed.broadcast(values, src=0)
        loss, found, took = (float(v) for v in values)
        return (
            None if math.isnan(loss) else loss,
            None if math.isnan(found) else found,
            took,
        )

    def best_model(self) -> ScreeningNet:
        model = build_model(model_config(self.config))
        model.load_state_dict(self.best_weights)
        return model.eval()

    def state(self) -> dict[str, Any]:
        return {
            "model": self._copy_weights(),
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
