"""Artifact bytes behind one interface: ``local`` (embedded), ``postgres`` (chunked), ``s3``."""

from __future__ import annotations

from app.config import Settings
from app.storage.base import ArtifactStore, StorageWriteError, StoreError, file_chunks

__all__ = ["ArtifactStore", "StorageWriteError", "StoreError", "file_chunks", "get_store"]


def get_store(settings: Settings) -> ArtifactStore:
    backend = settings.resolved_storage_backend
    if backend == "local":
        from app.storage.local import LocalStore

        return LocalStore(settings.storage_dir)
    if backend == "postgres":
        from app.db.session import get_engine
        from app.storage.postgres import PostgresStore

        return PostgresStore(get_engine(settings.database_url))
    from app.storage.s3 import S3Store

    return S3Store.from_settings(settings)
