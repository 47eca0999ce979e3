"""ONNX input: quantize with ONNX Runtime, measure every candidate, same planner and report.

An uploaded ``.onnx`` has no PyTorch graph, so the techniques that need one do not apply:
pruning (Torch-Pruning rewrites ``nn`` modules) and distillation (training). They are reported
as not applicable (a line in ``Result.warnings`` / ``report.json``), never as a failure; an
explicit recipe that asks for them is an ``InvalidRecipe``. What does apply, each a candidate
measured side by side with the uploaded model in ONNX Runtime:

- ``int8_static``: ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations) calibrated on the uploaded data (``quantize.quantize_onnx_static``);
- the same with one group of op types left in fp32 (``Recipe.keep_fp32``): int8 is not
  always faster (DESIGN §6: ORT's int8 depthwise convs ran at 0.6x of fp32), so the grid
  holds a candidate per fallback and the planner keeps whichever the runtime rewards;
- ``int8_dynamic`` (per-channel MatMul / Gemm weights) where the graph has MatMul / Gemm;
- ``fp16`` weight storage.

The never-larger / never-slower rules, the objective ranking and the report are the planner's
(``planner.search``), as for ``.pt2`` input. Artifacts: ``model.onnx``, ``report.json``,
``candidates.json``; no ``model.pt2`` (there is no PyTorch graph to export).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from app.engine.errors import InvalidRecipe
from app.engine.planner.search import Outcome, SearchSpace, run_recipe, search
from app.engine.types import JobSpec, Metrics, Recipe, Result

# Op types ONNX Runtime computes in int8 when quantized: the layers that hold the weights.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEPTHWISE = "DepthwiseConv"  # pseudo op type: a Conv with group == input channels > 1
NOT_APPLICABLE = ("pruning and distillation are not applicable to an ONNX model (they need "
                  "the PyTorch graph): only ONNX Runtime quantization was searched; upload a "
                  ".pt2 (torch.export.save) to prune and distill")
NO_PT2 = "no model.pt2 for ONNX input: the artifact is model.onnx only"


@dataclass
class OnnxBuilt:
    """A candidate built from the uploaded ONNX model (what the planner carries around)."""

    recipe: Recipe
    onnx_path: Path


@dataclass(frozen=True)
class OnnxSpace(SearchSpace):
    """The ONNX grid: explicit recipes (quantization only), no distillation."""

    recipes: tuple[Recipe, ...] = ()
    prune_ratios: tuple[float, ...] = (0.0,)
    distill_epochs: int = 0
    max_distill: int = 0

    def grid(self, seed: int) -> list[Recipe]:
        return [replace(r, seed=seed) for r in self.recipes]


# ---------------------------------------------------------------------------------------------
# the graph


def _depthwise(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    w = inits.get(node.input[1])
    return group > 1 and w is not None and len(w.dims) == 4 and w.dims[1] == 1


def op_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names by op type (``DepthwiseConv`` as its own group besides ``Conv``)."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        groups.setdefault(node.op_type, []).append(node.name)
        if _depthwise(node, inits):
            groups.setdefault(DEPTHWISE, []).append(node.name)
    return groups


def onnx_grid(groups: dict[str, list[str]]) -> tuple[Recipe, ...]:
    """The candidates for a graph with these op groups (module doc)."""
    from onnxruntime.quantization.registry import QDQRegistry

    compute = [t for t in COMPUTE_OPS if t in groups]
    recipes = [Recipe(quant="int8_static")]
    if DEPTHWISE in groups:
        recipes.append(Recipe(quant="int8_static", keep_fp32=(DEPTHWISE,)))
    # int8 only where the weights are: no Q/DQ pairs around activations, pooling, reshapes.
    rest = tuple(sorted(t for t in groups if t in QDQRegistry and t not in COMPUTE_OPS))
    if rest and compute:
        recipes.append(Recipe(quant="int8_static", keep_fp32=rest))
    if len(compute) > 1:  # with a single compute type this is the fp32 model again
        recipes += [Recipe(quant="int8_static", keep_fp32=(t,)) for t in compute]
    if "MatMul" in groups or "Gemm" in groups:
        recipes.append(Recipe(quant="int8_dynamic"))
    recipes.append(Recipe(quant="fp16"))
    return tuple(recipes)


def _check_recipe(recipe: Recipe, groups: dict[str, list[str]]) -> None:
    if recipe.prune_ratio > 0 or recipe.distill_epochs > 0:
        raise InvalidRecipe(
            f"recipe asks for prune_ratio {recipe.prune_ratio:g} / distill_epochs "
            f"{recipe.distill_epochs}, but pruning and distillation need the PyTorch graph and "
            "are not applicable to an ONNX model: use prune_ratio 0 and distill_epochs 0, "
            "or upload a .pt2 (torch.export.save)")
    if recipe.keep_fp32 and recipe.quant != "int8_static":
        raise InvalidRecipe(f"keep_fp32 applies to quant 'int8_static', not {recipe.quant!r}")
    unknown = [t for t in recipe.keep_fp32 if t not in groups]
    if unknown:
        raise InvalidRecipe(f"keep_fp32 names op type(s) {unknown} this graph does not have "
                            f"(it has {sorted(groups)})")


def _named_source(model_path: Path, work: Path) -> tuple[Path, onnx.ModelProto]:
    """The model with every node named (``nodes_to_exclude`` selects nodes by name)."""
    model = onnx.load(str(model_path), load_external_data=False)
    if all(n.name for n in model.graph.node):
        return model_path, model
    model = onnx.load(str(model_path))
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
            while n.name in used:
                n.name += "_"
            used.add(n.name)
    out = work / "source.onnx"
    onnx.save(model, str(out), save_as_external_data=model.ByteSize() > (1 << 31) - (1 << 26))
    return out, onnx.load(str(out), load_external_data=False)


# ---------------------------------------------------------------------------------------------
# the evaluator


class OnnxEvaluator:
    """Implements ``planner.search.Evaluator`` on an ONNX model with ONNX Runtime only."""

    def __init__(self, model_path: Path, train: Any, holdout: Any, spec: JobSpec, work: Path,
                 *, clock: Any) -> None:
        from app.engine.pipeline import CALIB_BATCH, CALIB_SAMPLES, _label_max
        from app.engine.stages.evaluate import evaluate_onnx, make_session, run_onnx
        from app.engine.stages.quality import Scorer

        self.constraints = spec.constraints
        self.train, self.holdout, self.work, self.clock = train, holdout, work, clock
        self.source, proto = _named_source(model_path, work)
        self.groups = op_groups(proto)
        self._n = 0
        clock.progress("baseline", 0.0, "measuring the uploaded ONNX model")
        self._base_sess = make_session(model_path, threads=self.constraints.threads)
        names = [i.name for i in self._base_sess.get_inputs()]
        dims = {i.shape[0] for i in self._base_sess.get_inputs() if i.shape}
        self.fixed_batch = next((d for d in dims if isinstance(d, int) and d > 0), None)
        self.batch = self.fixed_batch or self.constraints.batch_size
        # Latency feed: the target batch from held-out samples (repeated if fewer).
        idx = np.arange(self.batch) % holdout.samples
        self._latency_feed = {n: np.ascontiguousarray(holdout.inputs[n][idx]) for n in names}
        # Calibration: batches of the training part; only full batches for a fixed batch dim.
        calib_n = min(CALIB_SAMPLES, train.samples)
        step = self.fixed_batch or CALIB_BATCH
        last = calib_n - step + 1 if self.fixed_batch else calib_n
        self._calib = [{n: np.ascontiguousarray(train.inputs[n][i:i + step]) for n in names}
                       for i in range(0, max(last, 1), step)]
        self.reference = run_onnx(self._base_sess, holdout, batch_size=64)
        # The job's metric (as the .pt2 path): checked before any candidate is built; the
        # baseline's per-sample scores pair every candidate's drop interval.
        self.scorer = Scorer.resolve(self.constraints.metric, self.reference, holdout.labels,
                                     label_max=_label_max(train, holdout),
                                     source="the held-out data")
        self._base_scores = self.scorer.score(self.reference).per_sample
        self.model_path = model_path
        self.latency_runs: list[dict[str, Any]] = []
        self.baseline: Metrics = evaluate_onnx(
            model_path, holdout, self.reference, batch_size=self.batch,
            threads=self.constraints.threads, session=self._base_sess, scorer=self.scorer)
        clock.progress(
            "baseline", 1.0,
            f"baseline: {self.baseline.quality_kind} {self.baseline.quality:.4f}, "
            f"{self.baseline.size_bytes / 1e6:.3f} MB, p50 {self.baseline.latency_p50_ms:.3f} ms")

    def build(self, recipe: Recipe) -> OnnxBuilt:
        from app.engine.stages.quantize import (
            quantize_onnx_dynamic,
            quantize_onnx_fp16,
            quantize_onnx_static,
        )

        _check_recipe(recipe, self.groups)
        self._n += 1
        keep = "_fp32-" + "-".join(recipe.keep_fp32) if recipe.keep_fp32 else ""
        path = self.work / f"cand{self._n:03d}_{recipe.quant}{keep}.onnx"
        if recipe.quant == "int8_static":
            self.clock.progress("quantize", 0.0, "int8 static (ONNX Runtime): calibrating"
                                + (f", {', '.join(recipe.keep_fp32)} kept fp32" if keep else ""))
            exclude = sorted({n for t in recipe.keep_fp32 for n in self.groups[t]})
            quantize_onnx_static(self.source, path, self._calib, nodes_to_exclude=exclude)
        elif recipe.quant == "int8_dynamic":
            quantize_onnx_dynamic(self.source, path)
        elif recipe.quant == "fp16":
            quantize_onnx_fp16(self.source, path)
        elif recipe.quant == "none":
            shutil.copyfile(self.source, path)
        else:
            raise InvalidRecipe(f"unknown quantization scheme {recipe.quant!r}")
        return OnnxBuilt(recipe, path)

    def structure(self, recipe: Recipe) -> str:
        """The planner's dedup key: nothing is pruned here, so a candidate differs from
        another only by the op types it keeps in fp32 (with its quant scheme)."""
        return "onnx fp32:" + ",".join(sorted(recipe.keep_fp32))

    def measure(self, built: Sequence[OnnxBuilt]) -> list[Metrics]:
        """The .pt2 path's measurement (``evaluate_against_baseline``): side by side with the
        uploaded model and an identical-model control, the job's metric, paired intervals."""
        from app.engine.pipeline import LATENCY_MAX_S, LATENCY_SHARE
        from app.engine.stages.evaluate import evaluate_against_baseline

        c = self.constraints
        self.clock.progress("evaluate", 0.1,
                            f"timing {len(built)} candidate(s) side by side with the baseline"
                            f" and an identical-model control (batch {self.batch},"
                            f" {c.threads} threads)")
        metrics, cmp = evaluate_against_baseline(
            self.model_path, [b.onnx_path for b in built], self.holdout, self.reference,
            baseline_p50_ms=self.baseline.latency_p50_ms, batch_size=self.batch,
            threads=c.threads, scorer=self.scorer, baseline_scores=self._base_scores,
            max_seconds=min(max(LATENCY_SHARE * c.time_budget_s, LATENCY_MAX_S[0]),
                            LATENCY_MAX_S[1]))
        self.latency_runs.append({"timed": [b.recipe.quant for b in built], **cmp.to_dict()})
        self.clock.progress("evaluate", 1.0,
                            f"measured {len(built)} candidate(s) in {cmp.rounds} rounds; an"
                            f" identical model measured {cmp.control.ratio:.3f}x of the"
                            f" baseline (noise +-{cmp.noise:.1%})")
        return metrics

    def distill(self, built: OnnxBuilt, epochs: int, time_budget_s: float,
                max_epochs: int | None = None) -> OnnxBuilt:
        raise InvalidRecipe("distillation is not applicable to an ONNX model "
                            "(it needs the PyTorch graph)")


