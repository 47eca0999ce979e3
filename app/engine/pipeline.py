"""``run``: .pt2 + data + constraints in, a compressed model that meets them (or the closest) out.

Stages: load -> baseline -> (prune -> quantize -> evaluate)* -> distill* -> export. The planner
(``planner.search``) decides which candidates to build; :class:`StageEvaluator` is the bridge
from the planner to the stage functions of E1 (formats, evaluate), E2 (graph, prune) and E3
(quantize, export, distill).

Latency figures. Every measurement interleaves the measured sessions with the fp32 baseline
session and a second session of the baseline (the identical-model control; spinning off,
DESIGN §6) and reports each candidate's p50 as ``baseline_p50 * (candidate / baseline ratio
measured in the same run)`` (``stages.evaluate.evaluate_against_baseline``, the same path the
tests use): the ratio is what is measured side by side, the absolute scale is the baseline's
first measurement. So load from other processes between two measurement runs does not move one
candidate against another, and the control's ratio in each run is the noise the never-slower
rule must beat (``report.json`` ``latency``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.engine.errors import InvalidRecipe, TimeBudgetExceeded
from app.engine.planner.search import Outcome, SearchSpace, default_space, run_recipe, search
from app.engine.progress import Tracker
from app.engine.types import (
    Candidate,
    Constraints,
    JobSpec,
    Metrics,
    ProgressFn,
    Recipe,
    Result,
    StatusFn,
    TensorSpec,
)

HOLDOUT_FRACTION = 0.2  # of the data, when no separate evaluation data is given
VAL_FRACTION = 0.15  # of the training part, for distillation's early stopping
CALIB_SAMPLES = 256  # calibration samples for static int8
CALIB_BATCH = 32
EXPORT_RESERVE_S = 10.0  # seconds of the budget kept for the final export and report
# Epochs without held-out gain before a phase stops. A heavily pruned student recovers in
# bursts: at patience 2 ResCNN pruned 70 % stopped at 77 % accuracy on digits 16x16.
DISTILL_PATIENCE = 4
# Wall seconds of timing per side-by-side latency run at most: this share of the job's time
# budget, within [3, 30] s (compare_latency stops earlier once every ratio is known within
# +-3 %; a job runs two or three such runs plus one per distilled candidate).
LATENCY_SHARE = 0.03
LATENCY_MAX_S = (3.0, 30.0)


# ---------------------------------------------------------------------------------------------
# helpers


def _input_specs(ep: torch.export.ExportedProgram) -> tuple[TensorSpec, ...]:
    """User inputs of an exported program: name, shape (dim 0 dynamic), numpy dtype name."""
    user = set(ep.graph_signature.user_inputs)
    specs: list[TensorSpec] = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            continue
        shape: list[int | None] = []
        for k, d in enumerate(val.shape):
            shape.append(None if k == 0 or not isinstance(d, int) else int(d))
        dtype = str(val.dtype).removeprefix("torch.")
        specs.append(TensorSpec(node.name, tuple(shape), dtype))
    return tuple(specs)


def _require_dynamic_batch(ep: torch.export.ExportedProgram, model: nn.Module,
                           example_inputs: tuple[torch.Tensor, ...], filename: str) -> None:
    """Every stage runs the model at other batch sizes than its export's (calibration,
    training, latency at ``Constraints.batch_size``). A program exported without a dynamic
    batch is fine when only its input spec fixed the batch; when its graph bakes the size in
    (attention reshapes to ``[batch * heads, ...]``), the job fails here with what to do,
    not later with a raw ``view`` error from the first export."""
    from app.engine.errors import InvalidModel
    from app.engine.planner.search import _short
    from app.engine.stages.prune import has_dynamic_batch, reexport

    if has_dynamic_batch(ep):
        return
    try:
        reexport(model, example_inputs, strict=True)
    except InvalidModel as e:
        fixed = [f"{s.arg.name}: {list(ph.meta['val'].shape)}"
                 for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"
                 for ph in ep.graph.nodes if ph.op == "placeholder" and ph.name == s.arg.name
                 and hasattr(ph.meta.get("val"), "shape")]
        raise InvalidModel(
            f"{filename} was exported with a fixed batch size ({'; '.join(fixed)}) and its "
            "graph depends on that size, so it cannot run the other batch sizes compression "
            "needs; export it again with a dynamic batch dimension, e.g. "
            "torch.export.export(model, args, dynamic_shapes=({0: torch.export.Dim('batch')},"
            " ...)) with one entry per input"
            f" ({_short(str(e.__cause__ or e).strip(), 200)})") from e


def _has_depthwise(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        for m in model.modules()
    )


def _linear_heavy(model: nn.Module) -> bool:
    """More Linear than Conv weight parameters: a transformer / MLP, where dynamic int8 fits."""
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d))
    return lin > conv


def _label_max(*parts: Any) -> int | None:
    """Largest class id over data sets (None when none has labels)."""
    tops = [int(p.labels.max()) for p in parts if p.labels is not None and len(p.labels)]
    return max(tops) if tops else None


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch kernels for the run, restoring the caller's setting afterwards."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _device(spec: JobSpec) -> torch.device:
    if spec.device == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRecipe("device 'cuda' was requested but CUDA is not available here")
        return torch.device("cuda")
    if spec.device == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _file_entry(path: Path) -> dict[str, Any]:
    from app.engine.stages.export import sha256_file

    return {"file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


class _Clock:
    """Hard deadline, checked at every progress point; the overall progress ``tracker``."""

    def __init__(self, budget_s: float, on_progress: ProgressFn | None,
                 on_status: StatusFn | None = None) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.deadline = self.start + budget_s
        self._cb = on_progress
        self._status_cb = on_status
        self.tracker = Tracker(self.deadline)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, stage: str, fraction: float, message: str) -> None:
        # The callback first: a cancel is reported as cancel even when the clock also ran out.
        if self._status_cb is not None:
            self._status_cb(self.tracker.status(stage))
        if self._cb is not None:
            self._cb(stage, float(min(max(fraction, 0.0), 1.0)), message)
        if time.monotonic() > self.deadline:
            raise TimeBudgetExceeded(
                f"time budget of {self.budget_s:g} s exceeded during {stage!r}"
                f" (after {self.elapsed():.0f} s)"
            )

    def epoch(self, stage: str, fraction: float, message: str) -> None:
        """``progress`` for the distillation loop: it calls once per finished epoch."""
        self.tracker.epoch_done()
        self.progress(stage, fraction, message)


# ---------------------------------------------------------------------------------------------
# the bridge from the planner to the stages


@dataclass
class Built:
    recipe: Recipe
    pruned: nn.Module  # fp32 pruned model: the distillation student's starting point
    model: nn.Module  # the torch model the ONNX file came from (converted int8, or fp32)
    onnx_path: Path


class StageEvaluator:
    """Implements ``planner.search.Evaluator`` with the real stage functions."""

    def __init__(
        self,
        teacher: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        train: Any,
        val: Any,
        holdout: Any,
        constraints: Constraints,
        workdir: Path,
        *,
        device: torch.device,
        clock: _Clock,
        baseline_key: str | None = None,
    ) -> None:
        from app.engine.stages.distill import has_attention, model_family
        from app.engine.stages.evaluate import evaluate_onnx, make_session, run_onnx
        from app.engine.stages.export import BASELINES, export_onnx
        from app.engine.stages.quality import Scorer

        self.teacher = teacher
        self.example_inputs = example_inputs
        self.train, self.val, self.holdout = train, val, holdout
        self.constraints = constraints
        self.workdir = workdir
        self.device = device
        self.clock = clock
        self.warnings: list[str] = []  # for the user: what a scheme left in fp32, once each
        self._n = 0
        self._pruned: dict[tuple[float, str, str, int], nn.Module] = {}  # see structure()
        # One entry per side-by-side latency run (LatencyComparison.to_dict + what it timed).
        self.latency_runs: list[dict[str, Any]] = []
        self.family = model_family(teacher)  # decides distillation rate and warm-up
        self.attention = has_attention(teacher)  # int8 students: QAT, or fp32 KD + PTQ
        self.distill_log: list[dict[str, Any]] = []  # one entry per distillation
        clock.progress("baseline", 0.0, "exporting the fp32 baseline to ONNX")
        self.baseline_onnx = workdir / "baseline.onnx"
        self.baseline_cached = BASELINES.export(
            baseline_key, self.baseline_onnx,
            lambda path: export_onnx(teacher, example_inputs, path))
        base_sess = make_session(self.baseline_onnx, threads=constraints.threads)
        # Reference outputs for fidelity (no labels) and agreement: the fp32 ONNX model.
        self.reference = run_onnx(base_sess, holdout, batch_size=64)
        # The metric, checked against outputs and labels before any candidate is built.
        self.scorer = Scorer.resolve(
            constraints.metric, self.reference, holdout.labels, label_max=_label_max(
                train, val, holdout), source="the held-out data")
        # The baseline's per-sample scores: every candidate's drop interval is paired to them.
        self._base_scores = self.scorer.score(self.reference).per_sample
        self.baseline: Metrics = evaluate_onnx(
            self.baseline_onnx, holdout, self.reference, batch_size=constraints.batch_size,
            threads=constraints.threads, session=base_sess, scorer=self.scorer)
        clock.progress(
            "baseline", 1.0,
            f"baseline: {self.baseline.quality_kind} {self.baseline.quality:.4f}, "
            f"{self.baseline.size_bytes / 1e6:.3f} MB, p50 {self.baseline.latency_p50_ms:.3f} ms"
            + (" (ONNX export reused: same model file, same input shapes)"
               if self.baseline_cached else ""),
        )

    # -- measurement ---------------------------------------------------------------------------

    def measure(self, built: Sequence[Built]) -> list[Metrics]:
        from app.engine.stages.evaluate import evaluate_against_baseline

        c = self.constraints
        self.clock.progress("evaluate", 0.1,
                            f"timing {len(built)} candidate(s) side by side with the baseline"
                            f" and an identical-model control (batch {c.batch_size},"
                            f" {c.threads} threads)")
        metrics, cmp = evaluate_against_baseline(
            self.baseline_onnx, [b.onnx_path for b in built], self.holdout, self.reference,
            baseline_p50_ms=self.baseline.latency_p50_ms, batch_size=c.batch_size,
            threads=c.threads, scorer=self.scorer, baseline_scores=self._base_scores,
            max_seconds=min(max(LATENCY_SHARE * c.time_budget_s, LATENCY_MAX_S[0]),
                            LATENCY_MAX_S[1]))
        self.latency_runs.append({
            "timed": [f"prune {b.recipe.prune_ratio:.0%} {b.recipe.quant}"
                      f"{' distilled' if b.recipe.distill_epochs else ''}" for b in built],
            **cmp.to_dict()})
        self.clock.progress("evaluate", 1.0,
                            f"measured {len(built)} candidate(s) in {cmp.rounds} rounds; an"
                            f" identical model measured {cmp.control.ratio:.3f}x of the"
                            f" baseline (noise +-{cmp.noise:.1%})")
        return metrics

    # -- building ----------------------------------------------------------------------------

    def _path(self, recipe: Recipe, tag: str) -> Path:
        self._n += 1
        return self.workdir / (f"cand{self._n:03d}_p{round(recipe.prune_ratio * 100):02d}"
                               f"_{recipe.quant}_{tag}.onnx")

    def _calib(self) -> list[tuple[torch.Tensor, ...]]:
        data = self.train.take(min(CALIB_SAMPLES, self.train.samples))
        return [x for x, _ in data.batches(CALIB_BATCH)]

    def _export(self, recipe: Recipe, fp32: nn.Module, tag: str,
                converted: nn.Module | None = None) -> Built:
        """ONNX of a candidate: ``converted`` (a QAT student after convert) as is, else
        ``fp32`` through the recipe's scheme (``schemes.get(recipe.quant).to_onnx``)."""
        from app.engine.schemes import get
        from app.engine.stages.export import export_onnx

        scheme = get(recipe.quant)
        path = self._path(recipe, tag)
        if converted is not None:
            export_onnx(converted, self.example_inputs, path)
            return Built(recipe, fp32, converted, path)
        calib = self._calib() if scheme.needs_calibration else []
        model, path = scheme.to_onnx(fp32, self.example_inputs, path, calib)
        self.warnings.extend(w for w in scheme.notes(path) if w not in self.warnings)
        return Built(recipe, fp32, model, path)

    def structure(self, recipe: Recipe) -> str:
        """Fingerprint of the pruned model (parameter names, shapes, non-zero count): equal
        for candidates whose pruning changed nothing. The pruned model is kept for build()."""
        from app.engine.stages.prune import structure_fingerprint

        key = (recipe.prune_ratio, recipe.prune_mode, recipe.importance, recipe.round_to)
        if key not in self._pruned:
            _seed_all(recipe.seed)
            self._pruned[key] = self._prune(recipe)
        return structure_fingerprint(self._pruned[key])

    def _prune(self, recipe: Recipe) -> nn.Module:
        from app.engine.stages.prune import PruneConfig, prune

        key = (recipe.prune_ratio, recipe.prune_mode, recipe.importance, recipe.round_to)
        if key in self._pruned:  # pruned once per ratio, whatever the quant schemes built on it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's pytree spec on deepcopy
                return copy.deepcopy(self._pruned[key])
        if recipe.prune_ratio <= 0:
            return copy.deepcopy(self.teacher)
        grad_batches = None
        if recipe.importance == "taylor":
            grad_batches = []
            with torch.no_grad():
                for x, _ in self.train.take(min(256, self.train.samples)).batches(64):
                    grad_batches.append((x, self.teacher(*x)))
        cfg = PruneConfig(ratio=recipe.prune_ratio, mode=recipe.prune_mode,
                          importance=recipe.importance, round_to=recipe.round_to)
        return prune(self.teacher, self.example_inputs, cfg, grad_batches=grad_batches,
                     calib_batches=self._calib())

    def build(self, recipe: Recipe) -> Built:
        from app.engine.schemes import get

        scheme = get(recipe.quant)
        if not 0.0 <= recipe.prune_ratio <= 0.95:
            raise InvalidRecipe(f"prune_ratio must be in [0, 0.95], got {recipe.prune_ratio}")
        _seed_all(recipe.seed)  # each candidate independent of the order it is built in
        pruned = self._prune(recipe)
        pruned.eval()
        if scheme.needs_calibration:
            # Reported at its start (the planner reports "quantize" only once it is built),
            # so the job's stage says what the worker is doing.
            self.clock.progress("quantize", 0.0, f"{scheme.name}: calibrating")
        return self._export(recipe, pruned, "ptq")

    def distill(self, built: Built, epochs: int, time_budget_s: float,
                max_epochs: int | None = None) -> Built:
        from app.engine.schemes import get
        from app.engine.stages.distill import FAMILY_SCHEDULES, DistillConfig, distill
        from app.engine.stages.quantize import convert

        recipe = built.recipe
        scheme = get(recipe.quant)
        _seed_all(recipe.seed)
        student: nn.Module
        # Quantization-aware, except with attention: an attention model distils in fp32 and
        # is quantized after, with calibration, as its untrained candidate was. The zoo ViT
        # pruned 70 % int8 fell from 98.8 % to 85-94 % validation accuracy in every QAT epoch
        # (24 epochs, warm-up rate under 3e-4; also when training started from calibrated
        # ranges) and was rolled back; distilled in fp32 for 12 epochs, then quantized, it
        # scored 96.25 % on the benchmark's unseen test split against 95.25 % for fp32.
        # ConvNeXt (LayerNorm, no attention) trains well with QAT (zoo: no drop).
        qat = scheme.qat and not self.attention
        if qat:
            student = scheme.prepare_qat(copy.deepcopy(built.pruned), self.example_inputs)
        else:
            student = copy.deepcopy(built.pruned)
        teacher = copy.deepcopy(self.teacher).to(self.device).eval()
        # The rate is the recipe's (the planner fills it per model family); the warm-up and
        # decay are the family's (stages.distill.FAMILY_SCHEDULES).
        cfg = DistillConfig(epochs=epochs, max_epochs=max_epochs,
                            temperature=recipe.temperature, alpha=recipe.alpha,
                            lr=recipe.lr, time_budget_s=time_budget_s, seed=recipe.seed,
                            mixup=recipe.mixup, patience=DISTILL_PATIENCE,
                            warmup_fraction=FAMILY_SCHEDULES[self.family].warmup_fraction,
                            hidden_weight=FAMILY_SCHEDULES[self.family].hidden_weight,
                            task=self.scorer.task)
        rep = distill(student.to(self.device), teacher, self.train, self.val, cfg,
                      device=self.device, on_progress=self.clock.epoch)
        student, epochs_run = rep.student, int(rep.epochs_run)
        self.distill_log.append({
            "recipe": f"prune {recipe.prune_ratio:.0%} {recipe.quant}", "family": self.family,
            "quantization_aware": qat, "hidden_state_layers": rep.hidden_layers,
            "lr": recipe.lr, "warmup_fraction": cfg.warmup_fraction,
            "min_lr_fraction": cfg.min_lr_fraction, "epochs_run": epochs_run,
            "epochs_planned": rep.planned_epochs,
            "best_epoch": rep.best_epoch, "stopped": rep.stopped_reason,
            "annealed_at_epoch": rep.annealed_at,
            "quality_kind": rep.quality_kind,
            "validation_quality_start": rep.initial_holdout_quality,
            "validation_quality_best": rep.best_holdout_quality,
            "rolled_back": rep.rolled_back})
        if rep.rolled_back:
            self.clock.progress("distill", 1.0,
                                f"no distillation epoch beat the untrained start "
                                f"({rep.quality_kind} {rep.initial_holdout_quality:.4f}): "
                                "rolled back to it")
        trained = student.to("cpu")
        new_recipe = replace(recipe, distill_epochs=epochs_run)
        if qat:
            assert isinstance(trained, torch.fx.GraphModule)
            return self._export(new_recipe, trained, "qat", convert(trained))
        trained.eval()
        return self._export(new_recipe, trained, "kd")


