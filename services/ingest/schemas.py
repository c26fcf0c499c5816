from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from shared.api.schemas import PlainText
from shared.db.models import BatchPriority, Laterality, View


class BatchCreate(BaseModel):
    name: PlainText = Field(min_length=1, max_length=200)
    priority: BatchPriority = BatchPriority.NORMAL


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
