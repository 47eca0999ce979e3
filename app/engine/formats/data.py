"""Loading and validating data files (.npz / .safetensors) against a model's inputs.

Keys are the model's input names (dim 0 = samples) plus an optional ``labels`` key of integer
class ids. Nothing here unpickles: ``.npz`` is read with ``allow_pickle=False`` (an object array
is refused, not loaded) and ``.safetensors`` holds raw tensors only.

Dtype policy (documented contract):
- float inputs accept float16/float32/float64 arrays, cast to the model's float dtype
  (float64 -> float32 loses precision only, never meaning); integer or bool arrays for a float
  input are refused (usually a sign of unscaled pixels or the wrong key).
- integer inputs accept any integer dtype whose values fit the model's dtype; floats are refused.
- bool inputs accept bool only.
- labels: a 1-D integer array (any int/uint dtype, values >= 0), one per sample; stored int64.
Errors name the input and give expected vs found. ``InvalidData`` = the file itself is
unreadable/unsafe, or its labels are bad; ``InputMismatch`` = readable, but does not fit the
model's inputs.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.engine.errors import EngineError, InputMismatch, InvalidData
from app.engine.types import DatasetInfo, TensorSpec

# torch is imported where tensors are made: reading and validating a file needs numpy only,
# so the sandboxed data check (formats.sandbox.inspect_data_file) starts without torch.
if TYPE_CHECKING:
    import torch

LABELS = "labels"
MAX_DATA_BYTES = 8 << 30  # uncompressed bytes of one data file


@dataclass
class Dataset:
    """Validated arrays: ``inputs`` in model input order (dict insertion order), labels int64."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """All samples as torch tensors, in input-name order (shares memory with numpy)."""
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self.inputs.values())

    def label_tensor(self) -> torch.Tensor | None:
        import torch

        return None if self.labels is None else torch.from_numpy(self.labels)

    def batches(
        self, batch_size: int
    ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
        """Consecutive batches (the last may be smaller) of (inputs, labels or None)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        xs = self.tensors()
        y = self.label_tensor()
        for i in range(0, self.samples, batch_size):
            yield (tuple(x[i:i + batch_size] for x in xs),
                   None if y is None else y[i:i + batch_size])

    def subset(self, idx: np.ndarray | Sequence[int]) -> Dataset:
        index = np.asarray(idx, dtype=np.int64)
        return Dataset({k: v[index] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[index])

    def take(self, n: int) -> Dataset:
        return self.subset(np.arange(min(n, self.samples)))

    def split(self, holdout_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """(train, holdout). Stratified by label when labels exist; deterministic in ``seed``.

        Each part keeps at least one sample when there are two or more.
        """
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must be in (0, 1)")
        rng = np.random.default_rng(seed)
        n = self.samples
        if self.labels is None:
            perm = rng.permutation(n)
            k = min(max(1, round(n * holdout_fraction)), n - 1)
            hold = perm[:k]
        else:
            parts = []
            for c in np.unique(self.labels):
                members = rng.permutation(np.flatnonzero(self.labels == c))
                parts.append(members[: round(len(members) * holdout_fraction)])
            hold = np.concatenate(parts) if parts else np.empty(0, np.int64)
            if len(hold) == 0 and n > 1:  # tiny classes all rounded to zero
                hold = rng.permutation(n)[:1]
            if len(hold) == n:
                hold = hold[:-1]
        mask = np.zeros(n, dtype=bool)
        mask[hold] = True
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))


