"""int8 dynamic coverage: ModelPress's ``int8_dynamic`` scheme vs ONNX Runtime's one-line
``quantize_dynamic`` (per-channel, every op type it supports) on real architectures.

For each model of ``examples.hf_zoo`` named on the command line (default: embedder, bert):
brief training (``EPOCHS``) with a fixed seed, fp32 ONNX export of the module-ized graph
(what the engine quantizes), both quantizations of that same file, then on a held-out split
the engine never saw: size ratio to fp32, cosine to fp32 (mean over samples) and accuracy
(classifiers only; the embedder's output is its embedding, so cosine only).
Everything is measured in one process, side by side.

    PYTHONPATH=. python bench/quant_coverage.py embedder bert
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from app.engine.graph import modularize
from app.engine.schemes import get
from app.engine.stages.export import export_onnx, onnx_outputs
from examples import hf_zoo

TRAIN, HOLDOUT = 600, 300  # samples
EPOCHS = 3  # brief: enough for class-separating outputs; both quantizations see the same model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
                 .mean())


def bench(name: str, tmp: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    zm = hf_zoo.build(name)
    data = zm.make_data(TRAIN + HOLDOUT, 0)
    train = {k: v[:TRAIN] for k, v in data.items()}
    hold = {k: v[TRAIN:] for k, v in data.items()}
    hf_zoo.fit(zm, train, epochs=EPOCHS)
    pt2 = hf_zoo.save_pt2(zm, train, tmp / f"{name}.pt2")
    model = modularize(torch.export.load(str(pt2))).eval()
    ex = tuple(torch.from_numpy(train[k][:4]) for k in zm.input_names)
    fp32 = export_onnx(model, ex, tmp / f"{name}.onnx")
    ort_q = tmp / f"{name}_ort.onnx"
    quantize_dynamic(fp32, ort_q, per_channel=True, weight_type=QuantType.QInt8)
    _, ours = get("int8_dynamic").to_onnx(model, ex, tmp / f"{name}_mp.onnx", [])
    xs = tuple(torch.from_numpy(hold[k]) for k in zm.input_names)
    ref = onnx_outputs(fp32, xs)[0]
    rows = []
    for label, path in (("fp32", fp32), ("ORT quantize_dynamic", ort_q),
                        ("ModelPress int8_dynamic", ours)):
        out = onnx_outputs(path, xs)[0]
        acc = (f"{(out.argmax(1) == hold['labels']).mean():.4f}"
               if zm.kind == "classifier" else "-")
        rows.append(f"{name:<9} {label:<24} {path.stat().st_size / 1e6:8.3f} "
                    f"{fp32.stat().st_size / path.stat().st_size:6.2f}x "
                    f"{_cosine(out, ref):8.4f} {acc:>8}")
    return "\n".join(rows)


def main(names: list[str]) -> None:
    print(f"{'model':<9} {'quantization':<24} {'MB':>8} {'smaller':>7} {'cosine':>8} "
          f"{'accuracy':>8}")
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            print(bench(name, Path(d)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["embedder", "bert"])
