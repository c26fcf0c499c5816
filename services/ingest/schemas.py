from __future__ import annotations

import uuid

from pydantic import AnyHttpUrl, BaseModel, Field, field_validator

from shared.api.schemas import PlainText
from shared.db.models import BatchPriority, Laterality, View


class BatchCreate(BaseModel):
    name: PlainText = Field(min_length=1, max_length=200)
    priority: BatchPriority = BatchPriority.NORMAL
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
