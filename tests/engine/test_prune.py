"""prune() / reexport(): physically smaller models, protected output, dynamic batch."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

from app.engine.errors import InvalidRecipe
from app.engine.graph import modularize
from app.engine.stages.prune import (
    PruneConfig,
    has_dynamic_batch,
    prune,
    reexport,
    sparsity,
    unsafe_layers,
)
from examples.zoo import DWCNN, MLP, ResCNN, TinyEncoder, digits, train

pytestmark = pytest.mark.engine

SHAPES = {"ResCNN": (4, 1, 8, 8), "DWCNN": (4, 1, 8, 8), "TinyEncoder": (4, 1, 16, 16)}
CLASSES = {"ResCNN": ResCNN, "DWCNN": DWCNN, "TinyEncoder": TinyEncoder}
# Fraction of parameters left after ratio 0.5 (measured: ResCNN 0.253, DWCNN 0.309 -- channel
# pruning is ~quadratic in the kept fraction; TinyEncoder 0.679 -- only the FFN width of the
# encoder layers may shrink, attention and the embedding width stay).
MAX_KEPT = {"ResCNN": 0.30, "DWCNN": 0.35, "TinyEncoder": 0.70}


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _widths(m: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, sub in m.named_modules():
        if isinstance(sub, nn.Conv2d):
            out[name] = sub.out_channels
        elif isinstance(sub, nn.Linear):
            out[name] = sub.out_features
    return out


@functools.cache  # exports cost ~1 s each; every test works on its own modularized copy
def _program(name: str) -> tuple[torch.export.ExportedProgram, torch.Tensor]:
    torch.manual_seed(0)
    model = CLASSES[name]().eval()
    x = torch.randn(*SHAPES[name], generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return ep, x


@functools.cache  # shared by several tests, which only read it
def _half(name: str) -> tuple[GraphModule, nn.Module, dict[str, torch.Tensor]]:
    """(modularized input, its ratio-0.5 prune, the input's state before pruning)."""
    ep, x = _program(name)
    gm = modularize(ep)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    return gm, prune(gm, (x,), PruneConfig(ratio=0.5)), state


@functools.cache
def _trained_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = digits(8)
    model = train(MLP(), x[:1200], y[:1200], epochs=4)
    return model, x, y


@pytest.mark.parametrize("name", list(CLASSES))
def test_structured_half_shrinks_and_reexports(name: str) -> None:
    _, x = _program(name)
    gm, pruned, state = _half(name)

    assert _n(pruned) <= MAX_KEPT[name] * _n(gm)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == gm(x).shape == (4, 10)
    assert _widths(pruned)["head"] == 10
    # round_to=8: every layer whose width changed is a multiple of 8
    before, after = _widths(gm), _widths(pruned)
    changed = [k for k in after if after[k] != before[k]]
    assert changed
    assert all(after[k] % 8 == 0 and after[k] < before[k] for k in changed)
    # the input is untouched
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert _widths(gm) == before

    ep2 = reexport(pruned, (x,))
    assert has_dynamic_batch(ep2)
    x7 = torch.randn(7, *x.shape[1:])
    with torch.no_grad():
        assert torch.allclose(ep2.module()(x), out, atol=1e-5, rtol=0)
        assert torch.allclose(ep2.module()(x7), pruned(x7), atol=1e-5, rtol=0)


def test_transformer_keeps_attention_and_embedding_width() -> None:
    gm, pruned, _ = _half("TinyEncoder")
    kept = {n for n, m in gm.named_modules() if any(m is u for u in unsafe_layers(gm))}
    assert kept == {
        "embed", "head",
        "layers.0.attn.in_proj", "layers.0.attn.out_proj", "layers.0.fc2",
        "layers.1.attn.in_proj", "layers.1.attn.out_proj", "layers.1.fc2",
    }
    w = _widths(pruned)
    assert w["layers.0.fc1"] == w["layers.1.fc1"] == 128  # FFN 256 -> 128
    assert w["embed"] == w["layers.0.fc2"] == w["layers.0.attn.out_proj"] == 64
    assert w["layers.0.attn.in_proj"] == 192


def test_cnn_coupling_residual_concat_depthwise() -> None:
    w = _widths(_half("DWCNN")[1])
    # residual: stem and the first block's projection share one width
    assert w["stem.0"] == w["blocks.0.body.6"] == 16
    # depthwise conv follows its expansion conv
    for b in range(3):
        assert w[f"blocks.{b}.body.0"] == w[f"blocks.{b}.body.3"]
    w = _widths(_half("ResCNN")[1])
    assert w["branch_a"] == w["branch_b"] == 16  # both sides of the concat pruned
    assert w["stem.0"] == w["block1.conv2"] and w["down.0"] == w["block2.conv2"]


def test_round_to_other_multiple_and_high_ratio() -> None:
    ep, x = _program("ResCNN")
    gm = modularize(ep)
    w = _widths(prune(gm, (x,), PruneConfig(ratio=0.5, round_to=12)))
    assert w["stem.0"] == 12 and w["down.0"] == 36  # 16 -> 12, 32 -> 36: nearest multiple
    w = _widths(prune(gm, (x,), PruneConfig(ratio=0.9, round_to=8)))
    # never rounded to zero: at least one multiple of round_to survives
    assert w["stem.0"] == 8 and w["down.0"] == 8


def test_plain_module_input_is_exported_and_left_untouched() -> None:
    torch.manual_seed(0)
    model = DWCNN().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 1, 8, 8)
    pruned = prune(model, (x,), PruneConfig(ratio=0.5))
    assert _n(pruned) < 0.35 * _n(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    ep = reexport(pruned, (x,))
    assert has_dynamic_batch(ep)  # a batch-1 example still yields a dynamic batch
    xb = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(ep.module()(xb), pruned(xb), atol=1e-5, rtol=0)


def test_pruned_model_is_trainable() -> None:
    _, x = _program("ResCNN")
    pruned = copy.deepcopy(_half("ResCNN")[1])
    pruned.train()
    pruned(x).square().mean().backward()
    assert all(p.grad is not None for p in pruned.parameters())


def test_taylor_differs_from_l2_on_trained_model() -> None:
    model, x, y = _trained_mlp()
    ex = (x[:8],)
    with torch.no_grad():
        teacher = model(x[:512])
    batches = [((x[i : i + 128],), teacher[i : i + 128]) for i in range(0, 512, 128)]
    l2 = prune(model, ex, PruneConfig(ratio=0.5))
    taylor = prune(model, ex, PruneConfig(ratio=0.5, importance="taylor"), grad_batches=batches)

    def kept_rows(pruned: nn.Module) -> set[int]:
        w = pruned.get_submodule("fc1").weight
        assert isinstance(w, torch.Tensor)
        rows = model.get_submodule("fc1").weight
        return {int((rows - r).abs().sum(1).argmin()) for r in w}

    assert _widths(l2)["fc1"] == _widths(taylor)["fc1"] == 32
    assert kept_rows(l2) != kept_rows(taylor)
    # both are valid smaller classifiers; neither is pure noise before recovery
    xt, yt = x[1200:], y[1200:]
    with torch.no_grad():
        base = (model(xt).argmax(1) == yt).float().mean().item()
        acc_taylor = (taylor(xt).argmax(1) == yt).float().mean().item()
    assert base > 0.85
    assert acc_taylor > 0.3
    # labels as targets work too
    lab = prune(model, ex, PruneConfig(ratio=0.5, importance="taylor"),
                grad_batches=[((x[:256],), y[:256])])
    assert _n(lab) < _n(model)


def test_taylor_needs_batches() -> None:
    ep, x = _program("DWCNN")
    with pytest.raises(InvalidRecipe):
        prune(modularize(ep), (x,), PruneConfig(ratio=0.5, importance="taylor"))


def test_unstructured_zeroes_requested_fraction() -> None:
    ep, x = _program("ResCNN")
    gm = modularize(ep)
    pruned = prune(gm, (x,), PruneConfig(ratio=0.6, mode="unstructured"))
    assert abs(sparsity(pruned) - 0.6) <= 0.02
    assert sparsity(gm) == 0.0
    assert _n(pruned) == _n(gm)
    assert _widths(pruned) == _widths(gm)
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())
    with torch.no_grad():
        assert pruned(x).shape == (4, 10)


