"""ONNX input end to end: quantized with ONNX Runtime, measured like any candidate, same report.

Today's main fails every ONNX model at load (``'model.onnx' is not a .pt2 archive``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from app.engine.cli import main as cli_main
from app.engine.errors import InvalidRecipe
from app.engine.formats.data import Dataset
from app.engine.pipeline import run
from app.engine.stages.evaluate import latency_ms, make_session, run_onnx
from app.engine.types import Constraints, JobSpec, ProgressStatus, Recipe
from tests.onnx_example import build_onnx


@pytest.fixture(scope="module")
def example_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_onnx(tmp_path_factory.mktemp("onnx_in"))


def _accuracy(model: Path, data: Path) -> float:
    arrays = np.load(data)
    out = run_onnx(make_session(model), Dataset({"x": arrays["x"]}))
    return float((out.argmax(1) == arrays["labels"]).mean())


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_compress_onnx_cli_gives_a_faster_int8_model(example_onnx: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    model, data = example_onnx
    out = tmp_path / "out"
    rc = cli_main(["compress", str(model), "--data", str(data), "--out", str(out),
                   "--max-accuracy-drop", "0.02", "--batch-size", "8", "--quiet"])
    assert rc == 0
    # Artifacts: model.onnx + report.json + candidates.json, no model.pt2 (no PyTorch graph).
    assert sorted(p.name for p in out.iterdir()) == ["candidates.json", "model.onnx",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "succeeded" and report["model_format"] == "onnx"
    assert any("not applicable" in w for w in report["warnings"])
    assert any("no model.pt2" in w for w in report["warnings"])
    assert set(report["manifest"]["outputs"]) == {"model.onnx", "candidates.json"}
    cands = report["candidates"]
    # Quantization only: no prune ratio > 0, no distillation; a per-op-type fp32 fallback
    # (int8 only where the weights are), each measured on the runtime.
    assert all(c["recipe"]["prune_ratio"] == 0 and c["recipe"]["distill_epochs"] == 0
               and not c["distilled"] for c in cands)
    assert {c["recipe"]["quant"] for c in cands} >= {"int8_static", "int8_dynamic", "fp16"}
    assert any(c["recipe"]["keep_fp32"] for c in cands)
    assert all(c["metrics"]["latency_p50_ms"] > 0 and c["metrics"]["size_bytes"] > 0
               for c in cands)
    chosen = report["chosen"]
    assert chosen["recipe"]["quant"] in ("int8_static", "int8_dynamic") and chosen["feasible"]

    art = out / "model.onnx"
    assert _op_types(art) & {"DequantizeLinear", "DynamicQuantizeLinear"}
    assert any(i.data_type == onnx.TensorProto.INT8 for i in onnx.load(str(art)).graph.initializer)
    assert art.stat().st_size < 0.4 * model.stat().st_size  # int8 weights: about 4x smaller
    assert report["baseline"]["size_bytes"] == model.stat().st_size
    # Accuracy on every digit, recomputed here: within the 2-point limit of the uploaded model.
    assert _accuracy(art, data) >= _accuracy(model, data) - 0.02
    assert _accuracy(model, data) > 0.9  # a trained model, not chance
    # Faster than the uploaded model at batch 8: measured again here, side by side.
    feed = {"x": np.load(data)["x"][:8]}
    base_ms, art_ms = (p50 for p50, _ in latency_ms([make_session(model), make_session(art)],
                                                    feed, rounds=9))
    assert art_ms < base_ms, f"int8 {art_ms:.3f} ms vs uploaded {base_ms:.3f} ms"
    assert report["ratios"]["speedup"] > 1.0 / (1 - 0.03)  # the never-slower tolerance


def test_onnx_fallback_recipe_keeps_the_op_type_in_fp32(example_onnx: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    model, data = example_onnx
    def gemm_weights(recipe: Recipe, out: Path) -> tuple[list[str], list[str]]:
        """(op type producing each Gemm's weight, data types of those weights' sources)."""
        spec = JobSpec(constraints=Constraints(max_size_mb=10.0, time_budget_s=120),
                       recipe=recipe)
        statuses.clear()  # this run's overall progress only
        res = run(model, data, spec, out, on_status=statuses.append)
        assert res.best.recipe == recipe and "model.pt2" not in res.artifacts
        graph = onnx.load(str(res.artifacts["model.onnx"])).graph
        producers = {o: n.op_type for n in graph.node for o in n.output}
        inits = {i.name: i.data_type for i in graph.initializer}
        gemms = [n for n in graph.node if n.op_type == "Gemm"]
        assert len(gemms) == 3
        return ([producers.get(g.input[1], "initializer") for g in gemms],
                [onnx.TensorProto.DataType.Name(inits.get(g.input[1], 0)) for g in gemms])

    statuses: list[ProgressStatus] = []
    # All int8: every Gemm reads an int8 weight through DequantizeLinear.
    assert gemm_weights(Recipe(quant="int8_static"), tmp_path / "int8")[0] == [
        "DequantizeLinear"] * 3
    # Gemm kept fp32: every Gemm reads its fp32 initializer directly.
    assert gemm_weights(Recipe(quant="int8_static", keep_fp32=("Gemm",)),
                        tmp_path / "keep") == (["initializer"] * 3, ["FLOAT"] * 3)
    overall = [s.overall for s in statuses]
    assert overall == sorted(overall) and overall[-1] == 1.0


@pytest.mark.parametrize("recipe", [Recipe(prune_ratio=0.3), Recipe(distill_epochs=3),
                                    Recipe(quant="int8_static", keep_fp32=("LSTM",))])
def test_onnx_recipe_that_needs_torch_is_invalid_recipe(example_onnx: tuple[Path, Path],
                                                        tmp_path: Path, recipe: Recipe) -> None:
    model, data = example_onnx
    spec = JobSpec(constraints=Constraints(max_size_mb=10.0, time_budget_s=60), recipe=recipe)
    with pytest.raises(InvalidRecipe) as e:
        run(model, data, spec, tmp_path / "out")
    expected = "does not have" if recipe.keep_fp32 else "not applicable to an ONNX model"
    assert expected in e.value.message
