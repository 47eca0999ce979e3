"""The OpenAPI document as a contract a generator can use: readable operationIds, the bearer
scheme (the Authorize button of /docs), and the Problem schema every error response points at.

Checked by tests/service/test_openapi.py (openapi-python-client generates a client from the
live document, warnings are failures) and tests/service/test_contract.py (schemathesis).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from app.schemas.common import Problem

BEARER = "bearer"
# Routes anyone may call: the rest need ``Authorization: Bearer <key>``.
PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json")


def operation_id(route: APIRoute) -> str:
    """``create_job`` -> ``createJob``: the route function's name in camelCase (FastAPI's
    default, ``create_job_v1_jobs_post``, becomes the method name of generated clients)."""
    head, *rest = route.name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def _problem_schemas() -> dict[str, Any]:
    (_, top) = models_json_schema([(Problem, "serialization")],
                                  ref_template="#/components/schemas/{model}")
    return dict(top.get("$defs", {}))


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {}).update(_problem_schemas())
        components["securitySchemes"] = {BEARER: {
            "type": "http", "scheme": "bearer",
            "description": "An API key: `modelpress admin create-key --tenant NAME`"}}
        for path, item in doc.get("paths", {}).items():
            if path.startswith(PUBLIC_PREFIXES):
                continue
            for op in item.values():
                op["security"] = [{BEARER: []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
