"""Fault-injection suite: shared fixtures.

Every test under tests/faults gets the ``faults`` marker (added at collection) and runs in the
default ``make test``. The real servers come from tests/service/conftest.py's helpers; this
suite has its OWN Postgres database and its own Redis DB number, so a fault test (a worker
with a fast reaper, a killed process) never touches the rows or messages of the service suite.

Redis DB: MODELPRESS_TEST_FAULTS_REDIS_DB (default 14; the service suite flushes 11-13) on
MODELPRESS_TEST_REDIS. Tests that restart servers start their own (tests/faults/servers.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import (
    create_database,
    drop_database,
    flushed_redis_db,
    mlp_files,
)

__all__ = ["faults_pg_url", "faults_redis_url", "mlp_files"]

FAULTS_REDIS_DB = int(os.environ.get("MODELPRESS_TEST_FAULTS_REDIS_DB", "14"))
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def faults_pg_url() -> Iterator[str]:
    """A fresh database migrated to head, for this suite only; dropped at the end."""
    from app.db.migrate import upgrade

    url = create_database("mp_faults")
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def faults_redis_url() -> Iterator[str]:
    """Redis DB FAULTS_REDIS_DB, flushed before and after; fails (never skips) if unreachable."""
    yield from flushed_redis_db(FAULTS_REDIS_DB)
