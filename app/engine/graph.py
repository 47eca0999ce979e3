"""Module-ization of ``torch.export`` programs.

``ExportedProgram.module()`` is a flat FX graph of ATen calls (``aten.conv2d(x, w, ...)``)
whose weights are ``get_attr`` nodes: there is no ``nn.Conv2d`` anywhere, so Torch-Pruning
(which discovers layers as real modules and hooks their forward) cannot see it, and the
module refuses ``.eval()``. :func:`modularize` rewrites the layer calls into ``call_module``
nodes that hold real ``nn.Conv{1,2,3}d`` / ``nn.Linear`` / ``nn.BatchNorm{1,2,3}d`` /
``nn.LayerNorm`` modules, moves the weights into them, drops the export's ``_guards_fn`` and
returns a plain, trainable ``torch.fx.GraphModule`` that re-exports with ``torch.export``.

Both graph forms are understood: the default export IR (``aten.conv2d``, ``aten.linear``,
``aten.batch_norm``, ``aten.layer_norm``) and the core-ATen form left by
``run_decompositions()`` (``aten.convolution``, ``aten.addmm``/``aten.mm`` with a transposed
weight, ``aten._native_batch_norm_legit_no_training``, ``aten.native_layer_norm``).
A call whose weight is not a plain attribute (computed, shared by two layers) stays a
function call: it still runs, it is just invisible to the pruner.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

aten = torch.ops.aten

__all__ = ["modularize", "modularize_module"]


@dataclass
class _Rewrite:
    """One layer call to replace: the node whose value the module produces, the new module,
    the node feeding it and the get_attr targets whose tensors it took over."""

    value_node: Node  # node whose users are redirected to the module's output
    extra_nodes: list[Node]  # nodes erased with it (the tuple-producing op, a transpose)
    module: nn.Module
    input_node: Node
    name_hint: str
    consumed: list[str]  # get_attr targets now owned by the module
    is_batch_norm_training: bool = False


def modularize(ep: torch.export.ExportedProgram) -> GraphModule:
    """Return a trainable ``GraphModule`` equivalent to ``ep.module()`` with real layers.

    The result is a fresh copy (no storage shared with ``ep``). It starts in eval mode unless
    the program was exported in training mode (batch norm with ``training=True``), so its
    outputs equal ``ep.module()``'s; call ``.train()`` / ``.eval()`` as with any module.
    """
    return modularize_module(ep.module())


def modularize_module(gm: GraphModule) -> GraphModule:
    """Module-ize an ATen-level ``GraphModule`` (e.g. ``ExportedProgram.module()``)."""
    graph = _copy_graph(gm)
    tensors = _attr_tensors(gm, graph)
    uses: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            uses[n.target] = uses.get(n.target, 0) + len(n.users)

    # Match and rewrite in one topological pass, so a later match (batch norm after conv)
    # already sees the earlier rewrite's module node as its input.
    root = nn.Module()
    taken: set[str] = set()
    consumed: set[str] = set()
    any_training_bn = False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        matcher = _MATCHERS.get(node.target)
        rw = None if matcher is None else matcher(node, tensors, uses)
        if rw is None:
            continue
        path = _unique_path(rw.name_hint, taken, tensors)
        taken.add(path)
        _set_submodule(root, path, rw.module)
        with graph.inserting_before(rw.value_node):
            new = graph.call_module(path, (rw.input_node,))
        new.meta = dict(rw.value_node.meta)
        rw.value_node.replace_all_uses_with(new)
        for n in [rw.value_node, *rw.extra_nodes]:
            if not n.users:
                graph.erase_node(n)
        consumed.update(rw.consumed)
        any_training_bn |= rw.is_batch_norm_training

    # Training-mode exports bump num_batches_tracked with an in-place add that the module
    # now does itself; the export's input guard is meaningless once the graph is rewritten.
    for n in list(graph.nodes):
        bumps_counter = (
            n.op == "call_function"
            and n.target is aten.add_.Tensor
            and isinstance(n.args[0], Node)
            and n.args[0].op == "get_attr"
            and n.args[0].target in consumed
            and not n.users
        )
        if bumps_counter or (n.op == "call_module" and n.target == "_guards_fn"):
            graph.erase_node(n)
    for n in list(graph.nodes):
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)

    # Remaining attributes (e.g. a positional embedding) are copied, keeping their kind.
    for n in graph.nodes:
        if n.op == "get_attr":
            _set_tensor(root, n.target, tensors[n.target])
    graph.lint()
    out = GraphModule(root, graph, class_name="ModularizedModule")
    # The pytree codegen of ep.module() reads self._in_spec / self._out_spec.
    for spec in ("_in_spec", "_out_spec"):
        if hasattr(gm, spec):
            setattr(out, spec, getattr(gm, spec))
    out.train(any_training_bn)
    return out


# --------------------------------------------------------------------------------------------
# helpers


def _copy_graph(gm: GraphModule) -> Graph:
    g = Graph()
    val_map: dict[Node, Node] = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    g._codegen = gm.graph._codegen  # keeps the pytree in/out spec: same call signature
    return g


def _attr_tensors(gm: GraphModule, graph: Graph) -> dict[str, torch.Tensor]:
    """Detached copies of every tensor a get_attr node reads, Parameter-ness preserved."""
    out: dict[str, torch.Tensor] = {}
    for n in graph.nodes:
        if n.op != "get_attr" or n.target in out:
            continue
        t = _get_attr(gm, str(n.target))
        if isinstance(t, nn.Parameter):
            out[n.target] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
        elif isinstance(t, torch.Tensor):
            out[n.target] = t.detach().clone()
        else:
            raise TypeError(f"get_attr {n.target!r} is a {type(t).__name__}, not a tensor")
    return out


def _get_attr(mod: nn.Module, path: str) -> Any:
    obj: Any = mod
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that holds ``path``'s last part (plain containers created on the way)."""
    *parents, leaf = path.split(".")
    cur = root
    for p in parents:
        nxt = getattr(cur, p, None)
        if not isinstance(nxt, nn.Module):
            nxt = nn.Module()
            cur.add_module(p, nxt)
        cur = nxt
    return cur, leaf


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, leaf = _parent_of(root, path)
    parent.add_module(leaf, module)