# ------------------------------------------------------------------------------ file reading


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    from app.engine.formats.zipcheck import inspect_zip

    try:
        inspect_zip(path, max_uncompressed_bytes=MAX_DATA_BYTES, what="npz file")
    except EngineError as e:  # same structural checks, reported as a data problem
        raise InvalidData(e.message.replace("npz file", "data file", 1),
                          details=e.details) from e
    _check_npy_headers(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as e:
                    if "allow_pickle" in str(e) or "Object arrays" in str(e):
                        raise InvalidData(
                            f"array {key!r} in {path.name!r} is an object (pickled) array: "
                            "only numeric arrays are accepted", details={"input": key}) from e
                    raise InvalidData(f"array {key!r} in {path.name!r} is unreadable: {e}",
                                      details={"input": key}) from e
    except InvalidData:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InvalidData(f"{path.name!r} is not a readable .npz file: {e}") from e
    return arrays


def _check_npy_headers(path: Path) -> None:
    """Read each member's .npy header only: refuse object dtypes and shapes whose byte size
    exceeds the member (numpy allocates the claimed shape before reading the data)."""
    from numpy.lib import format as npf

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                with zf.open(info) as f:
                    version = npf.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npf.read_array_header_1_0(f)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = npf.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                if dtype.hasobject:
                    raise InvalidData(
                        f"array {key!r} in {path.name!r} is an object (pickled) array: only "
                        "numeric arrays are accepted", details={"input": key})
                claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if claimed > info.file_size:
                    raise InvalidData(
                        f"array {key!r} in {path.name!r} claims shape {tuple(shape)} "
                        f"({claimed} bytes) but holds {info.file_size} bytes",
                        details={"input": key})
    except InvalidData:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InvalidData(f"{path.name!r} is not a readable .npz file: {e}") from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:  # SafetensorError, bf16 (no numpy dtype), bad header
        raise InvalidData(f"{path.name!r} is not a readable .safetensors file of numpy "
                          f"dtypes: {e}") from e


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Raw arrays of a .npz / .safetensors file (no validation against a model)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"data file {path.name!r} does not exist")
    with path.open("rb") as f:
        head = f.read(9)
    suffix = path.suffix.lower()
    # Stored uploads may have lost their suffix: sniff zip (npz) / safetensors header ('{'
    # after the 8-byte little-endian header length).
    if suffix == ".npz" or (suffix != ".safetensors" and head.startswith(b"PK")):
        return _read_npz(path)
    if suffix == ".safetensors" or head[8:9] == b"{":
        return _read_safetensors(path)
    raise InvalidData(f"data file {path.name!r}: expected .npz or .safetensors")


# ------------------------------------------------------------------------------ validation


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if i == 0 else ("?" if d is None else str(d))
                           for i, d in enumerate(shape)) + ")"


def _coerce(name: str, arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
    want = np.dtype(spec.dtype)
    got = arr.dtype
    if got.kind in "OUSVMm" or got.hasobject:
        raise InputMismatch(f"input {name!r}: expected dtype {want}, found {got} "
                            "(non-numeric)", details={"input": name})
    if want.kind == "f":
        if got.kind != "f":
            raise InputMismatch(
                f"input {name!r}: expected dtype {want}, found {got}; integer/bool data is not "
                "cast to float (scale it to the model's range and save as float32)",
                details={"input": name, "expected": str(want), "found": str(got)})
        return arr.astype(want, copy=False)
    if want.kind in "iu":
        if got.kind not in "iu":
            raise InputMismatch(f"input {name!r}: expected integer dtype {want}, found {got}",
                                details={"input": name, "expected": str(want), "found": str(got)})
        if arr.size and got != want:
            info = np.iinfo(want)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise InputMismatch(f"input {name!r}: values [{lo}, {hi}] do not fit {want}",
                                    details={"input": name})
        return arr.astype(want, copy=False)
    if want.kind == "b":
        if got.kind != "b":
            raise InputMismatch(f"input {name!r}: expected dtype bool, found {got}",
                                details={"input": name, "expected": "bool", "found": str(got)})
        return arr
    if got != want:
        raise InputMismatch(f"input {name!r}: expected dtype {want}, found {got}",
                            details={"input": name})
    return arr


def _check_shape(name: str, arr: np.ndarray, spec: TensorSpec) -> None:
    if arr.ndim != len(spec.shape) or any(
        d is not None and d != a for d, a in zip(spec.shape[1:], arr.shape[1:], strict=False)
    ):
        raise InputMismatch(
            f"input {name!r}: expected shape {_fmt_shape(spec.shape)} (N = samples), "
            f"found {tuple(arr.shape)}",
            details={"input": name, "expected": list(spec.shape), "found": list(arr.shape)})


def _check_finite(name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind != "f":
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = ~finite
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(bad.sum()) - n_nan
    first = int(np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))[0]) if arr.ndim else 0
    raise InputMismatch(
        f"input {name!r}: found {n_nan} NaN and {n_inf} Inf values (first in sample {first}); "
        "expected finite numbers", details={"input": name, "nan": n_nan, "inf": n_inf})


