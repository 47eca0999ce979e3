"""``modelpress compress``: run the engine on local files, without the service.

    modelpress compress model.pt2 --data data.npz --max-size-mb 2 --max-latency-ms 3 \\
        --max-accuracy-drop 0.01 [--metric auto --batch-size 1 --threads 2 --objective smallest \\
        --time-budget-s 600 --seed 0 --eval-data eval.npz --recipe recipe.json] --out out/

Exit codes: 0 succeeded, 2 bad input (one precise line on stderr, no traceback),
3 constraints_unsatisfiable (the closest candidate's artifacts are still written),
4 time budget exceeded, 130 cancelled (Ctrl-C).

``app/cli.py`` (the console script) imports :func:`add_compress_parser` and :func:`compress`;
``python -m app.engine.cli compress ...`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO, get_args

from app.engine.types import QualityMetric

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_UNSATISFIABLE = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 130


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(s: str) -> float | int:
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v

    return parse


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(
            f"an absolute fraction in [0, 1] (0.01 = one point), got {s}")
    return v


def add_compress_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compress`` sub-command to an ``argparse`` sub-parser collection."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "compress",
        help="compress a .pt2 or .onnx model to a size / latency / accuracy budget",
        description="Prune, quantize and distill a torch.export (.pt2) model until it meets "
        "the constraints; writes model.onnx (int8 QDQ), model.pt2 and report.json. An .onnx "
        "model is quantized with ONNX Runtime only (no pruning, no distillation, no model.pt2).",
    )
    p.add_argument("model", type=Path,
                   help="model file (.pt2 from torch.export.save, or a single-file .onnx)")
    p.add_argument("--data", type=Path, required=True,
                   help=".npz or .safetensors: keys = model input names, optional 'labels'")
    p.add_argument("--eval-data", type=Path, default=None,
                   help="held-out data (same keys); default: 20%% of --data is held out")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--max-size-mb", type=_positive(float), default=None, help="MB = 1e6 bytes")
    p.add_argument("--max-latency-ms", type=_positive(float), default=None,
                   help="ONNX Runtime p50 at --batch-size / --threads")
    p.add_argument("--max-accuracy-drop", type=_fraction, default=None,
                   help="absolute (0.01 = one point), in units of --metric")
    p.add_argument("--metric", choices=get_args(QualityMetric), default="auto",
                   help="quality measure: auto = accuracy with labels / agreement without for "
                   "logits, cosine for embeddings (unit-norm rows), mse (1 - MSE/Var) for one "
                   "value per sample")
    p.add_argument("--batch-size", type=_positive(int), default=1)
    p.add_argument("--threads", type=_positive(int), default=2)
    p.add_argument("--objective", choices=("smallest", "fastest"), default="smallest")
    p.add_argument("--time-budget-s", type=_positive(float), default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--recipe", type=Path, default=None,
                   help="JSON recipe (prune_ratio, quant, distill_epochs, ...): skips the search")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=compress)
    return p


def _load_recipe(path: Path) -> Any:
    from app.engine.errors import InvalidRecipe
    from app.engine.types import Recipe

    try:
        d = json.loads(path.read_text())
        return Recipe.from_dict(d)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidRecipe(f"cannot read recipe {str(path)!r}: {e}") from None


def _row(name: str, m: Any, base: Any, out: TextIO) -> None:
    size_ratio = base.size_bytes / max(m.size_bytes, 1)
    speed = base.latency_p50_ms / max(m.latency_p50_ms, 1e-9)
    drop = (base.quality - m.quality) * 100
    ci = m.quality_drop_ci95
    interval = "" if ci is None else f" [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]"
    print(f"  {name:<34} {m.size_bytes / 1e6:9.3f} {size_ratio:6.1f}x {m.latency_p50_ms:9.3f}"
          f" {speed:6.2f}x {m.quality:8.4f} {drop:+7.2f}{interval}", file=out)


def print_summary(result: Any, out: TextIO | None = None) -> None:
    """Baseline, every candidate and the chosen one, in one table (default: sys.stdout at
    call time, so a redirected stdout is honoured)."""
    out = out or sys.stdout
    base = result.baseline
    print(f"\n  {'model':<34} {'size MB':>9} {'smaller':>7} {'p50 ms':>9} {'faster':>7}"
          f" {base.quality_kind[:8]:>8} {'drop pt':>7} {'95% interval':>16}", file=out)
    _row("fp32 baseline", base, base, out)
    for i, c in enumerate(result.candidates):
        r = c.recipe
        mark = "*" if c is result.best else ("+" if c.feasible else " ")
        name = f"{mark}{i:2d} prune {r.prune_ratio:.0%} {r.quant}" + (
            f" +KD {r.distill_epochs}ep" if c.distilled else "") + (
            f" fp32:{','.join(r.keep_fp32)}" if r.keep_fp32 else "")
        _row(name, c.metrics, base, out)
    print("  (* chosen, + feasible)", file=out)
    print(f"\n{result.status}: {result.message}", file=out)
    for w in result.warnings:
        print(f"warning: {w}", file=out)
    for name, path in result.artifacts.items():
        print(f"  {name:<16} {path}", file=out)


def compress(args: argparse.Namespace) -> int:
    """Run ``compress`` from parsed arguments; returns the process exit code."""
    from app.engine import pipeline
    from app.engine.errors import Cancelled, EngineError, TimeBudgetExceeded
    from app.engine.types import Constraints, JobSpec

    start = time.monotonic()

    def progress(stage: str, fraction: float, message: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - start:7.1f}s] {stage:<9} {fraction:4.0%}  {message}",
                  flush=True)

    files = (("model", args.model), ("--data", args.data), ("--eval-data", args.eval_data))
    for label, path in files:
        if path is not None and not Path(path).is_file():
            print(f"error: {label} file not found: {path}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        spec = JobSpec(
            constraints=Constraints(
                max_size_mb=args.max_size_mb, max_latency_ms=args.max_latency_ms,
                max_accuracy_drop=args.max_accuracy_drop, batch_size=args.batch_size,
                threads=args.threads, objective=args.objective, time_budget_s=args.time_budget_s,
                metric=args.metric,
            ),
            recipe=None if args.recipe is None else _load_recipe(args.recipe),
            device=args.device,
            seed=args.seed,
        )
        result = pipeline.run(args.model, args.data, spec, args.out, progress,
                              eval_data_path=args.eval_data)
    except TimeBudgetExceeded as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return EXIT_TIMEOUT
    except (Cancelled, KeyboardInterrupt):
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except EngineError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_summary(result)
    return EXIT_OK if result.status == "succeeded" else EXIT_UNSATISFIABLE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.engine.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compress_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
