"""Session-wide real servers; per-test database, bucket and Redis db."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.orm import Session

from devstack.synth import SynthImage, SynthOptions, generate_exams
from shared.config import Settings
from shared.db.base import get_engine, session_factory
from shared.storage import ObjectStore
from tests.infra import (
    Infra,
    containers,
    docker_reachable,
    drop_bucket,
    embedded,
    fresh_settings,
    migrate_template,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a `slow` test first, each kept whole: the test processes of `make test`
    take files in this order, and a long file started last would leave the other process
    idle at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within kept


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    servers = containers() if docker_reachable() else embedded(tmp_path_factory.mktemp("servers"))
    with servers as running:
        migrate_template(running)
        yield running


def _drop_database(infra: Infra, settings: Settings) -> None:
    get_engine(settings.database_url).dispose()
    name = settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect(infra.postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(infra: Infra) -> Iterator[Settings]:
    """Settings pointing at a freshly migrated database, an empty bucket and Redis db."""
    fresh = fresh_settings(infra)
    yield fresh
    _drop_database(infra, fresh)
    drop_bucket(fresh)


@pytest.fixture
def other_settings(infra: Infra) -> Iterator[Settings]:
    """A second fresh database, bucket and Redis db: another stack's (a restore's target)."""
    fresh = fresh_settings(infra)
    yield fresh
    _drop_database(infra, fresh)
    drop_bucket(fresh)


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    with session_factory(settings.database_url)() as db_session:
        yield db_session


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings)


@pytest.fixture(scope="session")
def exam(tmp_path_factory: pytest.TempPathFactory) -> list[SynthImage]:
    """One small synthetic four-view exam (256 x 208 pixels at 0.8 mm)."""
    options = SynthOptions(height=256, width=208, pixel_spacing_mm=0.8)
    return generate_exams(tmp_path_factory.mktemp("exam"), exams=1, seed=4, options=options)
