from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import DEV_S3_SECRET_KEY, Settings


def test_reads_prefixed_environment_and_ignores_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCREENING_S3_BUCKET", "scans")
    monkeypatch.setenv("SCREENING_INFERENCE_CHUNK_SIZE", "32")
    monkeypatch.setenv("SCREENING_REDIS_URL", "")
    settings = Settings()
    assert settings.s3_bucket == "scans"
    assert settings.inference_chunk_size == 32
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


def test_production_refuses_placeholder_secrets() -> None:
    with pytest.raises(ValidationError, match="SCREENING_S3_SECRET_KEY"):
        Settings(env="prod", s3_access_key="real", patient_key_secret="real-secret")


def test_production_accepts_real_secrets() -> None:
    settings = Settings(
        env="prod",
        s3_access_key="real",
        s3_secret_key="real-secret",
        patient_key_secret="another-real-secret",
    )
    assert settings.s3_secret_key != DEV_S3_SECRET_KEY


def test_s3_endpoint_parts() -> None:
    settings = Settings(s3_endpoint="https://minio.example:9000")
    assert settings.s3_host == "minio.example:9000"
    assert settings.s3_secure is True
