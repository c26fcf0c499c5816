from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shared.api.schemas import BatchPublic
from shared.db.models import (
    AuditAction,
    ImageStatus,
    Laterality,
    ModelStatus,
    TrainingStatus,
    View,
)


class ModelVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    status: ModelStatus
    trained: bool
    # Why registration rejected it (status "rejected"); promoting it then takes --force.
    rejection_reason: str | None = None


class ImageCounts(BaseModel):
    queued: int
    running: int
    done: int
    failed: int
    stored: int = 0  # training batches: kept for training, not screened


class DriftAlarm(BaseModel):
    """A week of the tenant's whose exam scores lie far from the version's reference."""

    week_start: date
    model_version_id: uuid.UUID
    psi: float
    exams: int


class BatchDetail(BatchPublic):
    counts: ImageCounts
    total_images: int
    rejected_files: int  # uploads the quality gate refused; listed at .../rejections
    model_versions: list[ModelVersionPublic]
    warnings: list[str]  # sentences for a reader
    # Images per prediction warning code, e.g. {"input_unlike_training_data": 3}.
    warning_counts: dict[str, int] = {}
    # The weeks the batch spans with a raised drift alarm (GET /v1/drift has the figures).
    drift_alarms: list[DriftAlarm] = []


class BatchPage(BaseModel):
    items: list[BatchPublic]
    next_cursor: str | None


class ImageResult(BaseModel):
    id: uuid.UUID
    batch_id: uuid.UUID
    study_id: uuid.UUID
    filename: str
    media_type: str
    laterality: Laterality | None
    view: View | None
    status: ImageStatus
    attempts: int
    score: float | None
    error_code: str | None
    error_message: str | None
    model_version: ModelVersionPublic | None
    heatmap_url: str | None = None  # PNG overlay at 1/4 of the image's size
    # Codes a reader must see beside the score: "input_unlike_training_data" when the image
    # looks unlike the model's training inputs (input_distance: how far, in the model
    # version's own units; above its threshold is "unlike").
    warnings: list[str] = []
    input_distance: float | None = None
    created_at: datetime
    finished_at: datetime | None
    # When retention deleted the image's stored file, preview and heatmaps (its result
    # stays); None while they are kept.
    image_purged_at: datetime | None = None


class ResultsPage(BaseModel):
    items: list[ImageResult]
    next_cursor: str | None


class AuditEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    at: datetime
    key_prefix: str
    action: AuditAction
    resource_type: str
    resource_id: uuid.UUID | None
    detail: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEventPublic]
    next_cursor: str | None


class RejectedFilePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    filename: str
    code: str
    message: str
    created_at: datetime


class RejectionsPage(BaseModel):
    items: list[RejectedFilePublic]
    next_cursor: str | None


class ExamImage(BaseModel):
    id: uuid.UUID
    laterality: Laterality | None
    view: View | None
    status: ImageStatus
    score: float | None
    error_code: str | None
    heatmap_url: str | None = None
    warnings: list[str] = []
    image_purged_at: datetime | None = None  # see ImageResult


class BreastResult(BaseModel):
    laterality: Laterality
    score: float  # mean of its scored views' probabilities
    views: list[View]  # the views that score comes from


class OriginalIds(BaseModel):
    """What a radiologist finds the patient by: shown only to a key with the
    export_identified scope, from the identity vault (each opening audited)."""

    patient_id: str | None
    accession_number: str | None


class Exam(BaseModel):
    """One study: its images, breast and exam scores, and which screening views it lacks."""

    id: uuid.UUID
    study_key: str  # pseudonymous: the remapped StudyInstanceUID, or the uploader's key
    patient_key: str  # keyed hash; the same patient has the same key in every batch
    images: list[ExamImage]
    views_present: list[str]  # e.g. "L-CC"
    missing_views: list[str]
    breasts: list[BreastResult]  # breasts with at least one scored view
    exam_score: float | None  # the worse breast; None until a view is scored
    # The exam score through the model's calibration (validation data) as a probability.
    exam_probability: float | None = None
    # "recall" when exam_score reaches the model's threshold (chosen on validation data for
    # its target sensitivity), else "routine"; None without a trained, evaluated model.
    recall: Literal["recall", "routine"] | None = None
    recall_threshold: float | None = None
    # Where the threshold comes from: "site" (this tenant's operating point for the version,
    # chosen on its own evaluation) or "model" (the version's); None without a threshold.
    threshold_source: Literal["site", "model"] | None = None
    model_version: ModelVersionPublic | None = None
    # Every warning code of the exam's images (e.g. input_unlike_training_data).
    warnings: list[str] = []
    # For a key with the export_identified scope: the original patient id and accession
    # number (None without that scope, or when the vault holds none); original_error says why
    # they could not be shown (vault_key_missing).
    original: OriginalIds | None = None
    original_error: str | None = None


class ExamsPage(BaseModel):
    items: list[Exam]
    next_cursor: str | None


class ModelVersionDetail(ModelVersionPublic):
    architecture: dict[str, Any]
    metrics: dict[str, Any]
    recall_threshold: float | None
    calibration: dict[str, float] | None
    model_card: dict[str, Any] | None
    training_run_id: uuid.UUID | None
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None


class ModelsPage(BaseModel):
    items: list[ModelVersionDetail]


class EpochPoint(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float
    # None for a cross-validation's final model, which has no validation split.
    validation_loss: float | None
    validation_auc: float | None  # exam level
    seconds: float
    attempt: int  # which attempt of the run trained this epoch (a resumed run: > 1)


class TrainingStage(BaseModel):
    id: uuid.UUID
    kind: str  # fold | final
    fold: int | None
    status: TrainingStatus
    epochs_done: int
    exam_auc: float | None  # a fold's, on its held-out fold


class TrainingRunDetail(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    status: TrainingStatus
    seed: int
    hyperparameters: dict[str, Any]
    split_sizes: dict[str, Any]
    attempts: int
    epochs_done: int
    evaluation: dict[str, Any] | None
    model_version: ModelVersionPublic | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    curve: list[EpochPoint]
    # "single", or a cross-validation ("cross_validation") and its stages: "fold" runs and
    # the "final" model's run, each with its own status and curve at its own URL.
    kind: str = "single"
    parent_id: uuid.UUID | None = None
    fold: int | None = None
    stages: list[TrainingStage] = []


class TrainingRunsPage(BaseModel):
    items: list[TrainingRunDetail]


class DriftInputs(BaseModel):
    """What the week's images looked like (None where no image said)."""

    images: int
    median_breast_intensity: float | None  # grey level after the VOI transform, 0-1
    median_input_distance: float | None  # from the version's training inputs
    flagged_share: float | None  # of images flagged input_unlike_training_data
    median_pixel_spacing_mm: float | None
    manufacturers: dict[str, float]  # share of images per DICOM Manufacturer


class DriftWeek(BaseModel):
    week_start: date  # Monday, UTC
    model_version: ModelVersionPublic
    exams: int
    # Population stability index of the week's exam scores against the version's reference;
    # None when the version has none.
    psi: float | None
    alarm: bool
    bin_shares: list[float]  # the week's exams per reference bin
    reference_shares: list[float]  # the reference's exams per bin
    reference_edges: list[float]
    inputs: DriftInputs
    computed_at: datetime


class DriftReport(BaseModel):
    psi_threshold: float
    min_exams: int
    weeks: list[DriftWeek]
