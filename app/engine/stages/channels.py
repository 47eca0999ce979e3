"""Which layers of a module-ized graph may change width, and why the others may not.

Torch-Pruning couples layers by following autograd (residual adds, concats, depthwise convs,
norms, layer-scale parameters): it decides *how* channels are removed together. What it cannot
know is which widths the FX graph bakes in as literal numbers (a ``view(x, [N, 17, 4, 24])``
splitting attention heads), or which tensors leave the model (the output width is the user's
contract). :func:`analyze` walks the graph once, groups tensors whose channel axis must be pruned
identically (union-find over "channel spaces") and marks a space unsafe, with a reason, when it
reaches something pruning cannot follow. Layers producing an unsafe space are Torch-Pruning's
``ignored_layers``; a view or reshape that only adds or drops size-1 axes around the channel
axis is made width-agnostic (its channel size becomes ``-1``) by :func:`free_views`.

    >>> import torch
    >>> from app.engine.graph import modularize_module
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = modularize_module(torch.export.export(m, (torch.randn(2, 4),)).module())
    >>> p = analyze(gm)
    >>> p.prunable, p.kept
    (['0'], {'2': 'its channels reach the model output'})
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

aten = torch.ops.aten

__all__ = ["Prunability", "analyze", "free_views"]

OUTPUT = "its channels reach the model output"


@dataclass(frozen=True)
class Prunability:
    """Outcome of :func:`analyze` on one graph."""

    layers: tuple[str, ...]  # every conv / linear module path, in graph order
    kept: dict[str, str]  # layer -> why its output width must stay
    fixed_ops: tuple[str, ...] = ()  # weighted ops that are not layers, e.g. "lstm (8 weights)"
    # (view / reshape node, index in its shape argument): literal channel sizes to set to -1
    views: tuple[tuple[Node, int], ...] = field(default=(), repr=False, compare=False)

    @property
    def prunable(self) -> list[str]:
        return [n for n in self.layers if n not in self.kept]

    def summary(self) -> str:
        """One line for the report and the CLI, e.g.
        ``structured pruning: 0 of 1 layers prunable; kept whole: head: its channels reach the
        model output (1 layers: head); not layers, never pruned: lstm (8 weights)``."""
        line = f"structured pruning: {len(self.prunable)} of {len(self.layers)} layers prunable"
        by_reason: dict[str, list[str]] = {}
        for layer, why in self.kept.items():
            by_reason.setdefault(why, []).append(layer)
        parts = []
        for why, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{why} ({len(names)} layers: {shown})")
        if parts:
            line += "; kept whole: " + "; ".join(parts)
        if self.fixed_ops:
            line += "; not layers, never pruned: " + ", ".join(self.fixed_ops)
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "prunable": len(self.prunable),
                "kept": dict(self.kept), "fixed_ops": list(self.fixed_ops),
                "summary": self.summary()}


class _Spaces:
    """Union-find over "channel spaces": sets of tensors whose channel axis must be pruned
    identically. Each space remembers the layers whose output channels define it and, once
    something forbids pruning it, the first reason why."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reason: list[str | None] = []
        self.producers: list[list[str]] = []
        self.children: list[list[int]] = []  # concat: output space -> input spaces

    def new(self, producer: str | None = None, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.reason.append(reason)
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
        self.reason[ra] = self.reason[ra] or self.reason[rb]
        self.producers[ra] += self.producers[rb]
        self.children[ra] += self.children[rb]
        return ra

    def mark(self, i: int, reason: str) -> None:
        r = self.find(i)
        if self.reason[r] is None:
            self.reason[r] = reason

    def resolve(self) -> dict[str, str]:
        """Layer -> reason, after unsafe concat outputs taint their inputs."""
        changed = True
        while changed:
            changed = False
            for i in range(len(self.parent)):
                r = self.find(i)
                why = self.reason[r]
                if why is None:
                    continue
                for c in self.children[r]:
                    rc = self.find(c)
                    if self.reason[rc] is None:
                        self.reason[rc] = f"concatenated into a fixed-width tensor ({why})"
                        changed = True
        out: dict[str, str] = {}
        for i in range(len(self.parent)):
            why = self.reason[i]
            if self.find(i) == i and why is not None:
                out.update(dict.fromkeys(self.producers[i], why))
        return out


# Ops that keep the channel axis where it is and act per element.
_UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.hardtanh.default,
    aten.hardtanh_.default, aten.sigmoid.default, aten.silu.default, aten.silu_.default,
    aten.tanh.default, aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
    aten.leaky_relu.default, aten.elu.default, aten.dropout.default, aten.dropout_.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.relu6.default, aten.mish.default, aten.softplus.default, aten.abs.default,
    aten.neg.default, aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar,
    aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.exp.default, aten.sqrt.default, aten.rsqrt.default,
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
_PAD = {aten.pad.default, aten.constant_pad_nd.default}
# Ops that only move data between axes; followed when they keep the channel axis intact.
_VIEW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_NOT_WEIGHTS = _BINARY | _VIEW | {aten.cat.default, aten.expand.default}  # params as data
_SQUEEZE = {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
            aten.unsqueeze.default}


def analyze(gm: GraphModule) -> Prunability:
    """The channel-space analysis of a module-ized graph (module doc). Read-only."""
    a = _Analysis(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            a.visit_module(node)
        elif node.op == "call_function":
            a.visit_function(node)
        elif node.op == "output":
            a.taint(node.args, OUTPUT)
    kept = a.sp.resolve()
    reached = {p for ps in a.sp.producers for p in ps}
    for name in a.layers:
        if name not in reached:
            kept[name] = "not reached from the model inputs by the analysis"
    safe_views = tuple(v for v in a.views if a.sp.reason[a.sp.find(a.view_space[v[0]])] is None)
    fixed = tuple(f"{op} ({n} weights)" for op, n in a.fixed.items())
    return Prunability(tuple(a.layers), {k: kept[k] for k in a.layers if k in kept}, fixed,
                       safe_views)


def free_views(gm: GraphModule, p: Prunability) -> None:
    """Write ``-1`` for the literal channel sizes of ``p.views`` (in place; recompiles)."""
    if not p.views:
        return
    for node, i in p.views:
        shape = list(node.args[1])  # type: ignore[arg-type]
        shape[i] = -1
        node.args = (node.args[0], shape, *node.args[2:])
    gm.recompile()


def _shape(n: Any) -> tuple[Any, ...] | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _op(node: Node) -> str:
    """The op's name without its overload ("view", "scaled_dot_product_attention")."""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _is_layer(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd))


class _Analysis:
    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.sp = _Spaces()
        self.track: dict[Node, tuple[int, int]] = {}  # node -> (space, channel axis >= 0)
        self.layers: list[str] = []
        self.views: list[tuple[Node, int]] = []
        self.view_space: dict[Node, int] = {}
        self.fixed: dict[str, int] = {}  # weighted non-layer op -> weight tensors it reads

    def taint(self, args: Any, reason: str) -> None:
        for a in _flat_nodes(args):
            if a in self.track:
                self.sp.mark(self.track[a][0], reason)

    # -- layers ------------------------------------------------------------------------------

    def visit_module(self, node: Node) -> None:
        name = str(node.target)
        mod = self.modules[name]
        inp = node.args[0] if node.args else None
        src = self.track.get(inp) if isinstance(inp, Node) else None
        shape = _shape(node)
        r = None if shape is None else len(shape)
        sp = self.sp
        if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            self.layers.append(name)
            if src is not None and src[1] != 1:
                sp.mark(src[0], f"read by conv {name} on a non-channel axis")
            if mod.groups == 1:
                self.track[node] = (sp.new(name), 1)
            elif mod.groups == mod.in_channels == mod.out_channels:
                # depthwise: its channels are its input's channels (one space)
                s = sp.new(name, None if src is not None
                           else "depthwise conv on a model input: its width is the input's")
                self.track[node] = (s if src is None else sp.union(src[0], s), 1)
            else:
                why = f"grouped conv {name} (groups={mod.groups}): kept whole"
                if src is not None:
                    sp.mark(src[0], why)
                self.track[node] = (sp.new(name, why), 1)
        elif isinstance(mod, nn.Linear) and r is not None:
            self.layers.append(name)
            if src is not None and src[1] != r - 1:
                sp.mark(src[0], f"read by linear {name} on a non-feature axis")
            self.track[node] = (sp.new(name), r - 1)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if src is not None and src[1] == 1:
                self.track[node] = src
            else:
                self.taint(node.args, f"batch norm {name} over another axis")
        elif isinstance(mod, nn.LayerNorm) and r is not None:
            if src is not None and src[1] == r - 1 and len(mod.normalized_shape) == 1:
                self.track[node] = src
            else:
                self.taint(node.args, f"layer norm {name} over several axes")
        else:
            if _is_layer(mod):  # transposed conv
                self.layers.append(name)
                self.track[node] = (sp.new(name, f"{type(mod).__name__} is not pruned"), 1)
            self.taint(node.args, f"its channels reach {type(mod).__name__} {name}")

    # -- functions ---------------------------------------------------------------------------

    def visit_function(self, node: Node) -> None:
        t = node.target
        args: Any = node.args  # FX's Argument union is too wide for int(); values are checked
        first = args[0] if args else None
        src = self.track.get(first) if isinstance(first, Node) else None
        sp = self.sp
        self._note_weights(node)
        if t is aten.flatten.using_ints and src is not None:
            self._flatten(node, src)
        elif t in _UNARY:
            if src is not None:
                self.track[node] = src
            self.taint(args[1:], f"its channels reach {_op(node)}")
        elif t in _BINARY:
            self._binary(node)
        elif t is aten.cat.default:
            self._cat(node)
        elif src is None:
            self.taint((args, node.kwargs), f"its channels reach {_op(node)}")
        elif t in _REDUCE:
            self._reduce(node, src)
        elif t in _POOL:
            if src[1] == 1:
                self.track[node] = src
            else:
                sp.mark(src[0], f"pooled on a non-channel axis by {_op(node)}")
        elif t in _PAD:
            r_in = len(_shape(first) or ())
            padded = len(args[1]) // 2  # pad pairs count from the last axis
            if src[1] < r_in - padded:
                self.track[node] = src
            else:
                sp.mark(src[0], f"its channel axis is padded by {_op(node)}")
        elif t in _VIEW or t in _SQUEEZE:
            self._view(node, src)
        elif t is aten.permute.default:
            self.track[node] = (src[0], [int(d) % len(args[1]) for d in args[1]].index(src[1]))
        elif t is aten.transpose.int:
            r = len(_shape(first) or ())
            d0, d1 = int(args[1]) % r, int(args[2]) % r
            ax = d1 if src[1] == d0 else d0 if src[1] == d1 else src[1]
            self.track[node] = (src[0], ax)
        elif t is aten.scaled_dot_product_attention.default:
            self.taint(args, "it feeds attention heads (scaled_dot_product_attention), "
                       "whose head count and size are baked into the graph's reshapes")
        else:
            self.taint((args, node.kwargs), f"its channels reach {_op(node)}")

    def _note_weights(self, node: Node) -> None:
        n = sum(1 for a in _flat_nodes(node.args) if a.op == "get_attr"
                and isinstance(_get(self.gm, str(a.target)), nn.Parameter))
        if n and node.target not in _NOT_WEIGHTS:
            self.fixed[_op(node)] = self.fixed.get(_op(node), 0) + n

    def _binary(self, node: Node) -> None:
        operands = [a for a in node.args[:2] if isinstance(a, Node)]
        tracked = [a for a in operands if a in self.track]
        if not tracked:
            return
        out_shape = _shape(node)
        if out_shape is None:
            self.taint(node.args, f"its channels reach {_op(node)} of unknown shape")
            return
        r_out = len(out_shape)
        space = axis = None
        why = None
        for a in operands:
            ra = len(_shape(a) or out_shape)
            if a in self.track:
                s, ax = self.track[a]
                out_ax = ax + (r_out - ra)  # broadcasting aligns trailing axes
                if axis is not None and out_ax != axis:
                    why = f"added to another axis by {_op(node)}"
                axis = out_ax
                space = s if space is None else self.sp.union(space, s)
        assert space is not None and axis is not None
        for a in operands:
            if a not in self.track:
                why = why or self._constant_operand(a, axis, r_out, node)
        if why:
            self.sp.mark(space, why)
        self.track[node] = (space, axis)

    def _constant_operand(self, a: Node, axis: int, r_out: int, node: Node) -> str | None:
        """None when an untracked operand of a binary op cannot block pruning: a scalar, a
        tensor of size 1 on the channel axis, or a parameter Torch-Pruning prunes itself
        (it prunes an unwrapped parameter along its last non-singleton axis)."""
        shape = _shape(a)
        if shape is None:
            return f"combined with an untracked value by {_op(node)}"
        ax = axis - (r_out - len(shape))
        if ax < 0 or shape[ax] == 1:
            return None
        t = _get(self.gm, str(a.target)) if a.op == "get_attr" else None
        if isinstance(t, nn.Parameter):
            last = max((i for i, s in enumerate(t.shape) if s > 1), default=None)
            if last == ax:
                return None
        kind = "a constant" if a.op == "get_attr" else "a tensor the analysis cannot resize"
        return f"it is combined by {_op(node)} with {kind} of the same width"

    def _reduce(self, node: Node, src: tuple[int, int]) -> None:
        args: Any = node.args
        r_in = len(_shape(args[0]) or ())
        dims = args[1] if len(args) > 1 else None
        keepdim = bool(args[2]) if len(args) > 2 else bool(node.kwargs.get("keepdim"))
        if not r_in or dims is None:
            self.sp.mark(src[0], f"reduced over all axes by {_op(node)}")
            return
        dl = [int(d) % r_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if src[1] in dl:
            self.sp.mark(src[0], f"reduced over the channel axis by {_op(node)}")
            return
        self.track[node] = (src[0], src[1] if keepdim else src[1] - sum(d < src[1] for d in dl))

    def _view(self, node: Node, src: tuple[int, int]) -> None:
        """Follow a view that keeps the channel axis whole (only size-1 axes change)."""
        s_in, s_out = _shape(node.args[0]), _shape(node)
        why = (f"its channel axis is split or merged by {_op(node)} (e.g. into attention heads) "
               "with sizes baked into the graph")
        if s_in is None or s_out is None:
            self.sp.mark(src[0], why)
            return
        big_in = [i for i, d in enumerate(s_in) if str(d) != "1"]
        big_out = [i for i, d in enumerate(s_out) if str(d) != "1"]
        if (src[1] not in big_in or [str(s_in[i]) for i in big_in]
                != [str(s_out[i]) for i in big_out]):
            self.sp.mark(src[0], why)
            return
        out_ax = big_out[big_in.index(src[1])]
        if node.target in _VIEW:
            shape: Any = node.args[1]
            lit = shape[out_ax]
            if not isinstance(lit, int) or (lit != -1 and -1 in shape):
                self.sp.mark(src[0], why)
                return
            if lit != -1:
                self.views.append((node, out_ax))
                self.view_space[node] = src[0]
        self.track[node] = (src[0], out_ax)

    def _flatten(self, node: Node, src: tuple[int, int]) -> None:
        """flatten(start, end) keeps the channel axis when it lies outside [start, end] or
        every other axis of that range has size 1."""
        args: Any = node.args
        s_in = _shape(args[0]) or ()
        r = len(s_in)
        start = int(args[1]) % r if len(args) > 1 else 0
        end = int(args[2]) % r if len(args) > 2 else r - 1
        c = src[1]
        if c < start:
            self.track[node] = src
        elif c > end:
            self.track[node] = (src[0], c - (end - start))
        elif all(str(s_in[i]) == "1" for i in range(start, end + 1) if i != c):
            self.track[node] = (src[0], start)
        else:
            self.sp.mark(src[0], "its channel axis is merged with other axes by flatten")

    def _cat(self, node: Node) -> None:
        args: Any = node.args
        kwargs: Any = node.kwargs
        dim = int(args[1]) if len(args) > 1 else int(kwargs.get("dim", 0))
        r = len(_shape(node) or ())
        parts = [self.track.get(a) if isinstance(a, Node) else None for a in args[0]]
        if r and all(p is not None and p[1] == dim % r for p in parts):
            out = self.sp.new()
            self.sp.children[out] = [p[0] for p in parts if p is not None]
            self.track[node] = (out, dim % r)
        else:
            self.taint(args, f"concatenated along another axis by {_op(node)}")


def _get(mod: nn.Module, path: str) -> Any:
    obj: Any = mod
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


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