def _latency_report(ev: Any, outcome: Outcome) -> dict[str, Any]:
    """How latency was measured and how noisy it was: the measured noise of every run.
    ``ev``: an evaluator with ``constraints`` and ``latency_runs`` (.pt2 or ONNX path)."""
    from app.engine.stages.evaluate import LATENCY_METHOD

    runs = ev.latency_runs
    chosen = outcome.best.metrics.latency
    return {
        "method": LATENCY_METHOD,
        "batch_size": ev.constraints.batch_size, "threads": ev.constraints.threads,
        # The chosen candidate's ratio to the baseline (< 1 = faster) and the run it came from.
        "chosen": None if chosen is None else dataclasses.asdict(chosen),
        "finalists_remeasured": outcome.remeasured,
        "control_ratios": [r["control"]["ratio"] for r in runs],
        "noise": [r["noise"] for r in runs],
        "runs": [{k: v for k, v in r.items() if k != "method"} for r in runs],
    }


def finish_run(
    *, outcome: Outcome, baseline: Metrics, spec: JobSpec, clock: _Clock, out_dir: Path,
    onnx_out: Path, message: str, warnings: list[str], inputs: dict[str, Path | None],
    artifacts: dict[str, Path], details: dict[str, Any],
) -> Result:
    """The end of a run for either model format: ``candidates.json``, ``report.json`` (the
    keys every run has, plus the format's own ``details``), and the Result. ``inputs``: name
    -> file of the run's inputs (None = not given); ``artifacts``: the format's files besides
    ``model.onnx`` and the two written here, in manifest order."""
    from app.engine.stages.export import library_versions

    best = outcome.best
    cand_out = out_dir / "candidates.json"
    cand_out.write_text(json.dumps(
        {"candidates": [x.to_dict() for x in outcome.candidates], "pareto_front": outcome.front},
        indent=2))
    files = {"model.onnx": onnx_out, **artifacts, "candidates.json": cand_out}
    report: dict[str, Any] = {
        "status": outcome.status,
        "message": message,
        "seed": spec.seed,
        "spec": spec.to_dict(),
        "constraints": spec.constraints.to_dict(),
        "recipe": best.recipe.to_dict(),
        "baseline": baseline.to_dict(),
        "chosen": best.to_dict(),
        "chosen_index": outcome.best_index,
        "candidates": [x.to_dict() for x in outcome.candidates],
        "pareto_front": outcome.front,
        "skipped": outcome.skipped,
        # An untrained choice distilled with the time left (planner.search.polish): the
        # copy's candidate index and whether it replaced the choice; None = no polish.
        "polish": outcome.polished,
        "warnings": warnings,
        "ratios": {
            "size": baseline.size_bytes / max(best.metrics.size_bytes, 1),
            "speedup": baseline.latency_p50_ms / max(best.metrics.latency_p50_ms, 1e-9),
            "quality_drop": baseline.quality - best.metrics.quality,
        },
        **details,
        "elapsed_s": round(clock.elapsed(), 3),
        "manifest": {
            "inputs": {k: _file_entry(Path(v)) for k, v in inputs.items() if v is not None},
            "outputs": {p.name: _file_entry(p) for p in files.values()},
            "library_versions": library_versions(),
        },
    }
    report_out = out_dir / "report.json"
    report_out.write_text(json.dumps(report, indent=2, default=str))
    clock.tracker.done()
    clock.progress("export", 1.0, message)
    return Result(
        status=outcome.status,  # type: ignore[arg-type]
        baseline=baseline,
        best=best,
        candidates=outcome.candidates,
        artifacts={"model.onnx": onnx_out, **artifacts, "report.json": report_out,
                   "candidates.json": cand_out},
        report=report,
        message=message,
        warnings=warnings,
    )


