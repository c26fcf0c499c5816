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
    ExamOutcome,
    ExportDelivery,
    ExportDeliveryStatus,
    OutcomeSource,
    OutcomeTruth,
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
