"""Issue 2 acceptance benchmark: fp32 vs ONNX Runtime quantization alone vs ModelPress.

    .venv/bin/python bench/engine.py [--size 32 --epochs 8 --time-budget-s 1800 --out bench/out]

On scikit-learn's digits (upscaled to --size x --size, fixed seed, split into train / val /
test), it trains three architectures from examples/zoo.py — ResCNN (residual blocks, batch
norm, concat), DWCNN (depthwise-separable, MobileNetV2-style) and TinyEncoder (transformer
encoder) — and for each builds:

- fp32:      the model exported to ONNX (dynamo exporter, single file);
- ORT quant: what a user would do instead, ONNX Runtime's own quantization of that file:
             ``quantize_static`` QDQ per-channel for the CNNs (calibrated on the same 256
             training samples), ``quantize_dynamic`` per-channel for the transformer;
- ModelPress: ``pipeline.run`` on the .pt2 and the training data, with constraints that encode
             the targets (CNNs: >= 6.5x smaller than fp32 and <= 0.5 point accuracy drop on
             the validation split, objective ``fastest``; the encoder: smaller than ORT quant
             alone at no loss on the validation split, objective ``smallest``); the CNN
             candidates distil with mixup (``--mixup``, Recipe.mixup). No latency
             limit: the never-slower rule always holds, and a latency limit at the 3x target
             sits inside the measurement noise at batch 1 on shared cores.

Then it measures all three ONNX files of a model side by side in one ONNX Runtime process
(2 intra-op threads, spinning off, interleaved rounds; median of ``--repeats`` repetitions) at
batch 1 and 8, and accuracy on the held-out TEST split that neither training nor ModelPress saw.

Targets (issue 2): each CNN >= 6x smaller and >= 3x faster than fp32 at <= 1.0 point drop;
every model smaller and faster than ORT quantization alone at equal or better accuracy (within
0.5 point). Input size and widths (base width 48: about 100 MMACs for ResCNN) make the CNNs
compute-bound enough for the ratios to mean something, while the whole run takes about 26
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import pipeline
from app.engine.planner.search import SearchSpace
from app.engine.stages.evaluate import latency_ms, make_session
from app.engine.stages.export import export_onnx
from app.engine.stages.quantize import quantize_onnx_dynamic, quantize_onnx_static
from app.engine.types import Constraints, JobSpec
from examples import zoo
from examples.build import fit

SEED = 0
THREADS = 2
CNN_WIDTH = 48  # base channels of both CNNs (see make)


@dataclass
class Row:
    arch: str
    variant: str
    size: int
    p50: dict[int, float]  # batch -> ms
    acc: float


def split_digits(size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x, y = zoo.digits(size, seed=SEED)  # shuffled with the seed
    n_test, n_val = 300, 300
    return {
        "test": (x[:n_test], y[:n_test]),
        "val": (x[n_test : n_test + n_val], y[n_test : n_test + n_val]),
        "train": (x[n_test + n_val :], y[n_test + n_val :]),
    }


def make(arch: str, size: int) -> torch.nn.Module:
    # Width 48, was 32 (the README keeps the width-32 figures): at 32 the int8 students ran in
    # about 0.25 ms at batch 1, where ONNX Runtime's per-operator thread hand-off with
    # 2 threads and spinning off costs more than the int8 convolutions themselves (the same
    # ResCNN student: 0.19 ms on 1 thread, 0.27 ms on 2). At 48 the teacher is 2.25x the
    # compute, and a 70 % prune lands on the 16 base channels that a 55 % prune gave at 32.
    if arch == "rescnn":
        return zoo.ResCNN(width=CNN_WIDTH)
    if arch == "dwcnn":
        return zoo.DWCNN(width=CNN_WIDTH)
    if arch == "encoder":
        return zoo.TinyEncoder(seq=size, dim=128, heads=4, ffn=512, layers=2)
    raise ValueError(arch)


def cnn_arch(arch: str) -> bool:
    return arch != "encoder"


def accuracy(onnx_path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    sess = make_session(onnx_path, threads=THREADS)
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i : i + 64].numpy()})[0]
                          for i in range(0, len(x), 64)])
    return float((out.argmax(1) == y.numpy()).mean())


def side_by_side(paths: list[Path], x: torch.Tensor, batch: int, repeats: int,
                 rounds: int) -> list[float]:
    """Median over ``repeats`` of the interleaved p50 of each file, in ms."""
    sessions = [make_session(p, threads=THREADS) for p in paths]
    feed = {sessions[0].get_inputs()[0].name: x[:batch].numpy()}
    per: list[list[float]] = [[] for _ in paths]
    for _ in range(repeats):
        res = latency_ms(sessions, feed, warmup=5, rounds=rounds, runs_per_round=10)
        for k, (p50, _p95) in enumerate(res):
            per[k].append(p50)
    return [statistics.median(v) for v in per]


def bench_arch(arch: str, data: dict[str, tuple[torch.Tensor, torch.Tensor]], size: int,
               out: Path, args: argparse.Namespace) -> tuple[list[Row], dict[str, object]]:
    d = out / arch
    d.mkdir(parents=True, exist_ok=True)
    xtr, ytr = data["train"]
    xva, yva = data["val"]
    xte, yte = data["test"]
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    # The encoder trains in seconds but needs more epochs than the CNNs to converge.
    epochs = args.epochs if cnn_arch(arch) else 3 * args.epochs
    model = fit(make(arch, size), xtr, ytr, epochs=epochs, lr=3e-3, seed=SEED)
    train_s = time.perf_counter() - t0
    print(f"[{arch}] trained in {train_s:.0f} s", flush=True)

    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model.eval(), (xtr[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(d / "model.pt2"))
    name = str(ep.graph_signature.user_inputs[0])
    np.savez(d / "train.npz", **{name: xtr.numpy(), "labels": ytr.numpy()})  # type: ignore[arg-type]
    np.savez(d / "val.npz", **{name: xva.numpy(), "labels": yva.numpy()})  # type: ignore[arg-type]

    fp32 = export_onnx(model, (xtr[:2],), d / "fp32.onnx")
    ort_q = d / "ort_quant.onnx"
    if arch == "encoder":
        quantize_onnx_dynamic(fp32, ort_q, per_channel=True)
    else:
        calib = [{name: xtr[i : i + 32].numpy()} for i in range(0, 256, 32)]
        quantize_onnx_static(fp32, ort_q, calib, per_channel=True)

    fp32_b1, ort_b1 = side_by_side([fp32, ort_q], xte, 1, 1, args.rounds)
    cnn = arch != "encoder"
    # Targets as constraints; accuracy limit from the validation split (ModelPress's holdout).
    # The encoder must stay within 0.5 point of ORT quant on the test split: ask for no loss
    # on the validation split (300 samples: one sample is 0.33 point).
    drop = args.cnn_max_drop if cnn else 0.0
    constraints = Constraints(
        max_size_mb=(fp32.stat().st_size / 6.5 / 1e6) if cnn else ort_q.stat().st_size / 1.05e6,
        max_latency_ms=None,  # never slower always holds; see the module doc
        max_accuracy_drop=drop,
        batch_size=1, threads=THREADS, objective=args.objective if cnn else "smallest",
        time_budget_s=args.time_budget_s,
    )
    # The CNN ratios bracket what 6x smaller and 3x faster need; each in int8 and in fp32
    # (heavily pruned convs are too narrow for int8 kernels to beat fp32: measure both).
    space = SearchSpace(
        prune_ratios=tuple(float(r) for r in (args.cnn_ratios if cnn else "0.25,0.4,0.55")
                           .split(",")),
        quant_schemes=("int8_static", "none") if cnn else ("int8_dynamic",),
        distill_epochs=args.distill_epochs, max_distill=args.max_distill,
        mixup=args.mixup if cnn else 0.0,
    )
    print(f"[{arch}] fp32 p50 {fp32_b1:.3f} ms, ORT quant {ort_b1:.3f} ms; val acc fp32 "
          f"{accuracy(fp32, xva, yva):.4f}, ORT quant {accuracy(ort_q, xva, yva):.4f}; "
          f"constraints {constraints.to_dict()}", flush=True)
    t1 = time.perf_counter()

    def progress(stage: str, frac: float, msg: str) -> None:
        if args.verbose:
            print(f"  [{arch} {time.perf_counter() - t1:6.1f}s] {stage:<9} {frac:4.0%} {msg}",
                  flush=True)

    result = pipeline.run(d / "model.pt2", d / "train.npz", JobSpec(constraints=constraints,
                          seed=SEED), d / "modelpress", progress, eval_data_path=d / "val.npz",
                          space=space)
    mp_s = time.perf_counter() - t1
    mp = result.artifacts["model.onnx"]
    print(f"[{arch}] ModelPress {result.status} in {mp_s:.0f} s: {result.message}", flush=True)
    for c in result.candidates:
        r = c.recipe
        print(f"    prune {r.prune_ratio:.0%} {r.quant:<12} KD {r.distill_epochs:2d}ep  "
              f"{c.metrics.size_bytes / 1e3:8.1f} KB  p50 {c.metrics.latency_p50_ms:7.3f} ms  "
              f"val acc {c.metrics.quality:.4f}  "
              f"{'feasible' if c.feasible else '; '.join(c.reasons)}",
              flush=True)

    paths = [fp32, ort_q, mp]
    lat = {b: side_by_side(paths, xte, b, args.repeats, args.rounds) for b in (1, 8)}
    rows = [
        Row(arch, v, p.stat().st_size, {b: lat[b][k] for b in lat}, accuracy(p, xte, yte))
        for k, (v, p) in enumerate(zip(("fp32", "ORT quant", "ModelPress"), paths, strict=True))
    ]
    info: dict[str, object] = {"train_s": train_s, "modelpress_s": mp_s, "status": result.status,
                               "recipe": result.best.recipe.to_dict()}
    return rows, info


def print_table(rows: list[Row]) -> list[str]:
    lines = [
        f"{'model':<8} {'variant':<11} {'size KB':>9} {'smaller':>8} {'b1 ms':>8} {'b1 x':>6}"
        f" {'b8 ms':>8} {'b8 x':>6} {'test acc':>9} {'drop pt':>8}",
    ]
    base: Row | None = None
    for r in rows:
        if r.variant == "fp32":
            base = r
        assert base is not None
        lines.append(
            f"{r.arch:<8} {r.variant:<11} {r.size / 1e3:9.1f} {base.size / r.size:7.1f}x"
            f" {r.p50[1]:8.3f} {base.p50[1] / r.p50[1]:5.2f}x {r.p50[8]:8.3f}"
            f" {base.p50[8] / r.p50[8]:5.2f}x {r.acc * 100:8.2f}% {(base.acc - r.acc) * 100:+8.2f}"
        )
    return lines


def verdicts(rows: list[Row]) -> list[str]:
    out: list[str] = []
    by = {(r.arch, r.variant): r for r in rows}
    for arch in dict.fromkeys(r.arch for r in rows):
        f, o, m = by[(arch, "fp32")], by[(arch, "ORT quant")], by[(arch, "ModelPress")]
        checks = []
        if arch != "encoder":
            checks += [
                ("6x smaller than fp32", f.size / m.size >= 6),
                ("3x faster than fp32 at b1", f.p50[1] / m.p50[1] >= 3),
                ("3x faster than fp32 at b8", f.p50[8] / m.p50[8] >= 3),
                ("<= 1.0 pt drop", (f.acc - m.acc) <= 0.01 + 1e-9),
            ]
        checks += [
            ("smaller than ORT quant", m.size < o.size),
            ("faster than ORT quant at b1", m.p50[1] < o.p50[1]),
            ("faster than ORT quant at b8", m.p50[8] < o.p50[8]),
            ("accuracy >= ORT quant - 0.5 pt", m.acc >= o.acc - 0.005 - 1e-9),
        ]
        out.append(f"{arch}: " + ", ".join(f"{name} {'OK' if ok else 'MISSED'}"
                                           for name, ok in checks))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="digits upscaled to size x size")
    p.add_argument("--epochs", type=int, default=8, help="fp32 training epochs")
    p.add_argument("--distill-epochs", type=int, default=40)
    p.add_argument("--time-budget-s", type=float, default=1800.0, help="per ModelPress run")
    p.add_argument("--archs", default="rescnn,dwcnn,encoder")
    p.add_argument("--cnn-max-drop", type=float, default=0.005,
                   help="ModelPress max_accuracy_drop for the CNNs (validation split)")
    p.add_argument("--cnn-ratios", default="0.4,0.55,0.7,0.8",
                   help="prune ratios of the CNN search grid (each with int8 and fp32)")
    p.add_argument("--objective", default="fastest", choices=("fastest", "smallest"),
                   help="planner objective for the CNNs (the encoder: smallest)")
    # Mixup distillation (the teacher labels mixed inputs) recovered a 70 %-pruned int8 DWCNN
    # to the fp32 test accuracy (98.67 %, val 98.67 %) where plain distillation reached
    # 98.00 % (same recipe and seed, 25 vs 31 epochs). The encoder meets its targets without it
    # and was not measured with it.
    p.add_argument("--mixup", type=float, default=0.4,
                   help="Recipe.mixup of every CNN candidate (0 = plain distillation)")
    p.add_argument("--max-distill", type=int, default=3, help="candidates distilled at most")
    p.add_argument("--repeats", type=int, default=3, help="latency repetitions (median)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    data = split_digits(args.size)
    rows: list[Row] = []
    infos: dict[str, object] = {}
    for arch in args.archs.split(","):
        r, info = bench_arch(arch, data, args.size, args.out, args)
        rows += r
        infos[arch] = info
    lines = print_table(rows)
    total = time.perf_counter() - start
    print(f"\ndigits {args.size}x{args.size}, train {len(data['train'][1])} / val "
          f"{len(data['val'][1])} / test {len(data['test'][1])}; ONNX Runtime, {THREADS} threads, "
          f"spinning off, interleaved, median of {args.repeats}; total {total / 60:.1f} min\n")
    print("\n".join(lines))
    print()
    v = verdicts(rows)
    print("\n".join(v))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_bench.json").write_text(json.dumps(
        {"table": lines, "verdicts": v, "runs": infos, "total_s": total}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
