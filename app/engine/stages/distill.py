"""Knowledge distillation from the original model (teacher) into a compressed student.

The student is a pruned module, a PT2E ``prepare_qat`` fake-quant GraphModule (then this is
quantization-aware distillation), or both. Loss per batch:

- classifier (labels, or 2-D (N, C>1) outputs): ``alpha * T^2 * KL(p_t^T || p_s^T)
  + (1 - alpha) * CE(s, labels)`` with labels, else the KL term alone;
- embedding (any other output): ``MSE(s, t) + (1 - cos(s, t))``.

Hidden states (``DistillConfig.hidden_weight``, float students): the student's LayerNorm
outputs are also pulled toward the teacher's, ``hidden_weight * mean_l MSE(h_s, h_t) /
var(h_t)`` over every LayerNorm module the two share by name and output shape (structured
pruning of a transformer narrows its FFN, not its residual stream, so every block's
normalised hidden state still lines up; a CNN's pruned BN channels do not and are skipped).
The intermediate-layer loss of TinyBERT / DistilBERT. ``bench/hidden_states.py``, zoo models
pruned 70 %, 24 epochs at 3e-4, weight 0 -> 1: best validation quality BERT (int8 dynamic)
97.92 -> 98.61 %, ViT (int8 static, fp32 KD + PTQ) 98.8 -> 99.4 %, embedder 0.9997 -> 0.9999
cosine; on the benchmark's unseen 400-sample test split BERT 85.75 -> 86.25 % (fp32's), the
embedder 0.9996 -> 0.9998, ViT 96.25 -> 95.25 % (fp32's; 4 samples). Weight 1 for the
transformer family (``FAMILY_SCHEDULES``).

Optional mixup (``DistillConfig.mixup``, float inputs only): each training batch is a convex
mix of pairs of samples, and the teacher labels the mixed batch itself ("consistent teaching",
Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent"), so the
student matches the teacher between the training points too, not only on them; the
cross-entropy term mixes the two labels with the same weight.

AdamW with a per-step schedule: linear warm-up over ``warmup_fraction`` of the planned steps,
then cosine decay to ``min_lr_fraction`` of ``lr`` (a pruned student needs a high rate to
recover and a low one to settle batch-norm statistics and fake-quant ranges). The planned steps
are ``epochs`` epochs; if after the first epoch the time budget cannot hold them, the plan
shrinks once to the epochs that fit, so the decay still happens; if it holds more and
``max_epochs`` allows, the plan grows once to what fits (up to ``max_epochs``). The
learning rate and warm-up suit the model family (:func:`model_family`,
:data:`FAMILY_SCHEDULES`): attention / LayerNorm models collapse at the rates BN CNNs
need (a ViT fell from 75 % to chance in one epoch at 5e-3).

Held-out quality after every epoch (accuracy with labels, else top-1 agreement with the
teacher, or mean cosine for embeddings), ties broken by the held-out distillation loss (a
300-sample accuracy moves in steps of 0.33 points, so equal accuracy with a lower loss is still
progress); the best state is kept. The untrained start counts: a student no trained epoch
improves on is rolled back to its start (``DistillReport.rolled_back``), so distillation never
returns a worse one than it got. A QAT student's start has no quantization ranges yet, so its
start is judged (and kept for the roll-back) as a calibrated copy, while training continues on
the uncalibrated original (calibrating the trained student up front in eval mode cost DWCNN 3.3
points: a freshly pruned model's eval-mode activations set ranges far too wide for the moving
average to undo). ``patience`` epochs without improvement while the rate is still high
(above ``ANNEAL_ABOVE`` of the peak) do not stop the run: the best state is restored and the
rate anneals from where it is to the floor over ``patience`` more epochs; only a plateau during
that anneal (or its end) stops it. A cosine plan of 40 epochs otherwise stopped pruned students
at 80 % of the peak rate, never reaching the low-rate end where they settle (ResCNN pruned
70 %: 96.7 % validation accuracy at epoch 10, stopped at 14). The clock is checked between
batches against ``time_budget_s``.
``on_progress`` is called once per epoch and may raise (``errors.Cancelled``) to stop the run:
the exception propagates to the caller.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.engine.stages.quantize import disable_observer, enable_observer, set_training
from app.engine.types import ProgressFn

if TYPE_CHECKING:
    from app.engine.formats.data import Dataset

Task = Literal["auto", "classifier", "embedding"]
Family = Literal["transformer", "cnn", "dense"]
StopReason = Literal["epochs", "early_stopping", "time_budget"]
QualityKind = Literal["accuracy", "agreement", "cosine"]


class DataLike(Protocol):
    """What distill needs of a data set (``formats.data.Dataset`` has it)."""

    labels: np.ndarray | None

    @property
    def samples(self) -> int: ...

    def tensors(self) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 10
    # Epochs the plan may grow to when the time budget holds more than ``epochs`` (measured
    # after the first epoch); None = exactly ``epochs``. Early-stopping patience grows with
    # the plan (a quarter of it), so a long cosine schedule reaches its low-rate end.
    max_epochs: int | None = None
    temperature: float = 4.0  # softening of both logit sets in the KL term
    alpha: float = 0.7  # weight of the KL term vs cross-entropy (labels only)
    lr: float = 1e-3  # AdamW peak learning rate (after warm-up)
    batch_size: int = 64
    patience: int = 2  # epochs without holdout improvement before stopping
    time_budget_s: float = 300.0  # wall seconds for the whole call (teacher pass included)
    weight_decay: float = 1e-4
    min_delta: float = 1e-4  # smallest holdout gain that counts as an improvement
    task: Task = "auto"  # "auto": classifier if labels or 2-D (N, C>1) outputs
    seed: int = 0  # shuffling order
    # Beta(mixup, mixup) mixing weight per sample; 0 = off. Needs float inputs (not token
    # ids) and costs one teacher forward pass per batch.
    mixup: float = 0.0
    warmup_fraction: float = 0.0  # of the planned steps, linear from 0 to ``lr``
    min_lr_fraction: float = 0.05  # cosine decay ends at lr * this; 1.0 = constant rate
    # Weight of the hidden-state term (module doc, "Hidden states"); 0 = off. Costs one
    # teacher forward pass per batch.
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs >= 0, batch_size >= 1 and patience >= 1 are required")
        if self.max_epochs is not None and self.max_epochs < self.epochs:
            raise ValueError("max_epochs must be >= epochs (or None)")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0 or self.lr <= 0:
            raise ValueError("alpha in [0, 1], temperature > 0 and lr > 0 are required")
        if self.mixup < 0:
            raise ValueError("mixup (the Beta distribution parameter) must be >= 0")
        if self.hidden_weight < 0:
            raise ValueError("hidden_weight must be >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.min_lr_fraction <= 1.0:
            raise ValueError("warmup_fraction in [0, 1) and min_lr_fraction in [0, 1] are required")


@dataclass(frozen=True)
class FamilySchedule:
    """Distillation rate and warm-up that suit a model family (see ``FAMILY_SCHEDULES``)."""

    lr: float
    warmup_fraction: float
    # Beta(mixup, mixup) input mixing of the default search's candidates (float inputs only).
    mixup: float = 0.0
    # DistillConfig.hidden_weight of float students (module doc, "Hidden states").
    hidden_weight: float = 0.0


# Pruned students start far from the teacher. BN CNNs and MLPs recover at AdamW 5e-3 (1e-3
# was too slow in a few epochs; the zoo's fp32 models train at 3e-3 .. 1e-2). Attention /
# LayerNorm models need a rate an order lower with a warm-up (transformer fine-tuning uses
# 1e-4 .. 5e-4): at 5e-3 a pruned int8 ViT fell from 75 % to chance in its first epoch.
# Mixup for CNNs and MLPs: students distilled on the data points alone matched the teacher
# there and lost on unseen data (zoo MLP pruned 70 % int8: 100 % on the 280-sample hold-out,
# 1.0 point below fp32 on the benchmark's test split; with mixup 0.4, 0.5 point; bench/engine
# DWCNN 70 % int8: 98.00 -> 98.67 % test). Transformers: no such measurement, no mixup; they
# match the teacher's hidden states instead (module doc, "Hidden states").
# Mixup needs epochs: the planner's MLP (digits 8x8, pruned 80 % int8, 359 held-out samples)
# reached 96.4 % in 4 epochs without it and 95.3 % with it, but 95.3 % in 12 without and
# 97.5 % with; so the family's mixup applies to plans of at least MIXUP_MIN_EPOCHS.
MIXUP_MIN_EPOCHS = 8
FAMILY_SCHEDULES: dict[Family, FamilySchedule] = {
    "transformer": FamilySchedule(lr=3e-4, warmup_fraction=0.1, hidden_weight=1.0),
    "cnn": FamilySchedule(lr=5e-3, warmup_fraction=0.05, mixup=0.4),
    "dense": FamilySchedule(lr=5e-3, warmup_fraction=0.05, mixup=0.4),
}

# A softmax is attention's only when its probabilities weight values: they reach a batched
# matrix product, through ops that move or mask but do not mix them (eager attention:
# softmax -> to(dtype) -> dropout -> matmul). A classifier's output softmax reaches none.
_PRODUCT_OPS = frozenset({"matmul", "bmm", "mm", "einsum", "baddbmm"})
_PASS_THROUGH_OPS = frozenset({
    "to", "_to_copy", "dropout", "native_dropout", "clone", "contiguous", "type_as", "alias",
    "view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze", "permute", "transpose",
    "masked_fill", "where", "getitem",
})
_PASS_THROUGH_DEPTH = 8  # ops between the softmax and the product; eager attention has 2


def _op_name(node: torch.fx.Node) -> str:
    """"matmul" for ``aten.matmul.default``, "getitem" for ``operator.getitem``."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    schema = getattr(target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else name.split(".")[0]


