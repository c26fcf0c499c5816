"""The local stack's service processes on the test session's real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import StackState, down, up
from shared.config import Settings
from tests.helpers import stack_environ


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[StackState]:
    # Several tasks for one exam.
    environ = stack_environ(settings, {"SCREENING_INFERENCE_CHUNK_SIZE": "3"})
    state = up(tmp_path / "stack", environ=environ)
    yield state
    survivors = down(tmp_path / "stack")
    assert survivors == [], f"processes left running after down: {survivors}"
