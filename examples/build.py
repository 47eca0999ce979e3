"""Build a sample model + data set from data a package ships (scikit-learn's digits).

    python -m examples.build --out examples/out [--arch rescnn|dwcnn|encoder|mlp --size 16]

Trains a small model from ``examples/zoo.py`` with a fixed seed (under 30 s on a CPU core),
then writes ``model.pt2`` (``torch.export.save``, dynamic batch dimension) and ``data.npz``
(key = the exported input name, plus ``labels``). Then try:

    python -m app.engine.cli compress examples/out/model.pt2 --data examples/out/data.npz \\
        --max-size-mb 2 --max-latency-ms 3 --max-accuracy-drop 0.01 --out out/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from examples import zoo


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
        batch: int = 64, seed: int = 0) -> nn.Module:
    """zoo.train's loop with a one-cycle learning-rate schedule: converges in a few epochs
    (plain constant-lr AdamW leaves batch-norm CNNs noisy after 8 epochs). Fixed seed."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def make_model(arch: str, size: int, width: int = 32) -> nn.Module:
    # Width 32 at 16x16 (about 12 MMACs) is compute-bound enough at batch 1 for int8 to be
    # faster than fp32 in ONNX Runtime; at width 16 overhead dominates and int8 is slower.
    if arch == "rescnn":
        return zoo.ResCNN(width=width)
    if arch == "dwcnn":
        return zoo.DWCNN(width=width)
    if arch == "encoder":
        return zoo.TinyEncoder(seq=size, dim=64, heads=4, ffn=256, layers=2)
    if arch == "mlp":
        return zoo.MLP(size=size, hidden=128)
    raise SystemExit(f"unknown --arch {arch!r} (rescnn, dwcnn, encoder, mlp)")


def export_model(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """torch.export with a dynamic batch dim; returns the input name (the data key)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return str(ep.graph_signature.user_inputs[0])


def build(out: Path, *, arch: str = "rescnn", size: int = 16, epochs: int = 6,
          seed: int = 0, width: int = 32) -> tuple[Path, Path, float]:
    """Train and write model.pt2 + data.npz into ``out``; returns (model, data, train accuracy)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x, y = zoo.digits(size, seed=seed)
    model = make_model(arch, size, width)
    fit(model, x, y, epochs=epochs, lr=5e-3, seed=seed)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    name = export_model(model, x[:2], out / "model.pt2")
    arrays: dict[str, np.ndarray] = {name: x.numpy(), "labels": y.numpy()}
    np.savez(out / "data.npz", **arrays)  # type: ignore[arg-type]
    return out / "model.pt2", out / "data.npz", acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("examples/out"))
    p.add_argument("--arch", default="rescnn")
    p.add_argument("--size", type=int, default=16, help="image side in pixels (digits are 8x8)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--width", type=int, default=32, help="CNN channel width")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    model, data, acc = build(a.out, arch=a.arch, size=a.size, epochs=a.epochs, seed=a.seed,
                             width=a.width)
    print(f"trained {a.arch} on digits {a.size}x{a.size} in {time.perf_counter() - t0:.1f} s "
          f"(train accuracy {acc:.3f})")
    print(f"wrote {model} ({model.stat().st_size / 1e6:.3f} MB) and {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
