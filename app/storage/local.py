"""Local directory store (the embedded default): write to a temp file, fsync, rename."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from app.storage.base import CHUNK_BYTES, StoreError, check_key, check_prefix


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        digest, size = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see all or nothing
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise StoreError(f"no object {key!r}")
        f = path.open("rb")  # opened eagerly so a missing file fails before streaming starts
        return self._read(f, start, end)

    @staticmethod
    def _read(f: BinaryIO, start: int, end: int | None) -> Iterator[bytes]:
        with f:
            f.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                n = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
                chunk = f.read(n)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        # Keys map to paths, so a prefix ending in "/" is one directory (temp files included).
        d = self.root / check_prefix(prefix)
        if not d.is_dir():
            return 0
        n = sum(1 for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        shutil.rmtree(d)
        return n
