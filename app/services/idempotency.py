"""Idempotency-Key: the first response to a POST is stored and replayed to retries.

The fingerprint covers method, path, query and body (uploads: method, path and query, so a
retry is answered before its body is read). A key reused with a different request is a 409.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.db.models import IdempotencyKey
from app.db.repositories import idempotency as repo
from app.errors import Conflict


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: str
    headers: dict[str, str]


def fingerprint(method: str, path: str, query: str, body: bytes = b"") -> str:
    h = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), query.encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def find(session: Session, tenant_id: str, key: str, fp: str) -> StoredResponse | None:
    row = repo.get(session, tenant_id, key)
    if row is None:
        return None
    if row.fingerprint != fp:
        raise Conflict("Idempotency-Key was already used with a different request")
    return StoredResponse(row.status_code, row.body, {str(k): str(v)
                                                      for k, v in row.headers.items()})


def remember(session: Session, tenant_id: str, key: str, fp: str, status_code: int, body: str,
             headers: dict[str, str]) -> None:
    repo.add(session, IdempotencyKey(tenant_id=tenant_id, key=key, fingerprint=fp,
                                     status_code=status_code, body=body, headers=headers))
