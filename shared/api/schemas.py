"""Public schemas both services return."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from datetime import date as Date
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from shared.db.models import (
    BatchPriority,
    BatchPurpose,
    BatchSource,
    BatchStatus,
    Breast,
    Evaluation,
    ExamOutcome,
    ExportDelivery,
    ExportDeliveryStatus,
    OperatingTarget,
    OutcomeSource,
    OutcomeTruth,
    SiteOperatingPoint,
    TrainingStatus,
)
from shared.outcomes import MAX_OUTCOMES_PER_REQUEST

# User-supplied text: no control characters (Postgres refuses NUL; the rest are never
# meaningful in a name and confuse logs and terminals).
PLAIN_TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
PlainText = Annotated[str, StringConstraints(pattern=PLAIN_TEXT_PATTERN)]


class BatchPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    priority: BatchPriority
    status: BatchStatus
    created_at: datetime
    closed_at: datetime | None
    completed_at: datetime | None
    callback_url: str | None = None
    purpose: BatchPurpose = BatchPurpose.SCREENING
    # api (POST /v1/batches), dicom (a study sent to the gateway) or dicomweb (STOW-RS).
    source: BatchSource = BatchSource.API
    sent_by: str | None = None  # the sending node's AE title (source dicom)
    accession_key: str | None = None  # keyed hash of the study's accession number
    # When the site's retention removed the last of its images' objects (results stay).
    images_purged_at: datetime | None = None


class OutcomeIn(BaseModel):
    """What became of an exam, for one breast (or both), from one source."""

    truth: OutcomeTruth
    breast: Breast
    source: OutcomeSource
    date: Date = Field(description="when the truth was established (biopsy, follow-up ...)")

    @field_validator("date")
    @classmethod
    def _not_in_the_future(cls, value: Date) -> Date:
        # A day of leeway: the site's date may be a time zone ahead of ours.
        if value > (datetime.now(UTC) + timedelta(days=1)).date():
            raise ValueError(f"{value} is in the future; give the date the truth was known")
        return value


class OutcomeImportRow(OutcomeIn):
    """One outcome of a bulk import: the exam named by our id or by the site's study key."""

    exam_id: uuid.UUID | None = None
    study_key: Annotated[
        str | None, StringConstraints(min_length=1, max_length=128, pattern=PLAIN_TEXT_PATTERN)
    ] = None

    @model_validator(mode="after")
    def _one_exam_name(self) -> OutcomeImportRow:
        if (self.exam_id is None) == (self.study_key is None):
            raise ValueError("give exactly one of exam_id and study_key")
        return self


class OutcomeImport(BaseModel):
    outcomes: list[OutcomeImportRow] = Field(min_length=1, max_length=MAX_OUTCOMES_PER_REQUEST)


class OutcomeImportResult(BaseModel):
    recorded: int  # outcome rows written or replaced
    exams: int  # exams that got an outcome


class OutcomePublic(BaseModel):
    exam_id: uuid.UUID
    truth: OutcomeTruth
    breast: Breast
    source: OutcomeSource
    date: Date
    recorded_at: datetime


class OutcomesList(BaseModel):
    items: list[OutcomePublic]


def outcome_public(row: ExamOutcome) -> OutcomePublic:
    return OutcomePublic(
        exam_id=row.study_id,
        truth=row.truth,
        breast=row.breast,
        source=row.source,
        date=row.outcome_date,
        recorded_at=row.recorded_at,
    )


class EvaluationCreate(BaseModel):
    """Which versions (one, or two to compare; none: the active one) on which exams: those
    with an outcome in `batch_ids`, else every exam whose outcome is dated in
    [`outcomes_from`, `outcomes_to`] (either end may be open)."""

    model_versions: list[uuid.UUID] = Field(default_factory=list, max_length=2)
    batch_ids: list[uuid.UUID] = Field(default_factory=list, max_length=1000)
    outcomes_from: Date | None = None
    outcomes_to: Date | None = None
    seed: int = Field(default=0, ge=0, le=2**31 - 1)  # of the bootstrap intervals

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationCreate:
        if len(set(self.model_versions)) != len(self.model_versions):
            raise ValueError("model_versions names the same version twice")
        if self.outcomes_from and self.outcomes_to and self.outcomes_from > self.outcomes_to:
            raise ValueError("outcomes_from is after outcomes_to")
        return self


