"""ModelPress engine: a pure library (torch, torchao, torch-pruning, onnx, onnxruntime).

Entry point: ``app.engine.pipeline.run(model_path, data_path, spec, out_dir, on_progress)``.
Importing this package is cheap: torch and friends load only when ``run`` is first used.
"""

from __future__ import annotations

from typing import Any

from app.engine.errors import (
    Cancelled,
    EngineError,
    InputMismatch,
    InvalidData,
    InvalidModel,
    InvalidRecipe,
    LoaderCrashed,
    TimeBudgetExceeded,
    UnsafeModel,
)
from app.engine.types import Candidate, Constraints, JobSpec, Metrics, Recipe, Result

__all__ = [
    "Cancelled",
    "Candidate",
    "Constraints",
    "EngineError",
    "InputMismatch",
    "InvalidData",
    "InvalidModel",
    "InvalidRecipe",
    "JobSpec",
    "LoaderCrashed",
    "Metrics",
    "Recipe",
    "Result",
    "TimeBudgetExceeded",
    "UnsafeModel",
    "run",
]


def run(*args: Any, **kwargs: Any) -> Result:
    """``pipeline.run`` (imported lazily: it pulls in torch)."""
    from app.engine.pipeline import run as _run

    return _run(*args, **kwargs)
