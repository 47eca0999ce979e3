"""Quantization: int8 static / QAT through torchao PT2E, int8 dynamic and fp16 at the ONNX level.

Why the split:
- int8 static and QAT use PT2E (``X86InductorQuantizer``, per-channel symmetric int8 weights
  in 7 bits (``WEIGHT_QMIN``: exact on CPUs without VNNI), per-tensor uint8 activations).
  ``convert`` gives a GraphModule with quantize/dequantize ops that ``export.export_onnx``
  turns into a QDQ ONNX graph ONNX Runtime runs with int8 kernels.
- int8 dynamic through PT2E does NOT reach ONNX: the converted graph holds
  ``quantized_decomposed.choose_qparams.tensor``, which the dynamo ONNX exporter cannot
  translate (checked with torch 2.13 / torchao 0.18). So dynamic int8 is an ONNX-level step on
  the fp32 ONNX (``quantize_onnx_dynamic``: onnxruntime ``quantize_dynamic``, per-channel,
  which keeps cosine to fp32 well above per-tensor on transformer encoders).
- fp16 is weight storage only (``quantize_onnx_fp16``): half the file, same fp32 compute,
  because ONNX Runtime's CPU provider has few fp16 kernels.

Inputs are plain ``nn.Module`` s, module-ized ``fx.GraphModule`` s or
``ExportedProgram.module()`` graphs; each is re-captured with ``torch.export`` and a dynamic
batch dimension so calibration and training batches may have any size.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Inputs = tuple[torch.Tensor, ...]


def _quiet() -> contextlib.ExitStack:
    """Silence torchao's import-time chatter and PT2E warnings (they go to stdout/stderr)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


with _quiet(), contextlib.redirect_stdout(io.StringIO()):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as _xiq
    from torchao.quantization.pt2e import (
        disable_observer,
        enable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )
    from torchao.quantization.pt2e import qat_utils as _qat_utils
    from torchao.quantization.pt2e import utils as _pt2e_utils
    from torchao.quantization.pt2e.quantize_pt2e import (
        convert_pt2e,
        prepare_pt2e,
        prepare_qat_pt2e,
    )


# ---------------------------------------------------------------------------------------------
# Speed: torchao re-runs a strict torch.export of every rewrite pattern on every call. QAT
# convert exports 102 conv-bn patterns (conv1d/2d/transpose x 12 variants x match/replacement):
# ~15 s of CPU per convert on this machine, and every train()/eval() switch of an exported
# graph exports the batch-norm patterns again. The pattern graphs depend only on the pattern
# function (qualname + closure) and example shapes, so they are memoized per process, and
# conv-bn folding runs only for the conv kinds the graph actually contains. The patterns are
# also traced non-strict (``_export_pattern``): a pattern is a few aten calls on plain tensors,
# which the dynamo front end of a strict export only slows down (QAT convert of ResCNN 6.0 s ->
# 1.7 s, prepare 1.2 -> 0.7 s); the graphs are the same node for node once the ``_guards_fn``
# node non-strict export adds is dropped (checked on all 60 patterns of the conv1d/conv2d QAT
# and PTQ paths), and torchao itself drops that node the same way on torch 2.9.

_PATTERNS: dict[tuple[Any, ...], torch.fx.GraphModule] = {}
_ORIG_FOLD_HELPER = _qat_utils._fold_conv_bn_qat_helper
_ORIG_FUSE_HELPER = _qat_utils._fuse_conv_bn_qat_helper
_ORIG_UPDATE_QSPEC = _qat_utils._update_conv_input_qspec_map_after_replacement
_CONV_OPS = {
    torch.nn.functional.conv1d: torch.ops.aten.conv1d.default,
    torch.nn.functional.conv2d: torch.ops.aten.conv2d.default,
    torch.nn.functional.conv_transpose1d: torch.ops.aten.conv_transpose1d.default,
    torch.nn.functional.conv_transpose2d: torch.ops.aten.conv_transpose2d.input,
}


