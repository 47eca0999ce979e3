"""Measure a model on the target runtime (ONNX Runtime, CPU): quality, latency, size, cost.

Conventions (units in names):
- latency in milliseconds per ``session.run`` call at the given batch; p50/p95 over all timed
  runs of the interleaved rounds.
- MACs = multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul (and their integer/QLinear
  forms) for the given input shapes; ``evaluate_onnx`` reports them for batch 1 (per sample).
  Elementwise ops, norms and pooling are not counted (they are a few % on these models).
- parameters = elements of weight initializers (fp32 or int8 alike: a QDQ graph's int8 weight
  behind DequantizeLinear counts once, its scales / zero points do not). BatchNormalization
  running stats in an unfused fp32 graph count too.
- size = bytes on disk of the .onnx plus every external-data file it references.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from app.engine.formats.data import Dataset
from app.engine.formats.onnx_safe import external_data_files
from app.engine.types import Metrics, QualityKind, QualityMetric

Feed = Sequence[np.ndarray] | Mapping[str, np.ndarray]

# ---------------------------------------------------------------------------- sessions / runs


def make_session(onnx_path: Path, *, threads: int = 2) -> ort.InferenceSession:
    """CPU session with ``threads`` intra-op threads, 1 inter-op, no spinning (DESIGN §6)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle spinning threads of one session steal the 2 cores from another measured beside it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _as_session(model: Path | ort.InferenceSession, threads: int = 2) -> ort.InferenceSession:
    return model if isinstance(model, ort.InferenceSession) else make_session(Path(model),
                                                                              threads=threads)


def _feed(session: ort.InferenceSession, batch: Feed) -> dict[str, np.ndarray]:
    if isinstance(batch, Mapping):
        return dict(batch)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(batch):
        raise ValueError(f"session expects inputs {names}, got {len(batch)} arrays")
    return dict(zip(names, batch, strict=True))


def _ordered_arrays(data: Dataset, names: Sequence[str]) -> list[np.ndarray]:
    """Data arrays in session-input order (by name; positional if the names differ)."""
    if all(n in data.inputs for n in names):
        return [data.inputs[n] for n in names]
    arrays = list(data.inputs.values())
    if len(arrays) != len(names):
        raise ValueError(f"model inputs {list(names)} vs data inputs {list(data.inputs)}")
    return arrays


def _static_batch(session: ort.InferenceSession) -> int | None:
    dims = [i.shape[0] if i.shape else None for i in session.get_inputs()]
    fixed = {d for d in dims if isinstance(d, int) and d > 0}
    return fixed.pop() if len(fixed) == 1 else None


def run_onnx(
    model: Path | ort.InferenceSession, data: Dataset, *, batch_size: int = 64,
    threads: int = 2,
) -> np.ndarray:
    """First output of the model over every sample of ``data`` (batched, in order).

    A model exported with a fixed batch dimension B runs in batches of B; the last batch is
    padded by repeating its last sample and the padding is dropped from the result.
    """
    sess = _as_session(model, threads)
    names = [i.name for i in sess.get_inputs()]
    arrays = _ordered_arrays(data, names)
    fixed = _static_batch(sess)
    bs = fixed or batch_size
    outs: list[np.ndarray] = []
    n = data.samples
    for i in range(0, n, bs):
        chunk = [a[i:i + bs] for a in arrays]
        real = len(chunk[0])
        if fixed and real < fixed:
            chunk = [np.concatenate([c, np.repeat(c[-1:], fixed - real, axis=0)]) for c in chunk]
        out = sess.run(None, dict(zip(names, chunk, strict=True)))[0]
        outs.append(np.asarray(out)[:real])
    return np.concatenate(outs) if outs else np.empty((0,), np.float32)


