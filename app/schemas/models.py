from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from app.schemas.common import TensorSpecOut


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: str
    inputs: list[TensorSpecOut]
    outputs: list[TensorSpecOut]
    parameters: int
    sha256: str
    size_bytes: int
    created_at: datetime


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None = None
