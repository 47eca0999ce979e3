"""Shared engine fixtures: tiny real models from examples/zoo.py, exported once per session.

- ``digits8``: (x float32 (N, 1, 8, 8), y int64 (N,)) scikit-learn digits, N = 1797.
- ``mlp_model``: zoo.MLP trained 3 epochs on digits (eval mode).
- ``mlp_pt2`` / ``rescnn_pt2``: ``torch.export.save`` archives, input ``x``, dynamic batch.
- ``mlp_onnx``: dynamo ONNX export of ``mlp_model`` (weights in an external ``.onnx.data``).
- ``digits_npz``: ``{"x": images, "labels": y}`` for the MLP / ResCNN input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from examples.zoo import MLP, ResCNN, digits, train


def depthwise_fp32(path: Path) -> tuple[int, int]:
    """(depthwise Conv nodes, how many of them read an fp32 weight initializer) of an ONNX
    file: a depthwise conv kept in fp32 has its float weight; an int8 one reads a DQ output."""
    import onnx

    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    dw = [n for n in proto.graph.node if n.op_type == "Conv"
          and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    fp32 = sum(1 for n in dw if n.input[1] in inits
               and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT)
    return len(dw), fp32


def export_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, path)
    return path


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model.eval(), (example,), str(path), dynamo=True,
                      dynamic_shapes=({0: batch},), verbose=False)
    return path


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="session")
def digits8() -> tuple[torch.Tensor, torch.Tensor]:
    return digits(8)


@pytest.fixture(scope="session")
def mlp_model(digits8: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    x, y = digits8
    return train(MLP(), x, y, epochs=3)


@pytest.fixture(scope="session")
def mlp_pt2(engine_dir: Path, mlp_model: torch.nn.Module,
            digits8: tuple[torch.Tensor, torch.Tensor]) -> Path:
    return export_pt2(mlp_model, digits8[0][:4], engine_dir / "mlp.pt2")


@pytest.fixture(scope="session")
def rescnn_pt2(engine_dir: Path, digits8: tuple[torch.Tensor, torch.Tensor]) -> Path:
    torch.manual_seed(0)
    return export_pt2(ResCNN(width=8), digits8[0][:4], engine_dir / "rescnn.pt2")


@pytest.fixture(scope="session")
def mlp_onnx(engine_dir: Path, mlp_model: torch.nn.Module,
             digits8: tuple[torch.Tensor, torch.Tensor]) -> Path:
    d = engine_dir / "mlp_onnx"
    d.mkdir()
    return export_onnx(mlp_model, digits8[0][:4], d / "mlp.onnx")


@pytest.fixture(scope="session")
def digits_npz(engine_dir: Path, digits8: tuple[torch.Tensor, torch.Tensor]) -> Path:
    x, y = digits8
    path = engine_dir / "digits.npz"
    np.savez(path, x=x.numpy(), labels=y.numpy())
    return path
