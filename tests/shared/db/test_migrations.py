from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool

from devstack.stack import REPO_ROOT
from shared.config import Settings
from shared.db.base import Base
from tests.infra import Infra, fresh_settings


def _alembic(settings: Settings) -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", settings.database_url)
    return config


def _drift(url: str) -> list[object]:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return list(diff)


def test_head_on_empty_database_matches_models(infra: Infra) -> None:
    settings = fresh_settings(infra, migrated=False)
    command.upgrade(_alembic(settings), "head")
    assert _drift(settings.database_url) == []


def test_downgrade_to_base_and_back_round_trips(infra: Infra) -> None:
    settings = fresh_settings(infra, migrated=False)
    config = _alembic(settings)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    engine = create_engine(settings.database_url, poolclass=pool.NullPool)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    command.upgrade(config, "head")
    assert _drift(settings.database_url) == []
