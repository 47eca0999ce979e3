"""Measure a model on the target runtime (ONNX Runtime, CPU): quality, latency, size, cost.

Conventions (units in names):
- latency in milliseconds per ``session.run`` call at the given batch; p50/p95 over all timed
  runs of the interleaved rounds. A candidate is judged by its ratio to the baseline measured
  side by side (``compare_latency``: per-round medians, median of per-round ratios with a
  distribution-free interval, an identical-model control for the noise); on 2 loaded cores a
  p50 of single runs measured an identical model anywhere in 0.30x-1.05x of itself, the control
  ratio 0.91x-1.05x in the same runs (bench/latency_control.py).
- MACs = multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul (and their integer/QLinear
  forms) for the given input shapes; ``evaluate_onnx`` reports them for batch 1 (per sample).
  Elementwise ops, norms and pooling are not counted (they are a few % on these models).
- parameters = elements of weight initializers (fp32 or int8 alike: a QDQ graph's int8 weight
  behind DequantizeLinear counts once, its scales / zero points do not). BatchNormalization
  running stats in an unfused fp32 graph count too.
- size = bytes on disk of the .onnx plus every external-data file it references.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from app.engine.formats.data import Dataset
from app.engine.formats.onnx_safe import external_data_files
from app.engine.types import LatencyStats, Metrics, QualityKind, QualityMetric

if TYPE_CHECKING:
    from app.engine.stages.quality import Scorer

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


def _timed_rounds(
    sessions: Sequence[ort.InferenceSession], feeds: Sequence[dict[str, np.ndarray]], *,
    round_index: int, runs_per_round: int,
) -> list[list[float]]:
    """One interleaved round: ``runs_per_round`` timed runs (ms) of every session in turn.

    The order rotates with ``round_index``, so no session always runs right after another.
    """
    k = len(sessions)
    times: list[list[float]] = [[] for _ in sessions]
    for j in range(k):
        idx = (round_index + j) % k
        s, f = sessions[idx], feeds[idx]
        for _ in range(runs_per_round):
            t0 = time.perf_counter()
            s.run(None, f)
            times[idx].append((time.perf_counter() - t0) * 1e3)
    return times


def _warm(sessions: Sequence[ort.InferenceSession], feeds: Sequence[dict[str, np.ndarray]],
          warmup: int) -> None:
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)


def latency_ms(
    sessions: Sequence[ort.InferenceSession], feed_batch: Feed, *, warmup: int = 5,
    rounds: int = 7, runs_per_round: int = 10,
) -> list[tuple[float, float]]:
    """(p50, p95) in ms per session over all timed runs of ``rounds`` interleaved rounds.

    Absolute figures: use :func:`compare_latency` to judge one model against another.
    """
    feeds = [_feed(s, feed_batch) for s in sessions]
    _warm(sessions, feeds, warmup)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        for acc, t in zip(times, _timed_rounds(sessions, feeds, round_index=r,
                                               runs_per_round=runs_per_round), strict=True):
            acc.extend(t)
    return [(float(np.percentile(t, 50)), float(np.percentile(t, 95))) for t in times]


BLOCK_MS = 5.0  # ms of baseline runs per session per round (compare_latency's default)

LATENCY_METHOD = (
    "interleaved rounds (rotating order) of several runs per session; per-round medians; "
    "ratio = median over rounds of candidate / baseline round medians, with a "
    "distribution-free confidence interval of that median; rounds until every interval is "
    "narrow enough or a round / time cap; noise = how far the interval of an identical-model "
    "control (a second session of the baseline) reaches from 1"
)


def median_ci(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics (k, n + 1 - k).

    k is the largest rank with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2, so the interval
    covers the true median with at least ``confidence`` whatever the distribution of the
    values (load bursts on shared cores are far from normal). Too few values for that
    confidence give (min, max).

    >>> median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 0.9)
    (2.0, 8.0)
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("median_ci of no values")
    tail = (1.0 - confidence) / 2.0
    k, cdf = 0, 0.0  # cdf = P(B <= k - 1) for the current k + 1 candidate rank
    while k < n // 2:
        cdf += math.comb(n, k) / 2.0**n
        if cdf > tail:
            break
        k += 1
    k = max(k, 1)
    return x[k - 1], x[n - k]


@dataclass(frozen=True)
class RatioEstimate:
    """One session's latency relative to the baseline session measured in the same rounds."""

    ratio: float  # median over rounds of (session round median / baseline round median)
    low: float  # confidence interval of ``ratio`` (median_ci over the per-round ratios)
    high: float
    best_round: float  # fastest round median of the session / fastest of the baseline
    p50_ms: float  # over every timed run of the session
    p95_ms: float

    @property
    def half_width(self) -> float:
        """Relative half-width of the interval (0.03 = +-3 %)."""
        return max(self.high / self.ratio - 1.0, 1.0 - self.low / self.ratio)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LatencyComparison:
    """Result of :func:`compare_latency` (ms at the measured batch / threads)."""

    baseline_p50_ms: float
    baseline_p95_ms: float
    candidates: list[RatioEstimate]
    control: RatioEstimate  # the baseline model measured as if it were a candidate
    rounds: int
    runs_per_round: int
    confidence: float
    stopped: Literal["precise", "max_rounds", "time"]

    @property
    def noise(self) -> float:
        """How far the control's interval reaches from 1.0 (0.04: identical within +-4 %)."""
        c = self.control
        return max(abs(c.ratio - 1.0), c.high - 1.0, 1.0 - c.low)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": LATENCY_METHOD, "rounds": self.rounds,
            "runs_per_round": self.runs_per_round, "confidence": self.confidence,
            "stopped": self.stopped, "noise": self.noise, "control": self.control.to_dict(),
            "baseline_p50_ms": self.baseline_p50_ms, "baseline_p95_ms": self.baseline_p95_ms,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def compare_latency(
    baseline: ort.InferenceSession, candidates: Sequence[ort.InferenceSession], feed_batch: Feed,
    *, control: ort.InferenceSession, warmup: int = 5, runs_per_round: int | None = None,
    min_rounds: int = 8, max_rounds: int = 200, target_half_width: float = 0.03,
    confidence: float = 0.9, max_seconds: float = 20.0,
) -> LatencyComparison:
    """Latency of each candidate relative to ``baseline``, robust to a loaded machine.

    ``control`` must be a second session of the baseline's own model: it is measured exactly
    like a candidate, so its ratio shows what "no difference" looks like in this run (the
    measured noise). Every round times ``runs_per_round`` runs of each session in turn
    (default: enough for a block of about ``BLOCK_MS`` of the baseline, 5 .. 50 runs: one
    scheduler time slice lost to another process then moves a block's median, not its runs')
    (rotating order) and keeps each session's median; a load burst then hits one round of
    every session rather than one session's whole figure, and the per-round ratio cancels the
    load common to the round. Rounds continue from ``min_rounds`` until every ratio's interval
    (candidates and control) is within ``target_half_width`` or ``max_rounds`` / ``max_seconds``
    (wall seconds of timing) is reached.

    >>> s = make_session(path); cmp = compare_latency(s, [make_session(q)], feed,
    ...                                               control=make_session(path))
    >>> cmp.candidates[0].ratio, cmp.noise   # e.g. (0.41, 0.03): 2.4x faster, noise +-3 %
    """
    if min_rounds < 1 or max_rounds < min_rounds or (runs_per_round or 1) < 1:
        raise ValueError("1 <= min_rounds <= max_rounds and runs_per_round >= 1 are required")
    sessions = [baseline, control, *candidates]
    feeds = [_feed(s, feed_batch) for s in sessions]
    _warm(sessions, feeds, warmup)
    if runs_per_round is None:
        one = float(np.median(_timed_rounds([baseline], feeds[:1], round_index=0,
                                            runs_per_round=5)[0]))
        runs_per_round = int(min(max(math.ceil(BLOCK_MS / max(one, 1e-3)), 5), 50))
    all_times: list[list[float]] = [[] for _ in sessions]
    medians: list[list[float]] = [[] for _ in sessions]  # [session][round], ms

    def estimates() -> list[RatioEstimate]:
        base = np.asarray(medians[0])
        out = []
        for k in range(1, len(sessions)):
            per_round = (np.asarray(medians[k]) / base).tolist()
            lo, hi = median_ci(per_round, confidence)
            out.append(RatioEstimate(
                ratio=float(np.median(per_round)), low=float(lo), high=float(hi),
                best_round=float(min(medians[k]) / min(medians[0])),
                p50_ms=float(np.percentile(all_times[k], 50)),
                p95_ms=float(np.percentile(all_times[k], 95))))
        return out

    start = time.perf_counter()
    stopped: Literal["precise", "max_rounds", "time"] = "max_rounds"
    rounds = 0
    while rounds < max_rounds:
        times = _timed_rounds(sessions, feeds, round_index=rounds, runs_per_round=runs_per_round)
        rounds += 1
        for k, t in enumerate(times):
            all_times[k].extend(t)
            medians[k].append(float(np.median(t)))
        if rounds < min_rounds:
            continue
        if all(e.half_width <= target_half_width for e in estimates()):
            stopped = "precise"
            break
        if time.perf_counter() - start >= max_seconds:
            stopped = "time"
            break
    est = estimates()
    return LatencyComparison(
        baseline_p50_ms=float(np.percentile(all_times[0], 50)),
        baseline_p95_ms=float(np.percentile(all_times[0], 95)),
        candidates=est[1:], control=est[0], rounds=rounds, runs_per_round=runs_per_round,
        confidence=confidence, stopped=stopped,
    )


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


