"""Structured pruning on real architectures (transformers' own layers, tiny configs).

Regression tests for issue 10: pruning that silently did nothing (MobileNetV2's TF padding,
LSTM), a pruned HF ResNet with constant output (stale batch-norm statistics), identical
candidates built and reported twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import (
    MobileNetV2ConvLayer,
    MobileNetV2InvertedResidual,
)

from app.engine.errors import InvalidRecipe
from app.engine.graph import modularize
from app.engine.pipeline import run
from app.engine.planner.search import SearchSpace
from app.engine.stages.prune import (
    PruneConfig,
    has_dynamic_batch,
    prunability,
    prune,
    reexport,
)
from app.engine.types import Constraints, JobSpec
from examples import hf_zoo

pytestmark = pytest.mark.engine


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _export(model: nn.Module, *inputs: torch.Tensor) -> torch.export.ExportedProgram:
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in inputs)
    return torch.export.export(model.eval(), inputs, dynamic_shapes=dyn)


class _MobileNetV2Tiny(nn.Module):
    """transformers' MobileNetV2 layers (TF "SAME" padding as explicit F.pad, depthwise convs,
    an inverted residual with and without its shortcut), three blocks instead of seventeen."""

    def __init__(self) -> None:
        super().__init__()
        cfg = tf.MobileNetV2Config(num_channels=1, image_size=16, tf_padding=True)
        self.stem = MobileNetV2ConvLayer(cfg, 1, 16, 3, stride=2)
        self.block1 = MobileNetV2InvertedResidual(cfg, 16, 16, stride=1)  # with shortcut
        self.block2 = MobileNetV2InvertedResidual(cfg, 16, 24, stride=2)
        self.head = nn.Linear(24, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(self.stem(pixel_values)))
        return self.head(h.mean(dim=(2, 3)))


def test_mobilenetv2_prunes_through_tf_padding_and_depthwise_convs() -> None:
    # main kept all 7 conv/linear layers at full width: every conv reads an aten.pad output.
    torch.manual_seed(0)
    model = _MobileNetV2Tiny()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    info = prunability(_export(model, x).module(), (x,))
    assert info.kept == {"head": "its channels reach the model output"}
    assert len(info.layers) == 8
    gm = modularize(_export(model, x))
    pruned = prune(gm, (x,), PruneConfig(ratio=0.5), calib_batches=[(x,)])
    assert _n(pruned) < 0.45 * _n(gm)
    convs = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    dw = [m for m in convs.values() if m.groups > 1]
    assert len(dw) == 2 and all(m.groups == m.in_channels == m.out_channels == 48 for m in dw)
    # the shortcut of block1 ties the stem and block1's projection to one width
    assert convs["stem.convolution"].out_channels == convs["block1.reduce_1x1.convolution"] \
        .out_channels == 8
    ep = reexport(pruned, (x,))
    assert has_dynamic_batch(ep)
    x5 = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x5), pruned(x5), atol=1e-5)


def _tiny_resnet() -> nn.Module:
    cfg = tf.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32],
                          depths=[1, 1], layer_type="basic", num_labels=10)
    torch.manual_seed(0)
    return hf_zoo._ImageLogits(tf.ResNetForImageClassification(cfg))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_hf_resnet_pruned_keeps_its_accuracy_with_recalibrated_batch_norm() -> None:
    # main: HF ResNet pruned 50 % (untrained) fell to chance with constant output; the residual
    # groups were right, the batch-norm statistics of the full-width network were not.
    zm = hf_zoo.ZooModel("resnet", _tiny_resnet(), ("pixel_values",), "classifier",
                         lambda n, s: hf_zoo.digits_images(n, s, size=16), lr=1e-2)
    train, test = zm.make_data(640, 0), zm.make_data(400, 1)
    hf_zoo.fit(zm, train, epochs=4)
    x, y = torch.from_numpy(test["pixel_values"]), torch.from_numpy(test["labels"])
    fp32 = _accuracy(zm.module, x, y)
    gm = modularize(_export(zm.module, x[:4]))
    calib = [(torch.from_numpy(train["pixel_values"][i:i + 64]),) for i in range(0, 256, 64)]
    cfg = PruneConfig(ratio=0.3, round_to=4)  # widths 16 -> 12, 32 -> 24
    pruned = prune(gm, (x[:4],), cfg, calib_batches=calib)
    assert _n(pruned) < 0.6 * _n(gm)
    acc = _accuracy(pruned, x, y)
    stale = _accuracy(prune(gm, (x[:4],), cfg), x, y)
    # measured: fp32 0.967, recalibrated 0.868, stale statistics 0.388
    assert fp32 > 0.9, fp32
    assert acc > 0.75, (fp32, acc, stale)
    assert acc > stale + 0.3
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    # the shortcut conv of stage 2 and that stage's last conv add up: one pruned width
    short = next(k for k in widths if "shortcut" in k)
    last = next(k for k in widths if k.startswith(short.split(".shortcut")[0]) and
                k.endswith("layer.1.convolution"))
    assert widths[short] == widths[last] == 24


def test_lstm_says_why_nothing_is_prunable() -> None:
    torch.manual_seed(0)
    model = hf_zoo.LSTMClassifier(hidden=16)
    x = torch.randn(4, 8, 8)
    info = prunability(_export(model, x).module(), (x,))
    assert info.prunable == []
    assert info.summary() == (
        "structured pruning: 0 of 1 layers prunable; kept whole: its channels reach the model "
        "output (1 layers: head); not layers, never pruned: lstm (8 weights)")


def test_identical_candidates_are_built_once_and_the_user_is_told(tmp_path: Path) -> None:
    # main built prune 50 % of an LSTM as a separate candidate identical to prune 0 %.
    torch.manual_seed(0)
    zm = hf_zoo.ZooModel("lstm", hf_zoo.LSTMClassifier(hidden=16), ("x",), "classifier",
                         hf_zoo.digits_rows)
    data = zm.make_data(240, 0)
    model = hf_zoo.save_pt2(zm, data, tmp_path / "m.pt2")
    npz = hf_zoo.save_npz(data, tmp_path / "d.npz")
    space = SearchSpace(prune_ratios=(0.0, 0.5), quant_schemes=("int8_dynamic", "none"),
                        distill_epochs=0)
    spec = JobSpec(constraints=Constraints(time_budget_s=300), seed=0)
    result = run(model, npz, spec, tmp_path / "out", space=space)
    # grid: (0 %, dynamic), (50 %, dynamic) == (0 %, dynamic), (50 %, none) == the baseline
    assert [(c.recipe.prune_ratio, c.recipe.quant) for c in result.candidates] == [
        (0.0, "int8_dynamic")]
    assert result.warnings[0].startswith("structured pruning: 0 of 1 layers prunable")
    assert "lstm (8 weights)" in result.warnings[0]
    assert result.warnings[1] == (
        "structured pruning changed nothing: prune 50% left the model as prune 0% "
        "(same structure); those candidates were built once")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["warnings"] == result.warnings
    assert report["pruning"]["layers"] == 1 and report["pruning"]["prunable"] == 0


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_transformer_ffn_width_is_pruned(name: str) -> None:
    torch.manual_seed(0)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=8, num_labels=4)
        model: nn.Module = hf_zoo._TextLogits(tf.BertForSequenceClassification(cfg))
        g = torch.Generator().manual_seed(1)
        inputs: tuple[torch.Tensor, ...] = (torch.randint(0, 64, (4, 8), generator=g),
                                            torch.ones(4, 8, dtype=torch.long))
        ffn = "model.bert.encoder.layer.0.intermediate.dense"
    else:
        vcfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            num_labels=4)
        model = hf_zoo._ImageLogits(tf.ViTForImageClassification(vcfg))
        inputs = (torch.randn(4, 1, 16, 16),)
        ffn = next(n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and m.out_features == 64)
    gm = modularize(_export(model, *inputs))
    pruned = prune(gm, inputs, PruneConfig(ratio=0.5))
    widths = {n: m.out_features for n, m in pruned.named_modules() if isinstance(m, nn.Linear)}
    assert widths[ffn] == 32  # 64 -> 32
    assert _n(pruned) < _n(gm) - 2 * 32 * 32
    with torch.no_grad():
        assert pruned(*inputs).shape == gm(*inputs).shape == (4, 4)
    reasons = prunability(gm, inputs).kept
    assert any("attention heads" in r for r in reasons.values())


class _PooledReshape(nn.Module):
    """EfficientNet's pooler: ``reshape(pool(x), x.shape[:2])``, a literal width in the graph;
    and a ConvNeXt-style channels-last block with a layer-scale parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding="same")
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.full((16,), 0.5))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = h + (self.scale * self.fc(self.norm(self.dw(h).permute(0, 2, 3, 1)))).permute(
            0, 3, 1, 2)
        h = nn.functional.adaptive_avg_pool2d(h, 1)
        return self.head(h.reshape(h.shape[:2]))


