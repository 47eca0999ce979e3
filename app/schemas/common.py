from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Problem(BaseModel):
    """RFC 9457 problem details, plus a stable machine-readable ``code``."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class TensorSpecOut(BaseModel):
    name: str
    shape: list[int | None]
    dtype: str