def _pattern_key(pattern: Any, example_inputs: Any, is_cuda: bool, kwargs: dict[str, Any]) -> Any:
    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), str(v.dtype), str(v.device))
        return v

    fn = getattr(pattern, "fn", pattern)  # torchao wraps pattern functions in WrapperModule
    if not callable(fn) or not hasattr(fn, "__code__"):
        raise TypeError("not a plain pattern function")
    cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
    return (
        fn.__code__,
        cells,
        fn.__defaults__,
        tuple(sig(v) for v in example_inputs),
        is_cuda,
        tuple(sorted((k, sig(v)) for k, v in kwargs.items())),
    )


def _export_pattern(
    pattern: Any, example_inputs: Any, is_cuda: bool = False, **kwargs: Any
) -> torch.fx.GraphModule:
    """``_get_aten_graph_module_for_pattern`` with a non-strict export (see the note above)."""
    if is_cuda:
        example_inputs = tuple(x.cuda() if isinstance(x, torch.Tensor) else x
                               for x in example_inputs)
    gm = torch.export.export(pattern, tuple(example_inputs), kwargs, strict=False).module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.name == "_guards_fn":
            gm.graph.erase_node(node)
            if hasattr(gm, "_guards_fn"):
                delattr(gm, "_guards_fn")
    gm.graph.eliminate_dead_code()
    # ep.module() adds copy_ nodes for mutated inputs; they mean nothing in a pattern.
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target == torch.ops.aten.copy_.default
                and not node.users):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _memo_pattern(
    pattern: Any, example_inputs: Any, is_cuda: bool = False, **kwargs: Any
) -> torch.fx.GraphModule:
    try:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        hash(key)
    except Exception:  # unhashable closure: no memo
        return _export_pattern(pattern, example_inputs, is_cuda, **kwargs)
    if key not in _PATTERNS:
        _PATTERNS[key] = _export_pattern(pattern, example_inputs, is_cuda, **kwargs)
    return copy.deepcopy(_PATTERNS[key])  # the rewriter may touch the pattern graph


def _has_conv(m: torch.fx.GraphModule, conv_fn: Any) -> bool:
    op = _CONV_OPS.get(conv_fn)
    return op is None or any(n.target == op for n in m.graph.nodes)


def _fold_helper_if_present(
    m: torch.fx.GraphModule, conv_fn: Any, example_inputs: Any, is_cuda: bool
) -> torch.fx.GraphModule:
    if not _has_conv(m, conv_fn):
        return m
    return _ORIG_FOLD_HELPER(m, conv_fn, example_inputs, is_cuda)


def _fuse_helper_if_present(
    m: torch.fx.GraphModule, conv_fn: Any, example_inputs: Any, is_cuda: bool
) -> torch.fx.GraphModule:
    if not _has_conv(m, conv_fn):
        return m
    return _ORIG_FUSE_HELPER(m, conv_fn, example_inputs, is_cuda)


def _update_qspec_if_quantized(original_node: torch.fx.Node,
                               replacement_node: torch.fx.Node) -> None:
    """torchao 0.18 bug: QAT conv-bn fusion copies the conv's input qspecs by position and
    raises ``IndexError`` when the conv is annotated *not* to be quantized (empty map: the
    depthwise convs of ``skip_depthwise``, EfficientNet's and DWCNN's conv-bn-act blocks).
    Such a conv keeps an empty map: it stays fp32, as annotated."""
    ann = original_node.meta.get("quantization_annotation")
    if ann is not None and not ann.input_qspec_map:
        new = replacement_node.meta.get("quantization_annotation")
        if new is not None:
            new.input_qspec_map = {}
        return
    _ORIG_UPDATE_QSPEC(original_node, replacement_node)


