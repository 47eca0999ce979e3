from __future__ import annotations

from sqlalchemy import Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class BlobChunk(Base):
    """Artifact bytes for the ``postgres`` store: fixed-size chunks keyed by (key, seq)."""

    __tablename__ = "blob_chunks"

    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
