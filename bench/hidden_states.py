"""Hidden-state distillation of transformer students, measured on data the engine never saw.

    .venv/bin/python -m bench.hidden_states --model bert [--prune 0.7] [--quant int8_dynamic]
        [--epochs 24] [--weights 0,1] [--out DIR]

Builds and trains one model of ``examples/hf_zoo.py`` exactly as ``bench/zoo.py`` does (same
seed, same train / test split), then runs the engine once per hidden-state weight with the
same explicit recipe (prune ratio, quant scheme, distillation epochs, the transformer rate
3e-4): ``weight`` overrides ``stages.distill.FAMILY_SCHEDULES["transformer"].hidden_weight``
(0 = logits-only KD, the engine before hidden states). Prints, per weight, the quality of the
ONNX artifact on the benchmark's test split (accuracy, or cosine to fp32 for the embedder),
the engine's validation quality, the epochs run and the seconds taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import pipeline
from app.engine.stages import distill
from app.engine.stages.export import export_onnx
from app.engine.types import Constraints, JobSpec, Recipe
from bench.zoo import SEED, THREADS, outputs, score, splits
from examples import hf_zoo

TRANSFORMER_LR = 3e-4  # stages.distill.FAMILY_SCHEDULES["transformer"].lr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert", choices=hf_zoo.NAMES)
    p.add_argument("--prune", type=float, default=0.7)
    p.add_argument("--quant", default="int8_dynamic")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--weights", default="0,1")
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--out", type=Path, default=Path("bench/out/hidden_states"))
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    d = args.out / args.model
    d.mkdir(parents=True, exist_ok=True)
    zm = hf_zoo.build(args.model)
    train, test = splits(zm, args.test)
    hf_zoo.fit(zm, train, seed=SEED)
    pt2 = hf_zoo.save_pt2(zm, train, d / "model.pt2")
    npz = hf_zoo.save_npz(train, d / "train.npz", labels=zm.kind == "classifier")
    ex = tuple(torch.from_numpy(np.ascontiguousarray(train[k][:2])) for k in zm.input_names)
    ref = outputs(export_onnx(zm.module.eval(), ex, d / "fp32.onnx"), test)
    print(f"{args.model}: fp32 on the test split {score(zm, ref, ref, test['labels']):.4f}",
          flush=True)
    base = distill.FAMILY_SCHEDULES["transformer"]
    recipe = Recipe(prune_ratio=args.prune, quant=args.quant, distill_epochs=args.epochs,
                    lr=TRANSFORMER_LR, seed=SEED)
    try:
        for w in (float(v) for v in args.weights.split(",")):
            distill.FAMILY_SCHEDULES["transformer"] = dataclasses.replace(base, hidden_weight=w)
            t0 = time.perf_counter()
            res = pipeline.run(pt2, npz, JobSpec(constraints=Constraints(batch_size=8,
                                                                         time_budget_s=900),
                                                 seed=SEED, recipe=recipe), d / f"w{w:g}")
            q = score(zm, outputs(res.artifacts["model.onnx"], test), ref, test["labels"])
            runs = res.report["distillation"]["runs"]
            print(f"  hidden weight {w:g}: test {q:.4f}, validation "
                  f"{res.best.metrics.quality:.4f}, "
                  f"{sum(r['epochs_run'] for r in runs)} epochs, "
                  f"{runs[-1].get('hidden_state_layers', 0)} hidden layers matched, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        distill.FAMILY_SCHEDULES["transformer"] = base
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
