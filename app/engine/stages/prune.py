"""Prune stage: structured channel pruning (Torch-Pruning) and unstructured magnitude masks.

Structured pruning removes whole output channels of convolutions / linear layers together
with everything coupled to them (batch-norm channels, the next layer's input channels, the
other side of a residual add, the slice of a concat): the model gets physically smaller and
faster in every runtime. Unstructured pruning only zeroes weights: same shapes, same
speed; it pays off only once a compressor (zip, int8 + entropy coding) sees the zeros.

Which layers may change width is decided on the FX graph before Torch-Pruning runs
(:func:`unsafe_layers`): a layer is kept at full width when its output channels reach
something Torch-Pruning cannot follow (the graph output, a view/reshape with widths baked in,
attention internals, a tensor that is not a layer output), so attention projections and the
transformer embedding width stay intact while the FFN width is pruned.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.fx import GraphModule, Node

from app.engine.errors import EngineError, InvalidModel, InvalidRecipe
from app.engine.graph import modularize_module
from app.engine.types import Importance, ProgressFn, PruneMode

aten = torch.ops.aten

__all__ = [
    "PruneConfig", "has_dynamic_batch", "prune", "reexport", "sparsity", "unsafe_layers",
]

_STAGE = "prune"


@dataclass(frozen=True)
class PruneConfig:
    """ratio: fraction of output channels removed from every prunable layer group
    (structured) or of all conv/linear weights zeroed, ranked globally (unstructured);
    in [0, 0.95]. round_to (structured): a pruned layer keeps the multiple of round_to
    nearest to width * (1 - ratio), at least round_to channels, so a layer of 24 channels at
    ratio 0.7 keeps 8 and one of 8 channels is never pruned; 0 or 1 disables rounding."""

    ratio: float
    mode: PruneMode = "structured"
    importance: Importance = "l2"
    round_to: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 0.95:
            raise InvalidRecipe(f"prune ratio must be in [0, 0.95], got {self.ratio}")
        if self.mode not in ("structured", "unstructured"):
            raise InvalidRecipe(f"unknown prune mode {self.mode!r}")
        if self.importance not in ("l2", "taylor"):
            raise InvalidRecipe(f"unknown importance {self.importance!r}")
        if self.round_to < 0:
            raise InvalidRecipe(f"round_to must be >= 0, got {self.round_to}")


def prune(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    config: PruneConfig,
    *,
    grad_batches: Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]] | None = None,
    on_progress: ProgressFn | None = None,
) -> nn.Module:
    """Return a pruned copy of ``model`` (the argument is never modified), in eval mode.

    ``model`` may be any ``nn.Module`` (it is exported and module-ized first), an
    ``ExportedProgram.module()`` or the output of :func:`app.engine.graph.modularize`.
    Structured mode returns a ``torch.fx.GraphModule`` with fewer channels; the output layer
    and the model's input/output shapes never change. For ``importance="taylor"``,
    ``grad_batches`` holds (inputs, target) pairs: integer class targets give cross-entropy;
    float targets of shape (N, C) (teacher logits) give cross-entropy to the teacher's top-1,
    which unlike KL/MSE to the model's own logits has a non-zero gradient; other float targets
    give MSE. Taylor without usable gradients falls back to L2 magnitude.
    """
    report = on_progress or _no_progress
    report(_STAGE, 0.0, f"{config.mode} pruning, ratio {config.ratio:g}")
    net = _working_copy(model, example_inputs)
    if config.ratio == 0.0:
        report(_STAGE, 1.0, "ratio 0: nothing pruned")
        return net.eval()
    if config.mode == "unstructured":
        _prune_unstructured(net, config.ratio)
        report(_STAGE, 1.0, f"weights zeroed: {sparsity(net):.3f}")
        return net.eval()

    before = _count_params(net)
    out_before = _output_shapes(net, example_inputs)
    ignored = unsafe_layers(net)
    report(_STAGE, 0.2, f"{len(ignored)} layers kept at full width")
    importance = _importance(config, net, grad_batches)
    try:
        with warnings.catch_warnings():
            # Non-layer parameters (a positional embedding) make TP warn that it would prune
            # their last axis; the ignore analysis above keeps them out of every pruned group.
            warnings.simplefilter("ignore")
            pruner = tp.pruner.BasePruner(
                net,
                example_inputs,
                importance=importance,
                pruning_ratio=config.ratio,
                pruning_ratio_dict=_layer_ratios(net, ignored, config),
                ignored_layers=ignored,
                round_to=config.round_to if config.round_to > 1 else None,
                global_pruning=False,
            )
        if isinstance(importance, tp.importance.GroupTaylorImportance):
            report(_STAGE, 0.4, "taylor: accumulating gradients")
            if not _accumulate_grads(net, grad_batches or ()):
                pruner.importance = tp.importance.GroupMagnitudeImportance(p=2)
        report(_STAGE, 0.6, "removing channels")
        with torch.no_grad():
            pruner.step()
    except EngineError:
        raise
    except Exception as exc:  # Torch-Pruning on a graph it cannot follow
        raise InvalidRecipe(
            f"structured pruning failed on this model ({type(exc).__name__}: {exc}); "
            "use mode='unstructured' or ratio 0",
            details={"stage": _STAGE},
        ) from exc
    net.zero_grad(set_to_none=True)
    net.recompile()
    net.eval()
    try:
        out_after = _output_shapes(net, example_inputs)
    except Exception as exc:  # a width baked into the graph that the analysis missed
        raise InvalidRecipe(
            f"the pruned model no longer runs ({type(exc).__name__}: {exc})",
            details={"stage": _STAGE},
        ) from exc
    if out_after != out_before:  # a guard: the ignore analysis must make this impossible
        raise InvalidRecipe(
            f"pruning changed the output shapes {out_before} -> {out_after}",
            details={"before": str(out_before), "after": str(out_after)},
        )
    after = _count_params(net)
    report(_STAGE, 1.0, f"parameters {before} -> {after}")
    return net


def reexport(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, strict: bool = False
) -> torch.export.ExportedProgram:
    """Export ``model`` (in eval mode) with a dynamic batch dimension (dim 0) on every input.

    A graph that pins the batch size itself (a ``.pt2`` exported with a fixed batch whose
    reshapes bake the number in, e.g. attention) cannot get a dynamic batch: then the
    program is exported with static shapes (``strict=False``, check
    :func:`has_dynamic_batch`) or :class:`InvalidModel` is raised (``strict=True``).
    """
    model = model.eval()
    try:
        return _export_dynamic_batch(model, tuple(example_inputs))
    except Exception as exc:  # specialization errors come in several classes
        if strict:
            raise InvalidModel(
                f"the model cannot be exported with a dynamic batch size: {exc}"
            ) from exc
        return torch.export.export(model, tuple(example_inputs))


def has_dynamic_batch(ep: torch.export.ExportedProgram) -> bool:
    """True when dim 0 of every tensor input of ``ep`` is symbolic."""
    specs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for s in specs:
        node = placeholders.get(getattr(s.arg, "name", ""))
        val = None if node is None else node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], int):
            return False
    return True


def _export_dynamic_batch(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    if any(t.dim() == 0 for t in inputs):
        raise InvalidModel("a scalar input has no batch dimension")
    # A batch of 1 would be specialized (0/1 specialization): export on a batch of 2.
    if inputs and inputs[0].shape[0] == 1:
        inputs = tuple(t.expand(2, *t.shape[1:]).contiguous() for t in inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return torch.export.export(model, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all conv / linear weight tensors."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------------------------
# working copy


def _no_progress(stage: str, fraction: float, message: str) -> None:
    return None


def _working_copy(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...]
) -> GraphModule:
    """A private, module-ized copy: real layers, no storage shared with ``model``."""
    if isinstance(model, GraphModule):
        has_aten_layers = any(
            n.op == "call_function"
            and n.target in (aten.conv2d.default, aten.linear.default, aten.convolution.default)
            for n in model.graph.nodes
        )
        if has_aten_layers or any(
            n.op == "call_module" and n.target == "_guards_fn" for n in model.graph.nodes
        ):
            return modularize_module(model)  # builds fresh tensors
        with warnings.catch_warnings():
            # torch's own pytree spec (kept for the call signature) warns on deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            return copy.deepcopy(model)
    training = model.training
    model.eval()
    try:
        try:  # a dynamic batch keeps the pruned graph usable at any batch size
            ep = _export_dynamic_batch(model, tuple(example_inputs))
        except Exception:
            ep = torch.export.export(model, tuple(example_inputs))
    finally:
        model.train(training)
    return modularize_module(ep.module())


def _layer_ratios(
    model: nn.Module, ignored: list[nn.Module], config: PruneConfig
) -> dict[nn.Module, float]:
    """Per-layer ratios whose kept widths are the nearest multiple of ``round_to`` (at least
    one multiple). Torch-Pruning itself rounds the kept width *down*, which at high ratios
    on narrow layers rounds it to zero and then silently skips the layer."""
    skip = {id(m) for m in ignored}
    out: dict[nn.Module, float] = {}
    step = max(config.round_to, 1)
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Linear):
            width = m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            width = m.out_channels
        else:
            continue
        keep = max(step, int(width * (1.0 - config.ratio) / step + 0.5) * step)
        # TP keeps int(width * (1 - r)) channels: aim half a channel above to dodge float error
        out[m] = 0.0 if keep >= width else 1.0 - (keep + 0.5) / width
    return out


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _output_shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
    with torch.no_grad():
        out = model(*inputs)
    leaves = torch.utils._pytree.tree_leaves(out)  # tuples, lists and dicts of outputs
    return [tuple(o.shape) for o in leaves if isinstance(o, torch.Tensor)]


# --------------------------------------------------------------------------------------------
# unstructured


def _prune_unstructured(model: nn.Module, ratio: float) -> None:
    """Zero the ``ratio`` smallest-magnitude conv/linear weights, ranked globally."""
    import torch.nn.utils.prune as tprune

    params = [
        (m, "weight")
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    if not params:
        raise InvalidRecipe("unstructured pruning found no conv or linear layers")
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=ratio)
    for m, name in params:
        tprune.remove(m, name)  # permanent: the mask is folded into the weight


# --------------------------------------------------------------------------------------------
# importance (taylor needs gradients of a loss)


def _importance(
    config: PruneConfig, model: nn.Module,
    grad_batches: Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]] | None,
) -> Any:
    if config.importance == "taylor":
        if not grad_batches:
            raise InvalidRecipe("taylor importance needs grad_batches (inputs, targets)")
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not target.is_floating_point():
        return nn.functional.cross_entropy(out, target)
    if out.dim() == 2 and target.shape == out.shape and out.shape[1] > 1:
        return nn.functional.cross_entropy(out, target.argmax(dim=1))
    return nn.functional.mse_loss(out, target)


def _accumulate_grads(
    model: nn.Module, batches: Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]]
) -> bool:
    """Sum loss gradients over the batches into ``.grad``; False when they are all zero.

    Run in eval mode: batch-norm statistics stay frozen (importance must not move them).
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for inputs, target in batches:
            # the first output is the one the targets describe (the logits)
            first = torch.utils._pytree.tree_leaves(model(*inputs))[0]
            _loss(first, target).backward()
    total = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
    return total > 0.0