@contextlib.contextmanager
def _fast_patterns() -> Iterator[None]:
    saved = (_pt2e_utils._get_aten_graph_module_for_pattern,
             _qat_utils._get_aten_graph_module_for_pattern, _qat_utils._fold_conv_bn_qat_helper,
             _qat_utils._fuse_conv_bn_qat_helper,
             _qat_utils._update_conv_input_qspec_map_after_replacement)
    _pt2e_utils._get_aten_graph_module_for_pattern = _memo_pattern
    _qat_utils._get_aten_graph_module_for_pattern = _memo_pattern
    _qat_utils._fold_conv_bn_qat_helper = _fold_helper_if_present
    _qat_utils._fuse_conv_bn_qat_helper = _fuse_helper_if_present
    _qat_utils._update_conv_input_qspec_map_after_replacement = _update_qspec_if_quantized
    try:
        yield
    finally:
        (_pt2e_utils._get_aten_graph_module_for_pattern,
         _qat_utils._get_aten_graph_module_for_pattern,
         _qat_utils._fold_conv_bn_qat_helper,
         _qat_utils._fuse_conv_bn_qat_helper,
         _qat_utils._update_conv_input_qspec_map_after_replacement) = saved


# ---------------------------------------------------------------------------------------------
# capture helpers (also used by export.py and distill.py)


def batch_examples(example_inputs: Sequence[torch.Tensor]) -> Inputs:
    """Example inputs with a batch of at least 2.

    ``torch.export`` specializes a size-1 dimension to the constant 1, which would freeze the
    batch size of the captured graph; a batch of 2 keeps dim 0 symbolic.
    """
    out: list[torch.Tensor] = []
    for t in example_inputs:
        if t.dim() > 0 and t.shape[0] == 1:
            t = torch.cat([t, t], dim=0)
        # A copy: a slice of a big data tensor would drag its whole storage into the .pt2
        # (torch.export.save stores the example inputs).
        out.append(t.detach().clone().contiguous())
    return tuple(out)


def batch_dynamic_shapes(example_inputs: Sequence[torch.Tensor]) -> tuple[dict[int, Any], ...]:
    """dim 0 of every input is the batch: AUTO lets export keep it dynamic where it can
    (and specialize silently where the model itself fixes it, instead of failing)."""
    return tuple({0: torch.export.Dim.AUTO} if t.dim() > 0 else {} for t in example_inputs)


