"""A small ONNX model built as the README tells a user to: a model of ``examples/`` trained on
digits with ``examples.build.fit`` and exported to ONE ``.onnx`` file with the engine's exporter
(``app.engine.stages.export.export_onnx``). Shared by the engine and the service tests.

Why an MLP of width 512: the example's CNNs train for minutes on the shared 2 cores (ResCNN
width 32 at 16x16: 268 s), while this trains in about 30 s to 0.98 accuracy and its int8 form
runs about 1.6x faster than fp32 in ONNX Runtime at batch 8 (measured side by side here; at
width 128 the Gemms are too small for int8 to pay off reliably).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from app.engine.stages.export import export_onnx
from examples import zoo
from examples.build import fit


def build_onnx(out: Path, *, hidden: int = 512, epochs: int = 3,
               seed: int = 0) -> tuple[Path, Path]:
    """Write ``model.onnx`` (input ``x`` (N, 1, 8, 8), dynamic batch) and ``data.npz`` (``x``,
    ``labels``: every digit) into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    x, y = zoo.digits(8, seed=seed)
    torch.manual_seed(seed)
    model = fit(zoo.MLP(hidden=hidden), x, y, epochs=epochs, lr=3e-3, seed=seed)
    onnx_path = export_onnx(model, (x[:2],), out / "model.onnx")
    data = out / "data.npz"
    np.savez(data, x=x.numpy(), labels=y.numpy())
    return onnx_path, data
