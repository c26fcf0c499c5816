from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.api.schemas import PlainText
from shared.db.models import BatchPriority, BatchPurpose, Laterality, TrainingStatus, View
from shared.ml.config import TrainingConfig


class BatchCreate(BaseModel):
    name: PlainText = Field(min_length=1, max_length=200)
    priority: BatchPriority = BatchPriority.NORMAL
    purpose: BatchPurpose = Field(
        default=BatchPurpose.SCREENING,
        description="'training': images are kept for training runs and not screened",
    )
    callback_url: AnyHttpUrl | None = Field(
        default=None,
        description="POSTed a signed JSON summary when the batch completes (README: Webhooks)",
    )

    @field_validator("callback_url")
    @classmethod
    def _short_enough(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None and len(str(url)) > 2048:
            raise ValueError("callback_url is longer than 2048 characters")
        return url


class WebhookSecret(BaseModel):
    secret: str
    signature_header: str
    scheme: str


class AcceptedImage(BaseModel):
    id: uuid.UUID
    filename: str
    study_id: uuid.UUID
    media_type: str
    size_bytes: int
    sha256: str
    laterality: Laterality | None
    view: View | None


class RejectedFile(BaseModel):
    filename: str
    code: str
    message: str


class UploadResult(BaseModel):
    batch_id: uuid.UUID
    accepted: list[AcceptedImage]
    rejected: list[RejectedFile]
    warnings: list[str] = []


_DEFAULTS = TrainingConfig()


class LabelledImage(BaseModel):
    """One labelled image: by `file` name within `dataset.batch_id`, or by `image_id`."""

    file: PlainText | None = Field(default=None, min_length=1, max_length=255)
    image_id: uuid.UUID | None = None
    label: Literal["malignant", "benign", "normal"]
    box: list[Annotated[int, Field(ge=0, le=100_000)]] | None = Field(
        default=None,
        min_length=4,
        max_length=4,
        description="optional lesion box [x0, y0, x1, y1] in the image's pixels; it teaches "
        "the heatmap where the lesion is",
    )

    @model_validator(mode="after")
    def _one_reference(self) -> LabelledImage:
        if (self.file is None) == (self.image_id is None):
            raise ValueError("give exactly one of file or image_id")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if x1 <= x0 or y1 <= y0:
                raise ValueError("box is [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
            if self.label == "normal":
                raise ValueError("a normal image has no lesion box")
        return self


class TrainingDataset(BaseModel):
    batch_id: uuid.UUID | None = Field(
        default=None, description="the batch whose images `file` labels name"
    )
    labels: list[LabelledImage] = Field(min_length=1, max_length=200_000)

    @model_validator(mode="after")
    def _files_need_a_batch(self) -> TrainingDataset:
        if self.batch_id is None and any(item.file is not None for item in self.labels):
            raise ValueError("labels that name a file need dataset.batch_id")
        return self


class TrainingHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=_DEFAULTS.epochs, ge=1, le=500)
    batch_size: int = Field(default=_DEFAULTS.batch_size, ge=2, le=512)
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, gt=0, le=1)
    weight_decay: float = Field(default=_DEFAULTS.weight_decay, ge=0, le=1)
    patience: int = Field(default=_DEFAULTS.patience, ge=1, le=500)
    validation_fraction: float = Field(default=_DEFAULTS.validation_fraction, gt=0, lt=0.5)
    test_fraction: float = Field(default=_DEFAULTS.test_fraction, gt=0, lt=0.5)
    target_sensitivity: float = Field(default=_DEFAULTS.target_sensitivity, gt=0, le=1)
    augment: bool = _DEFAULTS.augment
    dense_weight: float = Field(default=_DEFAULTS.dense_weight, ge=0, le=100)
    time_budget_s: float | None = Field(default=_DEFAULTS.time_budget_s, gt=0)
    input_height: int = Field(default=_DEFAULTS.input_height, ge=64, le=2048, multiple_of=16)
    input_width: int = Field(default=_DEFAULTS.input_width, ge=64, le=2048, multiple_of=16)
    stem_channels: int = Field(default=_DEFAULTS.stem_channels, ge=1, le=256)
    stage_channels: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default=list(_DEFAULTS.stage_channels), min_length=1, max_length=6
    )
    # None: cross-validation when the data set has fewer than 200 patients; 0 or 1: one split.
    folds: int | None = Field(default=_DEFAULTS.folds, ge=0, le=20)
    init_from: str = Field(default=_DEFAULTS.init_from, min_length=1, max_length=200)
    fine_tune_learning_rate: float = Field(default=_DEFAULTS.fine_tune_learning_rate, gt=0, le=1)
    freeze_epochs: int = Field(default=_DEFAULTS.freeze_epochs, ge=0, le=500)
    fine_tune_augment_strength: float = Field(
        default=_DEFAULTS.fine_tune_augment_strength, ge=0, le=4
    )
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    accumulation_steps: int = Field(default=_DEFAULTS.accumulation_steps, ge=1, le=64)


class TrainingRunCreate(BaseModel):
    name: PlainText = Field(min_length=1, max_length=200)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    dataset: TrainingDataset
    hyperparameters: TrainingHyperparameters = TrainingHyperparameters()


class TrainingRunAccepted(BaseModel):
    id: uuid.UUID
    name: str
    status: TrainingStatus
    seed: int
    # One split: images and malignant images per train/validation/test. Cross-validation:
    # the same per fold ("fold 0" ...), each fold's held-out share.
    split_sizes: dict[str, dict[str, int]]
    kind: str = "single"  # or "cross_validation"
    folds: int = 1
    # The registered version the run starts from (warm start), or None: from scratch.
    init_from: str | None = None
