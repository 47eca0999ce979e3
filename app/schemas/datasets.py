from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from app.schemas.common import TensorSpecOut


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    model_id: str | None
    filename: str
    format: str
    samples: int
    inputs: list[TensorSpecOut]
    has_labels: bool
    num_classes: int | None
    sha256: str
    size_bytes: int
    created_at: datetime


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None = None
