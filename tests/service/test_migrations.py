"""The Alembic migrations build the whole schema from empty, on Postgres and on SQLite, and
match the models exactly (no drift between app.db.models and migrations/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db.base import metadata
from app.db.migrate import upgrade
from app.db.session import make_engine
from tests.service.conftest import create_database, drop_database

pytestmark = pytest.mark.service

TABLES = {"tenants", "api_keys", "models", "datasets", "jobs", "job_metrics", "artifacts",
          "idempotency_keys", "blob_chunks", "job_events", "webhooks", "webhook_deliveries",
          "webhook_attempts", "alembic_version"}


def _check(url: str) -> None:
    upgrade(url)
    upgrade(url)  # idempotent: a second run is a no-op
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        with engine.connect() as conn:
            rev = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
        assert rev == "0004"
    finally:
        engine.dispose()


def test_migrate_postgres_from_empty() -> None:
    url = create_database("mp_migr")
    try:
        _check(url)
    finally:
        drop_database(url)


def test_migrate_sqlite_from_empty(tmp_path: Path) -> None:
    _check(f"sqlite:///{tmp_path}/nested/dir/mp.db")
