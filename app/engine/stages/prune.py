"""Prune stage: structured channel pruning (Torch-Pruning) and unstructured magnitude masks.

Structured pruning removes whole output channels of convolutions / linear layers together
with everything coupled to them (batch-norm channels, the next layer's input channels, the
other side of a residual add, the slice of a concat, depthwise convs, layer-scale
parameters): the model gets physically smaller and faster in every runtime. Torch-Pruning's
dependency graph finds that coupling on the module-ized graph; which layers may change width at
all is decided first on the FX graph (:mod:`app.engine.stages.channels`), which says for every
layer kept whole why (it reaches the graph output, attention heads whose sizes are baked into
reshapes, ...). Unstructured pruning only zeroes weights: same shapes, same speed; it pays off
only once a compressor (zip, int8 + entropy coding) sees the zeros.

Removing channels shifts the statistics every following batch norm was trained on, so a
pruned CNN outputs a near-constant vector until they are re-estimated: given
``calib_batches``, :func:`prune` recalibrates batch-norm running statistics (no weight changes).
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn
from torch.fx import GraphModule

from app.engine.errors import EngineError, InvalidModel, InvalidRecipe
from app.engine.graph import modularize_module
from app.engine.stages.channels import Prunability, analyze, free_views
from app.engine.types import Importance, ProgressFn, PruneMode

aten = torch.ops.aten

__all__ = [
    "CRITERIA", "Criterion", "PruneConfig", "has_dynamic_batch", "prunability", "prune",
    "reexport", "sparsity", "structure_fingerprint", "unsafe_layers",
]

_STAGE = "prune"


class Criterion:
    """A structured-pruning criterion: how Torch-Pruning ranks the channels of a group.
    A new criterion is one subclass here (``name`` is the recipe's ``importance`` value)."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False  # True: loss gradients must be accumulated first

    def importance(self) -> Any:
        """The ``torch_pruning.importance`` object scoring each channel group."""
        raise NotImplementedError


CRITERIA: dict[str, type[Criterion]] = {}


def _register(cls: type[Criterion]) -> type[Criterion]:
    CRITERIA[cls.name] = cls
    return cls


@_register
class L2Magnitude(Criterion):
    """L2 norm of every weight a channel group owns (no data needed)."""

    name = "l2"

    def importance(self) -> Any:
        return tp.importance.GroupMagnitudeImportance(p=2)


@_register
class Taylor(Criterion):
    """First-order Taylor estimate |w * dL/dw| of the loss change when a group is removed."""

    name = "taylor"
    needs_gradients = True

    def importance(self) -> Any:
        return tp.importance.GroupTaylorImportance()


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
        if self.importance not in CRITERIA:
            raise InvalidRecipe(f"unknown importance {self.importance!r}; "
                                f"known: {', '.join(CRITERIA)}")
        if self.round_to < 0:
            raise InvalidRecipe(f"round_to must be >= 0, got {self.round_to}")


def prune(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    config: PruneConfig,
    *,
    grad_batches: Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]] | None = None,
    calib_batches: Sequence[tuple[torch.Tensor, ...]] | None = None,
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
    give MSE. Taylor without usable gradients falls back to L2 magnitude. ``calib_batches``
    (model inputs, a few hundred samples) re-estimate batch-norm statistics after pruning.
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
    info = analyze(net)
    report(_STAGE, 0.2, info.summary())
    modules = dict(net.named_modules())
    ignored = [modules[name] for name in info.kept]
    if not info.prunable:
        report(_STAGE, 1.0, "nothing pruned")
        return net.eval()
    free_views(net, info)  # literal channel sizes of views become -1: they follow the pruning
    criterion = CRITERIA[config.importance]()
    if criterion.needs_gradients and not grad_batches:
        raise InvalidRecipe(f"{config.importance} importance needs grad_batches (inputs, targets)")
    try:
        with warnings.catch_warnings():
            # Non-layer parameters (a positional embedding) make TP warn that it would prune
            # their last axis; the ignore analysis above keeps them out of every pruned group.
            warnings.simplefilter("ignore")
            pruner = tp.pruner.BasePruner(
                net,
                example_inputs,
                importance=criterion.importance(),
                pruning_ratio=config.ratio,
                pruning_ratio_dict=_layer_ratios(net, ignored, config),
                ignored_layers=ignored,
                round_to=config.round_to if config.round_to > 1 else None,
                global_pruning=False,
            )
        if criterion.needs_gradients:
            report(_STAGE, 0.4, f"{config.importance}: accumulating gradients")
            if not _accumulate_grads(net, grad_batches or ()):
                pruner.importance = L2Magnitude().importance()
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
    if calib_batches:
        report(_STAGE, 0.8, "re-estimating batch-norm statistics")
        _recalibrate_batch_norm(net, calib_batches)
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


def prunability(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Prunability:
    """Which conv / linear layers of ``model`` structured pruning may narrow, and why the
    others stay whole (:mod:`app.engine.stages.channels`); ``model`` is not modified."""
    return analyze(_working_copy(model, example_inputs))


def unsafe_layers(gm: GraphModule) -> list[nn.Module]:
    """Conv/linear modules of a module-ized graph whose output width must not change."""
    modules = dict(gm.named_modules())
    return [modules[name] for name in sorted(analyze(gm).kept)]


def structure_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter's name, shape and non-zero count: equal for two models that
    pruning left structurally the same (and equally sparse), e.g. a 30 % prune of a model with
    no prunable layer and the model itself."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{int(torch.count_nonzero(p))};".encode())
    return h.hexdigest()


def _recalibrate_batch_norm(net: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """Replace every batch norm's running statistics with the pruned network's own, as a
    cumulative average over ``batches``; only batch norms run in training mode."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return
    net.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    with torch.no_grad():
        for inputs in batches:
            net(*inputs)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum  # the exported value again, for any later fine-tuning
        m.eval()


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