def capture(
    model: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with a dynamic batch dimension, model in its current mode."""
    ex = batch_examples(example_inputs)
    with _quiet():
        return torch.export.export(model, ex, dynamic_shapes=batch_dynamic_shapes(ex))


def set_training(model: nn.Module, mode: bool) -> nn.Module:
    """``model.train(mode)`` that also works on exported / PT2E graphs.

    ``ExportedProgram.module()`` and PT2E-prepared graphs refuse ``train()`` / ``eval()``;
    torchao's helpers rewrite the batch-norm and dropout ops in their graph instead.
    Fake-quant observers (QAT) follow the mode too: ranges are learned in training only, so
    evaluating a QAT student on held-out data does not move its quantization ranges.
    """
    try:
        model.train(mode)
    except NotImplementedError:
        assert isinstance(model, torch.fx.GraphModule)
        with _fast_patterns():
            if mode:
                move_exported_model_to_train(model)
            else:
                move_exported_model_to_eval(model)
    model.apply(enable_observer if mode else disable_observer)
    return model


# ---------------------------------------------------------------------------------------------
# PT2E int8


def is_depthwise_conv(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """True for ``aten.conv2d`` with groups == in_channels > 1 (weight shape (C, 1, k, k))."""
    if node.op != "call_function" or node.target != torch.ops.aten.conv2d.default:
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if not isinstance(groups, int) or groups <= 1:
        return False
    w = node.args[1]
    shape = None
    if isinstance(w, torch.fx.Node):
        if "val" in w.meta and hasattr(w.meta["val"], "shape"):
            shape = tuple(w.meta["val"].shape)
        elif w.op == "get_attr":
            shape = tuple(_get_attr(gm, str(w.target)).shape)
    return shape is not None and len(shape) == 4 and shape[1] == 1


def _get_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_PADDING_CONVS = {
    torch.ops.aten.conv1d.padding: torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.padding: torch.ops.aten.conv2d.default,
}


def explicit_conv_padding(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``aten.conv{1,2}d.padding`` (``padding="same"`` / ``"valid"``) into the
    ``.default`` overload with explicit padding; returns how many convs were rewritten.

    torchao's X86InductorQuantizer only matches ``aten.conv2d.default`` ("conv2d_2 is not an
    aten conv2d operator" otherwise), and EfficientNet / Keras-TF ports use ``"same"``.
    PyTorch pads ``"same"`` with ``total = dilation * (kernel - 1)`` per spatial dim, ``total //
    2`` before and the rest after; when that is symmetric it becomes the conv's padding
    argument, else an explicit ``constant_pad_nd`` in front of an unpadded conv (even
    kernels, some dilations). Either way the output is bit-for-bit the same computation.
    """
    n_done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _PADDING_CONVS:
            continue
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        args = dict(zip(names, node.args, strict=False))
        args.update(node.kwargs)
        weight = args["weight"]
        shape = weight.meta["val"].shape if isinstance(weight, torch.fx.Node) else None
        if shape is None:
            continue
        spatial = len(shape) - 2
        dilation = list(args.get("dilation", [1] * spatial))
        dilation = dilation * spatial if len(dilation) == 1 else dilation
        mode = args.get("padding", "valid")
        before, after = [0] * spatial, [0] * spatial
        if mode == "same":
            for i in range(spatial):
                total = int(dilation[i]) * (int(shape[2 + i]) - 1)
                before[i], after[i] = total // 2, total - total // 2
        x = args["input"]
        with gm.graph.inserting_before(node):
            if before != after:
                pads: list[int] = []
                for i in reversed(range(spatial)):  # constant_pad_nd: last dim first
                    pads += [before[i], after[i]]
                x = gm.graph.call_function(torch.ops.aten.constant_pad_nd.default,
                                           (x, pads, 0.0))
                before = [0] * spatial
            conv = gm.graph.call_function(
                _PADDING_CONVS[node.target],
                (x, weight, args.get("bias"), list(args.get("stride", [1] * spatial)), before,
                 dilation, int(args.get("groups", 1))),
            )
        conv.meta = dict(node.meta)
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        n_done += 1
    if n_done:
        gm.graph.lint()
        gm.recompile()
    return n_done


class _OrtX86Quantizer(_xiq.X86InductorQuantizer):
    """X86 recipe adjusted for ONNX Runtime.

    1. ``quantize_outputs``: the X86 (Inductor) recipe quantizes a conv/linear output only when
       the next op takes int8. ONNX Runtime fuses DQ -> Conv -> Q into ``QLinearConv`` only
       when the Q is there; otherwise it keeps the conv in fp32 and dequantizes its weights on
       every run (measured: ResCNN int8 at 0.7x the fp32 speed). So every quantized pattern's
       output gets an activation observer too, like onnxruntime ``quantize_static`` does.
    2. ``skip_depthwise``: depthwise convs (and the bn/act fused with them) stay fp32: marking
       them annotated-with-no-config first makes every pattern containing one skip itself.
    """

    def __init__(self, *, quantize_outputs: bool, skip_depthwise: bool) -> None:
        super().__init__()
        self.quantize_outputs = quantize_outputs
        self.skip_depthwise = skip_depthwise

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        if self.skip_depthwise:
            for node in model.graph.nodes:
                if is_depthwise_conv(node, model):
                    _xiq._annotate_nodes_not_quantize(node)
        super().annotate(model)
        if self.quantize_outputs and self.global_config is not None:
            _quantize_pattern_outputs(model, self.global_config.output_activation)
        return model


_HEADS = {
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv1d.default,
    torch.ops.aten.linear.default,
}
# Ops a conv/linear output may flow through before its quantize point: folded-away batch norm
# (QAT keeps it until convert), its getitem, and activations ONNX Runtime folds into QLinearConv.
_CHAIN = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    operator.getitem,
    torch.ops.aten.relu.default,
    torch.ops.aten.relu_.default,
    torch.ops.aten.hardtanh.default,
    torch.ops.aten.hardtanh_.default,
}
_ADDS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}


