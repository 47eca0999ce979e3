"""Which int8 route is fastest on ONNX Runtime CPU for our tiny CNNs?

Compares, side by side (interleaved rounds, 2 intra-op threads, spinning off):
  fp32 ONNX | PT2E int8 (X86InductorQuantizer + every pattern output quantized, our default) |
  PT2E int8 with the plain X86 recipe (outputs quantized only where the next op is int8) |
  PT2E int8 with depthwise convs in fp32 |
  onnxruntime quantize_static (QDQ, per-channel) | same with depthwise excluded | fp16 storage
for ResCNN and DWCNN on digits resized to --size, at batch 1 and 8.

    .venv/bin/python bench/quant_probe.py --size 32 --rounds 7

Prints per variant: file size (KB), p50 latency of the best rounds (ms) at each batch, speed-up
vs fp32, and top-1 agreement with the fp32 model on 512 digits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.stages.export import export_onnx, onnx_outputs
from app.engine.stages.quantize import (
    quantize_onnx_fp16,
    quantize_onnx_static,
    quantize_static,
)
from examples.zoo import DWCNN, ResCNN, digits, train


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle spinning threads of one session steal cores from the other one being timed.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_ms(
    sessions: list[ort.InferenceSession], feed: np.ndarray, rounds: int, runs: int
) -> list[float]:
    """Per session: median over the best half of rounds of the mean ms per run."""
    name = sessions[0].get_inputs()[0].name
    for s in sessions:  # warm-up
        for _ in range(5):
            s.run(None, {name: feed})
    per: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, {name: feed})
            per[i].append((time.perf_counter() - t0) * 1e3 / runs)
    return [statistics.median(sorted(r)[: max(1, len(r) // 2)]) for r in per]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    x, y = digits(args.size)
    ex = (x[:8],)
    calib = [(x[i : i + 32],) for i in range(0, 256, 32)]
    calib_np = [{"x": x[i : i + 32].numpy()} for i in range(0, 256, 32)]
    evalx = (x[-512:],)
    tmp = Path(tempfile.mkdtemp(prefix="quant_probe_"))

    models: list[tuple[str, torch.nn.Module]] = [("ResCNN", ResCNN()), ("DWCNN", DWCNN())]
    for name, model in models:
        t0 = time.time()
        model = train(model, x[:1200], y[:1200], epochs=args.epochs)
        files: dict[str, Path] = {}
        files["fp32"] = export_onnx(model, ex, tmp / f"{name}_fp32.onnx")
        files["pt2e_int8"] = export_onnx(quantize_static(model, ex, calib), ex,
                                         tmp / f"{name}_pt2e.onnx")
        files["pt2e_x86_recipe"] = export_onnx(
            quantize_static(model, ex, calib, quantize_outputs=False), ex,
            tmp / f"{name}_pt2e_x86.onnx")
        files["ort_static"] = quantize_onnx_static(files["fp32"], tmp / f"{name}_ort.onnx",
                                                   calib_np)
        if name == "DWCNN":
            files["pt2e_int8_skipdw"] = export_onnx(
                quantize_static(model, ex, calib, skip_depthwise=True), ex,
                tmp / f"{name}_pt2e_skipdw.onnx")
            files["ort_static_skipdw"] = quantize_onnx_static(
                files["fp32"], tmp / f"{name}_ort_skipdw.onnx", calib_np, skip_depthwise=True)
        files["fp16_storage"] = quantize_onnx_fp16(files["fp32"], tmp / f"{name}_fp16.onnx")
        ref = onnx_outputs(files["fp32"], evalx)[0].argmax(1)
        agree = {k: float((onnx_outputs(p, evalx)[0].argmax(1) == ref).mean())
                 for k, p in files.items()}
        keys = list(files)
        sessions = [session(files[k], args.threads) for k in keys]
        lat = {}
        for b in (1, 8):
            lat[b] = interleaved_ms(sessions, x[:b].numpy(), args.rounds, args.runs)
        print(f"\n{name} {args.size}x{args.size}  (prep {time.time() - t0:.0f} s, "
              f"{args.threads} threads, spinning off, interleaved)")
        print(f"{'variant':<20}{'KB':>8}{'b1 ms':>9}{'x fp32':>8}{'b8 ms':>9}{'x fp32':>8}"
              f"{'agree':>8}")
        for i, k in enumerate(keys):
            kb = files[k].stat().st_size / 1e3
            print(f"{k:<20}{kb:>8.1f}{lat[1][i]:>9.3f}{lat[1][0] / lat[1][i]:>8.2f}"
                  f"{lat[8][i]:>9.3f}{lat[8][0] / lat[8][i]:>8.2f}{agree[k]:>8.3f}")


if __name__ == "__main__":
    main()
