"""Evaluation on ONNX Runtime: parity with torch, quality numbers, latency, MACs/params/size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from app.engine.formats.data import Dataset, load_dataset
from app.engine.stages.evaluate import (
    compare_latency,
    count_macs,
    count_params,
    evaluate_against_baseline,
    evaluate_onnx,
    latency_ms,
    make_session,
    median_ci,
    quality,
    run_onnx,
    size_on_disk,
)
from app.engine.types import TensorSpec
from tests.engine.conftest import export_onnx

pytestmark = pytest.mark.engine

IMG = TensorSpec("x", (None, 1, 8, 8), "float32")


class SmallCNN(nn.Module):
    """Conv 1->4 (3x3, pad 1) on 8x8, conv 4->8 (3x3, stride 2), depthwise 8 (3x3), linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.dw(x))
        return self.fc(x.flatten(1))


# Hand count per sample: output elements x (Cin/groups x kh x kw), Linear in x out.
CNN_MACS = (8 * 8 * 4) * (1 * 9) + (4 * 4 * 8) * (4 * 9) + (4 * 4 * 8) * (1 * 9) + 128 * 10
CNN_PARAMS = (4 * 9 + 4) + (8 * 4 * 9 + 8) + (8 * 9 + 8) + (128 * 10 + 10)
MLP_MACS = 64 * 64 + 64 * 64 + 64 * 10
MLP_PARAMS = MLP_MACS + 64 + 64 + 10


@pytest.fixture(scope="module")
def digits_ds(digits_npz: Path) -> Dataset:
    return load_dataset(digits_npz, [IMG])


@pytest.fixture(scope="module")
def cnn_onnx(engine_dir: Path) -> Path:
    torch.manual_seed(0)
    d = engine_dir / "cnn"
    d.mkdir()
    return export_onnx(SmallCNN(), torch.randn(2, 1, 8, 8), d / "cnn.onnx")


class _Calib(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.it = iter({"x": x[i:i + 32]} for i in range(0, 128, 32))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def test_ort_matches_torch(mlp_onnx: Path, mlp_model: nn.Module, digits_ds: Dataset) -> None:
    out = run_onnx(mlp_onnx, digits_ds, batch_size=100)  # 1797 = 17 full batches + 97
    with torch.no_grad():
        ref = mlp_model(torch.from_numpy(digits_ds.inputs["x"])).numpy()
    assert out.shape == (1797, 10)
    assert float(np.abs(out - ref).max()) < 1e-4


def test_accuracy_and_per_class_match_numpy(mlp_onnx: Path, digits_ds: Dataset) -> None:
    out = run_onnx(mlp_onnx, digits_ds)
    labels = digits_ds.labels
    assert labels is not None
    pred = out.argmax(1)
    q, kind, per_class, agreement = quality(out, out, labels)
    assert kind == "accuracy"
    assert q == pytest.approx(float(np.mean(pred == labels)), abs=1e-12)
    assert q > 0.8  # the fixture model was really trained (3 epochs on digits)
    assert per_class is not None and sorted(per_class, key=int) == [str(c) for c in range(10)]
    for c in range(10):
        assert per_class[str(c)] == pytest.approx(float(np.mean(pred[labels == c] == c)))
    assert agreement == 1.0


def test_agreement_and_cosine() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 5)).astype(np.float32)
    assert quality(logits, logits, None) == (1.0, "agreement", None, 1.0)
    flipped = logits.copy()
    flipped[:10] = -flipped[:10]  # changes the argmax of (almost surely) all 10 rows
    expected = float(np.mean(flipped.argmax(1) == logits.argmax(1)))
    assert quality(flipped, logits, None)[:2] == (pytest.approx(expected), "agreement")
    assert expected <= 0.8
    emb = rng.normal(size=(20, 4, 8)).astype(np.float32)  # 3-D: an embedding, not logits
    q, kind, per_class, agreement = quality(emb, emb, None)
    assert (kind, per_class, agreement) == ("cosine", None, None)
    assert q == pytest.approx(1.0, abs=1e-9)
    assert quality(-emb, emb, None)[0] == pytest.approx(-1.0, abs=1e-9)