# ---------------------------------------------------------------------------------------------
# run


def run_onnx_model(
    model_path: Path, data_path: Path, spec: JobSpec, out_dir: Path, clock: Any, work: Path,
    eval_data_path: Path | None, space: SearchSpace | None,
) -> Result:
    """``pipeline.run`` for an ONNX model (module doc); same arguments, errors and report."""
    from app.engine.formats.data import load_dataset
    from app.engine.formats.onnx_safe import check_onnx
    from app.engine.formats.sandbox import onnx_specs
    from app.engine.pipeline import (
        EXPORT_RESERVE_S,
        HOLDOUT_FRACTION,
        _latency_report,
        _seed_all,
        finish_run,
    )
    from app.engine.stages.quality import holdout_warnings

    c = spec.constraints
    _seed_all(spec.seed)
    warnings = [NOT_APPLICABLE, NO_PT2]

    # -- load ---------------------------------------------------------------------------------
    clock.progress("load", 0.0, f"checking {model_path.name}")
    check_onnx(model_path)
    if spec.recipe is not None:  # before any work: a recipe that cannot apply is an error
        _check_recipe(spec.recipe, op_groups(onnx.load(str(model_path),
                                                       load_external_data=False)))
    specs, _ = onnx_specs(model_path)
    names = ", ".join(f"{s.name}{list(s.shape)}" for s in specs)
    clock.progress("load", 0.4, f"model inputs: {names}")
    data = load_dataset(data_path, specs)
    if eval_data_path is not None:
        holdout, train = load_dataset(Path(eval_data_path), specs), data
    else:
        train, holdout = data.split(HOLDOUT_FRACTION, spec.seed)
    clock.progress("load", 1.0, f"data: {train.samples} calibration, {holdout.samples} held-out "
                   "samples; ONNX Runtime CPU")

    # -- baseline + plan ----------------------------------------------------------------------
    ev = OnnxEvaluator(model_path, train, holdout, spec, work, clock=clock)
    if ev.fixed_batch is not None and ev.fixed_batch != c.batch_size:
        warnings.append(f"the model has a fixed batch dimension of {ev.fixed_batch}: latency "
                        f"was measured at batch {ev.fixed_batch}, not {c.batch_size}")
    search_deadline = clock.deadline - max(EXPORT_RESERVE_S, 0.15 * c.time_budget_s)
    outcome: Outcome
    if spec.recipe is not None:
        recipe = replace(spec.recipe, seed=spec.seed)
        clock.progress("quantize", 0.0, f"explicit recipe: {recipe.to_dict()}")
        outcome = run_recipe(ev, recipe, c, deadline=search_deadline, on_progress=clock.progress,
                             tracker=clock.tracker)
    else:
        grid = onnx_grid(ev.groups)
        if space is not None and any(r > 0 for r in space.prune_ratios):
            warnings.append(f"search space prune ratios {list(space.prune_ratios)} ignored: "
                            "ONNX input is quantized only")
        outcome = search(ev, c, OnnxSpace(recipes=grid), seed=spec.seed,
                         deadline=search_deadline, on_progress=clock.progress,
                         tracker=clock.tracker)
    best = outcome.best
    chosen: OnnxBuilt = outcome.built[outcome.best_index]
    warnings += outcome.warnings
    warnings += holdout_warnings(ev.scorer.kind, ev.baseline.quality,
                                 best.metrics.quality_drop_ci95, holdout.samples,
                                 c.max_accuracy_drop)

    # -- export -------------------------------------------------------------------------------
    clock.tracker.begin("export")
    clock.progress("export", 0.0, "writing model.onnx, report.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_out = out_dir / "model.onnx"
    shutil.copyfile(chosen.onnx_path, onnx_out)
    fallback = f", {'/'.join(best.recipe.keep_fp32)} in fp32" if best.recipe.keep_fp32 else ""
    if outcome.status == "succeeded":
        message = f"chosen: {best.recipe.quant}{fallback} (ONNX Runtime)"
    else:
        message = (f"no candidate meets the constraints; closest: {best.recipe.quant}{fallback}"
                   ": " + "; ".join(best.reasons))
    return finish_run(
        outcome=outcome, baseline=ev.baseline, spec=spec, clock=clock, out_dir=out_dir,
        onnx_out=onnx_out, message=message, warnings=warnings,
        inputs={"model": model_path, "data": data_path, "eval_data": eval_data_path},
        artifacts={},
        details={
            "device": "cpu",  # ONNX Runtime CPU execution provider
            "model_format": "onnx",
            # The .pt2 path's torch-vs-ONNX export check; here no export step exists: the
            # measured file is the artifact.
            "onnx_parity_max_abs": None,
            "data": {"train": train.samples, "validation": 0, "holdout": holdout.samples,
                     "holdout_source": "eval_data" if eval_data_path is not None else "split"},
            "latency": _latency_report(ev, outcome),
        })