def _tail(node: torch.fx.Node) -> torch.fx.Node:
    """Last node of the chain conv -> [bn] -> [getitem] -> [relu/relu6] (single users only)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or user.target not in _CHAIN:
            break
        if user.target is operator.getitem and user.args[1] != 0:
            break
        node = user
    return node


def _set_output_qspec(node: torch.fx.Node, spec: Any) -> None:
    ann = node.meta.get(_xiq.QUANT_ANNOTATION_KEY)
    if ann is None:
        ann = _xiq._X86InductorQuantizationAnnotation(_annotated=True)
        node.meta[_xiq.QUANT_ANNOTATION_KEY] = ann
    if ann.output_qspec is None:
        ann.output_qspec = spec


def _quantize_at_tail(head: torch.fx.Node, spec: Any) -> torch.fx.Node:
    """Put the output quantize point of ``head``'s chain on its tail, and only there.

    The X86 QAT recipe annotates the output of conv-bn (and conv-bn-add) itself, and matches
    the activation after it only when it comes from an ``nn.ReLU`` / ``nn.ReLU6`` module
    (source partitions): after a functional ``torch.relu`` the quantize point stays on the
    bn / add output. Adding a second one after the relu would give ONNX
    DQ -> Conv -> Q -> DQ -> Relu -> Q, an extra requantize per block that ORT cannot fold
    (ResCNN QAT int8 was 1.27x slower at batch 1, 1.44x at batch 64, than PTQ).
    """
    tail = _tail(head)
    node = head
    while node is not tail:  # single-user chain (see _tail)
        ann = node.meta.get(_xiq.QUANT_ANNOTATION_KEY)
        if ann is not None:
            ann.output_qspec = None
        node = next(iter(node.users))
    _set_output_qspec(tail, spec)
    return tail


def _is_quantized_head(node: torch.fx.Node) -> bool:
    ann = node.meta.get(_xiq.QUANT_ANNOTATION_KEY)
    return (
        node.op == "call_function"
        and node.target in _HEADS
        and ann is not None
        and bool(ann.input_qspec_map)
    )


def _is_excluded(node: torch.fx.Node) -> bool:
    """A conv/linear explicitly left in fp32 (annotated, but with no quantized inputs)."""
    ann = node.meta.get(_xiq.QUANT_ANNOTATION_KEY)
    return (
        node.op == "call_function"
        and node.target in _HEADS
        and ann is not None
        and ann._annotated
        and not ann.input_qspec_map
    )


def _quantize_pattern_outputs(model: torch.fx.GraphModule, spec: Any) -> None:
    """Give every quantized conv/linear (after its bn/activation) and every residual add fed
    by one a quantized output, so the ONNX graph has DQ -> op -> Q groups ORT can fuse."""
    quantized: set[torch.fx.Node] = set()
    for node in model.graph.nodes:
        if _is_quantized_head(node):
            tail = _tail(node)
            if any(_is_excluded(u) for u in tail.users):
                # ORT re-quantizes an fp32 conv that sits between DQ and Q (its
                # WeightBiasQuantization pass): an excluded conv must get a float input.
                continue
            quantized.add(_quantize_at_tail(node, spec))
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS:
            continue
        tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(tensors) != 2 or not any(t in quantized for t in tensors):
            continue
        ann = node.meta.get(_xiq.QUANT_ANNOTATION_KEY)
        if ann is None:
            ann = _xiq._X86InductorQuantizationAnnotation(_annotated=True)
            node.meta[_xiq.QUANT_ANNOTATION_KEY] = ann
        for t in tensors:  # QLinearAdd needs both inputs int8
            if t not in quantized and t not in ann.input_qspec_map:
                ann.input_qspec_map[t] = spec
        _quantize_at_tail(node, spec)


# int8 weights restricted to 7 bits [-64, 63] (ONNX Runtime's ``reduce_range``). On x86 CPUs
# without VNNI (AVX2, AVX-512F) ORT's u8 x s8 kernels add pairs of products in int16
# (vpmaddubsw): 255 * 127 * 2 = 64,770 overflows 32,767 and saturates. Measured on this
# project's AVX2 machine (AMD EPYC, 2026-12-02), ResCNN int8: ORT vs the torch reference max
# abs logit difference 5.41 with full-range weights, 0.18 with 7-bit weights (2.58 with 7-bit
# activations instead, torchao's ``reduce_range``). The artifact runs on the user's CPU, not
# the worker's, so it is built to be exact on every x86 CPU; per-channel scales keep the
# accuracy cost small (ResCNN test accuracy 89.3 % vs 89.9 % full range, fp32 89.4 %).
WEIGHT_QMIN, WEIGHT_QMAX = -64, 63


def _seven_bit_weights(config: Any) -> Any:
    import dataclasses

    weight = dataclasses.replace(config.weight, quant_min=WEIGHT_QMIN, quant_max=WEIGHT_QMAX)
    return dataclasses.replace(config, weight=weight)


def _quantizer(
    *, is_qat: bool, skip_depthwise: bool, quantize_outputs: bool = True
) -> _xiq.X86InductorQuantizer:
    config = _seven_bit_weights(
        _xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat))
    with _quiet():
        return _OrtX86Quantizer(
            quantize_outputs=quantize_outputs, skip_depthwise=skip_depthwise
        ).set_global(config)


def quantize_static(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    calib: Iterable[Sequence[torch.Tensor]],
    *,
    skip_depthwise: bool = False,
    quantize_outputs: bool = True,
) -> torch.fx.GraphModule:
    """int8 static PT2E: capture (eval mode), insert observers, run ``calib`` batches, convert.

    Returns the converted GraphModule (quantize/dequantize ops, batch norm folded); export it
    with ``export.export_onnx`` for a QDQ ONNX graph. The input model is not modified.
    """
    set_training(model, False)
    gm = capture(model, example_inputs).module()
    explicit_conv_padding(gm)
    with _quiet(), _fast_patterns():
        prepared = prepare_pt2e(gm, _quantizer(is_qat=False, skip_depthwise=skip_depthwise,
                                               quantize_outputs=quantize_outputs))
    n = 0
    with torch.no_grad():
        for batch in calib:
            prepared(*batch)
            n += 1
    if n == 0:
        raise ValueError("quantize_static needs at least one calibration batch")
    return convert(prepared)


def prepare_qat(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], *, skip_depthwise: bool = False
) -> torch.fx.GraphModule:
    """Fake-quant GraphModule for quantization-aware training (conv+bn kept foldable).

    Captured in train mode; train it with the usual optimizer loop (``set_training`` switches
    batch-norm / dropout modes), then ``convert`` it.
    """
    set_training(model, True)
    try:
        gm = capture(model, example_inputs).module()
    finally:
        set_training(model, False)
    explicit_conv_padding(gm)
    with _quiet(), _fast_patterns():
        return prepare_qat_pt2e(gm, _quantizer(is_qat=True, skip_depthwise=skip_depthwise))


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Observed / fake-quant graph -> quantized reference graph (eval mode, weights int8)."""
    set_training(prepared, False)
    with _quiet(), _fast_patterns():
        out = convert_pt2e(prepared)
    set_training(out, False)
    _drop_unused_tensors(out)
    return out