def latency_ms(
    sessions: Sequence[ort.InferenceSession], feed_batch: Feed, *, warmup: int = 5,
    rounds: int = 7, runs_per_round: int = 10,
) -> list[tuple[float, float]]:
    """(p50, p95) in ms per session, measured interleaved side by side.

    Each round times ``runs_per_round`` single runs of every session, rotating which session
    goes first, so that machine noise (other jobs on the 2 shared cores) hits all alike.
    """
    feeds = [_feed(s, feed_batch) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    k = len(sessions)
    for r in range(rounds):
        for j in range(k):
            idx = (r + j) % k
            s, f = sessions[idx], feeds[idx]
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                s.run(None, f)
                times[idx].append((time.perf_counter() - t0) * 1e3)
    return [(float(np.percentile(t, 50)), float(np.percentile(t, 95))) for t in times]


# ---------------------------------------------------------------------------- quality


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine similarity of the flattened outputs."""
    from app.engine.stages.quality import cosines

    return float(cosines(a, b).mean())


def quality(
    outputs: np.ndarray, reference: np.ndarray | None, labels: np.ndarray | None,
    metric: QualityMetric = "auto",
) -> tuple[float, QualityKind, dict[str, float] | None, float | None]:
    """(quality, kind, per-class accuracy, top-1 agreement with reference).

    ``metric`` as ``Constraints.metric``; ``auto`` is resolved from ``reference`` (the fp32
    outputs) by ``stages.quality.resolve_metric``: accuracy for logits with labels, agreement
    for logits without, cosine for embeddings (unit-norm rows, other ranks), mse for one value
    per sample. Without a reference, ``outputs`` are their own reference (accuracy only).
    """
    from app.engine.stages.quality import Scorer

    ref = outputs if reference is None else reference
    if len(ref) != len(outputs):
        raise ValueError(f"reference has {len(ref)} rows, outputs {len(outputs)}")
    if labels is not None and len(labels) != len(outputs):
        raise ValueError(f"labels have {len(labels)} rows, outputs {len(outputs)}")
    scorer = Scorer.resolve(metric, ref, labels)
    if reference is None and scorer.kind != "accuracy":
        raise ValueError(f"metric {scorer.kind!r} needs reference outputs")
    s = scorer.score(outputs)
    return s.quality, scorer.kind, s.per_class, None if reference is None else s.agreement


# ---------------------------------------------------------------------------- cost


def _load_graph(onnx_path: Path) -> onnx.ModelProto:
    return onnx.load(str(onnx_path), load_external_data=False)


_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_WEIGHT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
                 TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}


def count_params(onnx_path: Path) -> int:
    """Elements of weight initializers (see module doc); QDQ scales/zero points excluded."""
    model = _load_graph(Path(onnx_path))
    graph = model.graph
    qparams: set[str] = set()
    for node in graph.node:
        if node.op_type in _QDQ or node.op_type.startswith("QLinear") or node.op_type in (
            "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"
        ):
            # Scale / zero-point inputs of (de)quantizers and QLinear ops are not parameters.
            ins = list(node.input)
            if node.op_type in _QDQ:
                qparams.update(ins[1:])
            elif node.op_type == "QLinearConv" or node.op_type == "QLinearMatMul":
                qparams.update(ins[i] for i in (1, 2, 4, 5, 6, 7) if i < len(ins))
            elif node.op_type in ("ConvInteger", "MatMulInteger"):
                qparams.update(ins[2:])
    # Whatever a DequantizeLinear turns into a float tensor is a weight, e.g. the int32 bias
    # written by onnxruntime.quantization.quantize_static.
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    total = 0
    for t in graph.initializer:
        if t.name in qparams or len(t.dims) == 0 or (
            t.data_type not in _WEIGHT_TYPES and t.name not in dequantized
        ):
            continue
        total += math.prod(t.dims)
    return int(total)


def _with_static_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.name not in shapes:
            raise ValueError(f"no shape given for input {vi.name!r}")
        dims = vi.type.tensor_type.shape.dim
        want = shapes[vi.name]
        if len(dims) != len(want):
            raise ValueError(f"input {vi.name!r} has rank {len(dims)}, shape given {want}")
        for d, v in zip(dims, want, strict=True):
            d.Clear()
            d.dim_value = int(v)


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    return None if any(d < 0 for d in dims) else tuple(dims)


_MAC_OPS = {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "Gemm", "MatMul",
            "MatMulInteger", "QLinearMatMul", "FusedMatMul"}


def _operands(node: onnx.NodeProto) -> tuple[str, str]:
    """(activation input, weight/second input) names of a MAC op."""
    if node.op_type.startswith("QLinear"):
        return node.input[0], node.input[3]
    return node.input[0], node.input[1]


def _probe_shapes(onnx_path: Path, model: onnx.ModelProto, names: set[str],
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Actual shapes of ``names`` by running the model once on zeros (shape inference gave up)."""
    full = onnx.load(str(onnx_path))  # with external data: the session needs the weights
    known = {o.name for o in full.graph.output}
    for n in sorted(names - known):
        full.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            next(v for v in model.graph.input if v.name == i.name).type.tensor_type.elem_type)
        feed[i.name] = np.zeros(shapes[i.name], dtype=dtype)
    outs = sess.run(None, feed)
    return {o.name: tuple(np.asarray(v).shape) for o, v in zip(sess.get_outputs(), outs,
                                                                strict=True)}


