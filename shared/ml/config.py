"""Training hyperparameters and patient-level splits: plain Python, so the ingest service
can validate a run and draw its splits without importing torch."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.db.models import Laterality, Split, TrainingLabel, View


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of a run; stored with the run and in its model's card."""

    epochs: int = 12
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    # Stop when validation AUC has not improved for this many epochs.
    patience: int = 4
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    target_sensitivity: float = 0.90
    augment: bool = True
    # Weight of the per-position loss on the heatmaps (from lesion boxes, and from images
    # known to have no lesion) beside the image-level loss; 0 trains on image labels only.
    dense_weight: float = 1.0
    # Stop after the epoch during which this many seconds of training have passed.
    time_budget_s: float | None = None
    input_height: int = 512
    input_width: int = 416
    # Network width: channels of the stem and of each residual stage.
    stem_channels: int = 16
    stage_channels: tuple[int, ...] = (16, 32, 64, 128)
    # Cross-validation: k patient-level stratified folds, then a final model on all the data.
    # None: CV_FOLDS when the data set has fewer than CV_BELOW_PATIENTS patients, else one
    # train/validation/test split (also what 0 or 1 asks for).
    folds: int | None = None
    # Warm start: "auto" (the active trained version, when its layers have the run's shapes),
    # "none" (from scratch), or a model version's name or id. The run records what it used.
    init_from: str = "auto"
    # The small-data recipe of a warm-started run (README "Warm start" has the measurements
    # behind each): a lower learning rate, the stem and first stage frozen for the first
    # epochs, and stronger anatomy-respecting augmentation.
    fine_tune_learning_rate: float = 3e-4
    freeze_epochs: int = 2
    fine_tune_augment_strength: float = 1.5
    # Arithmetic: "auto" is bf16 autocast on a GPU and float32 on the CPU; "bf16" or "off"
    # ask for one everywhere. Channels-last memory layout: "auto" on a GPU only.
    mixed_precision: str = "auto"
    channels_last: str = "auto"
    # Gradient accumulation: each step's batch goes through in this many parts (for a batch
    # that does not fit in memory); the update is the same as for the whole batch at once,
    # but for batch norm's statistics, which see a part at a time.
    accumulation_steps: int = 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stage_channels"] = list(self.stage_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "stage_channels" in values:
            values["stage_channels"] = tuple(values["stage_channels"])
        return cls(**values)


CV_FOLDS = 5
# Fewer patients than this and a single split's test set holds under 30 of them (at the
# default 15%): too few to judge a model, so runs use cross-validation unless told otherwise.
CV_BELOW_PATIENTS = 200
# The layer shapes a warm start needs to match (what else differs, such as the input size or
# dropout, a checkpoint's weights do not depend on).
WEIGHT_SHAPE_DEFAULTS = {
    "architecture": "screening-resnet-v1",
    "in_channels": 1,
    "stem_pool": True,
    "blocks_per_stage": 1,
    "outputs": 2,
}


def folds_for(config: TrainingConfig, patients: int) -> int:
    """How many folds a run trains: 1 for a single train/validation/test split."""
    if config.folds is not None:
        return max(1, config.folds)
    return CV_FOLDS if patients < CV_BELOW_PATIENTS else 1


def weights_fit(architecture: dict[str, Any], config: TrainingConfig) -> bool:
    """Whether a version of `architecture` has weights of the shapes `config`'s network
    needs (same layers and widths; the input size may differ)."""
    return (
        list(architecture.get("stage_channels", [])) == list(config.stage_channels)
        and architecture.get("stem_channels") == config.stem_channels
        and all(architecture.get(k, v) == v for k, v in WEIGHT_SHAPE_DEFAULTS.items())
    )


def stratified_folds(
    images: Sequence[tuple[uuid.UUID, str, bool]], *, folds: int, seed: int
) -> dict[uuid.UUID, int]:
    """Each image's fold, by patient: `images` are (image id, patient key, malignant).
    Patients with a malignant image and those without are dealt round-robin in seeded hash
    order, so every fold gets its share of each."""
    malignant_patients = {patient for _, patient, malignant in images if malignant}
    patients = sorted({patient for _, patient, _ in images})
    fold_of: dict[str, int] = {}
    for stratum in (
        [p for p in patients if p in malignant_patients],
        [p for p in patients if p not in malignant_patients],
    ):
        ordered = sorted(stratum, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())
        offset = len(fold_of)  # the second stratum continues the deal where the first ended
        for index, patient in enumerate(ordered):
            fold_of[patient] = (offset + index) % folds
    return {image_id: fold_of[patient] for image_id, patient, _ in images}


def fold_split(fold_of_image: int, fold: int, folds: int) -> Split:
    """Fold `fold`'s role for an image in fold `fold_of_image`: its held-out test fold, the
    next fold for early stopping, the rest for training."""
    if fold_of_image == fold:
        return Split.TEST
    if fold_of_image == (fold + 1) % folds:
        return Split.VALIDATION
    return Split.TRAIN


@dataclass(frozen=True)
class Example:
    image_id: uuid.UUID
    patient_key: str
    study_key: str
    laterality: Laterality
    view: View
    label: TrainingLabel

    @property
    def malignant(self) -> bool:
        return self.label == TrainingLabel.MALIGNANT

    @property
    def lesion(self) -> bool:
        return self.label != TrainingLabel.NORMAL


def split_by_patient(
    images: Sequence[tuple[uuid.UUID, str, bool]],
    *,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
) -> dict[uuid.UUID, Split]:
    """Assign every patient (and so all of their images) to one split; `images` are
    (image id, patient key, malignant).

    Stratified: patients with a malignant image and those without are split separately, so
    each split gets its share of the (rare) positives. Within a stratum, patients are ordered
    by a seeded hash, which is deterministic and independent of upload order.
    """
    malignant_patients = {patient for _, patient, malignant in images if malignant}
    patients = sorted({patient for _, patient, _ in images})
    assignment: dict[str, Split] = {}
    for stratum in (
        [p for p in patients if p in malignant_patients],
        [p for p in patients if p not in malignant_patients],
    ):
        ordered = sorted(stratum, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())
        n_test = round(len(ordered) * test_fraction)
        n_validation = round(len(ordered) * validation_fraction)
        for index, patient in enumerate(ordered):
            if index < n_test:
                assignment[patient] = Split.TEST
            elif index < n_test + n_validation:
                assignment[patient] = Split.VALIDATION
            else:
                assignment[patient] = Split.TRAIN
    return {image_id: assignment[patient] for image_id, patient, _ in images}
