"""Self-distillation: a model teaches itself.

* **Born-again networks** (Furlanello et al. 2018, "Born Again Neural Networks"): generation 0 learns from the
  labels; generation k+1, the same architecture freshly initialized, learns from the frozen generation k with
  the KD objective. Optionally the generations' ensemble (BAN ensemble) is evaluated too.
* **Be Your Own Teacher** (Zhang et al. 2019): auxiliary classifier exits on intermediate taps; each exit i
  (a bottleneck B_i: pool, linear, ReLU, then a linear classifier) minimizes

      (1 - alpha) CE(z_i, y) + alpha T^2 KL(softmax(z_C / T) || softmax(z_i / T)) + lambda ||F_i - F_C||_2^2

  the final output z_C and the deepest features F_C (the input of the student's last linear layer, or the
  `hint` tap) being the detached teacher, F_i = B_i(feature_i) the exit's bottleneck features (as wide as F_C;
  the squared L2 is summed over features, averaged over the batch), while the final classifier learns from the
  labels. Shallow layers get the exits' gradients; the exported model is the plain student (exits are for
  evaluation or early exit). ``hint_weight`` = lambda (0 turns the hint off).
* **Progressive self-knowledge distillation** (PS-KD, Kim et al. 2021): the target of sample x at epoch t is
  ``(1 - a_t) * onehot(y) + a_t * p_{t-1}(x)``, p_{t-1}(x) the model's own prediction for x when it last saw x
  (the previous epoch), ``a_t = alpha_T * (t + 1) / T`` for epochs t = 0..T-1 (the authors' code: the last
  epoch reaches alpha_T; in epoch 0 no prediction exists yet and the target is the label). The snapshot is a
  buffer of the side, so it is checkpointed and survives a resume (single process: under DDP each rank would need
  its own store).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal, Mapping, Optional, Sequence

import torch
from pydantic import Field
from torch import nn

from kdistill.configbase import Strict
from kdistill.distiller import Term
from kdistill.errors import WiringError
from kdistill.evaluate import predict_logits
from kdistill.losses import ce, kd
from kdistill.objective import SchemeSide, SideObjective
from kdistill.outputs import call_model, logits_of
from kdistill.schemes.common import ProbabilityEnsemble, SchemeJob, distill, freeze, scheme_run, train_ce
from kdistill.taps import Taps
from kdistill.tasks.job import run_stage
from kdistill.train_config import TrainConfig


class BornAgainScheme(Strict):
    """Born-again networks (Furlanello et al. 2018): generation k+1 (the student's architecture) learns from
    the frozen generation k with the `distill` objective; generation 0 learns from labels."""

    name: Literal["born_again"]
    generations: int = Field(3, ge=1, description="distilled generations after generation 0")
    ensemble: bool = Field(True, description="also evaluate the ensemble of generations 1..K")


class ByotScheme(Strict):
    """Be Your Own Teacher (Zhang et al. 2019): auxiliary classifier exits on intermediate student taps,
    supervised by the labels and by the final output."""

    name: Literal["byot"]
    exits: dict[str, str] = Field(..., min_length=1, description="exit name -> student module path")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term of each exit (1 - alpha weighs CE)")
    temperature: float = Field(3.0, gt=0)
    pool: int = Field(4, ge=1, description="adaptive-pool size of conv features before an exit head")
    hidden: int = Field(128, ge=1, description="bottleneck width of an exit head (without the hint)")
    hint_weight: float = Field(0.01, ge=0, description="lambda of the L2 hint from the deepest features (0: off)")
    hint: Optional[str] = Field(None, description="module path of the deepest features (default: the input of "
                                                  "the student's last linear layer)")


class SnapshotScheme(Strict):
    """Progressive self-knowledge distillation (Kim et al. 2021): the target is (1 - a_t) y + a_t p_prev(x),
    p_prev the model's own prediction for x in the previous epoch, a_t = alpha (t + 1) / T in epoch t of T."""

    name: Literal["snapshot"]
    alpha: float = Field(0.8, ge=0, le=1)


def _self_stage(stage: str, objective, data, train_cfg: TrainConfig, **options) -> nn.Module:
    """A stage whose side holds more than the student (exit heads, snapshots): its state is saved too."""
    return run_stage(stage, objective, data, train_cfg, side_weights=True, **options)[0]


# -- born-again generations ----------------------------------------------------------------------------------------
def born_again(make_model: Callable[[int], nn.Module], data, train_cfg: TrainConfig, *, generations: int = 3,
               terms: Optional[list[Term]] = None, taps: Optional[Mapping[str, str]] = None,
               gen0: Optional[nn.Module] = None, distill_data=None, seed: int = 0, run_dir: Optional[Path] = None,
               progress: bool = False, log=print) -> list[nn.Module]:
    """Generations 0..`generations`: `make_model(k)` builds generation k (same architecture each time);
    generation 0 learns from the labels of `data` (or is `gen0`, already trained); generation k learns from the
    frozen generation k - 1 with `terms` (default: Hinton KD) on `distill_data` (default `data`; e.g. data plus
    an unlabeled transfer set). Returns every generation, frozen."""
    if gen0 is None:
        gen0 = train_ce("gen0", make_model(0), data, train_cfg, seed=seed, run_dir=run_dir, progress=progress,
                        log=log)
    gens = [freeze(gen0)]
    distill_data = data if distill_data is None else distill_data
    for k in range(1, generations + 1):
        student = distill(f"gen{k}", make_model(k), gens[k - 1], distill_data, train_cfg, seed=seed + k,
                          terms=terms, taps=taps, run_dir=run_dir, progress=progress, log=log)
        gens.append(freeze(student))
    return gens


@scheme_run
def run_born_again(job: SchemeJob) -> dict:
    cfg = job.cfg
    terms, taps = job.terms()
    gens = born_again(lambda k: job.student(31 * k), job.bundle.train, cfg.train, generations=cfg.scheme.generations,
                      terms=terms, taps=taps, distill_data=job.bundle.distill_set(), seed=cfg.seed + 3,
                      **job.stage_options)
    models = {}
    previous = None
    for k, g in enumerate(gens):
        label = "gen0 (labels only)" if k == 0 else f"gen{k}"
        models[label] = job.evaluate(g, reference_logits=previous)
        previous = predict_logits(g, job.bundle.test)
    if cfg.scheme.ensemble and len(gens) > 2:
        models[f"ensemble gen1..{len(gens) - 1}"] = job.evaluate(ProbabilityEnsemble(gens[1:]))
    return job.finish(models)


# -- be your own teacher: auxiliary exits ---------------------------------------------------------------------------
class ExitHead(nn.Module):
    """An auxiliary classifier on an intermediate feature: adaptive pool (conv maps) -> flatten -> MLP."""

    def __init__(self, feature_shape: Sequence[int], num_classes: int, pool: int = 4, hidden: int = 128):
        super().__init__()
        dims = len(feature_shape)  # without the batch dimension
        if dims == 1:
            self.pool, width = nn.Identity(), feature_shape[0]
        elif dims == 2:
            self.pool, width = nn.AdaptiveAvgPool1d(min(pool, feature_shape[1])), \
                feature_shape[0] * min(pool, feature_shape[1])
        elif dims == 3:
            side = (min(pool, feature_shape[1]), min(pool, feature_shape[2]))
            self.pool, width = nn.AdaptiveAvgPool2d(side), feature_shape[0] * side[0] * side[1]
        else:
            raise WiringError(f"an exit needs a feature of shape (B, D), (B, C, L) or (B, C, H, W), got "
                              f"(B, {', '.join(map(str, feature_shape))})", fix="tap another module")
        self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(width, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def features(self, feature: torch.Tensor) -> torch.Tensor:
        """F_i: the bottleneck's output (B, hidden), what the hint compares with the deepest features."""
        return self.bottleneck(self.pool(feature))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(feature))


def last_linear(model: nn.Module) -> nn.Linear:
    """The last `nn.Linear` of `model` in module order (the classifier whose input is the deepest feature)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WiringError("the BYOT hint needs the deepest features: the student has no nn.Linear layer",
                          where="scheme.hint", fix="set scheme.hint to the module path of the deepest features, "
                                                   "or scheme.hint_weight: 0")
    return linears[-1]


_DEEPEST = "__deepest__"  # the tap name of the deepest features (F_C)


class ByotSide(SchemeSide):
    """Student + exit heads: forward -> (output, {ce, <exit>_ce, <exit>_kd, <exit>_hint})."""

    def __init__(self, student: nn.Module, exits: Mapping[str, str], *, alpha: float = 0.5,
                 temperature: float = 3.0, pool: int = 4, hidden: int = 128, hint_weight: float = 0.01,
                 hint: Optional[str] = None):
        super().__init__()
        if not exits:
            raise WiringError("be-your-own-teacher needs at least one exit", where="scheme.exits",
                              fix="map an exit name to a student module path, e.g. {block1: features.1}")
        self.student = student
        self.heads = nn.ModuleDict()
        self.exits = dict(exits)
        self.alpha, self.temperature, self.pool, self.hidden = alpha, temperature, pool, hidden
        self.hint_weight = hint_weight
        specs = dict(self.exits)
        self._deepest: Optional[nn.Module] = None
        if hint_weight > 0:
            if hint is not None:
                specs[_DEEPEST] = hint
            else:
                self._deepest = last_linear(student)
        self._taps = Taps(student, specs)
        self.step = 0

    def _run(self, inputs):
        captured = {}
        hook = None
        if self._deepest is not None:
            hook = self._deepest.register_forward_pre_hook(lambda m, args: captured.__setitem__(_DEEPEST, args[0]))
        try:
            with self._taps:
                out = call_model(self.student, inputs)
                features = self._taps.pop()
        finally:
            if hook is not None:
                hook.remove()
        features.update(captured)
        return out, features

    def build(self, inputs, teacher_values, labels) -> None:
        if labels is None:
            raise WiringError("be-your-own-teacher needs labels 'y'")
        out, features = self._run(inputs)
        num_classes = logits_of(out).shape[-1]
        deepest = features.pop(_DEEPEST, None)
        hidden = self.hidden if deepest is None else deepest.flatten(1).shape[1]   # F_i as wide as F_C
        for name, feature in features.items():
            if name not in self.heads:
                if not torch.is_tensor(feature):
                    raise WiringError(f"exit '{name}' tap gives a {type(feature).__name__}, not a tensor",
                                      fix="add a selector, e.g. 'layer:0'")
                head = ExitHead(tuple(feature.shape[1:]), num_classes, self.pool, hidden)
                self.heads[name] = head.to(feature.device)

    def forward(self, inputs, teacher_values, labels):
        out, features = self._run(inputs)
        final = logits_of(out)
        terms = {"ce": ce(final, labels)}
        target = final.detach()
        deepest = features.pop(_DEEPEST, None)
        for name, head in self.heads.items():
            bottleneck = head.features(features[name])
            z = head.classifier(bottleneck)
            terms[f"{name}_ce"] = (1 - self.alpha) * ce(z, labels)
            terms[f"{name}_kd"] = self.alpha * kd(z, target, self.temperature)
            if deepest is not None:
                gap = bottleneck.float() - deepest.detach().flatten(1).float()
                terms[f"{name}_hint"] = self.hint_weight * gap.pow(2).sum(-1).mean()
        return out, terms


class ExitModel(nn.Module):
    """The student cut at one exit: input -> the exit head's logits (for evaluating an exit)."""

    def __init__(self, student: nn.Module, path: str, head: nn.Module):
        super().__init__()
        self.student, self.head = student, head
        self._taps = Taps(student, {"exit": path})

    def forward(self, x):
        with self._taps:
            call_model(self.student, x)
            feature = self._taps.pop()["exit"]
        return self.head(feature)


class ByotObjective(SideObjective):
    def __init__(self, student: nn.Module, exits: Mapping[str, str], **options):
        super().__init__(ByotSide(student, exits, **options))

    def exit_models(self) -> dict[str, ExitModel]:
        return {name: ExitModel(self.side.student, self.side.exits[name], head)
                for name, head in self.side.heads.items()}


def train_byot(student: nn.Module, exits: Mapping[str, str], data, train_cfg: TrainConfig, *, alpha: float = 0.5,
               temperature: float = 3.0, pool: int = 4, hidden: int = 128, hint_weight: float = 0.01,
               hint: Optional[str] = None, seed: int = 0, run_dir: Optional[Path] = None, stage: str = "byot",
               progress: bool = False, log=print) -> tuple[nn.Module, dict[str, ExitModel]]:
    """Train `student` with auxiliary exits on `exits` (name -> module path); returns (student, exit models).
    `hint_weight` > 0 adds the L2 hint from the deepest features (`hint`, default the last linear's input)."""
    objective = ByotObjective(student, exits, alpha=alpha, temperature=temperature, pool=pool, hidden=hidden,
                              hint_weight=hint_weight, hint=hint)
    student = _self_stage(stage, objective, data, train_cfg, seed=seed, run_dir=run_dir, progress=progress, log=log)
    return student, objective.exit_models()


@scheme_run
def run_byot(job: SchemeJob) -> dict:
    cfg, s = job.cfg, job.cfg.scheme
    student, exit_models = train_byot(job.student(), s.exits, job.bundle.train, cfg.train, alpha=s.alpha,
                                      temperature=s.temperature, pool=s.pool, hidden=s.hidden,
                                      hint_weight=s.hint_weight, hint=s.hint, seed=cfg.seed + 3,
                                      **job.stage_options)
    models = {}
    if cfg.baseline:
        models["baseline (no exits)"] = job.evaluate(job.baseline())
    final_logits = predict_logits(student, job.bundle.test)
    models["student (final exit)"] = job.evaluate(student)
    for name, m in exit_models.items():
        models[f"exit {name}"] = job.evaluate(m, reference_logits=final_logits, cost=False)
    return job.finish(models)


# -- progressive self-knowledge distillation: the previous epoch's predictions as soft targets ----------------------
class SnapshotSide(SchemeSide):
    """Student + a per-sample store of its latest logits: forward(x, _, y, index) -> (output, {ce, self_kd})."""

    def __init__(self, student: nn.Module, num_samples: int, steps_per_epoch: int, total_steps: int,
                 alpha: float = 0.8):
        super().__init__()
        self.student = student
        self.num_samples = num_samples
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_epochs = max(1, math.ceil(total_steps / self.steps_per_epoch))
        self.alpha = alpha
        self.register_buffer("snapshot", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))
        self.step = 0

    def alpha_at(self, step: int) -> float:
        """a_t = alpha_T * (t + 1) / T, t the epoch of `step` (0-based), T the number of epochs (the authors'
        code: the last epoch reaches alpha_T)."""
        return self.alpha * min(step // self.steps_per_epoch + 1, self.total_epochs) / self.total_epochs

    def build(self, inputs, teacher_values, labels, index) -> None:
        if labels is None or index is None:
            raise WiringError("snapshot self-distillation needs labels 'y' and sample ids 'index' in each batch",
                              fix="use an ArrayDataset (it adds 'index') with labels")
        num_classes = logits_of(call_model(self.student, inputs)).shape[-1]
        if self.snapshot.shape != (self.num_samples, num_classes):
            device = next(self.student.parameters()).device
            self.snapshot = torch.zeros(self.num_samples, num_classes, device=device)
            self.seen = torch.zeros(self.num_samples, dtype=torch.bool, device=device)

    def forward(self, inputs, teacher_values, labels, index):
        out = call_model(self.student, inputs)
        z = logits_of(out)
        previous = self.snapshot[index]          # a copy: read before this step overwrites it
        w_soft = self.seen[index].to(z.dtype) * self.alpha_at(self.step)
        hard = ce(z, labels, reduction="none")
        soft = -(torch.softmax(previous, -1) * torch.log_softmax(z.float(), -1)).sum(-1)
        terms = {"ce": ((1 - w_soft) * hard).mean(), "self_kd": (w_soft * soft).mean()}
        if self.training:
            with torch.no_grad():
                self.snapshot[index] = z.detach().float()
                self.seen[index] = True
        return out, terms


class SnapshotObjective(SideObjective):
    def __init__(self, student: nn.Module, num_samples: int, train_cfg: TrainConfig, alpha: float = 0.8):
        steps_per_epoch = num_samples // train_cfg.batch_size
        super().__init__(SnapshotSide(student, num_samples, steps_per_epoch, train_cfg.steps, alpha))

    def side_args(self, batch):
        return batch.get("student_x", batch["x"]), {}, batch.get("y"), batch.get("index")


def train_snapshot(student: nn.Module, data, train_cfg: TrainConfig, *, alpha: float = 0.8, seed: int = 0,
                   run_dir: Optional[Path] = None, stage: str = "snapshot", progress: bool = False,
                   log=print) -> nn.Module:
    """Train `student` on labels mixed with its own previous-epoch predictions (PS-KD)."""
    objective = SnapshotObjective(student, len(data), train_cfg, alpha)
    return _self_stage(stage, objective, data, train_cfg, seed=seed, run_dir=run_dir, progress=progress, log=log)


@scheme_run
def run_snapshot(job: SchemeJob) -> dict:
    cfg = job.cfg
    student = train_snapshot(job.student(), job.bundle.train, cfg.train, alpha=cfg.scheme.alpha, seed=cfg.seed + 3,
                             **job.stage_options)
    models = {}
    if cfg.baseline:
        models["baseline (labels only)"] = job.evaluate(job.baseline())
    models["student (PS-KD)"] = job.evaluate(student)
    return job.finish(models)