def _set_tensor(root: nn.Module, path: str, t: torch.Tensor) -> None:
    parent, leaf = _parent_of(root, path)
    if isinstance(t, nn.Parameter):
        parent.register_parameter(leaf, t)
    else:
        parent.register_buffer(leaf, t)


def _unique_path(hint: str, taken: set[str], tensors: dict[str, torch.Tensor]) -> str:
    """A module path near the original name ("stem.0"), clear of other modules/attributes."""
    base = hint or "layer"

    def clash(p: str) -> bool:
        # An attribute path equal to p, or p a prefix of an attribute that stays a tensor.
        return p in taken or p in tensors or any(
            q == p or q.startswith(p + ".") or p.startswith(q + ".") for q in taken
        )

    if not clash(base):
        return base
    i = 1
    while clash(f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def _name_hint(weight_target: str) -> str:
    for suffix in (".weight", "_weight"):
        if weight_target.endswith(suffix):
            return weight_target[: -len(suffix)]
    return weight_target


def _attr(arg: Any, tensors: dict[str, torch.Tensor], uses: dict[str, int]) -> str | None:
    """Target of a get_attr node used exactly once (so a module may own it), else None."""
    if isinstance(arg, Node) and arg.op == "get_attr" and uses.get(str(arg.target), 0) == 1:
        return str(arg.target)
    return None


def _rank(node: Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _args(node: Node, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for name, a in zip(names, node.args, strict=False):
        out[name] = a
    out.update(node.kwargs)
    return out


def _is_param(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter)


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=True)


# --------------------------------------------------------------------------------------------
# matchers: one per ATen layer op; each returns None to leave the call alone


_Matcher = Callable[[Node, dict[str, torch.Tensor], dict[str, int]], _Rewrite | None]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _make_conv(
    node: Node, a: dict[str, Any], tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    w_t = _attr(a["weight"], tensors, uses)
    if w_t is None or not isinstance(a["input"], Node):
        return None
    b_t = None
    if a["bias"] is not None:
        b_t = _attr(a["bias"], tensors, uses)
        if b_t is None:
            return None
    w = tensors[w_t]
    nd = w.dim() - 2
    if nd not in _CONV:
        return None
    groups = int(a["groups"])
    padding = a["padding"]
    if not isinstance(padding, str):
        padding = tuple(int(p) for p in padding)
    conv_cls: Any = _CONV[nd]  # Conv1d/2d/3d take tuples of the matching length
    conv = conv_cls(
        in_channels=w.shape[1] * groups,
        out_channels=w.shape[0],
        kernel_size=tuple(w.shape[2:]),
        stride=tuple(int(s) for s in a["stride"]),
        padding=padding,
        dilation=tuple(int(d) for d in a["dilation"]),
        groups=groups,
        bias=b_t is not None,
        device=w.device,
        dtype=w.dtype,
    )
    conv.weight = _as_param(w)
    if b_t is not None:
        conv.bias = _as_param(tensors[b_t])
    consumed = [w_t] + ([b_t] if b_t else [])
    return _Rewrite(node, [], conv, a["input"], _name_hint(w_t), consumed)


def _match_convnd(node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]) -> Any:
    a = _args(
        node,
        ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
        {"bias": None, "stride": [1], "padding": [0], "dilation": [1], "groups": 1},
    )
    w = a["weight"]
    if isinstance(w, Node) and w.op == "get_attr" and str(w.target) in tensors:
        nd = tensors[str(w.target)].dim() - 2
        for k in ("stride", "dilation"):  # the schema allows a single int list of length 1
            if len(a[k]) == 1 and nd > 1:
                a[k] = list(a[k]) * nd
        if not isinstance(a["padding"], str) and len(a["padding"]) == 1 and nd > 1:
            a["padding"] = list(a["padding"]) * nd
    return _make_conv(node, a, tensors, uses)


def _match_convolution(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    a = _args(
        node,
        ["input", "weight", "bias", "stride", "padding", "dilation", "transposed",
         "output_padding", "groups"],
        {},
    )
    if a["transposed"]:
        return None  # ConvTranspose: not rewritten (stays a call, invisible to the pruner)
    return _make_conv(node, a, tensors, uses)


def _match_linear(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    a = _args(node, ["input", "weight", "bias"], {"bias": None})
    return _make_linear(node, a["input"], a["weight"], a["bias"], [], tensors, uses)


def _make_linear(
    node: Node, inp: Any, weight: Any, bias: Any, extra: list[Node],
    tensors: dict[str, torch.Tensor], uses: dict[str, int],
) -> _Rewrite | None:
    w_t = _attr(weight, tensors, uses)
    if w_t is None or not isinstance(inp, Node) or tensors[w_t].dim() != 2:
        return None
    b_t = None
    if bias is not None:
        b_t = _attr(bias, tensors, uses)
        if b_t is None or tensors[b_t].dim() != 1:
            return None
    w = tensors[w_t]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b_t is not None, device=w.device, dtype=w.dtype)
    lin.weight = _as_param(w)
    if b_t is not None:
        lin.bias = _as_param(tensors[b_t])
    consumed = [w_t] + ([b_t] if b_t else [])
    return _Rewrite(node, extra, lin, inp, _name_hint(w_t), consumed)


def _transposed_weight(arg: Any) -> Node | None:
    """``permute(w, [1, 0])`` / ``t(w)`` of a get_attr used only there: the Linear weight."""
    if not isinstance(arg, Node) or arg.op != "call_function" or len(arg.users) != 1:
        return None
    if arg.target is aten.t.default or (
        arg.target is aten.permute.default and list(arg.args[1]) == [1, 0]  # type: ignore[arg-type]
    ):
        src = arg.args[0]
        if isinstance(src, Node) and src.op == "get_attr":
            return src
    return None


def _match_addmm(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    # addmm(bias, x, w.T) with default beta/alpha == x @ w.T + bias == linear(x, w, bias)
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
        return None
    bias, inp, wt = node.args
    w = _transposed_weight(wt)
    if w is None or not isinstance(wt, Node):
        return None
    return _make_linear(node, inp, w, bias, [wt], tensors, uses)


def _match_mm(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    inp, wt = node.args
    w = _transposed_weight(wt)
    if w is None or not isinstance(wt, Node):
        return None
    return _make_linear(node, inp, w, None, [wt], tensors, uses)


_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _make_bn(
    value_node: Node, extra: list[Node], a: dict[str, Any],
    tensors: dict[str, torch.Tensor], uses: dict[str, int],
) -> _Rewrite | None:
    inp = a["input"]
    rank = _rank(inp) if isinstance(inp, Node) else None
    if rank not in _BN:
        return None
    names: dict[str, str | None] = {}
    for k in ("weight", "bias", "running_mean", "running_var"):
        if a[k] is None:
            names[k] = None
            continue
        t = _attr(a[k], tensors, uses)
        if t is None:
            return None
        names[k] = t
    affine = names["weight"] is not None and names["bias"] is not None
    if (names["weight"] is None) != (names["bias"] is None):
        return None
    track = names["running_mean"] is not None and names["running_var"] is not None
    if not track and a["training"] is False:
        return None  # eval with batch stats and no buffers: no nn.BatchNorm equivalent
    ref = next((tensors[t] for t in names.values() if t is not None), None)
    if ref is None:
        return None
    bn = _BN[rank](
        ref.shape[0], eps=float(a["eps"]), momentum=float(a["momentum"]), affine=affine,
        track_running_stats=track, device=ref.device, dtype=ref.dtype,
    )
    consumed: list[str] = []
    w_t, b_t, m_t, v_t = (names[k] for k in ("weight", "bias", "running_mean", "running_var"))
    if w_t is not None and b_t is not None:
        bn.weight = _as_param(tensors[w_t])
        bn.bias = _as_param(tensors[b_t])
        consumed += [w_t, b_t]
    if m_t is not None and v_t is not None:
        bn.running_mean = tensors[m_t].detach()
        bn.running_var = tensors[v_t].detach()
        consumed += [m_t, v_t]
        # num_batches_tracked sits beside running_mean ("x.running_mean" -> "x.num_batches_tracked")
        nbt = m_t.rsplit("running_mean", 1)[0] + "num_batches_tracked"
        if nbt in tensors and tensors[nbt].numel() == 1:
            bn.num_batches_tracked = tensors[nbt].detach().clone().to(torch.long).reshape(())
            consumed.append(nbt)
    hint = w_t or m_t or "bn"
    hint = hint.rsplit(".", 1)[0] if "." in hint else _name_hint(hint)
    return _Rewrite(
        value_node, extra, bn, inp, hint, consumed, is_batch_norm_training=bool(a["training"])
    )


def _match_batch_norm(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    a = _args(
        node,
        ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
         "cudnn_enabled"],
        {},
    )
    return _make_bn(node, [], a, tensors, uses)


def _single_getitem0(node: Node) -> Node | None:
    """For a tuple-returning op: its only used output must be ``[0]``; return that getitem."""
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0:
        return u
    return None


def _match_bn_no_training(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    gi = _single_getitem0(node)
    if gi is None:
        return None
    a = _args(
        node, ["input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"], {}
    )
    a["training"] = False
    return _make_bn(gi, [node], a, tensors, uses)


def _make_ln(
    value_node: Node, extra: list[Node], a: dict[str, Any],
    tensors: dict[str, torch.Tensor], uses: dict[str, int],
) -> _Rewrite | None:
    if not isinstance(a["input"], Node):
        return None
    w_t = b_t = None
    if a["weight"] is not None:
        w_t = _attr(a["weight"], tensors, uses)
        if w_t is None:
            return None
    if a["bias"] is not None:
        b_t = _attr(a["bias"], tensors, uses)
        if b_t is None:
            return None
    if w_t is None and b_t is not None:
        return None
    shape = tuple(int(s) for s in a["normalized_shape"])
    ref = tensors[w_t] if w_t else None
    ln = nn.LayerNorm(
        shape, eps=float(a["eps"]), elementwise_affine=w_t is not None, bias=b_t is not None,
        device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
    )
    consumed: list[str] = []
    if w_t is not None:
        ln.weight = _as_param(tensors[w_t])
        consumed.append(w_t)
    if b_t is not None:
        ln.bias = _as_param(tensors[b_t])
        consumed.append(b_t)
    hint = _name_hint(w_t) if w_t else "layer_norm"
    return _Rewrite(value_node, extra, ln, a["input"], hint, consumed)


def _match_layer_norm(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    a = _args(
        node, ["input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"],
        {"weight": None, "bias": None, "eps": 1e-5},
    )
    return _make_ln(node, [], a, tensors, uses)


def _match_native_layer_norm(
    node: Node, tensors: dict[str, torch.Tensor], uses: dict[str, int]
) -> _Rewrite | None:
    gi = _single_getitem0(node)
    if gi is None:
        return None
    a = _args(node, ["input", "normalized_shape", "weight", "bias", "eps"], {})
    return _make_ln(gi, [node], a, tensors, uses)


_MATCHERS: dict[Any, _Matcher] = {
    aten.conv1d.default: _match_convnd,
    aten.conv2d.default: _match_convnd,
    aten.conv3d.default: _match_convnd,
    aten.conv1d.padding: _match_convnd,
    aten.conv2d.padding: _match_convnd,
    aten.conv3d.padding: _match_convnd,
    aten.convolution.default: _match_convolution,
    aten.linear.default: _match_linear,
    aten.addmm.default: _match_addmm,
    aten.mm.default: _match_mm,
    aten.batch_norm.default: _match_batch_norm,
    aten._native_batch_norm_legit_no_training.default: _match_bn_no_training,
    aten.layer_norm.default: _match_layer_norm,
    aten.native_layer_norm.default: _match_native_layer_norm,
}