def _drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers no node reads any more.

    After convert the graph reads the int8 copies of the weights; the fp32 originals stay
    registered and ``torch.export`` would store both in the .pt2 (int8 archive > fp32).
    """
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]


# ---------------------------------------------------------------------------------------------
# ONNX-level quantization (onnxruntime.quantization)


# Op types onnxruntime's dynamic (IntegerOps) quantizer handles: its ``IntegerOpsRegistry``
# (onnxruntime.quantization.registry; ORT 1.2x-1.3x) holds MatMul, Attention, LSTM and the
# common Gather (embedding tables) / EmbedLayerNormalization; Gemm is rewritten to
# MatMul + Add first (IntegerOps mode does that itself). GRU / RNN have no int8 kernel there.
# Conv (``ConvInteger``) is left out on purpose: on this CPU it ran 5-8x SLOWER than the fp32
# Conv (plain CNN 35.8 vs 7.3 ms, MobileNetV2 19.1 vs 2.3 ms at batch 8, ORT 1.32), so it
# could only ever produce a smaller, slower artifact the planner must reject; conv nets get
# int8 from the static schemes instead.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm", "Gather", "LSTM", "Attention", "EmbedLayerNormalization")
_NO_INT8_KERNEL = ("GRU", "RNN")  # recurrent ops ORT's dynamic quantizer cannot quantize


def quantize_onnx_dynamic(src: Path, dst: Path, *, per_channel: bool = True) -> Path:
    """int8 dynamic (weights int8, activations quantized at run time) on an fp32 ONNX file.

    Quantizes every op type of ``DYNAMIC_OP_TYPES`` whose weight is a constant: Linear layers
    (``MatMulInteger``), token-embedding tables (Gather on an int8 table + DequantizeLinear)
    and LSTM weights. The file first goes through onnxruntime's ``quant_pre_process`` (shape
    inference and constant folding): the dynamo exporter computes LSTM weights from the flat
    parameter with Slice/Concat nodes, and ORT only quantizes an LSTM whose W and R are
    initializers. Per-channel weights by default (DESIGN §6: cosine 0.993 vs 0.964 per-tensor
    on a BERT encoder, same size and speed).

    >>> quantize_onnx_dynamic(Path("fp32.onnx"), Path("int8.onnx"))  # doctest: +SKIP
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):
            # Symbolic shape inference is skipped: it fails on some exporter graphs and the
            # dynamic quantizer does not need shapes (onnx shape inference still runs).
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            quantize_dynamic(
                pre,
                dst,
                per_channel=per_channel,
                reduce_range=True,  # 7-bit weights: exact on non-VNNI CPUs (WEIGHT_QMIN)
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(DYNAMIC_OP_TYPES),
            )
    finally:
        pre.unlink(missing_ok=True)
    return dst


