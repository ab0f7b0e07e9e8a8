"""Alembic owns the schema: after `upgrade head`, autogenerate finds nothing between models and database."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import service.models  # noqa: F401
from service.db import make_engine
from service.migrate import alembic_config, upgrade
from tests.helpers import fresh_database, postgres_server


def _differences(url: str) -> list:
    engine = make_engine(url)
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)


def test_sqlite_schema_matches_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    upgrade(url)
    assert _differences(url) == []
    with make_engine(url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_postgresql_schema_matches_the_models_and_downgrades():
    with postgres_server() as server:
        url = fresh_database(server, "migrations")
        upgrade(url)
        assert _differences(url) == []
        command.downgrade(alembic_config(url), "base")
        assert _differences(url) != [], "downgrade removes the tables"


def test_differences_are_detected(tmp_path):
    """The check above can fail: a database missing a migration shows up."""
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    upgrade(url)
    with make_engine(url).begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_job_status")
    assert any(d[0] == "add_index" for d in _differences(url))
