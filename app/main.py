"""The FastAPI application: routers, middleware, error handlers; no logic.

Run it with ``uvicorn --factory app.main:create_app`` (or ``app.main:app``, built on access).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.config import Settings, get_settings
from app.db.session import session_factory

log = logging.getLogger(__name__)

__version__ = "0.1.0"


def bootstrap_dev_key(settings: Settings) -> str | None:
    """Embedded default: create the dev tenant's key once, print it and save it (mode 0600)."""
    from app.services.admin import ensure_dev_key

    try:
        with session_factory(settings)() as session:
            key = ensure_dev_key(session)
            session.commit()
    except Exception:
        log.warning("could not create the development key (is the database migrated?)",
                    exc_info=True)
        return None
    if key is not None:
        path = settings.dev_key_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        print(f"ModelPress development API key (saved to {path}): {key}", file=sys.stderr)
    return key


def create_app(settings: Settings | None = None) -> FastAPI:
    from app.api import dashboard, errors, openapi
    from app.api.health import router as health_router
    from app.api.hygiene import RejectNulMiddleware
    from app.api.metrics import MetricsMiddleware
    from app.api.v1 import datasets, events, jobs, models, webhooks
    from app.services.auth import AuthCache
    from app.services.ratelimit import make_limiter
    from app.storage import get_store
    from workers.celery_app import create_celery

    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.resolved_dev_key_bootstrap:
            bootstrap_dev_key(settings)
        yield

    # /docs and /redoc with Swagger UI and ReDoc served from the package (fastapi-offline
    # ships their assets): an offline, self-hosted install must not need a CDN.
    app = FastAPIOffline(title="ModelPress", version=__version__, lifespan=lifespan,
                         description="Compress trained neural networks to a stated budget.",
                         generate_unique_id_function=openapi.operation_id)
    app.state.settings = settings
    app.state.sessions = session_factory(settings)
    app.state.store = get_store(settings)
    app.state.celery = create_celery(settings)
    app.state.auth_cache = AuthCache(settings.auth_cache_s)
    app.state.limiter = make_limiter(settings)
    errors.install(app)
    openapi.install(app)
    app.add_middleware(RejectNulMiddleware)
    app.add_middleware(MetricsMiddleware)  # outermost: refused requests are counted too
    for r in (health_router, models.router, datasets.router, jobs.router, events.router,
              webhooks.router):
        app.include_router(r)
    dashboard.install(app)
    return app


def __getattr__(name: str) -> Any:
    # ``uvicorn app.main:app`` without building an app (and its connections) at import time.
    if name == "app":
        return create_app()
    raise AttributeError(name)