def _check_labels(labels: np.ndarray, samples: int) -> np.ndarray:
    """Class ids: 1-D, integer, one per sample, >= 0. Bad labels are bad data (InvalidData),
    not a model mismatch; their range against the model's output width is checked where the
    outputs are known (stages.quality.resolve_metric)."""
    if labels.ndim != 1:
        raise InvalidData(f"input 'labels': expected a 1-D array of class ids (N,), found "
                          f"shape {tuple(labels.shape)}", details={"input": LABELS})
    if labels.dtype.kind not in "iu":
        nan = f" with {int(np.isnan(labels).sum())} NaN" if labels.dtype.kind == "f" else ""
        raise InvalidData(f"input 'labels': expected integer class ids, found dtype "
                          f"{labels.dtype}{nan}", details={"input": LABELS})
    if len(labels) != samples:
        raise InvalidData(f"input 'labels': expected {samples} labels (one per sample), "
                          f"found {len(labels)}", details={"input": LABELS})
    if len(labels) and int(labels.min()) < 0:
        first = int(np.flatnonzero(labels < 0)[0])
        raise InvalidData(f"input 'labels': class ids must be >= 0, found {int(labels.min())} "
                          f"(first in sample {first})", details={"input": LABELS})
    return labels.astype(np.int64, copy=False)


def validate_arrays(
    arrays: dict[str, np.ndarray], model_inputs: Sequence[TensorSpec], *, min_samples: int = 8,
    source: str = "data file",
) -> Dataset:
    """Check raw arrays against the model's input specs; return a Dataset in input order."""
    expected = [s.name for s in model_inputs]
    missing = [n for n in expected if n not in arrays]
    if missing:
        specs = {s.name: s for s in model_inputs}
        first = specs[missing[0]]
        raise InputMismatch(
            f"input {missing[0]!r} is missing from the {source}: expected an array "
            f"{_fmt_shape(first.shape)} {first.dtype}; the file has keys {sorted(arrays)}",
            details={"input": missing[0], "missing": missing, "found": sorted(arrays)})
    extra = [k for k in arrays if k not in expected and k != LABELS]
    if extra:
        raise InputMismatch(
            f"input {extra[0]!r} in the {source} is not a model input: expected keys "
            f"{expected} (+ optional 'labels'), found extra {extra}",
            details={"input": extra[0], "extra": extra, "expected": expected})
    inputs: dict[str, np.ndarray] = {}
    for spec in model_inputs:
        arr = arrays[spec.name]
        _check_shape(spec.name, arr, spec)
        arr = _coerce(spec.name, arr, spec)
        _check_finite(spec.name, arr)
        inputs[spec.name] = arr
    counts = {k: int(v.shape[0]) for k, v in inputs.items()}
    if len(set(counts.values())) > 1:
        raise InputMismatch(f"inputs have different sample counts (dim 0): {counts}",
                            details={"counts": counts})
    samples = next(iter(counts.values())) if counts else 0
    if samples < min_samples:
        name = expected[0] if expected else LABELS
        raise InputMismatch(
            f"input {name!r}: expected at least {min_samples} samples, found {samples}",
            details={"input": name, "expected": min_samples, "found": samples})
    has_labels = LABELS in arrays and LABELS not in expected  # an input may be named "labels"
    labels = _check_labels(arrays[LABELS], samples) if has_labels else None
    return Dataset(inputs, labels)


def load_dataset(
    path: Path, model_inputs: Sequence[TensorSpec], *, min_samples: int = 8
) -> Dataset:
    """Read a .npz / .safetensors file and validate it against ``model_inputs``.

    Raises InvalidData (unreadable, pickled arrays, bomb, bad labels) or InputMismatch
    (missing/extra key, dtype, non-batch shape, NaN/Inf, fewer than ``min_samples``) naming the
    input.
    """
    path = Path(path)
    return validate_arrays(read_arrays(path), model_inputs, min_samples=min_samples,
                           source=f"data file {path.name!r}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def inspect_dataset(
    path: Path, model_inputs: Sequence[TensorSpec], *, min_samples: int = 1
) -> DatasetInfo:
    """Validate like load_dataset and summarise; the input specs carry the real shapes."""
    path = Path(path)
    ds = load_dataset(path, model_inputs, min_samples=min_samples)
    specs = tuple(TensorSpec(k, tuple(int(d) for d in v.shape), str(v.dtype))
                  for k, v in ds.inputs.items())
    num_classes = None
    if ds.labels is not None and len(ds.labels):
        num_classes = int(ds.labels.max()) + 1
    return DatasetInfo(samples=ds.samples, inputs=specs, has_labels=ds.labels is not None,
                       num_classes=num_classes, sha256=_sha256(path),
                       size_bytes=path.stat().st_size)
