"""Engine errors: each carries a stable ``code`` the service maps to an RFC 9457 problem.

The engine never knows about HTTP; it only promises that every failure it raises on purpose
is an ``EngineError`` with one of the codes below and a message that names what was wrong
(which input, what was expected, what was found).
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every deliberate engine failure."""

    code: str = "engine_error"

    def __init__(self, message: str, *, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, object] = details or {}


class InvalidModel(EngineError):
    """The file is not a model we can read (wrong format, truncated, corrupt)."""

    code = "invalid_model"


class UnsafeModel(EngineError):
    """The file would execute code or escape its directory if loaded (pickle, traversal, bomb)."""

    code = "unsafe_model"


class InvalidData(EngineError):
    """The data file is unreadable or unsafe (pickled arrays, bad header), or its labels are bad."""

    code = "invalid_data"


class InputMismatch(EngineError):
    """The data does not match the model's inputs (keys, dtype, shape, NaN/Inf, too few)."""

    code = "input_mismatch"


class InvalidRecipe(EngineError):
    """A recipe or constraint set the engine cannot act on."""

    code = "invalid_recipe"


class Cancelled(EngineError):
    """Raised from a progress callback to stop the run at the next progress point."""

    code = "cancelled"


class TimeBudgetExceeded(EngineError):
    """The run went past its hard time budget."""

    code = "timeout"


class LoaderCrashed(EngineError):
    """The sandboxed loader process died or hit its resource limits."""

    code = "loader_failed"
