"""The ``ArtifactStore`` protocol and helpers shared by the backends."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

CHUNK_BYTES = 1024 * 1024  # read/write granularity: bounded memory per stream


class StoreError(Exception):
    """A key is invalid or missing."""


class StorageWriteError(Exception):
    """Writing bytes failed in the backend (disk full, database error, S3 unreachable).

    ``code`` is the stable error code a job that hit it ends with.
    """

    code = "storage_error"


@runtime_checkable
class ArtifactStore(Protocol):
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Write all ``chunks`` under ``key`` atomically; return (size in bytes, sha256 hex).

        Readers never see a partial object: either the old value, nothing, or all of it.
        """
        ...

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` (``end`` exclusive, None = to the end)."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix`` (a ``dir/`` ending in ``/``);
        return how many were removed. Cleans up after a job attempt that died mid-write."""
        ...


def check_key(key: str) -> str:
    """Keys are relative, slash-separated, without ``..`` (they become paths on disk)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise StoreError(f"invalid storage key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is a valid key followed by ``/``: it names a whole directory, never a
    partial file name (``jobs/1`` must not match ``jobs/12/...``)."""
    if not prefix.endswith("/"):
        raise StoreError(f"invalid storage prefix {prefix!r} (must end with '/')")
    check_key(prefix[:-1])
    return prefix


def file_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Regroup arbitrary chunks into pieces of exactly ``size`` bytes (the last may be short)."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)
