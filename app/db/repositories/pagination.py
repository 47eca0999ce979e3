"""Keyset pagination over (created_at DESC, id DESC) with an opaque cursor."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session


class CursorError(ValueError):
    pass


class _Row(Protocol):
    id: str
    created_at: datetime


T = TypeVar("T", bound=_Row)


def encode_cursor(row: _Row) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, id_ = json.loads(raw)
        return datetime.fromisoformat(ts), str(id_)
    except (ValueError, TypeError) as e:
        raise CursorError("invalid cursor") from e


def page(session: Session, query: Select[Any], created_at: InstrumentedAttribute[Any],
         id_col: InstrumentedAttribute[Any], limit: int,
         cursor: str | None) -> tuple[Sequence[T], str | None]:
    """One page of ``query`` newest first, and the cursor of the next page (None at the end)."""
    if cursor:
        ts, last_id = decode_cursor(cursor)
        query = query.where(or_(created_at < ts, and_(created_at == ts, id_col < last_id)))
    ordered = query.order_by(created_at.desc(), id_col.desc()).limit(limit + 1)
    rows: Sequence[T] = session.scalars(ordered).all()
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1])
    return rows, None
