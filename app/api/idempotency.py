"""Route helpers for Idempotency-Key: replay a stored response, or commit and remember one."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.services import idempotency as idem
from app.services.idempotency import StoredResponse


def replay(stored: StoredResponse) -> Response:
    return Response(content=stored.body, status_code=stored.status_code,
                    headers={**stored.headers, "Idempotent-Replayed": "true"},
                    media_type="application/json")


def commit_and_remember(session: Session, tenant_id: str, key: str | None, fp: str,
                        response: StoredResponse,
                        undo: Callable[[], None] | None = None) -> tuple[StoredResponse, bool]:
    """Commit the request's work together with its idempotency record.

    Returns (response to send, True if this request's work was committed). A concurrent
    request with the same key that committed first wins: ours is rolled back (``undo`` removes
    stored bytes) and the winner's response is returned.
    """
    try:
        if key:
            idem.remember(session, tenant_id, key, fp, response.status_code, response.body,
                          response.headers)
        session.commit()
        return response, True
    except IntegrityError:
        session.rollback()
        if undo:
            undo()
        if key and (stored := idem.find(session, tenant_id, key, fp)) is not None:
            return stored, False
        raise
    except BaseException:
        session.rollback()
        if undo:
            undo()
        raise
