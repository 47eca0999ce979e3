"""Quantization that covers the model: embedding tables, LSTM, padding="same" convs.

Each test is a regression test for issue 10 §2 on a tiny real model (transformers BERT from a
config, nn.LSTM, nn.Conv2d with padding="same").
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from app.engine.stages.export import export_onnx, onnx_outputs
from app.engine.stages.quantize import (
    capture,
    explicit_conv_padding,
    fp32_leftovers,
    quantize_onnx_dynamic,
    quantize_static,
)

pytestmark = pytest.mark.engine


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


class _Embedder(nn.Module):
    """A BERT encoder (transformers, from a config) returning mean-pooled L2-normed rows.

    Vocabulary 2048 x 64: the token-embedding table is most of the bytes, as in MiniLM."""

    def __init__(self) -> None:
        import transformers as tf

        super().__init__()
        torch.manual_seed(0)
        cfg = tf.BertConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=128,
                            max_position_embeddings=16)
        self.bert = tf.BertModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_dynamic_int8_quantizes_the_embedding_table(tmp_path: Path) -> None:
    model = _Embedder().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2048, (64, 16), generator=g)
    mask = torch.ones(64, 16, dtype=torch.int64)
    mask[::3, 10:] = 0
    fp32 = export_onnx(model, (ids[:4], mask[:4]), tmp_path / "emb.onnx")
    q = quantize_onnx_dynamic(fp32, tmp_path / "emb_int8.onnx")

    proto = onnx.load(str(q))
    # ORT stores a quantized Gather table as uint8 with a zero point
    int8 = {i.name for i in proto.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in int8]
    assert len(gathers) >= 1  # the word-embedding table is int8 (main: fp32, 1.5x smaller)
    assert "Gather" not in fp32_leftovers(q) and "MatMul" not in fp32_leftovers(q)
    ratio = fp32.stat().st_size / q.stat().st_size
    assert ratio >= 3.5, ratio
    a = onnx_outputs(fp32, (ids, mask))[0]
    b = onnx_outputs(q, (ids, mask))[0]
    assert _cosine(a, b) >= 0.99


class _LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(16, 96, num_layers=2, batch_first=True)
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_dynamic_int8_quantizes_lstm(tmp_path: Path) -> None:
    model = _LSTMNet().eval()
    x = torch.randn(64, 12, 16, generator=torch.Generator().manual_seed(0))
    fp32 = export_onnx(model, (x[:4],), tmp_path / "lstm.onnx")
    assert _ops(fp32)["LSTM"] == 2
    q = quantize_onnx_dynamic(fp32, tmp_path / "lstm_int8.onnx")
    proto = onnx.load(str(q))
    # ORT's int8 LSTM is DynamicQuantizeLSTM (com.microsoft) with int8 W and R.
    assert _ops(q)["DynamicQuantizeLSTM"] == 2 and _ops(q)["LSTM"] == 0
    assert fp32_leftovers(q) == {}
    ratio = fp32.stat().st_size / q.stat().st_size
    assert ratio >= 3.0, ratio  # main: 1.00x (LSTM weights left fp32)
    a = onnx_outputs(fp32, (x,))[0]
    b = onnx_outputs(q, (x,))[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 3
               for i in proto.graph.initializer)


class _SameConvNet(nn.Module):
    """padding="same" with an odd kernel (symmetric), an even kernel and a dilated even kernel
    (asymmetric: explicit pad), plus a depthwise "same" conv (EfficientNet's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding="same")
        self.c2 = nn.Conv2d(8, 8, 4, padding="same")
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.c3 = nn.Conv2d(8, 8, 2, padding="same", dilation=3)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.c3(x))
        return self.head(x.mean((2, 3)))


def test_explicit_padding_rewrite_is_exact() -> None:
    model = _SameConvNet().eval()
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    gm = capture(model, (x[:2],)).module()
    assert sum(n.target == torch.ops.aten.conv2d.padding for n in gm.graph.nodes) == 4
    assert explicit_conv_padding(gm) == 4
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.conv2d.padding not in targets
    assert targets.count(torch.ops.aten.constant_pad_nd.default) == 2  # the even kernels
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_padding_same_conv_quantizes_to_int8(tmp_path: Path) -> None:
    model = _SameConvNet().eval()
    x = torch.randn(96, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    ex = (x[:4],)
    # main: ValueError "conv2d is not an aten conv2d operator" from the X86 quantizer
    q = quantize_static(model, ex, [(x[i:i + 32],) for i in range(0, 96, 32)])
    path = export_onnx(q, ex, tmp_path / "same_int8.onnx")
    proto = onnx.load(str(path))
    dq_out = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    assert all(c.input[0] in dq_out and c.input[1] in dq_out for c in convs)  # QDQ around all
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert _ops(tmp_path / "opt.onnx")["QLinearConv"] == 4  # what ORT runs: int8 kernels
    with torch.no_grad():
        ref = model(x).numpy()
    got = onnx_outputs(path, (x,))[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_int8_export_folds_zero_pads_into_conv(tmp_path: Path) -> None:
    """The even "same" kernels export as Pad -> Q -> DQ -> Conv, a pattern ONNX Runtime does
    not fuse: on main each ran as a fp32 Pad between a dequantize and a requantize (52 of them
    made transformers' MobileNetV2 int8 1.3-1.6x slower than fp32)."""
    model = _SameConvNet().eval()
    x = torch.randn(96, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    ex = (x[:4],)
    q = quantize_static(model, ex, [(x[i:i + 32],) for i in range(0, 96, 32)])
    path = export_onnx(q, ex, tmp_path / "same_int8.onnx")
    assert _ops(path)["Pad"] == 0
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ran = _ops(tmp_path / "opt.onnx")
    assert ran["QLinearConv"] == 4 and ran["Pad"] == 0
    # Quantize the input and the pooled features, dequantize before the fp32 mean and the
    # logits: int8 between (main: a DQ -> Pad -> Q per padded conv on top).
    assert ran["QuantizeLinear"] == 2 and ran["DequantizeLinear"] == 2, ran
    with torch.no_grad():
        ref = q(x).numpy()
    got = onnx_outputs(path, (x,))[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


class _OversizedPoolNet(nn.Module):
    """EfficientNet's head: ``nn.AvgPool2d(hidden_dim, ceil_mode=True)`` on a small map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(64, ceil_mode=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(self.pool(x).flatten(1))


def test_int8_oversized_average_pool_is_not_zeroed(tmp_path: Path) -> None:
    """main: ORT's QLinearAveragePool zeroed the pooled features (every int8 EfficientNet
    predicted one class); the export now writes a GlobalAveragePool."""
    model = _OversizedPoolNet().eval()
    x = torch.randn(96, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    ex = (x[:4],)
    q = quantize_static(model, ex, [(x[i:i + 32],) for i in range(0, 96, 32)])
    path = export_onnx(q, ex, tmp_path / "pool_int8.onnx")
    ops = _ops(path)
    assert ops["AveragePool"] == 0 and ops["GlobalAveragePool"] == 1
    with torch.no_grad():
        ref = q(x).numpy()
    got = onnx_outputs(path, (x,))[0]  # ONNX Runtime, default optimizations: int8 kernels
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9
