"""int8 static (PT2E), QAT, skip-depthwise, ONNX-level dynamic int8 / fp16 on real tiny models."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.engine.stages.export import export_onnx, onnx_outputs
from app.engine.stages.quantize import (
    convert,
    prepare_qat,
    quantize_onnx_dynamic,
    quantize_onnx_fp16,
    quantize_onnx_static,
    quantize_static,
    set_training,
)
from examples.zoo import DWCNN, ResCNN, TinyEncoder, digits, train
from tests.engine.conftest import depthwise_fp32

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return digits(8)


@pytest.fixture(scope="module")
def rescnn(data: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Module:
    x, y = data
    return train(ResCNN(width=16), x[:1200], y[:1200], epochs=3)


def _calib(x: torch.Tensor, n: int = 4, bs: int = 32) -> list[tuple[torch.Tensor]]:
    return [(x[i * bs : (i + 1) * bs],) for i in range(n)]


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _ort_fused_ops(path: Path, tmp: Path) -> Counter[str]:
    """Op types after ONNX Runtime's graph optimizations (what actually runs)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp / "optimized.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = _ops(tmp / "optimized.onnx")
    (tmp / "optimized.onnx").unlink()
    return ops


def test_static_int8_rescnn_qdq_onnx(
    rescnn: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, _ = data
    ex = (x[:4],)
    # The pipeline hands over exported / module-ized graphs: quantize that form.
    batch = torch.export.Dim("batch", min=2)
    gm = torch.export.export(rescnn, ex, dynamic_shapes=({0: batch},)).module()
    q = quantize_static(gm, ex, _calib(x))
    fp32 = export_onnx(rescnn, ex, tmp_path / "fp32.onnx")
    int8 = export_onnx(q, ex, tmp_path / "int8.onnx")

    # single files, nothing beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]
    ops = _ops(int8)
    assert ops["QuantizeLinear"] >= 8 and ops["DequantizeLinear"] >= 9
    proto = onnx.load(str(int8))
    int8_weights = [i for i in proto.graph.initializer
                    if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == 9  # 8 convs + the linear head
    assert not any(i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 64
                   for i in proto.graph.initializer)  # no fp32 weight left behind
    ratio = fp32.stat().st_size / int8.stat().st_size
    assert ratio >= 3.0, ratio

    # ORT fuses every conv into an int8 kernel (outputs quantized for it), head into QGemm
    fused = _ort_fused_ops(int8, tmp_path)
    assert fused["QLinearConv"] == 8 and fused["QLinearAdd"] == 2 and fused["QGemm"] == 1
    assert fused["Conv"] == 0 and fused["FusedConv"] == 0

    ev = (x[1200:],)
    with torch.no_grad():
        ref = rescnn(*ev).numpy()
        tq = q(*ev).numpy()
    got = onnx_outputs(int8, ev)[0]
    assert np.abs(got - tq).max() < 0.3  # ORT int8 kernels vs torch reference q/dq
    assert (got.argmax(1) == tq.argmax(1)).mean() >= 0.98
    agreement = (got.argmax(1) == ref.argmax(1)).mean()
    assert agreement >= 0.95, agreement
    # dynamic batch: batch 1 and 7 run
    assert onnx_outputs(int8, (x[:1],))[0].shape == (1, 10)
    assert onnx_outputs(int8, (x[:7],))[0].shape == (7, 10)


def test_skip_depthwise_keeps_depthwise_fp32(
    data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, _ = data
    model = DWCNN(width=8).eval()
    ex = (x[:4],)
    int8 = export_onnx(quantize_static(model, ex, _calib(x, 2)), ex, tmp_path / "a.onnx")
    skip = export_onnx(quantize_static(model, ex, _calib(x, 2), skip_depthwise=True), ex,
                       tmp_path / "s.onnx")

    assert depthwise_fp32(int8) == (3, 0)
    assert depthwise_fp32(skip) == (3, 3)
    # What ORT runs: all-int8 fuses the depthwise convs into QLinearConv; with skip_depthwise
    # they stay float (ORT would re-quantize a float conv sitting between DQ and Q).
    def int8_depthwise(path: Path) -> tuple[int, int]:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
        grouped = [n.op_type for n in nodes if any(a.name == "group" and a.i > 1
                                                   for a in n.attribute)]
        return len(grouped), grouped.count("QLinearConv")

    assert int8_depthwise(int8) == (3, 3)
    assert int8_depthwise(skip) == (3, 0)
    with torch.no_grad():
        ref = model(x[:256]).numpy()
    scale = np.abs(ref).max()
    for p in (int8, skip):  # untrained model: compare values, not argmax
        assert np.abs(onnx_outputs(p, (x[:256],))[0] - ref).max() < 0.1 * scale


def test_prepare_qat_trains_and_converts(
    data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, y = data
    torch.manual_seed(0)
    model = ResCNN(width=4)
    ex = (x[:4],)
    p = prepare_qat(model, ex)
    assert isinstance(p, torch.fx.GraphModule)
    assert model.training is False  # input model left in eval mode
    params = [t for t in p.parameters() if t.requires_grad]
    assert len(params) >= 9
    before = [t.detach().clone() for t in params]
    set_training(p, True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for i in range(0, 1152, 64):
        loss = torch.nn.functional.cross_entropy(p(x[i : i + 64]), y[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # it learns
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    set_training(p, False)
    with torch.no_grad():
        fake = p(x[1200:1400])
    q = convert(p)
    with torch.no_grad():
        real = q(x[1200:1400])
    assert (fake - real).abs().max() < 0.05  # fake-quant predicted the int8 model
    path = export_onnx(q, ex, tmp_path / "qat.onnx")
    assert _ort_fused_ops(path, tmp_path)["QLinearConv"] == 8
    got = onnx_outputs(path, (x[1200:1400],))[0]
    assert np.abs(got - real.numpy()).max() < 0.1


def test_dynamic_int8_tiny_encoder(
    data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, y = data
    model = train(TinyEncoder(seq=8, dim=64, ffn=256), x[:600], y[:600], epochs=2)
    ex = (x[:4],)
    fp32 = export_onnx(model, ex, tmp_path / "enc.onnx")
    dyn = quantize_onnx_dynamic(fp32, tmp_path / "enc_int8.onnx")
    ops = _ops(dyn)
    assert ops["DynamicQuantizeLinear"] >= 1 and ops["MatMulInteger"] >= 8
    assert fp32.stat().st_size / dyn.stat().st_size >= 2.5
    ev = (x[1200:],)
    a = onnx_outputs(fp32, ev)[0]
    b = onnx_outputs(dyn, ev)[0]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() >= 0.98, cos.mean()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


def test_onnx_static_and_fp16(
    rescnn: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, _ = data
    fp32 = export_onnx(rescnn, (x[:4],), tmp_path / "m.onnx")
    name = ort.InferenceSession(str(fp32)).get_inputs()[0].name
    calib = [{name: x[i : i + 32].numpy()} for i in range(0, 128, 32)]
    st = quantize_onnx_static(fp32, tmp_path / "st.onnx", calib)
    half = quantize_onnx_fp16(fp32, tmp_path / "h.onnx")
    ev = (x[1200:],)
    ref = onnx_outputs(fp32, ev)[0]
    assert fp32.stat().st_size / st.stat().st_size >= 2.5  # ORT keeps int32 bias + names
    assert (onnx_outputs(st, ev)[0].argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert 1.8 <= fp32.stat().st_size / half.stat().st_size <= 2.1
    assert np.abs(onnx_outputs(half, ev)[0] - ref).max() < 0.05


def test_qat_graph_has_no_more_requantize_than_ptq(
    rescnn: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    """QAT-converted int8 must run the same int8 graph as post-training int8.

    Regression: after a functional ``torch.relu`` (ResBlock) the X86 QAT recipe left a quantize
    point on the conv-bn / add output and ours added one after the relu, giving ONNX
    DQ -> Conv -> Q -> DQ -> Relu -> Q: four extra requantize pairs that ORT cannot fold
    (ResCNN QAT int8 ran 9-44 % slower than PTQ int8).
    """
    x, _ = data
    ex = (x[:4],)
    ptq = export_onnx(quantize_static(rescnn, ex, _calib(x)), ex, tmp_path / "ptq.onnx")
    p = prepare_qat(rescnn, ex)
    set_training(p, True)
    with torch.no_grad():  # observers see data; the structure, not the weights, is tested
        for (b,) in _calib(x):
            p(b)
    qat = export_onnx(convert(p), ex, tmp_path / "qat.onnx")
    qdq = ("QuantizeLinear", "DequantizeLinear")
    assert [_ops(qat)[k] for k in qdq] == [_ops(ptq)[k] for k in qdq]
    left_qat, left_ptq = _ort_fused_ops(qat, tmp_path), _ort_fused_ops(ptq, tmp_path)
    assert [left_qat[k] for k in qdq] == [left_ptq[k] for k in qdq], (left_qat, left_ptq)
    assert left_qat["QLinearConv"] == left_ptq["QLinearConv"] == 8


def test_qat_skip_depthwise_trains_converts_and_keeps_depthwise_fp32(
    data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    """main: ``prepare_qat(skip_depthwise=True)`` on conv-bn-act depthwise blocks raised
    IndexError inside torchao's conv-bn fusion, and the whole job with it (zoo EfficientNet)."""
    x, y = data
    torch.manual_seed(0)
    model = DWCNN(width=8)
    ex = (x[:4],)
    p = prepare_qat(model, ex, skip_depthwise=True)
    set_training(p, True)
    opt = torch.optim.AdamW([t for t in p.parameters() if t.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(p(x[:64]), y[:64])  # one step: it trains
    loss.backward()
    opt.step()
    q = convert(p)
    with torch.no_grad():
        real = q(x[1200:1400])
    path = export_onnx(q, ex, tmp_path / "qat_dw.onnx")
    assert depthwise_fp32(path) == (3, 3)
    fused = _ort_fused_ops(path, tmp_path)
    assert fused["QLinearConv"] >= 3, fused  # the stem and pointwise convs run int8
    got = onnx_outputs(path, (x[1200:1400],))[0]
    assert np.abs(got - real.numpy()).max() < 0.1 * np.abs(real.numpy()).max()


def test_non_strict_rewrite_patterns_are_torchao_s_graphs(
    data: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewrite patterns are traced non-strict for speed (quantize.py); a torch / torchao
    upgrade that makes those graphs differ from torchao's own strict ones would make conv-bn
    fusion silently match nothing. Compares node for node (ops, targets, wiring, constants)
    the patterns one QAT prepare + convert of a conv-bn net asks for."""
    from torchao.quantization.pt2e import utils as pt2e_utils

    from app.engine.stages import quantize as q

    seen: list[tuple[object, tuple[object, ...], bool, dict[str, object]]] = []
    mine = q._export_pattern

    def record(pattern: object, ex: tuple[object, ...], is_cuda: bool = False,
               **kwargs: object) -> torch.fx.GraphModule:
        seen.append((pattern, ex, is_cuda, kwargs))
        return mine(pattern, ex, is_cuda, **kwargs)

    monkeypatch.setattr(q, "_export_pattern", record)
    monkeypatch.setattr(q, "_PATTERNS", {})  # no memo: every pattern is traced here
    x, _ = data
    p = prepare_qat(DWCNN(width=4), (x[:4],))
    set_training(p, True)
    with torch.no_grad():
        p(x[:16])
    convert(p)

    def signature(gm: torch.fx.GraphModule) -> list[tuple[object, ...]]:
        index = {n: i for i, n in enumerate(gm.graph.nodes)}

        def arg(v: object) -> object:
            if isinstance(v, torch.fx.Node):
                return ("node", index[v])
            if isinstance(v, (list, tuple)):
                return tuple(arg(u) for u in v)
            return repr(v)

        return [(n.op, str(n.target), arg(n.args),
                 tuple(sorted((k, arg(v)) for k, v in n.kwargs.items())))
                for n in gm.graph.nodes]

    kinds = {getattr(getattr(pat, "fn", pat), "__qualname__", "?") for pat, *_ in seen}
    assert any("conv_bn" in k for k in kinds) and any("batchnorm" in k for k in kinds), kinds
    # One of each kind: the strict reference costs about 0.5 s a pattern.
    firsts: dict[str, tuple[object, tuple[object, ...], bool, dict[str, object]]] = {}
    for item in seen:
        firsts.setdefault(getattr(getattr(item[0], "fn", item[0]), "__qualname__", "?"), item)
    for name, (pat, ex, is_cuda, kwargs) in firsts.items():
        strict = pt2e_utils._get_aten_graph_module_for_pattern(pat, ex, is_cuda, **kwargs)
        assert signature(mine(pat, ex, is_cuda, **kwargs)) == signature(strict), name
