"""The local stack's service processes on the test session's real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import Settings
from shared.devstack.stack import StackState, down, up


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[StackState]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    environ.update(
        {
            "SCREENING_ENV": "test",
            "SCREENING_DATABASE_URL": settings.database_url,
            "SCREENING_REDIS_URL": settings.redis_url,
            "SCREENING_S3_ENDPOINT": settings.s3_endpoint,
            "SCREENING_S3_ACCESS_KEY": settings.s3_access_key,
            "SCREENING_S3_SECRET_KEY": settings.s3_secret_key,
            "SCREENING_S3_BUCKET": settings.s3_bucket,
            "SCREENING_INFERENCE_CHUNK_SIZE": "3",  # several tasks for one exam
        }
    )
    state = up(tmp_path / "stack", environ=environ)
    yield state
    survivors = down(tmp_path / "stack")
    assert survivors == [], f"processes left running after down: {survivors}"