def test_macs_params_hand_counted(cnn_onnx: Path, mlp_onnx: Path) -> None:
    assert count_macs(cnn_onnx, {"x": (1, 1, 8, 8)}) == CNN_MACS == 2304 + 4608 + 1152 + 1280
    assert count_macs(cnn_onnx, [(3, 1, 8, 8)]) == 3 * CNN_MACS
    assert count_params(cnn_onnx) == CNN_PARAMS
    assert count_macs(mlp_onnx, {"x": (1, 1, 8, 8)}) == MLP_MACS
    assert count_params(mlp_onnx) == MLP_PARAMS == 8970


def test_qdq_graph_counts_like_fp32(cnn_onnx: Path, digits_ds: Dataset, tmp_path: Path) -> None:
    q = tmp_path / "cnn.int8.onnx"
    quantize_static(str(cnn_onnx), str(q), _Calib(digits_ds.inputs["x"]),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert count_macs(q, {"x": (1, 1, 8, 8)}) == CNN_MACS
    assert count_params(q) == CNN_PARAMS
    # Same function as fp32 (int8 rounding only): argmax agrees on almost all digits.
    x = {"x": digits_ds.inputs["x"][:256]}
    ref = make_session(cnn_onnx).run(None, x)[0]
    out = make_session(q).run(None, x)[0]
    assert float(np.mean(ref.argmax(1) == out.argmax(1))) > 0.9


def test_size_includes_external_data(mlp_onnx: Path) -> None:
    data = mlp_onnx.parent / (mlp_onnx.name + ".data")
    assert data.stat().st_size >= 4 * MLP_MACS  # fp32 weight matrices live in the .data file
    assert size_on_disk(mlp_onnx) == mlp_onnx.stat().st_size + data.stat().st_size


def test_session_and_latency(mlp_onnx: Path, cnn_onnx: Path, digits_ds: Dataset) -> None:
    a, b = make_session(mlp_onnx, threads=2), make_session(cnn_onnx, threads=1)
    opts = a.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    feed = (digits_ds.inputs["x"][:8],)
    res = latency_ms([a, b], feed, warmup=2, rounds=3, runs_per_round=5)
    assert len(res) == 2
    for p50, p95 in res:
        assert 0 < p50 <= p95 < 1000


def test_evaluate_onnx_metrics(mlp_onnx: Path, mlp_model: nn.Module, digits_ds: Dataset) -> None:
    with torch.no_grad():
        ref = mlp_model(torch.from_numpy(digits_ds.inputs["x"])).numpy()
    m = evaluate_onnx(mlp_onnx, digits_ds, ref, batch_size=4, threads=1)
    labels = digits_ds.labels
    assert labels is not None
    assert m.quality_kind == "accuracy"
    assert m.quality == pytest.approx(float(np.mean(ref.argmax(1) == labels)), abs=1e-3)
    assert m.agreement is not None and m.agreement > 0.999
    assert m.parameters == 8970 and m.macs == MLP_MACS
    assert m.size_bytes == size_on_disk(mlp_onnx)
    assert 0 < m.latency_p50_ms <= m.latency_p95_ms
    assert m.per_class_accuracy is not None and len(m.per_class_accuracy) == 10
    unlabeled = Dataset(dict(digits_ds.inputs), None)
    m2 = evaluate_onnx(mlp_onnx, unlabeled, ref, latency=(1.0, 2.0))
    assert (m2.quality_kind, m2.latency_p50_ms, m2.latency_p95_ms) == ("agreement", 1.0, 2.0)
    assert m2.quality == m2.agreement and m2.quality > 0.999


def test_static_batch_model_is_padded(engine_dir: Path, digits_ds: Dataset) -> None:
    torch.manual_seed(1)
    model = SmallCNN().eval()
    path = engine_dir / "cnn_static" / "cnn.onnx"
    path.parent.mkdir()
    torch.onnx.export(model, (torch.randn(4, 1, 8, 8),), str(path), dynamo=True)  # batch fixed 4
    assert make_session(path).get_inputs()[0].shape[0] == 4
    ds = digits_ds.take(10)  # 4 + 4 + 2 (padded to 4, padding dropped)
    out = run_onnx(path, ds, batch_size=64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ds.inputs["x"])).numpy()
    assert out.shape == (10, 10)
    assert float(np.abs(out - ref).max()) < 1e-5
    m = evaluate_onnx(path, ds, ref, batch_size=1, threads=1)
    assert m.macs == CNN_MACS and m.quality_kind == "accuracy"


