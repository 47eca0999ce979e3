"""The quantization-scheme registry: every scheme builds, the API enum is the registry, a
scheme that fails on a model is reported and its fallback tried, depthwise-fp32 is a real
candidate, and padding="same" CNNs come out of the pipeline in int8."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from app.engine import schemes
from app.engine.cli import print_summary
from app.engine.pipeline import run
from app.engine.planner.search import SearchSpace, default_space
from app.engine.stages.export import onnx_outputs
from app.engine.types import Constraints, JobSpec
from examples.zoo import DWCNN, MLP, digits
from tests.engine.conftest import depthwise_fp32

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return digits(8)[0]


def test_every_registered_scheme_builds(x: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(hidden=128).eval()
    ex = (x[:4],)
    calib = [(x[:64],), (x[64:128],)]
    sizes, outs = {}, {}
    # int8_static_dw_fp32 is int8_static on a model without depthwise convs: built on DWCNN
    # in test_depthwise_fp32_scheme_keeps_depthwise_convs_fp32 (one PT2E build saved here)
    names = [n for n in schemes.NAMES if n != "int8_static_dw_fp32"]
    for name in names:
        scheme = schemes.get(name)
        got, path = scheme.to_onnx(model, ex, tmp_path / f"{name}.onnx", calib)
        assert (got is model) == (scheme.method != "pt2e")
        sizes[name] = path.stat().st_size
        outs[name] = onnx_outputs(path, (x[:256],))[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.onnx" for n in names)  # no temporary file left
    ref = outs["none"]
    for name in names:
        ratio = sizes["none"] / sizes[name]
        if name.startswith("int8"):
            assert ratio >= 2.5, (name, ratio)
        elif name == "fp16":
            assert 1.8 <= ratio <= 2.1
        assert np.abs(outs[name] - ref).max() < 0.05 * np.abs(ref).max() + 1e-3, name


def test_api_recipe_enum_is_the_registry_and_cheap_to_import() -> None:
    code = ("import sys, json; from app.schemas.jobs import RecipeIn; "
            "print(json.dumps([RecipeIn.model_json_schema()['properties']['quant']['enum'], "
            "'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2])
    enum, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert enum == list(schemes.NAMES)
    assert "int8_static_dw_fp32" in enum
    assert torch_loaded is False  # the client reads this schema without the engine's deps
    with pytest.raises(Exception, match="unknown quantization scheme 'int4'"):
        schemes.get("int4")


def test_depthwise_fp32_scheme_keeps_depthwise_convs_fp32(x: torch.Tensor,
                                                          tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DWCNN(width=8).eval()
    ex = (x[:4],)
    calib = [(x[:32],), (x[32:64],)]

    # (all-int8 quantizes them: test_quantize.test_skip_depthwise_keeps_depthwise_fp32)
    _, keep = schemes.get("int8_static_dw_fp32").to_onnx(model, ex, tmp_path / "k.onnx", calib)
    assert depthwise_fp32(keep) == (3, 3)
    # ... and the planner measures it as its own candidate on depthwise nets
    assert "int8_static_dw_fp32" in default_space(linear_heavy=False,
                                                  depthwise=True).quant_schemes
    assert "int8_static_dw_fp32" not in default_space(linear_heavy=False).quant_schemes


class _AllConv(nn.Module):
    """A fully convolutional classifier (no Linear): nothing for int8 dynamic to quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 10, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