# ---------------------------------------------------------------------------------------------
# run


def run(
    model_path: Path,
    data_path: Path,
    spec: JobSpec,
    out_dir: Path,
    on_progress: ProgressFn | None = None,
    *,
    eval_data_path: Path | None = None,
    space: SearchSpace | None = None,
    work_dir: Path | None = None,
    model_format: str | None = None,
    on_status: StatusFn | None = None,
) -> Result:
    """Compress ``model_path`` (.pt2 or .onnx) under ``spec`` using ``data_path``; write artifacts.

    Raises ``EngineError`` subclasses: bad model / data (InvalidModel, UnsafeModel, InvalidData,
    InputMismatch), InvalidRecipe, Cancelled (from ``on_progress``), TimeBudgetExceeded.
    ``space`` overrides the search grid (tests, benchmarks). ``work_dir``: where the scratch
    directory (candidate ONNX files) is made, default the system temp dir. Artifacts in ``out_dir``:
    ``model.onnx``, ``model.pt2``, ``report.json``, ``candidates.json``.
    ``model_format`` ("pt2" | "onnx", default: detected from the file) picks the path, here
    only: an ONNX model is quantized with ONNX Runtime (``onnx_pipeline``; no model.pt2).
    ``on_status`` gets the overall progress, ETA and activity (``progress.Tracker``) right
    before each ``on_progress`` call.
    """
    from app.engine.formats.sandbox import detect_format

    model_path, data_path, out_dir = Path(model_path), Path(data_path), Path(out_dir)
    fmt = model_format or detect_format(model_path)
    if fmt not in ("pt2", "onnx"):
        raise InvalidRecipe(f"unknown model format {fmt!r} (pt2, onnx)")
    if fmt == "pt2" and spec.recipe is not None and spec.recipe.keep_fp32:
        raise InvalidRecipe("recipe keep_fp32 applies to ONNX input only")
    c = spec.constraints
    if c.time_budget_s <= 0 or c.batch_size < 1 or c.threads < 1:
        raise InvalidRecipe("time_budget_s, batch_size and threads must be positive "
                            f"(got {c.time_budget_s}, {c.batch_size}, {c.threads})")
    clock = _Clock(c.time_budget_s, on_progress, on_status)
    with _deterministic(), tempfile.TemporaryDirectory(prefix="modelpress-",
                                                       dir=work_dir) as tmp:
        if fmt == "onnx":
            from app.engine.onnx_pipeline import run_onnx_model

            return run_onnx_model(model_path, data_path, spec, out_dir, clock, Path(tmp),
                                  eval_data_path, space)
        return _run(model_path, data_path, spec, out_dir, clock, Path(tmp), eval_data_path, space)


