"""Export: single-file ONNX (dynamo exporter, dynamic batch), .pt2, hashes, library versions.

``export_onnx`` of a converted PT2E model gives a QDQ graph (QuantizeLinear/DequantizeLinear
around Conv/Gemm/MatMul) that ONNX Runtime fuses into int8 kernels. Two graph rewrites keep
that fusion right (``onnx_rewrite``): zero ``Pad`` nodes in front of a Conv are folded into its
``pads``, and an ``AveragePool`` whose one window covers its input becomes ``GlobalAveragePool``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import platform
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from app.engine.stages.quantize import batch_examples, capture, set_training

if TYPE_CHECKING:
    import onnx

_CHUNK = 1 << 20  # bytes read per hash update


@contextlib.contextmanager
def _shared_torchlib_registry() -> Iterator[None]:
    """Build torch.onnx's op registry once per process and opset, not on every export.

    ``torch.onnx.export(dynamo=True)`` rebuilds the torchlib registry on each call (0.34 s of
    CPU here, 0.7 s the first time): about a fifth of a small model's export, and a job
    exports every candidate. The registry is only mutated by a ``custom_translation_table``,
    which this module never passes, so one instance per opset can serve every export.
    """
    from torch.onnx._internal.exporter import _registration

    cls = _registration.ONNXRegistry
    original = cls.__dict__["from_torchlib"]
    build = original.__func__

    def cached(klass: type, opset_version: int = _registration._constants.TORCHLIB_OPSET) -> Any:
        key = (klass, opset_version)
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(klass, opset_version)
        return _REGISTRIES[key]

    cls.from_torchlib = classmethod(cached)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        cls.from_torchlib = original  # type: ignore[method-assign]


_REGISTRIES: dict[tuple[type, int], Any] = {}


def _program(
    model: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        return model
    set_training(model, False)
    return capture(model, example_inputs)


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[torch.Tensor],
    path: Path,
    *,
    opset: int | None = None,
) -> Path:
    """Write ``model`` as ONE ONNX file (weights inline, no ``.data`` side file).

    Dim 0 of every input (the batch) is dynamic. Input names are the model's ``forward``
    argument names (the names of an exported program's user inputs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ep = _program(model, example_inputs)
    ex = batch_examples(example_inputs)
    side = path.with_name(path.name + ".data")
    # The exporter prints progress lines to stdout; keep the caller's stdout clean.
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
          _shared_torchlib_registry()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ep,
            ex,
            str(path),
            dynamo=True,
            external_data=False,  # the batch dim is already symbolic in ``ep``
            opset_version=opset,
        )
    # One file, no debug metadata: the exporter annotates every node with its Python stack
    # trace and module path (a quarter of a small int8 file, and it leaks server paths).
    import onnx

    from app.engine.stages.onnx_rewrite import fold_zero_pads, global_average_pools

    proto = onnx.load(str(path), load_external_data=True)
    strip_metadata(proto)
    fold_zero_pads(proto)  # int8: ORT does not fuse Pad -> Q -> DQ -> Conv (onnx_rewrite.py)
    global_average_pools(proto)  # int8: ORT's QLinearAveragePool zeroes an oversized window
    onnx.save(proto, str(path), save_as_external_data=False)
    if side.exists():  # exporters that ignore external_data=False
        side.unlink()
    return path


class OnnxCache:
    """Exported ONNX files by key, least recently used dropped first, at most ``max_bytes``.

    A worker compresses the same uploaded model again and again (one job per set of
    constraints, a retry, a load of identical jobs): the fp32 baseline export of such a model
    (a third of a small job's CPU here) is the same bytes every time. The key must name
    everything the export depends on (the caller's job): here the model file's sha256 and the
    example inputs' shapes and dtypes; the exporter's versions are fixed for a process.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0  # sum of the cached files' sizes
        self._lock = threading.Lock()  # a thread-pool worker may run two jobs at once

    def export(self, key: str | None, path: Path, export: Callable[[Path], Path]) -> bool:
        """Write the file of ``key`` to ``path``: a copy if cached, else ``export(path)``
        (then kept). Returns True for a cache hit. ``key`` None: always export, keep nothing."""
        if key is not None:
            with self._lock:
                data = self._files.get(key)
                if data is not None:
                    self._files.move_to_end(key)
            if data is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                return True
        export(path)
        if key is not None:
            data = path.read_bytes()
            if len(data) <= self.max_bytes:
                with self._lock:
                    if key not in self._files:  # another thread may have just added it
                        self._files[key] = data
                        self._bytes += len(data)
                    while self._bytes > self.max_bytes:
                        self._bytes -= len(self._files.popitem(last=False)[1])
        return False

    def __len__(self) -> int:
        return len(self._files)


# Baselines of the last models this process compressed: 256 MiB holds one ResNet-50 (98 MB
# fp32) or hundreds of small models; a worker host has GBs.
BASELINES = OnnxCache(max_bytes=256 << 20)


def export_key(model_sha256: str, example_inputs: Sequence[torch.Tensor]) -> str:
    """Cache key of an export of the model file ``model_sha256`` traced on these inputs."""
    shapes = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in example_inputs)
    return f"{model_sha256}|{shapes}"


def strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node metadata/doc strings and intermediate value_info (shapes ORT re-infers)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]


def export_pt2(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[torch.Tensor],
    path: Path,
) -> Path:
    """``torch.export.save`` of the model (dynamic batch); ``torch.export.load`` reads it back.

    Works for converted PT2E int8 models too (int8 weights are plain tensors in the archive).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ep = _program(model, example_inputs)
    torch.export.save(ep, str(path))
    return path


def onnx_outputs(onnx_path: Path, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run an ONNX file in ONNX Runtime (CPU, 1 thread, no spinning) on torch inputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"ONNX model takes {len(names)} inputs, got {len(inputs)}")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    return [np.asarray(o) for o in sess.run(None, feed)]


def onnx_parity(model: nn.Module, onnx_path: Path, inputs: Sequence[torch.Tensor]) -> float:
    """Max abs difference between the first output of ``model`` and of the ONNX file."""
    set_training(model, False)
    with torch.no_grad():
        out = model(*inputs)
    ref = out[0] if isinstance(out, tuple | list) else out
    got = onnx_outputs(onnx_path, inputs)[0]
    return float(np.max(np.abs(ref.detach().cpu().numpy() - got)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_PACKAGES = {
    "torch": "torch",
    "torchao": "torchao",
    "torch_pruning": "torch-pruning",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxscript": "onnxscript",
    "numpy": "numpy",
}


def library_versions() -> dict[str, str]:
    """Versions of the toolchain that produced an artifact (for the report manifest)."""
    out: dict[str, str] = {}
    for key, dist in _PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "not installed"
    out["python"] = platform.python_version()
    return out