def count_macs(onnx_path: Path, input_shapes: Mapping[str, Sequence[int]] | Sequence[
        Sequence[int]]) -> int:
    """MACs of Conv/ConvTranspose/Gemm/MatMul (+ integer/QLinear forms) for these input shapes.

    ``input_shapes``: {input name: shape} or shapes in graph-input order. Shapes come from ONNX
    shape inference; if it leaves a needed one symbolic, one zero-input run finds it.
    """
    onnx_path = Path(onnx_path)
    model = _load_graph(onnx_path)
    inits = {t.name: t for t in model.graph.initializer}
    graph_inputs = [v.name for v in model.graph.input if v.name not in inits]
    if isinstance(input_shapes, Mapping):
        shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    else:
        shapes = {n: tuple(int(d) for d in s) for n, s in zip(graph_inputs, input_shapes,
                                                                strict=True)}
    _with_static_inputs(model, shapes)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    known: dict[str, tuple[int, ...]] = dict(shapes)
    for t in inits.values():
        known[t.name] = tuple(t.dims)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        s = _static_shape(vi)
        if s is not None:
            known[vi.name] = s
    for node in inferred.graph.node:  # Constant nodes (e.g. folded weights) have static dims
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    known[node.output[0]] = tuple(a.t.dims)
    mac_nodes = [n for n in inferred.graph.node if n.op_type in _MAC_OPS]
    needed = {x for n in mac_nodes for x in (*_operands(n), n.output[0])}
    missing = needed - set(known)
    if missing:
        known.update(_probe_shapes(onnx_path, model, missing, shapes))
    total = 0
    for n in mac_nodes:
        a_name, w_name = _operands(n)
        a, w, y = known[a_name], known[w_name], known[n.output[0]]
        if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            # y: (N, Cout, *spatial); w: (Cout, Cin/groups, *kernel)
            total += math.prod(y) * math.prod(w[1:])
        elif n.op_type == "ConvTranspose":
            # Each input element scatters into Cout/groups * kernel outputs.
            total += math.prod(a) * math.prod(w[1:])
        elif n.op_type == "Gemm":
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            total += math.prod(y) * k
        else:  # MatMul family: y = a @ w, K = last dim of a (1-D a: K = a[0])
            total += math.prod(y) * a[-1]
    return int(total)


def size_on_disk(onnx_path: Path) -> int:
    """Bytes of the .onnx plus every distinct external-data file it references."""
    onnx_path = Path(onnx_path)
    model = _load_graph(onnx_path)
    total = onnx_path.stat().st_size
    for f in external_data_files(model, onnx_path.parent):
        if f.is_file():
            total += f.stat().st_size
    return total


# ---------------------------------------------------------------------------- all together


def _latency_feed(data: Dataset, names: Sequence[str], batch_size: int) -> dict[str, np.ndarray]:
    arrays = _ordered_arrays(data, names)
    idx = np.arange(batch_size) % max(data.samples, 1)
    return {n: np.ascontiguousarray(a[idx]) for n, a in zip(names, arrays, strict=True)}


def evaluate_onnx(
    onnx_path: Path, data: Dataset, reference_outputs: np.ndarray | None, *,
    batch_size: int = 1, threads: int = 2, infer_batch_size: int = 64,
    latency: tuple[float, float] | None = None, metric: QualityMetric = "auto",
) -> Metrics:
    """Full Metrics of one ONNX model on ``data``.

    ``batch_size`` / ``threads`` are the deployment target used for latency (the first
    ``batch_size`` samples, repeated if fewer). Pass ``latency`` = (p50, p95) when the caller
    measured it side by side with other candidates via ``latency_ms``; else it is measured
    here alone. Quality uses ``infer_batch_size`` for throughput only.
    """
    onnx_path = Path(onnx_path)
    sess = make_session(onnx_path, threads=threads)
    outputs = run_onnx(sess, data, batch_size=infer_batch_size)
    q, kind, per_class, agreement = quality(outputs, reference_outputs, data.labels, metric)
    names = [i.name for i in sess.get_inputs()]
    fixed = _static_batch(sess)
    lat_batch = fixed or batch_size
    if latency is None:
        latency = latency_ms([sess], _latency_feed(data, names, lat_batch))[0]
    arrays = _ordered_arrays(data, names)
    shapes = {n: (fixed or 1, *a.shape[1:]) for n, a in zip(names, arrays, strict=True)}
    macs = count_macs(onnx_path, shapes) // (fixed or 1)
    return Metrics(
        quality=q, quality_kind=kind, latency_p50_ms=latency[0], latency_p95_ms=latency[1],
        size_bytes=size_on_disk(onnx_path), parameters=count_params(onnx_path), macs=macs,
        per_class_accuracy=per_class, agreement=agreement,
    )


__all__ = [
    "cosine",
    "count_macs",
    "count_params",
    "evaluate_onnx",
    "latency_ms",
    "make_session",
    "quality",
    "run_onnx",
    "size_on_disk",
]
