"""Requests refused before routing: a NUL byte in the path or query string.

Why: Postgres text cannot hold NUL, so an id or file name carrying one would reach the
database as a 500 (psycopg DataError) instead of a clean 400. One ASGI check covers every
route, present and future.
"""

from __future__ import annotations

from typing import Any

from app.api.errors import problem

_NUL = (b"\x00", b"%00")


class RejectNulMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            query: bytes = scope.get("query_string", b"")
            if any(n in raw_path or n in query for n in _NUL) or "\x00" in scope["path"]:
                resp = problem(400, "bad_request", "NUL byte in the path or query string",
                               instance=scope["path"].replace("\x00", ""))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
