"""Database store: bytes in ``blob_chunks`` rows of CHUNK_BYTES each, streamed both ways.

Writes go into one transaction on their own connection (atomic: a failed upload leaves no
rows). Reads select only the chunks that cover the requested range, one at a time through a
server-side cursor, so memory stays at about one chunk whatever the object size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from sqlalchemy import Engine, delete, func, insert, select

from app.db.models.blob_chunk import BlobChunk
from app.storage.base import CHUNK_BYTES, StoreError, check_key, check_prefix, rechunk


class PostgresStore:
    def __init__(self, engine: Engine, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.engine = engine
        self.chunk_bytes = chunk_bytes

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        check_key(key)
        digest, size = hashlib.sha256(), 0
        with self.engine.begin() as conn:
            conn.execute(delete(BlobChunk).where(BlobChunk.key == key))
            for seq, piece in enumerate(rechunk(chunks, self.chunk_bytes)):
                digest.update(piece)
                size += len(piece)
                conn.execute(insert(BlobChunk).values(key=key, seq=seq, data=piece))
        return size, digest.hexdigest()

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        check_key(key)
        if not self.exists(key):
            raise StoreError(f"no object {key!r}")
        return self._read(key, start, end)

    def _read(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        c = self.chunk_bytes
        first = start // c
        q = select(BlobChunk.seq, BlobChunk.data).where(BlobChunk.key == key,
                                                        BlobChunk.seq >= first)
        if end is not None:
            if end <= start:
                return
            q = q.where(BlobChunk.seq <= (end - 1) // c)
        with self.engine.connect() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=1).execute(
                q.order_by(BlobChunk.seq))
            for seq, data in rows:
                lo = max(start - seq * c, 0)
                hi = len(data) if end is None else min(len(data), end - seq * c)
                if lo < hi:
                    yield bytes(data[lo:hi])

    def delete(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(BlobChunk).where(BlobChunk.key == check_key(key)))

    def exists(self, key: str) -> bool:
        with self.engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(BlobChunk)
                             .where(BlobChunk.key == check_key(key), BlobChunk.seq == 0))
            return bool(n.scalar_one())

    def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        with self.engine.begin() as conn:
            # autoescape: "_" and "%" in a key are literal, not LIKE wildcards.
            res = conn.execute(delete(BlobChunk).where(
                BlobChunk.key.startswith(prefix, autoescape=True), BlobChunk.seq == 0)
                .returning(BlobChunk.key))
            n = len(res.all())
            conn.execute(delete(BlobChunk).where(
                BlobChunk.key.startswith(prefix, autoescape=True)))
        return n
