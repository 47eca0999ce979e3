"""Dependency aliases: routes never build their own sessions, stores or principals."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Unauthorized
from app.services.auth import Principal, authenticate
from app.storage import ArtifactStore

# Query parameters that look like credentials: refused so keys never land in access logs.
_KEY_PARAMS = frozenset({"api_key", "apikey", "key", "token", "access_token", "auth",
                         "authorization"})


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


def get_celery(request: Request) -> Any:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
CeleryDep = Annotated[Any, Depends(get_celery)]


def get_tenant(request: Request, session: SessionDep) -> Principal:
    if any(k.lower() in _KEY_PARAMS for k in request.query_params):
        raise Unauthorized("API keys in the query string are refused; send "
                           "'Authorization: Bearer <key>'")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing 'Authorization: Bearer <key>' header")
    principal = authenticate(session, token.strip())
    session.rollback()  # end the read transaction; the route starts its own work
    return principal


TenantDep = Annotated[Principal, Depends(get_tenant)]
