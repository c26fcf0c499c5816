"""The local stack's service processes on the test session's real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import StackState, down, up
from shared.config import CONNECTION_FIELDS, Settings, settings_to_environ


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[StackState]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SCREENING_")}
    environ.update(settings_to_environ(settings, CONNECTION_FIELDS))
    environ["SCREENING_INFERENCE_CHUNK_SIZE"] = "3"  # several tasks for one exam
    state = up(tmp_path / "stack", environ=environ)
    yield state
    survivors = down(tmp_path / "stack")
    assert survivors == [], f"processes left running after down: {survivors}"
