"""Data files against model inputs: every bad case names the input, expected and found."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from app.engine.errors import InputMismatch, InvalidData
from app.engine.formats.data import Dataset, inspect_dataset, load_dataset
from app.engine.types import TensorSpec

pytestmark = pytest.mark.engine

IMG = TensorSpec("x", (None, 1, 8, 8), "float32")
MASK = TensorSpec("mask", (None, 16), "int64")


def arrays(n: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 1, 8, 8), dtype=np.float32),
            "labels": rng.integers(0, 10, n)}


def save(tmp_path: Path, data: dict[str, np.ndarray], name: str = "d.npz") -> Path:
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **data)  # type: ignore[arg-type]
    else:
        save_file(data, str(path))
    return path


def test_digits_npz_loads(digits_npz: Path, digits8: tuple[torch.Tensor, torch.Tensor]) -> None:
    ds = load_dataset(digits_npz, [IMG])
    x, y = digits8
    assert ds.samples == 1797
    np.testing.assert_array_equal(ds.inputs["x"], x.numpy())
    assert ds.labels is not None and ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, y.numpy())
    info = inspect_dataset(digits_npz, [IMG])
    assert info.samples == 1797 and info.has_labels and info.num_classes == 10
    assert info.inputs == (TensorSpec("x", (1797, 1, 8, 8), "float32"),)
    assert info.sha256 == hashlib.sha256(digits_npz.read_bytes()).hexdigest()
    assert info.size_bytes == digits_npz.stat().st_size


def test_safetensors_and_multi_input(tmp_path: Path) -> None:
    data = arrays()
    data["mask"] = np.ones((20, 16), dtype=np.int32)  # int32 -> int64 is a safe cast
    ds = load_dataset(save(tmp_path, data, "d.safetensors"), [IMG, MASK])
    assert ds.names == ("x", "mask")
    assert ds.inputs["mask"].dtype == np.int64
    xs = ds.tensors()
    assert [t.shape for t in xs] == [(20, 1, 8, 8), (20, 16)]


def test_float64_is_cast_to_float32(tmp_path: Path) -> None:
    data = arrays()
    data["x"] = data["x"].astype(np.float64)
    ds = load_dataset(save(tmp_path, data), [IMG])
    assert ds.inputs["x"].dtype == np.float32


@pytest.mark.parametrize(("mutate", "error", "pattern"), [
    (lambda d: d.pop("x"), InputMismatch, r"input 'x' is missing.*\(N, 1, 8, 8\) float32"),
    (lambda d: d.update(y=np.zeros(20)), InputMismatch, r"input 'y'.*not a model input"),
    (lambda d: d.update(x=(d["x"] * 16).astype(np.int64)), InputMismatch,
     r"input 'x': expected dtype float32, found int64"),
    (lambda d: d.update(x=d["x"].reshape(20, 1, 4, 16)), InputMismatch,
     r"input 'x': expected shape \(N, 1, 8, 8\).*found \(20, 1, 4, 16\)"),
    (lambda d: d.update(x=d["x"][:, 0]), InputMismatch,
     r"input 'x': expected shape \(N, 1, 8, 8\).*found \(20, 8, 8\)"),
    (lambda d: d["x"].__setitem__((3, 0, 1, 1), np.nan), InputMismatch,
     r"input 'x': found 1 NaN and 0 Inf values \(first in sample 3\)"),
    (lambda d: d["x"].__setitem__((5, 0, 0, 0), np.inf), InputMismatch,
     r"input 'x': found 0 NaN and 1 Inf values \(first in sample 5\)"),
    (lambda d: d.update(x=d["x"][:5], labels=d["labels"][:5]), InputMismatch,
     r"input 'x': expected at least 8 samples, found 5"),
    # Bad labels are bad data (README: invalid_data), not a mismatch with the model's inputs.
    (lambda d: d.update(labels=d["labels"][:19]), InvalidData,
     r"input 'labels': expected 20 labels.*found 19"),
    (lambda d: d.update(labels=d["labels"].astype(np.float32)), InvalidData,
     r"input 'labels': expected integer class ids, found dtype float32"),
    (lambda d: d.update(labels=np.where(np.arange(20) == 4, np.nan, d["labels"])), InvalidData,
     r"input 'labels': expected integer class ids, found dtype float64 with 1 NaN"),
    (lambda d: d.update(labels=d["labels"].reshape(20, 1)), InvalidData,
     r"input 'labels': expected a 1-D array.*found shape \(20, 1\)"),
    (lambda d: d["labels"].__setitem__(7, -1), InvalidData,
     r"input 'labels': class ids must be >= 0, found -1 \(first in sample 7\)"),
])
def test_bad_data_names_the_input(tmp_path: Path, mutate: object, error: type[Exception],
                                  pattern: str) -> None:
    data = arrays()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(error, match=pattern) as exc:
        load_dataset(save(tmp_path, data), [IMG])
    assert exc.value.details.get("input") in {"x", "y", "labels"}  # type: ignore[attr-defined]


def test_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    obj = np.empty(20, dtype=object)
    obj[:] = [{"a": 1}] * 20
    data = arrays()
    path = tmp_path / "obj.npz"
    np.savez(path, x=data["x"], labels=obj)
    with pytest.raises(InvalidData, match=r"'labels'.*object \(pickled\) array"):
        load_dataset(path, [IMG])
    assert not marker.exists()


def test_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(InvalidData, match=r"junk\.npz"):
        load_dataset(junk, [IMG])
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\xff" * 32)
    with pytest.raises(InvalidData, match=r"junk\.safetensors"):
        load_dataset(bad_st, [IMG])
    csv = tmp_path / "d.csv"
    csv.write_text("x,labels\n0.5,1\n")
    with pytest.raises(InvalidData, match=r"\.npz or \.safetensors"):
        load_dataset(csv, [IMG])
    # Without a suffix the content decides (stored uploads may have lost their names).
    blob = save(tmp_path, arrays(), "d.safetensors").rename(tmp_path / "blob")
    assert load_dataset(blob, [IMG]).samples == 20


def test_split_batches_take() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    ds = Dataset({"x": rng.random((100, 3), dtype=np.float32)}, labels)
    train, hold = ds.split(0.2, seed=0)
    assert train.samples + hold.samples == 100
    assert hold.labels is not None and train.labels is not None
    # Stratified: every class keeps its share in the holdout (20 % of 40/30/20/10).
    assert np.bincount(hold.labels, minlength=4).tolist() == [8, 6, 4, 2]
    # Disjoint, and together exactly the original rows.
    rows = np.concatenate([train.inputs["x"], hold.inputs["x"]])
    assert len(np.unique(rows, axis=0)) == 100
    again, _ = ds.split(0.2, seed=0)
    np.testing.assert_array_equal(again.inputs["x"], train.inputs["x"])
    sizes = [(len(xs[0]), None if y is None else len(y)) for xs, y in ds.batches(32)]
    assert sizes == [(32, 32), (32, 32), (32, 32), (4, 4)]
    assert ds.take(7).samples == 7 and ds.subset([3, 1]).labels.tolist() == [0, 0]  # type: ignore[union-attr]
    unlabeled = Dataset({"x": ds.inputs["x"]}, None)
    a, b = unlabeled.split(0.25, seed=3)
    assert (a.samples, b.samples) == (75, 25)


def test_npy_header_claiming_huge_shape_refused(tmp_path: Path) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1, 8, 8)})
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\0" * 256)
    with pytest.raises(InvalidData, match=r"'x'.*claims shape \(1000000000, 1, 8, 8\)"):
        load_dataset(path, [IMG])
