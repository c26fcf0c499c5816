"""In-process service apps on the real servers of the test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from services.ingest.app import create_app as create_ingest
from services.results.app import create_app as create_results
from shared.config import Settings


@pytest.fixture
def ingest(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_ingest(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def results(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_results(settings), raise_server_exceptions=False) as client:
        yield client