def fp32_leftovers(path: Path) -> dict[str, int]:
    """Layers of an ONNX file that keep fp32 weights although they hold most of its bytes:
    op type -> count, for GRU/RNN (no ORT int8 kernel) and float MatMul/Gemm/Gather/LSTM/Conv
    whose constant weight was left unquantized. Used to tell the user what a scheme missed."""
    import onnx

    model = onnx.load(str(path))
    floats = {i.name for i in model.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}
    weight_input = {"MatMul": 1, "Gemm": 1, "Gather": 0, "LSTM": 1, "Conv": 1}
    out: dict[str, int] = {}
    for node in model.graph.node:
        k = weight_input.get(node.op_type)
        if node.op_type in _NO_INT8_KERNEL or (
            k is not None and len(node.input) > k and node.input[k] in floats
        ):
            out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


class _Reader:
    """onnxruntime CalibrationDataReader over feed dicts."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_onnx_static(
    src: Path,
    dst: Path,
    calib: Iterable[dict[str, np.ndarray]],
    *,
    per_channel: bool = True,
    skip_depthwise: bool = False,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """onnxruntime ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations).

    The route for ONNX-only uploads, and the baseline the PT2E path is compared against.
    ``skip_depthwise`` excludes Conv nodes with group == input channels > 1;
    ``nodes_to_exclude`` (node names) stay fp32 as well.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    exclude: list[str] = list(nodes_to_exclude)
    if skip_depthwise:
        model = onnx.load(str(src))
        inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type != "Conv":
                continue
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            w = inits.get(node.input[1])
            if group > 1 and w is not None and len(w.dims) == 4 and w.dims[1] == 1:
                exclude.append(node.name)
    dst = Path(dst)
    with _quiet():
        quantize_static(
            Path(src),
            dst,
            _Reader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=True,  # 7-bit weights: exact on non-VNNI CPUs (WEIGHT_QMIN)
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
        )
    return dst


def quantize_onnx_fp16(src: Path, dst: Path, *, min_elements: int = 16) -> Path:
    """Store float32 initializers as float16 with a Cast back to float32 in front of their users.

    Half the weight bytes on disk; ONNX Runtime folds the casts at session load, so compute
    stays fp32 (CPU fp16 kernels are sparse) and the speed is that of the fp32 model.
    Tensors smaller than ``min_elements`` (scalars, shapes) are left alone.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    new_inits = []
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            new_inits.append(init)
            continue
        arr = numpy_helper.to_array(init).astype(np.float16)
        half = numpy_helper.from_array(arr, name=init.name + "__fp16")
        new_inits.append(half)
        casts.append(
            helper.make_node(
                "Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=init.name + "__cast"
            )
        )
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)