def latency_feed(data: Dataset, names: Sequence[str], batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` samples of ``data`` (repeated if fewer) as a session feed."""
    arrays = _ordered_arrays(data, names)
    idx = np.arange(batch_size) % max(data.samples, 1)
    return {n: np.ascontiguousarray(a[idx]) for n, a in zip(names, arrays, strict=True)}


def evaluate_onnx(
    onnx_path: Path, data: Dataset, reference_outputs: np.ndarray | None, *,
    batch_size: int = 1, threads: int = 2, infer_batch_size: int = 64,
    latency: tuple[float, float] | None = None, metric: QualityMetric = "auto",
    session: ort.InferenceSession | None = None, scorer: Scorer | None = None,
    baseline_scores: np.ndarray | None = None,
) -> Metrics:
    """Full Metrics of one ONNX model on ``data``.

    ``batch_size`` / ``threads`` are the deployment target used for latency (the first
    ``batch_size`` samples, repeated if fewer). Pass ``latency`` = (p50, p95) when the caller
    measured it side by side (see :func:`evaluate_against_baseline`); else it is measured here
    alone. ``session``: an open session of ``onnx_path`` to reuse. Quality uses
    ``infer_batch_size`` for throughput only. ``scorer`` (a resolved
    ``stages.quality.Scorer``, the job's metric) replaces ``metric`` / ``reference_outputs``;
    with ``baseline_scores`` (the baseline's per-sample scores on the same ``data``) the paired
    95 % interval of the drop is set too.
    """
    from app.engine.stages.quality import drop_interval

    onnx_path = Path(onnx_path)
    sess = session or make_session(onnx_path, threads=threads)
    outputs = run_onnx(sess, data, batch_size=infer_batch_size)
    ci = None
    if scorer is None:
        q, kind, per_class, agreement = quality(outputs, reference_outputs, data.labels, metric)
    else:
        s = scorer.score(outputs)
        q, kind, per_class, agreement = s.quality, scorer.kind, s.per_class, s.agreement
        if baseline_scores is not None:
            ci = drop_interval(scorer.kind, baseline_scores, s.per_sample)
    names = [i.name for i in sess.get_inputs()]
    fixed = _static_batch(sess)
    if latency is None:
        latency = latency_ms([sess], latency_feed(data, names, fixed or batch_size))[0]
    arrays = _ordered_arrays(data, names)
    shapes = {n: (fixed or 1, *a.shape[1:]) for n, a in zip(names, arrays, strict=True)}
    macs = count_macs(onnx_path, shapes) // (fixed or 1)
    return Metrics(
        quality=q, quality_kind=kind, latency_p50_ms=latency[0], latency_p95_ms=latency[1],
        size_bytes=size_on_disk(onnx_path), parameters=count_params(onnx_path), macs=macs,
        per_class_accuracy=per_class, agreement=agreement, quality_drop_ci95=ci,
    )


def evaluate_against_baseline(
    baseline: Path, candidates: Sequence[Path], data: Dataset,
    reference_outputs: np.ndarray | None, *, baseline_p50_ms: float | None = None,
    batch_size: int = 1, threads: int = 2, scorer: Scorer | None = None,
    baseline_scores: np.ndarray | None = None, **compare: Any,
) -> tuple[list[Metrics], LatencyComparison]:
    """Metrics of every candidate, its latency judged against ``baseline`` side by side.

    Latency comes from one :func:`compare_latency` run of all candidates with the baseline
    and an identical-model control (a second session of ``baseline``); each candidate's
    ``latency_p50_ms`` is ``baseline_p50_ms * ratio`` (``baseline_p50_ms``: the baseline's
    own figure, default its p50 in this run), so load that changes between two measurement
    runs does not move one candidate against another. ``Metrics.latency`` holds the ratio,
    its interval and the run's noise. ``scorer`` / ``baseline_scores``: as in
    :func:`evaluate_onnx`. ``compare``: keyword arguments of ``compare_latency``.

    >>> ms, cmp = evaluate_against_baseline(fp32, [int8], holdout, ref, batch_size=8)
    >>> ms[0].latency.ratio, cmp.noise
    """
    base = make_session(Path(baseline), threads=threads)
    sessions = [make_session(Path(p), threads=threads) for p in candidates]
    feed = latency_feed(data, [i.name for i in base.get_inputs()],
                        _static_batch(base) or batch_size)
    cmp = compare_latency(base, sessions, feed, control=make_session(Path(baseline),
                                                                       threads=threads),
                          **compare)
    ref_p50 = cmp.baseline_p50_ms if baseline_p50_ms is None else baseline_p50_ms
    scale = ref_p50 / cmp.baseline_p50_ms if cmp.baseline_p50_ms > 0 else 1.0
    out: list[Metrics] = []
    for path, sess, est in zip(candidates, sessions, cmp.candidates, strict=True):
        m = evaluate_onnx(Path(path), data, reference_outputs, batch_size=batch_size,
                          threads=threads, latency=(ref_p50 * est.ratio, est.p95_ms * scale),
                          session=sess, scorer=scorer, baseline_scores=baseline_scores)
        m.latency = LatencyStats(
            ratio=est.ratio, ratio_low=est.low, ratio_high=est.high, best_round=est.best_round,
            noise=cmp.noise, control_ratio=cmp.control.ratio, rounds=cmp.rounds,
            confidence=cmp.confidence)
        out.append(m)
    return out, cmp


__all__ = [
    "LATENCY_METHOD",
    "LatencyComparison",
    "RatioEstimate",
    "compare_latency",
    "cosine",
    "count_macs",
    "count_params",
    "evaluate_against_baseline",
    "evaluate_onnx",
    "latency_feed",
    "latency_ms",
    "make_session",
    "median_ci",
    "quality",
    "run_onnx",
    "size_on_disk",
]
