"""Latency you can trust: an identical model measured against itself beside a real candidate.

    .venv/bin/python bench/latency_control.py --pt2 model.pt2 --data train.npz \
        [--candidate engine_out/model.onnx] [--batches 1 8] [--repeats 3]

The fp32 baseline is the .pt2 exported to ONNX (the engine's own export). The candidate is
``--candidate`` (e.g. the ``model.onnx`` an engine run chose, for an independent check of its
reported ratio) or, by default, the engine's int8 static quantization of the unpruned model
(PT2E, calibrated on 256 samples of ``--data``).

For every batch size and repetition it runs ``stages.evaluate.compare_latency`` once (fp32
baseline, a second session of the same fp32 file as the identical-model control, the candidate;
2 intra-op threads, spinning off, interleaved rounds) and prints the control's ratio (target
0.95-1.05x) and the candidate's, each with its 90 % interval and best-round ratio. For contrast
the same three sessions are also timed the old way (p50 over single runs of 7 rounds x 10 runs,
``latency_ms``) and that ratio is printed too. Ratios are candidate / baseline: < 1 is faster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.formats.pt2 import check_pt2_archive, load_pt2
from app.engine.graph import modularize
from app.engine.stages.evaluate import compare_latency, latency_ms, make_session
from app.engine.stages.export import export_onnx
from app.engine.stages.quantize import quantize_static

THREADS = 2
CALIB = 256  # calibration samples for the default int8 candidate


def _inputs(pt2: Path, data: Path) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    check_pt2_archive(pt2)
    ep = load_pt2(pt2)
    names = [str(n) for n in ep.graph_signature.user_inputs]
    with np.load(data, allow_pickle=False) as z:
        arrays = {n: np.ascontiguousarray(z[n]) for n in names}
    return modularize(ep).eval(), arrays


def _default_candidate(model: torch.nn.Module, arrays: dict[str, np.ndarray],
                       path: Path) -> Path:
    xs = [torch.from_numpy(a[:CALIB]) for a in arrays.values()]
    calib = [tuple(x[i:i + 32] for x in xs) for i in range(0, len(xs[0]), 32)]
    q = quantize_static(model, tuple(x[:2] for x in xs), calib)
    return export_onnx(q, tuple(x[:2] for x in xs), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pt2", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help=".npz keyed by input name")
    ap.add_argument("--candidate", type=Path, help="ONNX file to judge (default: int8 static)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="per compare_latency run")
    args = ap.parse_args()

    model, arrays = _inputs(args.pt2, args.data)
    with tempfile.TemporaryDirectory(prefix="latency-control-") as tmp:
        ex = tuple(torch.from_numpy(a[:2]) for a in arrays.values())
        base_path = export_onnx(model, ex, Path(tmp) / "fp32.onnx")
        cand_path = args.candidate or _default_candidate(model, arrays, Path(tmp) / "int8.onnx")
        print(f"baseline {args.pt2} (fp32 ONNX), candidate {cand_path}, {THREADS} threads")
        print(f"{'batch':>5} {'rep':>3} {'rounds':>6} | {'control':>7} {'90% CI':>13} "
              f"{'best':>5} | {'cand':>7} {'90% CI':>13} {'best':>5} | "
              f"{'old ctl':>7} {'old cand':>8} | {'s':>4}")
        for batch in args.batches:
            feed = {k: v[np.arange(batch) % len(v)] for k, v in arrays.items()}
            for rep in range(args.repeats):
                base, ctl, cand = (make_session(p, threads=THREADS)
                                   for p in (base_path, base_path, cand_path))
                t0 = time.perf_counter()
                cmp = compare_latency(base, [cand], feed, control=ctl,
                                      max_seconds=args.max_seconds)
                sec = time.perf_counter() - t0
                c, k = cmp.control, cmp.candidates[0]
                old = latency_ms([base, ctl, cand], feed)  # p50 over single runs
                print(f"{batch:>5} {rep:>3} {cmp.rounds:>6} | {c.ratio:>6.3f}x "
                      f"{c.low:>6.3f}-{c.high:<6.3f} {c.best_round:>5.3f} | "
                      f"{k.ratio:>6.3f}x {k.low:>6.3f}-{k.high:<6.3f} {k.best_round:>5.3f} | "
                      f"{old[1][0] / old[0][0]:>6.3f}x {old[2][0] / old[0][0]:>7.3f}x | "
                      f"{sec:>4.0f}", flush=True)


if __name__ == "__main__":
    main()