def test_ratio_zero_is_an_exact_copy() -> None:
    ep, x = _program("DWCNN")
    gm = modularize(ep)
    same = prune(gm, (x,), PruneConfig(ratio=0.0))
    assert same is not gm
    with torch.no_grad():
        assert torch.equal(same(x), gm(x))


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": 1.0}, {"ratio": -0.1}, {"ratio": 0.5, "mode": "2:4"},
     {"ratio": 0.5, "importance": "random"}, {"ratio": 0.5, "round_to": -1}],
)
def test_bad_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRecipe):
        PruneConfig(**kwargs)  # type: ignore[arg-type]


def test_raw_exported_module_is_accepted() -> None:
    ep, x = _program("ResCNN")
    pruned = prune(ep.module(), (x,), PruneConfig(ratio=0.5))
    assert _widths(pruned) == _widths(_half("ResCNN")[1])
    with torch.no_grad():
        assert torch.allclose(pruned(x), _half("ResCNN")[1](x), atol=1e-5, rtol=0)


def test_progress_is_reported_and_cancellable() -> None:
    from app.engine.errors import Cancelled

    ep, x = _program("DWCNN")
    gm = modularize(ep)
    seen: list[tuple[str, float]] = []

    def record(stage: str, frac: float, msg: str) -> None:
        seen.append((stage, frac))

    prune(gm, (x,), PruneConfig(ratio=0.5), on_progress=record)
    assert seen[0] == ("prune", 0.0) and seen[-1] == ("prune", 1.0)

    def cancel(stage: str, frac: float, msg: str) -> None:
        if frac >= 0.6:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        prune(gm, (x,), PruneConfig(ratio=0.5), on_progress=cancel)


def test_static_batch_program_is_reported_not_hidden() -> None:
    from app.engine.errors import InvalidModel

    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    # exported without a dynamic batch: attention reshapes bake the batch size 4 in
    gm = modularize(torch.export.export(TinyEncoder().eval(), (x,)))
    ep = reexport(gm, (x,))
    assert not has_dynamic_batch(ep)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), gm(x), atol=1e-6, rtol=0)
    with pytest.raises(InvalidModel):
        reexport(gm, (x,), strict=True)