def _run(
    model_path: Path, data_path: Path, spec: JobSpec, out_dir: Path, clock: _Clock, work: Path,
    eval_data_path: Path | None, space: SearchSpace | None,
) -> Result:
    from app.engine.formats.data import load_dataset
    from app.engine.formats.pt2 import check_pt2_archive, load_pt2
    from app.engine.graph import modularize
    from app.engine.stages.export import export_key, export_pt2, onnx_parity, sha256_file
    from app.engine.stages.quality import holdout_warnings

    c = spec.constraints
    _seed_all(spec.seed)
    device = _device(spec)

    # -- load ---------------------------------------------------------------------------------
    clock.progress("load", 0.0, f"checking {model_path.name}")
    check_pt2_archive(model_path)
    ep = load_pt2(model_path)
    specs = _input_specs(ep)
    names = ", ".join(f"{s.name}{list(s.shape)}" for s in specs)
    clock.progress("load", 0.4, f"model inputs: {names}")
    data = load_dataset(data_path, specs)
    if eval_data_path is not None:
        holdout = load_dataset(Path(eval_data_path), specs)
        train_all = data
    else:
        train_all, holdout = data.split(HOLDOUT_FRACTION, spec.seed)
    train, val = train_all.split(VAL_FRACTION, spec.seed)
    teacher = modularize(ep).eval()
    example_inputs = tuple(t[:2] for t in train.take(2).tensors())
    _require_dynamic_batch(ep, teacher, example_inputs, model_path.name)
    clock.progress("load", 1.0, f"data: {train.samples} train, {val.samples} validation, "
                   f"{holdout.samples} held-out samples; device {device}")

    # -- baseline + plan ----------------------------------------------------------------------
    ev = StageEvaluator(teacher, example_inputs, train, val, holdout, c, work,
                        device=device, clock=clock,
                        baseline_key=export_key(sha256_file(model_path), example_inputs))
    search_deadline = clock.deadline - max(EXPORT_RESERVE_S, 0.15 * c.time_budget_s)
    outcome: Outcome
    if spec.recipe is not None:
        recipe = replace(spec.recipe, seed=spec.seed)
        clock.progress("prune", 0.0, f"explicit recipe: {recipe.to_dict()}")
        outcome = run_recipe(ev, recipe, c, deadline=search_deadline,
                             on_progress=clock.progress, tracker=clock.tracker)
    else:
        sp = space or default_space(linear_heavy=_linear_heavy(teacher),
                                    depthwise=_has_depthwise(teacher))
        from app.engine.stages.distill import FAMILY_SCHEDULES, MIXUP_MIN_EPOCHS

        family = FAMILY_SCHEDULES[ev.family]  # what the space leaves unset is the family's
        mixup = family.mixup if sp.distill_epochs >= MIXUP_MIN_EPOCHS else 0.0
        sp = replace(sp, lr=family.lr if sp.lr is None else sp.lr,
                     mixup=mixup if sp.mixup is None else sp.mixup)
        outcome = search(ev, c, sp, seed=spec.seed, deadline=search_deadline,
                         on_progress=clock.progress, tracker=clock.tracker)
    best: Candidate = outcome.best
    chosen: Built = outcome.built[outcome.best_index]
    pruning = _pruning_report(teacher, example_inputs)
    # Plain lines for the user (report.json, Result, CLIs, job result), most basic first.
    notes: list[str] = []
    wants_pruning = spec.recipe is None or (spec.recipe.prune_ratio > 0
                                            and spec.recipe.prune_mode == "structured")
    if wants_pruning and not pruning.prunable:
        notes.append(pruning.summary())
    notes += [*outcome.warnings, *(w for w in ev.warnings if w not in outcome.warnings)]

    # -- export -------------------------------------------------------------------------------
    clock.tracker.begin("export")
    clock.progress("export", 0.0, "writing model.onnx, model.pt2, report.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_out = out_dir / "model.onnx"
    shutil.copyfile(chosen.onnx_path, onnx_out)
    pt2_out = export_pt2(chosen.model, example_inputs, out_dir / "model.pt2")
    probe = tuple(t[:8] for t in holdout.take(min(8, holdout.samples)).tensors())
    parity = onnx_parity(chosen.model, onnx_out, probe)
    clock.progress("export", 0.5, f"ONNX Runtime vs torch max abs diff {parity:.2e}")
    if outcome.status == "succeeded":
        message = (f"chosen: prune {best.recipe.prune_ratio:.0%}, {best.recipe.quant}, "
                   f"{best.recipe.distill_epochs} distillation epochs")
    else:
        message = ("no candidate meets the constraints; closest: "
                   f"prune {best.recipe.prune_ratio:.0%}, {best.recipe.quant}: "
                   + "; ".join(best.reasons))
    notes += holdout_warnings(ev.scorer.kind, ev.baseline.quality,
                              best.metrics.quality_drop_ci95, holdout.samples,
                              c.max_accuracy_drop)
    return finish_run(
        outcome=outcome, baseline=ev.baseline, spec=spec, clock=clock, out_dir=out_dir,
        onnx_out=onnx_out, message=message, warnings=notes,
        inputs={"model": model_path, "data": data_path, "eval_data": eval_data_path},
        artifacts={"model.pt2": pt2_out},
        details={
            "device": str(device),
            "pruning": pruning.to_dict(),
            "onnx_parity_max_abs": parity,
            "latency": _latency_report(ev, outcome),
            "distillation": {"family": ev.family, "runs": ev.distill_log},
            "data": {"train": train.samples, "validation": val.samples,
                     "holdout": holdout.samples,
                     "holdout_source": "eval_data" if eval_data_path is not None else "split"},
        })


def _pruning_report(teacher: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    """Which layers structured pruning may narrow and why the others stay whole."""
    from app.engine.stages.prune import prunability

    return prunability(teacher, example_inputs)
