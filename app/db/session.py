"""Engine and session factory from settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings

T = TypeVar("T")


def normalize_url(url: str) -> str:
    """psycopg 3 is the installed driver: ``postgresql://`` means ``postgresql+psycopg://``."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: the API and the worker write the same file concurrently; wait, never fail, on locks.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")  # ms
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    url = normalize_url(database_url)
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Pessimistic ping on checkout (one extra round trip) for the general engine: its
    # sessions write and cannot be blindly retried. The hot read path uses get_read_engine.
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


@lru_cache(maxsize=8)
def get_engine(database_url: str) -> Engine:
    """One engine (connection pool) per URL and process."""
    return make_engine(database_url)


# Connections older than this are replaced on checkout (seconds): bounds the life of a pooled
# connection (server-side idle timeouts, failovers) without a ping per request.
READ_POOL_RECYCLE_S = 1800


# Per API process: connections of the read pool, and threads running its queries (equal, so a
# query never waits for, or opens, a connection beyond the pool: opening one costs a Postgres
# fork, several ms). A constant, not a setting: 8 measured as good as 4 on 2 cores.
READ_POOL_SIZE = 8


@lru_cache(maxsize=8)
def get_read_engine(database_url: str, pool_size: int = READ_POOL_SIZE) -> Engine:
    """Engine for single-statement reads on the hot path (GET /v1/jobs/{id}).

    Postgres: its own small pool, autocommit (a lone SELECT needs no BEGIN/ROLLBACK: one round
    trip instead of three) and no ``pool_pre_ping`` (one more saved). A dead connection (the
    server restarted) fails the statement instead; SQLAlchemy then invalidates every pooled
    connection older than the failure, and callers retry once with a fresh one
    (``run_read``), so the API still recovers by itself. No overflow: callers bound their
    concurrency to ``pool_size`` (connections opened and closed under load cost a Postgres
    fork each). SQLite: the ordinary engine.
    """
    url = normalize_url(database_url)
    if url.startswith("sqlite"):
        return get_engine(database_url)
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=False,
                         pool_recycle=READ_POOL_RECYCLE_S, pool_size=pool_size, max_overflow=0)


def run_read(engine: Engine, read: Callable[[Connection], T]) -> T:
    """``read(conn)`` on a pooled connection, retried once if the connection was dead.

    Only for idempotent reads: the retry re-runs ``read`` on a new connection after
    SQLAlchemy has invalidated the stale pool (e.g. after a Postgres restart).
    """
    try:
        with engine.connect() as conn:
            return read(conn)
    except DBAPIError as e:
        if not e.connection_invalidated:
            raise
    with engine.connect() as conn:
        return read(conn)


def session_factory(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(get_engine(settings.database_url), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A short unit of work that commits on success (tasks and scripts; never services)."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