def _weights_values(softmax: torch.fx.Node) -> bool:
    frontier, seen = [softmax], {softmax}
    for _ in range(_PASS_THROUGH_DEPTH):
        nxt: list[torch.fx.Node] = []
        for node in frontier:
            for user in node.users:
                if user in seen or user.op != "call_function":
                    continue
                op = _op_name(user)
                if op in _PRODUCT_OPS:
                    return True
                if op in _PASS_THROUGH_OPS:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


def has_attention(model: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` module, or in an FX graph (``graph.modularize`` output) a
    ``scaled_dot_product_attention`` call or a softmax whose output weights a matrix product
    (a softmax that only ends a classifier is not attention)."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return True
    if not isinstance(model, torch.fx.GraphModule):
        return False
    for n in model.graph.nodes:
        if n.op != "call_function":
            continue
        op = _op_name(n)
        if op == "scaled_dot_product_attention" or (op in ("softmax", "_softmax")
                                                    and _weights_values(n)):
            return True
    return False


def model_family(model: nn.Module) -> Family:
    """"transformer" if the graph has attention or more LayerNorm than BatchNorm layers,
    "cnn" if it has convolutions, else "dense".

    Attention is :func:`has_attention`'s: scaled dot-product attention, a softmax that weights a
    matrix product, or an ``nn.MultiheadAttention`` module in eager code.

    >>> model_family(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)))
    'cnn'
    """
    mods = list(model.modules())
    layer_norms = sum(isinstance(m, nn.LayerNorm) for m in mods)
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods)
    if has_attention(model) or layer_norms > batch_norms:
        return "transformer"
    if any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in mods):
        return "cnn"
    return "dense"


def lr_factor(step: int, total: int, config: DistillConfig) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based) of ``total`` planned.

    >>> cfg = DistillConfig(warmup_fraction=0.2, min_lr_fraction=0.0)
    >>> [round(lr_factor(s, 10, cfg), 3) for s in (0, 1, 2, 5, 9)]
    [0.333, 0.667, 1.0, 0.691, 0.038]
    """
    warm = round(config.warmup_fraction * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    span = max(total - warm, 1)
    return _cosine(min((step - warm) / span, 1.0), 1.0, config.min_lr_fraction)


def _cosine(t: float, high: float, floor: float) -> float:
    """Half-cosine from ``high`` at t = 0 down to ``floor`` at t = 1."""
    return floor + (high - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


# A plateau while the rate is above this fraction of its peak starts the anneal (module doc).
ANNEAL_ABOVE = 0.3


def anneal_factor(step: int, start: int, steps: int, start_factor: float,
                  config: DistillConfig) -> float:
    """Multiplier of ``config.lr`` during a plateau anneal: cosine from ``start_factor`` at
    step ``start`` to ``config.min_lr_fraction`` after ``steps`` more steps, then flat.

    >>> cfg = DistillConfig(min_lr_fraction=0.0)
    >>> [round(anneal_factor(s, 10, 4, 0.8, cfg), 3) for s in (10, 12, 14, 20)]
    [0.8, 0.4, 0.0, 0.0]
    """
    t = min(max(step - start, 0) / max(steps, 1), 1.0)
    return _cosine(t, start_factor, config.min_lr_fraction)


@dataclass
class DistillReport:
    student: nn.Module  # best state, eval mode, on CPU
    epochs_run: int  # epochs started (a budget-cut epoch counts)
    best_holdout_quality: float
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    stopped_reason: StopReason = "epochs"
    quality_kind: QualityKind = "accuracy"
    initial_holdout_quality: float = math.nan  # the student before any training
    best_epoch: int = 0  # 0 = the untrained start was best
    planned_epochs: int = 0  # the schedule's length after the first epoch's re-plan
    rolled_back: bool = False  # training ran but no epoch beat the start: the start returned
    annealed_at: int | None = None  # epoch whose plateau started the anneal (module doc)
    hidden_layers: int = 0  # LayerNorm outputs matched by the hidden-state term (module doc)


def _first(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model output must be a tensor or a tuple of tensors, got {type(out)}")


@torch.no_grad()
def _predict(
    model: nn.Module, xs: Sequence[torch.Tensor], batch_size: int, device: torch.device
) -> torch.Tensor:
    outs = []
    n = int(xs[0].shape[0])
    for i in range(0, n, batch_size):
        outs.append(_first(model(*(x[i : i + batch_size].to(device) for x in xs))).float())
    return torch.cat(outs)


def _quality(
    out: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None, classifier: bool
) -> tuple[float, QualityKind]:
    if classifier and labels is not None:
        return float((out.argmax(1) == labels).float().mean()), "accuracy"
    if classifier:
        return float((out.argmax(1) == ref.argmax(1)).float().mean()), "agreement"
    cos = F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
    return float(cos.mean()), "cosine"


def _loss(
    s: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    classifier: bool,
    config: DistillConfig,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """KD loss of a batch; ``mix`` = (weights (N,), partner labels (N,)) of a mixup batch."""
    if not classifier:
        s2, t2 = s.flatten(1), t.flatten(1)
        return F.mse_loss(s2, t2) + (1.0 - F.cosine_similarity(s2, t2, dim=1)).mean()
    temp = config.temperature
    kl = F.kl_div(
        F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1),
        reduction="batchmean", log_target=True,
    ) * (temp * temp)  # T^2 keeps the gradient scale independent of T
    if y is None:
        return kl
    if mix is None:
        ce = F.cross_entropy(s, y)
    else:
        lam, y2 = mix
        ce = (lam * F.cross_entropy(s, y, reduction="none")
              + (1.0 - lam) * F.cross_entropy(s, y2, reduction="none")).mean()
    return config.alpha * kl + (1.0 - config.alpha) * ce


def _mixup(
    xs: Sequence[torch.Tensor], alpha: float, gen: torch.Generator
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Mixed batch, per-sample weights lam (N,) and the partner index of each sample."""
    n = int(xs[0].shape[0])
    beta = torch.distributions.Beta(alpha, alpha)
    # torch's Beta sampler takes no generator: sample it under a forked global RNG seeded
    # from ``gen``, so the run stays deterministic and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        lam = beta.sample((n,))
    lam = torch.maximum(lam, 1.0 - lam)  # the sample keeps the larger share: its label leads
    partner = torch.randperm(n, generator=gen)
    mixed = []
    for x in xs:
        w = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        mixed.append(w * x + (1.0 - w) * x[partner.to(x.device)])
    return tuple(mixed), lam, partner


def _has_fake_quant(model: nn.Module) -> bool:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


@torch.no_grad()
def _calibrate_observers(
    student: nn.Module, xs: Sequence[torch.Tensor], batch_size: int, device: torch.device,
    max_samples: int = 512,
) -> None:
    """Let fake-quant observers see up to ``max_samples`` inputs; no-op for float students."""
    if not _has_fake_quant(student):
        return
    set_training(student, False)
    student.apply(enable_observer)
    n = min(int(xs[0].shape[0]), max_samples)
    for i in range(0, n, batch_size):
        student(*(x[i : i + batch_size].to(device) for x in xs))
    student.apply(disable_observer)


class _Hidden:
    """Outputs of the LayerNorm modules that student and teacher share by name and shape,
    captured by forward hooks during one forward pass each (module doc, "Hidden states")."""

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 probe: Sequence[torch.Tensor]) -> None:
        s_mods = {n: m for n, m in student.named_modules() if isinstance(m, nn.LayerNorm)}
        t_mods = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.LayerNorm)}
        shared = [n for n in s_mods if n in t_mods]
        self.s_out: dict[str, torch.Tensor] = {}
        self.t_out: dict[str, torch.Tensor] = {}
        self._handles = [s_mods[n].register_forward_hook(self._keep(self.s_out, n))
                         for n in shared]
        self._handles += [t_mods[n].register_forward_hook(self._keep(self.t_out, n))
                          for n in shared]
        with torch.no_grad():  # one probe pass: keep the layers whose widths still agree
            student(*probe)
            teacher(*probe)
        self.names = [n for n in shared if n in self.s_out and n in self.t_out
                      and self.s_out[n].shape == self.t_out[n].shape]

    @staticmethod
    def _keep(store: dict[str, torch.Tensor],
              name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                store[name] = out
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over the shared layers of MSE(student, teacher) / var(teacher): each layer
        weighs the same whatever its scale."""
        terms = [F.mse_loss(self.s_out[n], self.t_out[n].detach())
                 / (self.t_out[n].detach().var() + 1e-6) for n in self.names]
        return torch.stack(terms).mean()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: Dataset | DataLike,
    holdout: Dataset | DataLike,
    config: DistillConfig,
    *,
    device: torch.device | None = None,
    on_progress: ProgressFn | None = None,
) -> DistillReport:
    """Train ``student`` (in place) to match ``teacher``; return it in its best holdout state."""
    start = time.monotonic()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    set_training(teacher, False)
    teacher.to(device)
    student.to(device)

    xs = tuple(t.contiguous() for t in train.tensors())
    hx = tuple(t.contiguous() for t in holdout.tensors())
    y = None if train.labels is None else torch.as_tensor(train.labels, dtype=torch.long)
    hy = None if holdout.labels is None else torch.as_tensor(holdout.labels, dtype=torch.long)
    if train.samples < 2 or holdout.samples < 1:
        raise ValueError("distill needs >= 2 training samples and >= 1 holdout sample")

    bs = config.batch_size
    t_train = _predict(teacher, xs, bs, device)
    t_hold = _predict(teacher, hx, bs, device)
    teacher.to(teacher_device)
    classifier = config.task == "classifier" or (
        config.task == "auto"
        and (y is not None or (t_train.dim() == 2 and t_train.shape[1] > 1))
    )
    if classifier and t_train.dim() != 2:
        raise ValueError(f"classifier distillation needs (N, C) logits, got {tuple(t_train.shape)}")
    y_dev = None if y is None else y.to(device)
    hy_dev = None if hy is None or not classifier else hy.to(device)
    mixup = config.mixup > 0 and all(torch.is_floating_point(x) for x in xs)
    hidden: _Hidden | None = None
    if config.hidden_weight > 0 and not _has_fake_quant(student):
        teacher.to(device)
        hidden = _Hidden(student, teacher, tuple(x[:2].to(device) for x in xs))
        if not hidden.names:  # nothing to match (a CNN, or every width changed)
            hidden.close()
            hidden = None
    if mixup or hidden is not None:
        teacher.to(device)  # labels every mixed batch / gives its hidden states

    def evaluate(model: nn.Module) -> tuple[float, QualityKind, float]:
        set_training(model, False)
        out = _predict(model, hx, bs, device)
        q, k = _quality(out, t_hold, hy_dev, classifier)
        return q, k, float(_loss(out, t_hold, hy_dev, classifier, config))

    # A fresh QAT student has never observed data: its ranges are (inf, -inf), so its start
    # state can be neither judged fairly nor converted (torchao: "min inf should be less than
    # max -inf"). Its start is a calibrated copy; training goes on with the original (module
    # doc: calibrating the trained one up front costs accuracy).
    start_model: nn.Module | None = None
    if _has_fake_quant(student):
        start_model = copy.deepcopy(student)
        _calibrate_observers(start_model, xs, bs, device)
    best, kind, best_loss = evaluate(start_model or student)
    initial = best
    best_state = copy.deepcopy(student.state_dict())
    best_epoch = 0
    history: list[dict[str, float]] = []
    reason: StopReason = "epochs"
    stale = 0
    epochs_run = 0
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    n = int(xs[0].shape[0])
    steps_per_epoch = n // bs + (1 if n % bs >= 2 else 0)  # a 1-sample last batch is skipped
    planned = [max(config.epochs * steps_per_epoch, 1)]  # total steps; may change (module doc)
    # Set when a plateau starts the anneal: (epoch, first step, steps, factor at that step).
    anneal: list[tuple[int, int, int, float]] = []

    def factor(step: int) -> float:
        if anneal:
            _, first, steps, high = anneal[0]
            return anneal_factor(step, first, steps, high, config)
        return lr_factor(step, planned[0], config)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    max_epoch = max(config.epochs, config.max_epochs or 0)  # the loop's hard end
    train_start = time.monotonic()
    # A shrunk plan only shortens the decay (training goes on at the low rate until the
    # clock stops it); a grown one also moves the last epoch.
    plan_epochs, last_epoch, patience = config.epochs, config.epochs, config.patience

    for epoch in range(1, max_epoch + 1):
        if epoch > last_epoch:
            break
        if time.monotonic() - start >= config.time_budget_s:
            reason = "time_budget"
            break
        epochs_run = epoch
        set_training(student, True)
        perm = torch.randperm(n, generator=gen)
        total, seen, out_of_time = 0.0, 0, False
        for i in range(0, n, bs):
            if time.monotonic() - start >= config.time_budget_s:
                out_of_time = True
                break
            idx = perm[i : i + bs]
            if len(idx) < 2:  # batch norm in train mode cannot normalise one sample
                continue
            batch = tuple(x[idx].to(device) for x in xs)
            yb = None if y_dev is None else y_dev[idx.to(device)]
            mix = None
            if mixup:
                batch, lam, partner = _mixup(batch, config.mixup, gen)
                if yb is not None:
                    mix = (lam.to(device), yb[partner.to(device)])
            if mixup or hidden is not None:
                with torch.no_grad():
                    tb = _first(teacher(*batch)).float()
            else:
                tb = t_train[idx.to(device)]
            s = _first(student(*batch))
            loss = _loss(s, tb, yb, classifier, config, mix)
            if hidden is not None:
                loss = loss + config.hidden_weight * hidden.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        if epoch == 1 and not out_of_time:
            # The budget cannot hold the planned epochs: plan the epochs that fit, so the
            # learning rate still decays before the clock stops the run.
            epoch_s = max(time.monotonic() - train_start, 1e-6)
            fit = 1 + int((config.time_budget_s - (time.monotonic() - start)) / epoch_s)
            if fit < config.epochs:
                plan_epochs = fit
                planned[0] = max(fit * steps_per_epoch, 1)
            elif config.max_epochs is not None and config.max_epochs > config.epochs:
                # The budget holds more: a longer schedule (a "patient" teacher) recovers
                # more of a hard-pruned student. 80 % of what fits: evaluation per epoch and
                # the clock's jitter must not cut the decay short.
                plan_epochs = max(config.epochs, min(config.max_epochs, int(0.8 * fit)))
                last_epoch = plan_epochs
                planned[0] = max(plan_epochs * steps_per_epoch, 1)
                patience = max(config.patience, plan_epochs // 4)
        if seen:
            quality, kind, hold_loss = evaluate(student)
        else:
            quality, hold_loss = math.nan, math.nan
        history.append({
            "epoch": float(epoch), "train_loss": total / seen if seen else math.nan,
            "holdout_quality": quality, "holdout_loss": hold_loss,
            "seconds": time.monotonic() - start,
        })
        better = quality > best + config.min_delta or (
            quality >= best - 1e-12 and hold_loss < best_loss * (1.0 - 1e-3))
        if seen and better:
            best, best_loss, best_epoch, stale = quality, hold_loss, epoch, 0
            best_state = copy.deepcopy(student.state_dict())
        else:
            stale += 1
        if on_progress is not None:
            on_progress("distill", epoch / max(last_epoch, 1),
                        f"epoch {epoch}/{last_epoch}: holdout {kind} {quality:.4f} "
                        f"(best {best:.4f})")
        if out_of_time:
            reason = "time_budget"
            break
        if stale >= patience:
            now = factor(sched.last_epoch)
            if not anneal and now > ANNEAL_ABOVE and epoch < max_epoch:
                # Still at a high rate: settle from the best state at a decaying one.
                stale, n_anneal = 0, min(patience, max_epoch - epoch)
                student.load_state_dict(best_state)
                anneal.append((epoch, sched.last_epoch, n_anneal * steps_per_epoch, now))
                last_epoch = epoch + n_anneal
                continue
            reason = "early_stopping"
            break

    if hidden is not None:
        hidden.close()
    teacher.to(teacher_device)
    rolled_back = epochs_run > 0 and best_epoch == 0
    if best_epoch == 0 and start_model is not None:
        student = start_model
    else:
        student.load_state_dict(best_state)
    set_training(student, False)
    student.to(torch.device("cpu"))
    return DistillReport(
        student=student, epochs_run=epochs_run, best_holdout_quality=best, history=history,
        stopped_reason=reason, quality_kind=kind, initial_holdout_quality=initial,
        best_epoch=best_epoch, rolled_back=rolled_back, planned_epochs=plan_epochs,
        annealed_at=anneal[0][0] if anneal else None,
        hidden_layers=len(hidden.names) if hidden is not None else 0,
    )