class EvaluationError(BaseModel):
    code: str
    message: str


class EvaluationPublic(BaseModel):
    """An evaluation and, once `completed`, its figures (`versions`: per version, the exam
    AUC and its 95% bootstrap interval, the ROC curve, the figures at the version's recall
    threshold, calibration and its reliability curve, and all of it `by` manufacturer, model
    name and views; `comparison`: for two versions, the paired AUC difference)."""

    id: uuid.UUID
    status: TrainingStatus
    model_versions: list[uuid.UUID]
    batch_ids: list[uuid.UUID]
    outcomes_from: Date | None
    outcomes_to: Date | None
    created_at: datetime
    finished_at: datetime | None
    figures: dict[str, Any] | None
    error: EvaluationError | None


def evaluation_public(row: Evaluation) -> EvaluationPublic:
    return EvaluationPublic(
        id=row.id,
        status=row.status,
        model_versions=row.model_version_ids,
        batch_ids=row.batch_ids,
        outcomes_from=row.outcomes_from,
        outcomes_to=row.outcomes_to,
        created_at=row.created_at,
        finished_at=row.finished_at,
        figures=row.figures,
        error=(
            EvaluationError(code=row.error_code, message=row.error_message or "")
            if row.error_code
            else None
        ),
    )


class OperatingPointSet(BaseModel):
    """Choose this tenant's recall threshold for a model version on one of its completed
    evaluations of that version: the highest threshold that reaches a target `sensitivity`,
    or the lowest whose `recall_rate` stays within the target."""

    evaluation_id: uuid.UUID
    target: OperatingTarget
    value: float = Field(gt=0, le=1)


class OperatingPointPublic(BaseModel):
    model_version_id: uuid.UUID
    target: OperatingTarget
    value: float
    threshold: float
    evaluation_id: uuid.UUID
    chosen_at: datetime
    # On the evaluation's exams, at that threshold (present when just chosen).
    on_evaluation: dict[str, float] | None = None


class OperatingPointsList(BaseModel):
    items: list[OperatingPointPublic]


def operating_point_public(
    row: SiteOperatingPoint, on_evaluation: dict[str, float] | None = None
) -> OperatingPointPublic:
    return OperatingPointPublic(
        model_version_id=row.model_version_id,
        target=row.target,
        value=row.target_value,
        threshold=row.threshold,
        evaluation_id=row.evaluation_id,
        chosen_at=row.chosen_at,
        on_evaluation=on_evaluation,
    )


class DeliveryPublic(BaseModel):
    """One exam's DICOM results to one destination."""

    id: uuid.UUID
    exam_id: uuid.UUID
    destination: str
    transport: str  # "dimse" (C-STORE) or "stow-rs"
    status: ExportDeliveryStatus
    attempts: int
    # Whether the objects carried the original identifiers; False: the de-identified UIDs
    # (the tenant's vault is off or holds nothing for these images); None: not sent yet.
    identified: bool | None
    # The destination's last answer: a DICOM status (C-STORE) or an HTTP status (STOW-RS).
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, delivery: ExportDelivery) -> DeliveryPublic:
        return cls(
            id=delivery.id,
            exam_id=delivery.study_id,
            destination=delivery.destination.name,
            transport=delivery.destination.transport.value,
            status=delivery.status,
            attempts=delivery.attempts,
            identified=delivery.identified,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            next_attempt_at=delivery.next_attempt_at,
            delivered_at=delivery.delivered_at,
        )


class DeliveriesPage(BaseModel):
    items: list[DeliveryPublic]


class ErrorDetail(BaseModel):
    code: str
    message: str
    detail: dict[str, Any]


class ErrorResponse(BaseModel):
    """The one error shape of every service."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the error statuses a router may answer with."""
    return {status: {"model": ErrorResponse} for status in statuses}


# Every authenticated /v1 route may answer these.
COMMON_ERRORS = error_responses(400, 401, 403, 404, 422, 429, 503)