class _SameCNN(nn.Module):
    """EfficientNet-style: padding="same" convs, a depthwise one, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding="same")
        self.dw = nn.Conv2d(32, 32, 3, padding="same", groups=32)
        self.c2 = nn.Conv2d(32, 32, 4, padding="same")
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.c1(x))))
        return self.head(torch.relu(self.c2(x)).mean((2, 3)))


def _files(model: nn.Module, x: torch.Tensor, tmp: Path) -> tuple[Path, Path]:
    ep = torch.export.export(model.eval(), (x[:4],),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, tmp / "m.pt2")
    np.savez(tmp / "d.npz", x=x[:400].numpy())
    return tmp / "m.pt2", tmp / "d.npz"


def _spec() -> JobSpec:
    return JobSpec(constraints=Constraints(max_size_mb=100.0, batch_size=8,
                                           time_budget_s=240.0), seed=0)


def test_failing_scheme_is_reported_and_the_fallback_built(x: torch.Tensor,
                                                            tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_path, data_path = _files(_AllConv(), x, tmp_path)
    space = SearchSpace(prune_ratios=(0.0,), quant_schemes=("int8_dynamic",), max_distill=0)
    res = run(model_path, data_path, _spec(), tmp_path / "out", space=space)

    # main: int8_dynamic "succeeds" with an unchanged fp32 model (1.0x) and says nothing.
    # (The 80-sample hold-out adds its own "too small" warning: not about quantization.)
    quant = [w for w in res.warnings if w.startswith("quantization ")]
    assert len(quant) == 1
    assert quant[0].startswith("quantization int8_dynamic failed on this model")
    assert quant[0].endswith("trying int8_static_onnx instead")
    assert [c.recipe.quant for c in res.candidates] == ["int8_static_onnx"]
    assert res.baseline.size_bytes / res.best.metrics.size_bytes >= 2.5
    report = json.loads(res.artifacts["report.json"].read_text())
    assert report["warnings"] == res.warnings
    out = io.StringIO()
    print_summary(res, out)
    assert f"warning: {quant[0]}" in out.getvalue()


def test_padding_same_cnn_comes_out_int8(x: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    xs = torch.nn.functional.interpolate(x, size=12)
    model_path, data_path = _files(_SameCNN(), xs, tmp_path)
    space = SearchSpace(prune_ratios=(0.0,), quant_schemes=("int8_static",), max_distill=0)
    res = run(model_path, data_path, _spec(), tmp_path / "out", space=space)

    # main: PT2E raised "conv2d is not an aten conv2d operator"; nothing could be built
    assert not [w for w in res.warnings if "quantiz" in w or "int8" in w]
    assert res.report["skipped"] == []
    assert [c.recipe.quant for c in res.candidates] == ["int8_static"]
    proto = onnx.load(str(res.artifacts["model.onnx"]))
    dq_out = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and all(c.input[1] in dq_out for c in convs)
    assert res.baseline.size_bytes / res.best.metrics.size_bytes >= 2.0
    assert res.best.metrics.quality >= 0.98  # agreement with fp32 on held-out data


def test_fallback_replaces_the_failed_scheme_at_every_ratio() -> None:
    from app.engine.planner.search import _fall_back

    grid = SearchSpace(prune_ratios=(0.0, 0.5), quant_schemes=("int8_static", "int8_dynamic",
                                                               "none"), lr=1e-3,
                       mixup=0.0).grid(0)
    assert [(r.prune_ratio, r.quant) for r in grid] == [
        (0.0, "int8_static"), (0.0, "int8_dynamic"), (0.5, "int8_static"),
        (0.5, "int8_dynamic"), (0.5, "none")]
    skipped: list[dict[str, str]] = []
    new, line = _fall_back(grid, 0, "int8_static", {"int8_static"}, skipped)
    assert line == "trying int8_static_onnx instead"
    assert [(r.prune_ratio, r.quant) for r in new] == [
        (0.0, "int8_static_onnx"), (0.0, "int8_dynamic"), (0.5, "int8_static_onnx"),
        (0.5, "int8_dynamic"), (0.5, "none")]
    # the ONNX-level fallback fails too: int8_dynamic is already in the grid, nothing is left
    new2, line2 = _fall_back(new, 0, "int8_static_onnx", {"int8_static", "int8_static_onnx"},
                             skipped)
    assert line2 == "trying int8_dynamic instead"
    assert [(r.prune_ratio, r.quant) for r in new2] == [
        (0.0, "int8_dynamic"), (0.5, "int8_dynamic"), (0.5, "none")]
    assert [s["error"] for s in skipped] == ["not built: int8_static_onnx failed on this model"]
    assert schemes.fallback_for("int8_dynamic", {"int8_static_onnx"}) is None
