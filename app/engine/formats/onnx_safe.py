"""Safe checks for uploaded ONNX models (``.onnx`` plus optional external-data files).

ONNX is protobuf, not pickle, so parsing runs no code; the danger is external data: a tensor
may name any ``location`` (``../../etc/passwd``, ``/proc/self/environ``, a symlink) and an
``offset``/``length`` that make a loader read outside the upload. We therefore parse with
``load_external_data=False`` and check every external reference ourselves before calling
``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto

from app.engine.errors import InvalidModel, UnsafeModel

MAX_ONNX_BYTES = 2 << 30  # protobuf hard limit for the .onnx itself


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        yield from _attr_tensors(node.attribute)


def _attr_tensors(attrs: Iterable[AttributeProto]) -> Iterator[TensorProto]:
    for a in attrs:
        if a.type == AttributeProto.TENSOR:
            yield a.t
        elif a.type == AttributeProto.TENSORS:
            yield from a.tensors
        elif a.type == AttributeProto.SPARSE_TENSOR:
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        elif a.type == AttributeProto.SPARSE_TENSORS:
            for sp in a.sparse_tensors:
                yield sp.values
                yield sp.indices
        elif a.type == AttributeProto.GRAPH:
            yield from _graph_tensors(a.g)
        elif a.type == AttributeProto.GRAPHS:
            for g in a.graphs:
                yield from _graph_tensors(g)


def all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers, constants, subgraphs, functions."""
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from _attr_tensors(node.attribute)


def external_data_files(model: ModelProto, base_dir: Path) -> list[Path]:
    """Distinct external-data files referenced by the model (unchecked paths)."""
    seen: dict[str, Path] = {}
    for t in all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            seen.setdefault(loc, base_dir / loc)
    return list(seen.values())


def _check_location(tensor: TensorProto, base_dir: Path, *, allowed: bool = True) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    name = tensor.name or "<unnamed>"
    loc = info.get("location")
    if not loc:
        raise InvalidModel(f"tensor {name!r} has external data without a location")
    if "\x00" in loc or "\\" in loc:
        raise UnsafeModel(f"tensor {name!r}: external data location {loc!r} has a NUL or "
                          "backslash", details={"tensor": name, "location": loc})
    if (os.path.isabs(loc) or PurePosixPath(loc).is_absolute()
            or PureWindowsPath(loc).is_absolute() or re.match(r"^[A-Za-z]:", loc)):
        raise UnsafeModel(f"tensor {name!r}: external data location {loc!r} is absolute",
                          details={"tensor": name, "location": loc})
    if ".." in PurePosixPath(loc).parts:
        raise UnsafeModel(f"tensor {name!r}: external data location {loc!r} contains '..'",
                          details={"tensor": name, "location": loc})
    if not allowed:
        # Checked after the hostile forms above so that those are still called unsafe.
        raise InvalidModel(
            f"tensor {name!r} keeps its data in an external file {loc!r}, but this ONNX model "
            "arrived as a single file: save it with every tensor inside "
            "(onnx.save_model(model, path, save_as_external_data=False))",
            details={"tensor": name, "location": loc})
    base = base_dir.resolve()
    target = base_dir / loc
    # Walk each component: any symlink (file or intermediate dir) is refused.
    cur = base_dir
    for part in PurePosixPath(loc).parts:
        cur = cur / part
        try:
            st = cur.lstat()
        except OSError as e:
            raise InvalidModel(f"tensor {name!r}: external data file {loc!r} is missing",
                               details={"tensor": name, "location": loc}) from e
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeModel(f"tensor {name!r}: external data location {loc!r} is a symlink",
                              details={"tensor": name, "location": loc})
    resolved = target.resolve()
    if not resolved.is_relative_to(base):
        raise UnsafeModel(f"tensor {name!r}: external data {loc!r} leaves the model folder",
                          details={"tensor": name, "location": loc})
    st = target.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeModel(f"tensor {name!r}: external data {loc!r} is not a regular file")
    if st.st_nlink > 1:
        # A hard link is indistinguishable from the file it links to (/etc/shadow, another
        # tenant's upload): an upload's own data files have exactly one name.
        raise UnsafeModel(f"tensor {name!r}: external data {loc!r} is a hard link "
                          f"({st.st_nlink} names)", details={"tensor": name, "location": loc})
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else st.st_size - offset
    except ValueError as e:
        raise InvalidModel(f"tensor {name!r}: bad external data offset/length") from e
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise UnsafeModel(
            f"tensor {name!r}: external data range [{offset}, {offset + length}) is outside "
            f"{loc!r} ({st.st_size} bytes)", details={"tensor": name, "location": loc})


def check_onnx(path: Path, *, external_data: bool = True) -> None:
    """Parse without external data, check every external location, then full checker.

    Raises UnsafeModel for references that escape the model folder (absolute, ``..``,
    symlink, hard link, out-of-range) and InvalidModel for an unparsable or invalid graph.
    ``external_data=False`` (a single-file upload) refuses every external reference.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path.name!r} is not a file")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise InvalidModel(f"{path.name!r} is {size} bytes; the .onnx protobuf must be < 2 GiB "
                           "(put weights in external data)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise InvalidModel(f"{path.name!r} is not a valid ONNX protobuf (truncated or corrupt): "
                           f"{type(e).__name__}: {e}"[:2000]) from e
    if not model.graph.node and not model.graph.output:
        raise InvalidModel(f"{path.name!r} holds no graph (not an ONNX model?)")
    for t in all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            _check_location(t, path.parent, allowed=external_data)
    try:
        # The path form lets the checker read external data and handle > 2 GiB models.
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise InvalidModel(f"ONNX checker rejected {path.name!r}: {type(e).__name__}: {e}"[:2000]
                           ) from e
