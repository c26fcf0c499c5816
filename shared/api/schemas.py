"""Public schemas both services return."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from shared.db.models import BatchPriority, BatchStatus


class BatchPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    priority: BatchPriority
    status: BatchStatus
    created_at: datetime
    closed_at: datetime | None
    completed_at: datetime | None
