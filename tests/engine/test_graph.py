"""modularize(): real layers out of torch.export programs, with exact parity."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from app.engine.graph import modularize
from examples.zoo import DWCNN, MLP, ResCNN, TinyEncoder

pytestmark = pytest.mark.engine

ZOO = {
    "ResCNN": (ResCNN, (4, 1, 8, 8)),
    "DWCNN": (DWCNN, (4, 1, 8, 8)),
    "TinyEncoder": (TinyEncoder, (4, 1, 16, 16)),
    "MLP": (MLP, (4, 1, 8, 8)),
}
LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial running stats and affine params, so batch-norm parity means something."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@functools.cache  # exports cost ~1 s each on this machine; programs are never mutated
def _export(name: str, *, dynamic: bool = True) -> tuple[nn.Module, torch.export.ExportedProgram,
                                                        torch.Tensor]:
    cls, shape = ZOO[name]
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        _randomize_bn(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    dyn = ({0: torch.export.Dim("batch")},) if dynamic else None
    return model, torch.export.export(model, (x,), dynamic_shapes=dyn), x


def _layers(m: nn.Module) -> dict[type, int]:
    out: dict[type, int] = {}
    for sub in m.modules():
        for t in LAYER_TYPES:
            if isinstance(sub, t):
                out[t] = out.get(t, 0) + 1
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_parity_and_real_layers(name: str) -> None:
    model, ep, x = _export(name)
    gm = modularize(ep)
    with torch.no_grad():
        ref = ep.module()(x)
        out = gm(x)
        eager = model(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert torch.allclose(out, eager, atol=1e-5, rtol=0)
    # Every conv / linear / norm of the original is now a real module (MHA's in_proj is a
    # bare parameter in nn.MultiheadAttention and becomes an extra nn.Linear).
    expected = _layers(model)
    if name == "TinyEncoder":
        expected[nn.Linear] += 2  # one in_proj per encoder layer
    assert _layers(gm) == expected
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("conv2d", "linear", "batch_norm", "layer_norm"):
        assert not any(f"aten.{op}." in t for t in targets), op
    assert all(n.target != "_guards_fn" for n in gm.graph.nodes)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())


def test_conv_hyperparameters_survive() -> None:
    model, ep, _ = _export("DWCNN")
    gm = modularize(ep)
    src = dict(model.named_modules())
    for name, m in gm.named_modules():
        if isinstance(m, nn.Conv2d):
            o = src[name]
            assert isinstance(o, nn.Conv2d)
            assert (m.groups, m.stride, m.padding, m.dilation, m.bias is None) == (
                o.groups, o.stride, o.padding, o.dilation, o.bias is None
            ), name
    dw = gm.get_submodule("blocks.1.body.3")
    assert isinstance(dw, nn.Conv2d)
    assert dw.groups == dw.in_channels == dw.out_channels == 96 and dw.stride == (2, 2)


def test_decomposed_program_is_modularized_too() -> None:
    model, ep, x = _export("ResCNN", dynamic=False)
    gm = modularize(ep.run_decompositions())
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5, rtol=0)
    assert _layers(gm) == _layers(model)


def test_trainable_and_train_eval_switch() -> None:
    _, ep, x = _export("ResCNN")
    gm = modularize(ep)
    assert not gm.training
    with torch.no_grad():
        eval_out = gm(x)
    gm.train()
    bn = gm.get_submodule("stem.1")
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    mean_before = bn.running_mean.clone()
    out = gm(x)
    # batch statistics in train mode: different output, running stats move
    assert not torch.allclose(out, eval_out, atol=1e-3)
    assert not torch.equal(bn.running_mean, mean_before)
    out.square().mean().backward()
    grads = [p.grad for p in gm.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    head = gm.get_submodule("head")
    assert isinstance(head, nn.Linear)
    w_before = head.weight.detach().clone()
    opt.step()
    assert not torch.equal(head.weight, w_before)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))


def test_copy_does_not_share_storage_with_program() -> None:
    _, ep, x = _export("MLP")
    gm = modularize(ep)
    with torch.no_grad():
        ref = ep.module()(x)
        for p in gm.parameters():
            p.zero_()
        assert torch.equal(ep.module()(x), ref)


@pytest.mark.parametrize("name", ["DWCNN", "TinyEncoder"])
def test_reexport_with_dynamic_batch(name: str) -> None:
    _, ep, x = _export(name)
    gm = modularize(ep)
    batch = torch.export.Dim("batch")
    ep2 = torch.export.export(gm, (x,), dynamic_shapes=({0: batch},))
    x7 = torch.randn(7, *x.shape[1:])
    with torch.no_grad():
        assert torch.allclose(ep2.module()(x), gm(x), atol=1e-6, rtol=0)
        assert torch.allclose(ep2.module()(x7), ep.module()(x7), atol=1e-5, rtol=0)


def test_training_mode_export_keeps_batch_stats_semantics() -> None:
    torch.manual_seed(0)
    model = ResCNN().train()
    x = torch.randn(4, 1, 8, 8)
    ep = torch.export.export(model, (x,))
    gm = modularize(ep)
    assert gm.training  # exported with batch statistics: same semantics until .eval()
    with torch.no_grad():
        assert torch.allclose(gm(x), ep.module()(x), atol=1e-5, rtol=0)
    assert all(n.target is not torch.ops.aten.add_.Tensor for n in gm.graph.nodes)