# --------------------------------------------------------------------------------------------
# which layers may change width: a channel-space analysis of the FX graph


class _Spaces:
    """Union-find over "channel spaces": sets of tensors whose channel axis must be pruned
    identically. Each space remembers the layers whose output channels define it and whether
    anything in it forbids pruning."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.unsafe: list[bool] = []
        self.producers: list[list[str]] = []
        self.children: list[list[int]] = []  # concat: output space -> input spaces

    def new(self, producer: str | None = None, unsafe: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.unsafe.append(unsafe)
        self.producers.append([producer] if producer else [])
        self.children.append([])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self.parent[rb] = ra
        self.unsafe[ra] = self.unsafe[ra] or self.unsafe[rb]
        self.producers[ra] += self.producers[rb]
        self.children[ra] += self.children[rb]
        return ra

    def mark(self, i: int) -> None:
        self.unsafe[self.find(i)] = True

    def resolve(self) -> set[str]:
        """Layers that must keep their width, after unsafe concat outputs taint their inputs."""
        changed = True
        while changed:
            changed = False
            for i in range(len(self.parent)):
                r = self.find(i)
                if not self.unsafe[r]:
                    continue
                for c in self.children[r]:
                    if not self.unsafe[self.find(c)]:
                        self.unsafe[self.find(c)] = True
                        changed = True
        out: set[str] = set()
        for i in range(len(self.parent)):
            if self.find(i) == i and self.unsafe[i]:
                out.update(self.producers[i])
        return out


# Ops that keep the channel axis where it is and act per element.
_UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.hardtanh.default,
    aten.hardtanh_.default, aten.sigmoid.default, aten.silu.default, aten.silu_.default,
    aten.tanh.default, aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
    aten.leaky_relu.default, aten.elu.default, aten.dropout.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.relu6.default,
    aten.mish.default, aten.softplus.default, aten.abs.default, aten.neg.default,
    aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.pow.Tensor_Scalar,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.exp.default,
    aten.sqrt.default, aten.rsqrt.default,
}
_BINARY = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add_.Tensor,
    aten.mul_.Tensor, aten.maximum.default, aten.minimum.default, operator.add, operator.mul,
}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
_POOL = {  # NC... -> NC...: channel axis 1 untouched
    aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.max_pool2d.default,
    aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default, aten.max_pool1d.default,
    aten._adaptive_avg_pool2d.default,
}


def unsafe_layers(gm: GraphModule) -> list[nn.Module]:
    """Conv/linear modules of a module-ized graph whose output width must not change."""
    modules = dict(gm.named_modules())
    sp = _Spaces()
    track: dict[Node, tuple[int, int]] = {}  # node -> (space, channel axis >= 0)

    def rank(n: Any) -> int | None:
        v = n.meta.get("val") if isinstance(n, Node) else None
        return v.dim() if isinstance(v, torch.Tensor) else None

    def taint_args(args: Any) -> None:
        for a in _flat_nodes(args):
            if a in track:
                sp.mark(track[a][0])

    layers: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[str(node.target)]
            inp = node.args[0] if node.args else None
            src = track.get(inp) if isinstance(inp, Node) else None
            r = rank(node)
            if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
                layers.append(str(node.target))
                if mod.groups == 1:
                    if src is not None and src[1] != 1:
                        sp.mark(src[0])
                    track[node] = (sp.new(str(node.target)), 1)
                elif mod.groups == mod.in_channels == mod.out_channels and src is not None:
                    # depthwise: its channels are its input's channels (one space)
                    s = sp.new(str(node.target))
                    track[node] = (sp.union(src[0], s), 1)
                    if src[1] != 1:
                        sp.mark(s)
                else:  # grouped conv, or depthwise on a model input: keep both sides
                    if src is not None:
                        sp.mark(src[0])
                    track[node] = (sp.new(str(node.target), unsafe=True), 1)
            elif isinstance(mod, nn.Linear) and r is not None:
                layers.append(str(node.target))
                if src is not None and src[1] != r - 1:
                    sp.mark(src[0])
                track[node] = (sp.new(str(node.target)), r - 1)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if src is not None and src[1] == 1:
                    track[node] = src
                else:
                    taint_args(node.args)
            elif isinstance(mod, nn.LayerNorm) and r is not None:
                if src is not None and src[1] == r - 1 and len(mod.normalized_shape) == 1:
                    track[node] = src
                else:
                    taint_args(node.args)
            else:
                if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
                    layers.append(str(node.target))
                    track[node] = (sp.new(str(node.target), unsafe=True), 1)
                taint_args(node.args)
        elif node.op == "call_function":
            _visit_function(node, track, sp, rank, taint_args)
        elif node.op == "output":
            taint_args(node.args)  # output widths are part of the model's contract
    keep = sp.resolve()
    for name in layers:
        if not any(name in sp.producers[i] for i in range(len(sp.parent))):
            keep.add(name)  # never reached by the analysis: leave it alone
    return [modules[name] for name in sorted(keep)]


def _visit_function(
    node: Node,
    track: dict[Node, tuple[int, int]],
    sp: _Spaces,
    rank: Callable[[Any], int | None],
    taint_args: Callable[[Any], None],
) -> None:
    t = node.target
    args: Any = node.args  # FX's Argument union is too wide for int(); values are checked
    kwargs: Any = node.kwargs
    first = args[0] if args else None
    src = track.get(first) if isinstance(first, Node) else None
    r_out = rank(node)
    if t in _UNARY:
        if src is not None:
            track[node] = src
        taint_args(args[1:])
        return
    if t in _BINARY:
        operands = [a for a in args[:2] if isinstance(a, Node)]
        tracked = [a for a in operands if a in track]
        if not tracked:
            return
        if r_out is None:
            taint_args(args)
            return
        space = None
        axis = None
        ok = True
        for a in operands:
            ra = rank(a)
            if a in track:
                s, ax = track[a]
                out_ax = ax + (r_out - (ra or r_out))  # broadcasting aligns trailing axes
                if axis is not None and out_ax != axis:
                    ok = False
                axis = out_ax
                space = s if space is None else sp.union(space, s)
            else:
                v = a.meta.get("val")
                if not (isinstance(v, torch.Tensor) and v.numel() == 1):
                    ok = False  # an untracked tensor (input, parameter) with a channel axis
        assert space is not None and axis is not None
        if not ok:
            sp.mark(space)
        track[node] = (space, axis)
        return
    if t in _REDUCE and src is not None:
        r_in = rank(first)
        dims = args[1] if len(args) > 1 else None
        keepdim = bool(args[2]) if len(args) > 2 else bool(kwargs.get("keepdim"))
        if r_in is None or dims is None:
            sp.mark(src[0])
            return
        dims_l = [int(d) % r_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if src[1] in dims_l:
            sp.mark(src[0])
            return
        axis = src[1] if keepdim else src[1] - sum(d < src[1] for d in dims_l)
        track[node] = (src[0], axis)
        return
    if t in _POOL and src is not None:
        if src[1] == 1:
            track[node] = src
        else:
            sp.mark(src[0])
        return
    if t is aten.flatten.using_ints and src is not None:
        r_in = rank(first)
        start = int(args[1]) if len(args) > 1 else 0
        end = int(args[2]) if len(args) > 2 else -1
        if r_in is not None and start % r_in == end % r_in:
            track[node] = src  # flattening a single axis is a no-op
        else:
            sp.mark(src[0])
        return
    if t is aten.cat.default:
        tensors = args[0]
        dim = int(args[1]) if len(args) > 1 else int(kwargs.get("dim", 0))
        r = rank(node)
        parts = [track.get(a) if isinstance(a, Node) else None for a in tensors]
        if r is not None and all(p is not None and p[1] == dim % r for p in parts):
            out = sp.new()
            sp.children[out] = [p[0] for p in parts if p is not None]
            track[node] = (out, dim % r)
        else:
            taint_args(args)
        return
    # Anything else (views, transposes, attention, indexing, ...) may depend on the width.
    taint_args(args)
    taint_args(kwargs)


def _flat_nodes(args: Any) -> list[Node]:
    out: list[Node] = []
    stack = [args]
    while stack:
        a = stack.pop()
        if isinstance(a, Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
    return out
