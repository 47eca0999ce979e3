"""The dashboard: a static single-page app served by the API (no CDN, no build step).

``GET /ui`` is the page, ``/ui/assets/*`` its scripts and styles, shipped in this package
(``static/``, listed in pyproject's package-data). The page talks to the public ``/v1`` API
with the user's key in ``Authorization: Bearer``, exactly as any other client: this module
serves files and holds no logic.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = files(__name__) / "static"

# The page loads only its own assets and talks only to this origin; downloads are blob: URLs.
# No inline script or style: a job's message or a file name can never become markup.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Revalidate every load (a 304 when unchanged): an upgraded server never runs an old script.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def page() -> FileResponse:
    return FileResponse(str(STATIC / "index.html"), media_type="text/html",
                        headers={**HEADERS, "Content-Security-Policy": CSP,
                                 "Referrer-Policy": "no-referrer"})


class _Assets(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        resp = super().file_response(*args, **kwargs)
        resp.headers.update(HEADERS)
        return resp


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/assets", _Assets(packages=[(__name__, "static")]), name="dashboard-assets")
