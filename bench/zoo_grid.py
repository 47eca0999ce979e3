"""How fast can each zoo model get at all? The engine's untrained grid, measured at batch 8.

    .venv/bin/python -m bench.zoo_grid [--models resnet,cnn,...] [--ratios 0,0.5,0.7,0.9]
        [--quant int8_static,none] [--out DIR]

Builds and trains every model of ``examples/hf_zoo.py`` as ``bench/zoo.py`` does (same seed,
same training split), then runs the engine's cheap phase only (``SearchSpace(max_distill=0)``:
prune at each ratio x each ``--quant`` scheme, quantize, export, measure), with no quality limit
and the ``fastest`` objective, batch 8, 2 threads. Prints every candidate's size ratio and
its batch-8 speed-up over the fp32 baseline (the engine's side-by-side measurement: median
of interleaved per-round ratios, with its 90 % interval), and untrained quality on the
engine's hold-out. The fastest candidate bounds what any search can ship at that batch: a
model whose fastest row is under 4x cannot be made ">= 4x faster at batch 8" by distillation
(it changes quality, not structure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import pipeline
from app.engine.planner.search import SearchSpace
from app.engine.types import Constraints, JobSpec
from bench.zoo import SEED, THREADS, splits
from examples import hf_zoo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(hf_zoo.NAMES))
    p.add_argument("--ratios", default="0,0.5,0.7,0.9")
    p.add_argument("--quant", default="int8_static,none",
                   help="quant schemes of the grid (the job's default for Linear-heavy models "
                        "adds int8_dynamic)")
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--out", type=Path, default=Path("bench/out/zoo_grid"))
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    for name in args.models.split(","):
        d = args.out / name
        d.mkdir(parents=True, exist_ok=True)
        zm = hf_zoo.build(name)
        train, _test = splits(zm, args.test)
        hf_zoo.fit(zm, train, seed=SEED)
        pt2 = hf_zoo.save_pt2(zm, train, d / "model.pt2")
        npz = hf_zoo.save_npz(train, d / "train.npz", labels=zm.kind == "classifier")
        t0 = time.perf_counter()
        constraints = Constraints(batch_size=8, threads=THREADS, objective="fastest",
                                  time_budget_s=900)
        res = pipeline.run(pt2, npz, JobSpec(constraints=constraints, seed=SEED), d / "engine",
                           space=SearchSpace(prune_ratios=ratios, max_distill=0,
                                             quant_schemes=tuple(args.quant.split(","))))
        base = res.baseline
        print(f"{name}: fp32 {base.size_bytes / 1e3:.0f} KB, {base.latency_p50_ms:.3f} ms at b8,"
              f" hold-out {base.quality:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        best = 0.0
        for c in res.candidates:
            m, lat = c.metrics, c.metrics.latency
            if lat is None:
                continue
            speed = 1.0 / lat.ratio
            best = max(best, speed)
            print(f"  prune {c.recipe.prune_ratio:4.0%} {c.recipe.quant:<13}"
                  f" {base.size_bytes / m.size_bytes:6.1f}x smaller  {speed:5.2f}x at b8"
                  f" [{1.0 / lat.ratio_high:.2f}, {1.0 / lat.ratio_low:.2f}]"
                  f"  untrained hold-out {m.quality:.4f}", flush=True)
        print(f"  fastest: {best:.2f}x at batch 8", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
