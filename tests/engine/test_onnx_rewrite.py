"""fold_zero_pads on hand-built graphs: exact where it folds, untouched where it must not."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.engine.stages.onnx_rewrite import fold_zero_pads, global_average_pools

pytestmark = pytest.mark.engine

_RNG = np.random.default_rng(0)
_W = _RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


def _graph(pads: list[int], *, value: float = 0.0, mode: str = "constant",
           qdq: bool = False) -> onnx.ModelProto:
    """x -> Pad -> [Q -> DQ ->] Conv(stride 2, pads 1,0,0,1) -> y."""
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"], mode=mode)]
    conv_in = "p"
    inits = [numpy_helper.from_array(np.array(pads, np.int64), "pads"),
             numpy_helper.from_array(np.array(value, np.float32), "value"),
             numpy_helper.from_array(_W, "w")]
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "zp")]
        nodes += [helper.make_node("QuantizeLinear", ["p", "s", "zp"], ["pq"]),
                  helper.make_node("DequantizeLinear", ["pq", "s", "zp"], ["pd"])]
        conv_in = "pd"
    nodes.append(helper.make_node("Conv", [conv_in, "w"], ["y"], strides=[2, 2],
                                  pads=[1, 0, 0, 1]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run as written
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


@pytest.mark.parametrize("qdq", [False, True])
def test_asymmetric_zero_pad_folds_into_conv_exactly(qdq: bool) -> None:
    x = _RNG.standard_normal((2, 3, 9, 9)).astype(np.float32)
    model = _graph([0, 0, 0, 2, 0, 0, 1, 1], qdq=qdq)  # H: 0 before 1 after, W: 2 before 1
    before = _run(model, x)
    assert fold_zero_pads(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Pad" not in ops
    conv = model.graph.node[-1]
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [1, 2, 1, 2]
    assert {i.name for i in model.graph.initializer}.isdisjoint({"pads", "value"})
    np.testing.assert_array_equal(_run(model, x), before)


@pytest.mark.parametrize("case", [
    {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 1.0},  # pads with ones, not zeros
    {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "reflect"},
    {"pads": [0, 1, 0, 0, 0, 0, 0, 0]},  # a channel, not a spatial pad
    {"pads": [0, 0, -1, 0, 0, 0, 0, 0]},  # a crop
])
def test_pads_that_are_not_zero_spatial_padding_stay(case: dict) -> None:
    model = _graph(**case)
    assert fold_zero_pads(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Pad", "Conv"]


def _pool_graph(kernel: int, stride: int, size: int, *, qdq: bool) -> onnx.ModelProto:
    """x -> [Q -> DQ ->] AveragePool(ceil_mode) [-> Q -> DQ] -> y, as EfficientNet's pooler."""
    nodes, src = [], "x"
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp")]
    if qdq:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"])]
        src = "xd"
    pooled = "y" if not qdq else "p"
    nodes.append(helper.make_node("AveragePool", [src], [pooled], kernel_shape=[kernel, kernel],
                                  strides=[stride, stride], ceil_mode=1, count_include_pad=1))
    if qdq:
        nodes += [helper.make_node("QuantizeLinear", ["p", "s", "zp"], ["pq"]),
                  helper.make_node("DequantizeLinear", ["pq", "s", "zp"], ["y"])]
    out = -(-(size - kernel) // stride) + 1 if size > kernel else 1
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, out, out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def _run_optimized(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


@pytest.mark.parametrize(("kernel", "stride", "size"), [(640, 640, 1), (640, 640, 3), (3, 1, 3),
                                                     (4, 2, 3)])
def test_whole_input_average_pool_becomes_global(kernel: int, stride: int, size: int) -> None:
    """ORT's QLinearAveragePool returns zeros for a window larger than its input (the int8
    EfficientNet predicted one class); GlobalAveragePool computes the same mean as fp32."""
    x = np.abs(_RNG.standard_normal((2, 8, size, size))).astype(np.float32)
    fp32 = _pool_graph(kernel, stride, size, qdq=False)
    int8 = _pool_graph(kernel, stride, size, qdq=True)
    want = _run(fp32, x)
    np.testing.assert_allclose(want, x.mean((2, 3), keepdims=True), rtol=1e-6)
    if kernel > size:  # as ONNX Runtime runs it by default (fused, int8): wrong (640: zeros)
        broken = _run_optimized(int8, x)
        assert np.abs(broken - want).max() > 0.1, "ORT fixed QLinearAveragePool: rewrite moot"
    for model in (fp32, int8):
        assert global_average_pools(model) == 1
        assert "AveragePool" not in [n.op_type for n in model.graph.node]
    np.testing.assert_allclose(_run(fp32, x), want, rtol=1e-6)
    np.testing.assert_allclose(_run_optimized(int8, x), want, atol=0.02)  # one int8 step


@pytest.mark.parametrize(("kernel", "stride", "size"), [(2, 2, 4), (2, 1, 3), (4, 2, 5),
                                                     (4, 1, 2)])
def test_average_pools_with_several_windows_stay(kernel: int, stride: int, size: int) -> None:
    model = _pool_graph(kernel, stride, size, qdq=False)
    assert global_average_pools(model) == 0
    assert [n.op_type for n in model.graph.node] == ["AveragePool"]