# ------------------------------------------------------------------- latency against a control


def test_median_ci_order_statistics() -> None:
    # n = 9 at 90 %: P(B(9, 1/2) <= 1) = 10/512 <= 0.05 < P(B <= 2) = 46/512 -> ranks 2 and 8.
    assert median_ci([9.0, 1, 8, 2, 7, 3, 6, 4, 5], 0.9) == (2.0, 8.0)
    # n = 20: P(B <= 5) = 0.0207 <= 0.05 < P(B <= 6) = 0.0577 -> ranks 6 and 15.
    assert median_ci(list(range(1, 21)), 0.9) == (6, 15)
    assert median_ci([3.0, 1.0], 0.9) == (1.0, 3.0)  # too few rounds: the whole range


class _Wide(nn.Module):
    """8x8 digits -> hidden -> hidden -> 10: its cost is ~hidden^2 MACs per sample."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def wide_pair(engine_dir: Path, digits8: tuple[torch.Tensor, torch.Tensor]) -> tuple[Path, Path]:
    """A baseline MLP and a 4x narrower one (about 16x fewer MACs in its middle layer)."""
    d = engine_dir / "wide"
    d.mkdir()
    torch.manual_seed(0)
    return (export_onnx(_Wide(1024), digits8[0][:4], d / "wide.onnx"),
            export_onnx(_Wide(256), digits8[0][:4], d / "narrow.onnx"))


def test_identical_model_control_measures_the_noise(wide_pair: tuple[Path, Path],
                                                    digits_ds: Dataset) -> None:
    """An identical model measured as a candidate lands near 1.0x; a real speed-up lands far
    outside that noise band, and the run says how many rounds it took and why it stopped."""
    wide, narrow = wide_pair
    feed = {"x": digits_ds.inputs["x"][:32]}
    cmp = compare_latency(make_session(wide), [make_session(narrow), make_session(wide)], feed,
                          control=make_session(wide), min_rounds=6, max_rounds=30,
                          max_seconds=20.0)
    c, fast, same = cmp.control, cmp.candidates[0], cmp.candidates[1]
    assert 6 <= cmp.rounds <= 30 and cmp.stopped in ("precise", "max_rounds", "time")
    assert c.low <= c.ratio <= c.high and 0.8 < c.ratio < 1.25, c
    assert cmp.noise == pytest.approx(max(abs(c.ratio - 1), c.high - 1, 1 - c.low))
    # A second identical candidate is as close to 1.0x as the control says identical models are.
    assert 0.75 < same.ratio < 1.33, same
    # About 16x fewer MACs in the big layer: well below 1 and beyond the measured noise.
    assert fast.high < 1.0 - cmp.noise and fast.ratio < 0.6, (fast, cmp.noise)
    assert fast.p50_ms < cmp.baseline_p50_ms
    d = cmp.to_dict()
    assert d["control"]["ratio"] == c.ratio and d["rounds"] == cmp.rounds and "method" in d


def test_evaluate_against_baseline_derives_ms_from_the_ratio(
    wide_pair: tuple[Path, Path], digits_ds: Dataset,
) -> None:
    """One measurement path: metrics of each candidate with its ratio, interval and the run's
    noise; latency_p50_ms is the given baseline figure times the measured ratio."""
    wide, narrow = wide_pair
    ref = run_onnx(wide, digits_ds)
    ms, cmp = evaluate_against_baseline(wide, [narrow], digits_ds, ref, baseline_p50_ms=2.0,
                                        batch_size=16, threads=2, min_rounds=4, max_rounds=8)
    m = ms[0]
    assert m.latency is not None
    assert m.latency.ratio == cmp.candidates[0].ratio
    assert m.latency_p50_ms == pytest.approx(2.0 * m.latency.ratio)
    assert m.latency.noise == cmp.noise and m.latency.control_ratio == cmp.control.ratio
    assert m.latency.rounds == cmp.rounds and m.latency.ratio_low <= m.latency.ratio
    assert m.size_bytes == size_on_disk(narrow) and m.quality_kind == "accuracy"
    assert m.agreement is not None and 0.0 <= m.agreement <= 1.0
