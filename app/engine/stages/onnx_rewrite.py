"""Graph rewrites on an exported ONNX model that ONNX Runtime does not do itself.

Zero ``Pad`` before ``Conv``: transformers' TF-style padding (MobileNetV2 ``tf_padding``) and
the explicit padding that replaces ``padding="same"`` before PT2E (EfficientNet) export as
``Pad -> Conv``. In fp32 ONNX Runtime folds that pair itself, but in a QDQ graph the pattern
is ``Pad -> QuantizeLinear -> DequantizeLinear -> Conv``: its fusion rule does not look through
the Q/DQ pair, so every such layer runs a fp32 Pad between a dequantize and a requantize. On
transformers' MobileNetV2 (52 of them) that made the int8 model 1.3-1.6x *slower* than fp32 at
batch 8, where ONNX Runtime's own quantization of the same network (no Pad) is 1.2x faster.

Folding is exact: quantizing a zero gives the zero point, and a quantized convolution pads
with the zero point, so ``Q(pad(x, 0)) == pad(Q(x), zero_point)``.

Whole-input ``AveragePool``: transformers' EfficientNet pools with
``nn.AvgPool2d(hidden_dim, ceil_mode=True)``, a 640 x 640 kernel on a 1 x 1 map. fp32 ONNX
Runtime clips the window to the input (as torch does), but its int8 ``QLinearAveragePool``
returns zeros for it: every int8 EfficientNet, ONNX Runtime's own ``quantize_static`` included,
predicted one class (8.5 % on digits). A pool whose one window covers the whole input is a
``GlobalAveragePool``, which has no such problem.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def fold_zero_pads(proto: onnx.ModelProto) -> int:
    """Move constant-zero spatial ``Pad`` nodes into the ``pads`` of the Conv(s) they feed.

    Handles ``Pad -> Conv`` and ``Pad -> QuantizeLinear -> DequantizeLinear -> Conv`` where
    every consumer on the way is the only one. Pads that are negative, non-constant, non-zero
    valued or touch the batch/channel dims are left alone. Returns the number folded.
    """
    graph = proto.graph
    consts = _constants(graph)
    outputs = {o.name for o in graph.output}
    consumers = _consumers(graph)  # kept current below: each fold rewires one value's readers
    folded = 0
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        spatial = _zero_spatial_pads(pad, consts)
        if spatial is None:
            continue
        convs = _conv_targets(pad, consumers, outputs)
        if convs is None or any(len(_conv_pads(c, len(spatial))) != len(spatial) for c in convs):
            continue
        for conv in convs:
            _add_conv_pads(conv, spatial)
        # Bypass the Pad: whatever read its output now reads its input.
        for node in consumers.pop(pad.output[0]):
            for i, name in enumerate(node.input):
                if name == pad.output[0]:
                    node.input[i] = pad.input[0]
            consumers[pad.input[0]].append(node)
        consumers[pad.input[0]].remove(pad)
        graph.node.remove(pad)
        folded += 1
    if folded:
        _drop_unused_initializers(graph)
    return folded


def global_average_pools(proto: onnx.ModelProto) -> int:
    """Turn ``AveragePool`` nodes whose single window covers the whole (static) input into
    ``GlobalAveragePool``. Returns the number rewritten."""
    pools = [n for n in proto.graph.node if n.op_type == "AveragePool"]
    if not pools:
        return 0
    shapes = _static_shapes(proto)
    done = 0
    for node in pools:
        spatial = shapes.get(node.input[0], ())[2:]
        if spatial and _covers_whole_input(node, spatial):
            node.op_type = "GlobalAveragePool"
            del node.attribute[:]
            done += 1
    return done


def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes from ONNX shape inference, symbolic dims as -1 (the batch)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    out: dict[str, tuple[int, ...]] = {}
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    for vi in infos:
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return out


def _covers_whole_input(node: onnx.NodeProto, spatial: tuple[int, ...]) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    n = len(spatial)
    strides = list(attrs.get("strides", [1] * n))
    pads = list(attrs.get("pads", [0] * 2 * n))
    dilations = list(attrs.get("dilations", [1] * n))
    ceil = bool(attrs.get("ceil_mode", 0))
    if (len(kernel) != n or any(p != 0 for p in pads) or any(d != 1 for d in dilations)
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or any(h <= 0 for h in spatial)):
        return False
    # Output size per dim: (h - k) / st + 1, rounded down (floor mode) or up (ceil mode). With
    # k >= h that is one window (starting at 0, covering the input) iff k == h, or in ceil
    # mode iff k - h < st.
    return all(k == h or (ceil and h < k < h + st)
               for h, k, st in zip(spatial, kernel, strides, strict=True))


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _zero_spatial_pads(pad: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[int] | None:
    """``[x1_begin, ..., x1_end, ...]`` (Conv's ``pads`` layout) or None if not foldable."""
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(pad.input) < 2 or pad.input[1] not in consts:
        return None
    if len(pad.input) > 3 and pad.input[3]:  # explicit axes: rare, not worth mapping
        return None
    if len(pad.input) > 2 and pad.input[2]:
        value = consts.get(pad.input[2])
        if value is None or np.any(value != 0):
            return None
    pads = [int(v) for v in consts[pad.input[1]].reshape(-1)]
    rank = len(pads) // 2
    if rank < 3 or any(v < 0 for v in pads):
        return None
    begin, end = pads[:rank], pads[rank:]
    if begin[:2] != [0, 0] or end[:2] != [0, 0]:  # batch or channel padding
        return None
    return begin[2:] + end[2:]


def _only(consumers: dict[str, list[onnx.NodeProto]], name: str, op: str
          ) -> onnx.NodeProto | None:
    nodes = consumers.get(name, [])
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None


def _conv_targets(pad: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                  outputs: set[str]) -> list[onnx.NodeProto] | None:
    out = pad.output[0]
    if out in outputs:
        return None
    direct = _only(consumers, out, "Conv")
    if direct is not None:
        convs = [direct]
        value = out
    else:
        q = _only(consumers, out, "QuantizeLinear")
        dq = _only(consumers, q.output[0], "DequantizeLinear") if q is not None else None
        if q is None or dq is None or {q.output[0], dq.output[0]} & outputs:
            return None
        value = dq.output[0]
        convs = consumers.get(value, [])
        if not convs or any(c.op_type != "Conv" for c in convs):
            return None
    for conv in convs:
        auto_pad = next((a.s for a in conv.attribute if a.name == "auto_pad"), b"NOTSET")
        if conv.input[0] != value or auto_pad != b"NOTSET" or value in conv.input[1:]:
            return None
    return convs


def _conv_pads(conv: onnx.NodeProto, n: int) -> list[int]:
    attr = next((a for a in conv.attribute if a.name == "pads"), None)
    return list(attr.ints) if attr is not None else [0] * n


def _add_conv_pads(conv: onnx.NodeProto, spatial: list[int]) -> None:
    new = [a + b for a, b in zip(_conv_pads(conv, len(spatial)), spatial, strict=True)]
    for attr in [a for a in conv.attribute if a.name == "pads"]:
        conv.attribute.remove(attr)
    conv.attribute.append(onnx.helper.make_attribute("pads", new))


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