def test_reshape_permute_and_layer_scale_follow_the_pruned_width() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gm = modularize(_export(_PooledReshape(), x))
    assert prunability(gm, (x,)).prunable == ["conv", "dw", "fc"]
    pruned = prune(gm, (x,), PruneConfig(ratio=0.5))
    assert pruned.get_parameter("scale").shape == (8,)
    assert {n: m.weight.shape[0] for n, m in pruned.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)} == {"conv": 8, "dw": 8, "fc": 8, "head": 3}
    x3 = torch.randn(3, 1, 8, 8)
    ep = reexport(pruned, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x3), pruned(x3), atol=1e-6)


def test_structure_fingerprint_tells_identical_prunes_apart() -> None:
    from app.engine.stages.prune import structure_fingerprint

    torch.manual_seed(0)
    x = torch.randn(4, 8, 8)
    lstm = modularize(_export(hf_zoo.LSTMClassifier(hidden=16), x))
    assert structure_fingerprint(prune(lstm, (x,), PruneConfig(0.5))) == \
        structure_fingerprint(lstm)
    mlp = modularize(_export(hf_zoo.MLP(hidden=32), torch.randn(4, 8, 8)))
    fp = {r: structure_fingerprint(prune(mlp, (torch.randn(4, 8, 8),), PruneConfig(r)))
          for r in (0.0, 0.5, 0.7)}
    assert len(set(fp.values())) == 3
    half = prune(mlp, (torch.randn(4, 8, 8),), PruneConfig(0.5))
    assert _n(half) == 64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # hidden 32 -> 16


def test_criteria_registry_is_the_recipe_enum() -> None:
    from typing import get_args

    from app.engine.stages.prune import CRITERIA
    from app.engine.types import Importance
    from app.schemas.jobs import RecipeIn

    assert set(CRITERIA) == set(get_args(Importance)) == {"l2", "taylor"}
    assert set(get_args(RecipeIn.model_fields["importance"].annotation)) == set(CRITERIA)
    with pytest.raises(InvalidRecipe, match="known: l2, taylor"):
        PruneConfig(ratio=0.5, importance="fisher")  # type: ignore[arg-type]
