"""What every scheme shares: the job (config, data, run directory), its stages, teachers, evaluation and summary.

A scheme is a plan of stages. Each stage hands an objective (`kdistill.objective.Objective`: a `Distiller`, or
a `kdistill.objective.SideObjective` over a custom side: mutual peers, exits, snapshots, task heads) to
`kdistill.tasks.job.run_stage`: one resumable `Engine.fit` that saves ``<stage>.safetensors`` and is loaded
instead of trained on a re-run once that file exists.

`SchemeJob` is what a scheme's plan works with (`scheme_run` turns ``plan(job)`` into the scheme's
``run(cfg, run_dir, ...)``): `SchemeJob.start` claims the run directory (`kdistill.tasks.job.RunDir`) and loads
the data; its methods build models with fixed init seeds, run stages, give the configured teacher (loaded, or
trained as a stage), evaluate, and write the summary atomically. The functions above it (`train_ce`, `distill`,
...) are the same steps over plain models and data, for Python use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from kdistill.data import ArrayDataset, DataBundle, check_labels, load_data
from kdistill.distiller import Distiller, Term, split_taps, terms_from_config
from kdistill.errors import KDError
from kdistill.evaluate import (accuracy, agreement, cost_report, expected_calibration_error, headline, measure_cost,
                               predict_logits, static_cost)
from kdistill.models import build_model
from kdistill.models.loading import load_into, load_state_dict_file
from kdistill.outputs import call_model, logits_of
from kdistill.seeding import seeded_build
from kdistill.tasks import dump_config, load_resolved
from kdistill.tasks.job import RunDir, run_stage
from kdistill.teachers.live import freeze
from kdistill.train_config import TrainConfig

if TYPE_CHECKING:
    from kdistill.config import RunConfig

# init seeds of the configured models: cfg.seed + offset (a teacher stage trains with seed + 1, a baseline + 2)
TEACHER_SEED, STUDENT_SEED = 101, 202


# -- stages over plain models and data -----------------------------------------------------------------------------
def train_ce(name: str, model: nn.Module, data, train_cfg: TrainConfig, *, seed: int, run_dir=None,
             progress: bool = False, log=print, eval_fn: Optional[Callable] = None) -> nn.Module:
    """A stage on the labels alone (a teacher from scratch, a baseline, generation 0)."""
    return run_stage(name, Distiller(model, None, [Term("ce", "ce")]), data, train_cfg, seed=seed, run_dir=run_dir,
                     eval_fn=eval_fn, progress=progress, log=log)[0]


def default_terms() -> list[Term]:
    """The config's default objective (Hinton KD): (1 - alpha) CE + alpha T^2 KL at alpha 0.9, T 4."""
    from kdistill.config import DistillConfig

    return terms_from_config(DistillConfig().resolved_terms())


def distill(name: str, student: nn.Module, teacher, data, train_cfg: TrainConfig, *, seed: int,
            terms: Optional[list[Term]] = None, taps: Optional[Mapping[str, str]] = None, run_dir=None,
            progress: bool = False, log=print, eval_fn: Optional[Callable] = None) -> nn.Module:
    """A stage of offline KD: `student` learns from the frozen `teacher` (a model or a teacher callable)."""
    terms = list(terms) if terms is not None else default_terms()
    student_taps, teacher_taps = split_taps(terms, taps or {})
    objective = Distiller(student, teacher, terms, student_taps=student_taps, teacher_taps=teacher_taps)
    return run_stage(name, objective, data, train_cfg, seed=seed, run_dir=run_dir, eval_fn=eval_fn,
                     progress=progress, log=log)[0]


def model_from(model_cfg, bundle: DataBundle, seed: int, where: str, *, input_shape: Optional[Sequence[int]] = None,
               num_classes: Optional[int] = None) -> nn.Module:
    """Build a configured model with a fixed init seed (the caller's RNG state untouched)."""
    shape = tuple(input_shape) if input_shape is not None else bundle.input_shape
    classes = num_classes if num_classes is not None else bundle.num_classes
    return seeded_build(seed, lambda: build_model(model_cfg.name, model_cfg.kwargs, input_shape=shape,
                                                  num_classes=classes, where=where))


def load_configured_weights(model: nn.Module, model_cfg, where: str, *, trust: bool = False) -> nn.Module:
    """Load `model_cfg.weights` into `model`. `trust` allows full unpickling of a .pt/.pth file (trusted only)."""
    state = load_state_dict_file(model_cfg.weights, where=f"{where}.weights", trust=trust)
    load_into(model, state, where=f"{where}.weights", source=model_cfg.weights)
    return model


def config_terms(cfg: "RunConfig") -> tuple[list[Term], dict[str, str]]:
    """The configured objective of a run: (terms, taps)."""
    return terms_from_config(cfg.distill.resolved_terms()), dict(cfg.distill.taps)


def inherit_train(section: Optional[TrainConfig], train: TrainConfig) -> TrainConfig:
    """A stage's own training settings (`teacher.train`, ...) over the run's `train`: every field the section does
    not set is taken from `train` (checkpointing, logging, determinism...), so every stage checkpoints."""
    if section is None:
        return train
    own = section.model_dump(exclude_unset=True)
    if set(own) >= set(TrainConfig.model_fields):
        return section
    return TrainConfig.model_validate({**train.model_dump(), **own})


def teacher_train_config(teacher_cfg, train_cfg: TrainConfig) -> TrainConfig:
    """`teacher.train` over the run's `train` (`inherit_train`); ``train.deterministic`` covers the whole run."""
    teacher_train = inherit_train(teacher_cfg.train, train_cfg)
    if train_cfg.deterministic and not teacher_train.deterministic:
        teacher_train = teacher_train.model_copy(update={"deterministic": True})
    return teacher_train


# -- evaluation ----------------------------------------------------------------------------------------------------
def evaluate(model: nn.Module, test: ArrayDataset, eval_cfg, *, reference_logits: Optional[torch.Tensor] = None,
             cost: bool = True, logits: Optional[torch.Tensor] = None) -> dict:
    """Accuracy, ECE (and agreement with a reference model), plus cost (params, bytes, FLOPs, latency).
    `logits`: the model's test-set logits when the caller has them already (they are then kept, e.g. for the
    report's per-example sections, and the numbers are computed from exactly those)."""
    logits = predict_logits(model, test) if logits is None else logits
    labels = test.tensors["y"]
    report = {"accuracy": accuracy(logits, labels),
              "ece": expected_calibration_error(logits, labels, eval_cfg.ece_bins)}
    if reference_logits is not None:
        report["agreement"] = agreement(logits, reference_logits)
    if cost:
        report.update(cost_report(model, test.tensors["x"][:1], latency_repeats=eval_cfg.latency_repeats,
                                  throughput_batch=eval_cfg.throughput_batch, threads=eval_cfg.threads))
    return report


def top1_accuracy(model: nn.Module, test: ArrayDataset) -> float:
    return accuracy(predict_logits(model, test), test.tensors["y"])


WEAK_TEACHER_FIX = ("check the teacher's weights (a .sha256 next to a weights file is verified) or train it longer; "
                    "--weak-teacher warn (Python: weak_teacher='warn') distils from it anyway")


def check_teacher(teacher: nn.Module, test: ArrayDataset, num_classes: int, *, where: str = "teacher",
                  policy: str = "warn", log=print) -> float:
    """The teacher's accuracy on held-out data. A teacher not measurably above chance (the larger of 1/classes and
    the most frequent class, plus 3 binomial standard errors) is reported before distillation: a warning line
    (`policy` "warn"), or a `KDError` ("refuse")."""
    labels = test.tensors["y"]
    keep = labels != -100
    n = int(keep.sum())
    if n == 0:
        return float("nan")
    logits = predict_logits(teacher, test)
    score = accuracy(logits[keep], labels[keep])
    majority = float(torch.bincount(labels[keep], minlength=num_classes).max()) / n
    chance = max(1.0 / max(1, num_classes), majority)
    if score > chance + 3 * (chance * (1 - chance) / n) ** 0.5:
        return score
    what = (f"the {where} scores {100 * score:.1f} % on the {n} held-out samples, which is chance level "
            f"({100 * chance:.1f} %): distilling from it would teach noise")
    if policy == "refuse":
        raise KDError(what, where=where, fix=WEAK_TEACHER_FIX)
    log(f"warning: {what}; check its weights or train it longer (--weak-teacher refuse stops here)")
    return score


# -- the job of a config -------------------------------------------------------------------------------------------
@dataclass
class SchemeJob:
    """One scheme run: the config, its data, the run directory (`RunDir`, possibly without a path) and logging."""

    cfg: "RunConfig"
    bundle: DataBundle
    run_dir: RunDir
    progress: bool = True
    log: Callable[[str], None] = print
    trust_checkpoint: bool = False
    weak_teacher: str = "warn"

    @classmethod
    def start(cls, cfg: "RunConfig", run_dir=None, *, progress: bool = True, log=print,
              trust_checkpoint: bool = False, weak_teacher: str = "warn") -> "SchemeJob":
        """Claim the run directory (writes the resolved config.yaml; refuses another run's), load and check data."""
        folder = RunDir(run_dir, cfg, dump=dump_config, load=load_resolved, log=log)
        folder.claim()
        bundle = load_data(cfg.data)
        check_labels(bundle.train, bundle.num_classes)
        check_labels(bundle.test, bundle.num_classes)
        check_labels(bundle.validation, bundle.num_classes)
        return cls(cfg, bundle, folder, progress, log, trust_checkpoint, weak_teacher)

    def check_teacher(self, teacher: nn.Module, where: str = "teacher") -> float:
        """Warn about (or, with `weak_teacher` "refuse", refuse) a teacher at chance on the test set."""
        return check_teacher(teacher, self.bundle.test, self.bundle.num_classes, where=where,
                             policy=self.weak_teacher, log=self.log)

    @property
    def stage_options(self) -> dict:
        """The keyword arguments every stage function takes: where to save, whether to show progress, the log."""
        return {"run_dir": self.run_dir, "progress": self.progress, "log": self.log}

    def model(self, model_cfg, seed: int, where: str, **shape) -> nn.Module:
        return model_from(model_cfg, self.bundle, seed, where, **shape)

    def student(self, seed_offset: int = 0, **shape) -> nn.Module:
        """A fresh configured student (init seed cfg.seed + 202 + `seed_offset`)."""
        return self.model(self.cfg.student, self.cfg.seed + STUDENT_SEED + seed_offset, "student", **shape)

    def terms(self) -> tuple[list[Term], dict[str, str]]:
        return config_terms(self.cfg)

    def accuracy_eval(self, train_cfg: TrainConfig) -> Optional[Callable[[nn.Module], dict]]:
        """Accuracy during training when ``eval_every`` asks for it (else None): on the validation split when the
        data has one, else on the test set."""
        if not train_cfg.eval_every:
            return None
        held_out = self.bundle.validation if self.bundle.validation is not None else self.bundle.test
        return lambda model: {"accuracy": top1_accuracy(model, held_out)}

    def stage(self, name: str, objective, data, *, seed: int, train_cfg: Optional[TrainConfig] = None,
              side_weights: bool = False, eval_fn: Optional[Callable] = None) -> nn.Module:
        """One stage of this job (`run_stage`); returns the exported student."""
        return run_stage(name, objective, data, train_cfg or self.cfg.train, seed=seed, eval_fn=eval_fn,
                         side_weights=side_weights, **self.stage_options)[0]

    def distill(self, name: str, student: nn.Module, teacher, data=None, *, seed: int,
                eval_fn: Optional[Callable] = None) -> nn.Module:
        """A KD stage with the configured objective (default data: labelled plus transfer set)."""
        terms, taps = self.terms()
        data = data if data is not None else self.bundle.distill_set()
        return distill(name, student, teacher, data, self.cfg.train, seed=seed, terms=terms, taps=taps,
                       eval_fn=eval_fn, **self.stage_options)

    def baseline(self, data=None, *, eval_fn: Optional[Callable] = None, **shape) -> nn.Module:
        """The student on the labels alone, same budget (stage ``baseline``)."""
        data = data if data is not None else self.bundle.train
        return train_ce("baseline", self.student(**shape), data, self.cfg.train, seed=self.cfg.seed + 2,
                        eval_fn=eval_fn, **self.stage_options)

    def teacher(self, teacher_cfg=None, *, seed: Optional[int] = None, stage: str = "teacher",
                where: str = "teacher", data=None, model: Optional[nn.Module] = None,
                eval_fn: Optional[Callable] = None, **shape) -> nn.Module:
        """A configured teacher, frozen: `model` (default: built from `teacher_cfg` at init seed + 101) with its
        weights loaded, or trained on the labels of `data` (default: the training set) as stage `stage`."""
        teacher_cfg = teacher_cfg if teacher_cfg is not None else self.cfg.teacher
        seed = self.cfg.seed if seed is None else seed
        model = model if model is not None else self.model(teacher_cfg, seed + TEACHER_SEED, where, **shape)
        if teacher_cfg.weights:
            return freeze(load_configured_weights(model, teacher_cfg, where, trust=self.trust_checkpoint))
        model = train_ce(stage, model, data if data is not None else self.bundle.train,
                         teacher_train_config(teacher_cfg, self.cfg.train), seed=seed + 1, eval_fn=eval_fn,
                         **self.stage_options)
        return freeze(model)

    def evaluate(self, model: nn.Module, test: Optional[ArrayDataset] = None, **options) -> dict:
        """`evaluate` on the test set (or `test`); the cost measurement's warnings are logged, not kept."""
        report = evaluate(model, test if test is not None else self.bundle.test, self.cfg.eval, **options)
        for line in report.pop("warnings", []):
            self.log(line)
        return report

    def measure_cost(self, models: Mapping[str, nn.Module], rows: dict) -> dict:
        """The cost of `models` measured together (interleaved rounds at fixed thread counts: `measure_cost`),
        added with their static cost to ``rows[name]``; warnings logged. Returns the measurement."""
        example, eval_cfg = self.bundle.test.tensors["x"][:1], self.cfg.eval
        cost = measure_cost(models, example, threads=eval_cfg.threads, latency_repeats=eval_cfg.latency_repeats,
                            throughput_batch=eval_cfg.throughput_batch)
        for name, model in models.items():
            rows[name].update({**static_cost(model, example), **headline(cost, name)})
        for line in cost["warnings"]:
            self.log(line)
        return cost

    def finish(self, models: dict, **extra: Any) -> dict:
        """The summary ``{scheme, dataset, **extra, models}``, written atomically to RUN_DIR/summary.json."""
        summary = {"scheme": self.cfg.scheme.name, "dataset": self.bundle.name, **extra, "models": models}
        self.run_dir.write_summary(summary)
        return summary


def scheme_run(plan: Callable[[SchemeJob], dict]) -> Callable[..., dict]:
    """A scheme's ``run(cfg, run_dir=None, *, progress, log, trust_checkpoint, weak_teacher) -> summary`` from
    its plan over the started `SchemeJob` (`trust_checkpoint` allows full unpickling of .pt/.pth teacher weights:
    trusted only; `weak_teacher` "refuse" stops at a teacher at chance level instead of warning)."""

    @functools.wraps(plan)
    def run(cfg: "RunConfig", run_dir=None, *, progress: bool = True, log=print, trust_checkpoint: bool = False,
            weak_teacher: str = "warn") -> dict:
        return plan(SchemeJob.start(cfg, run_dir, progress=progress, log=log, trust_checkpoint=trust_checkpoint,
                                    weak_teacher=weak_teacher))

    return run


# -- small shared modules ------------------------------------------------------------------------------------------
class ProbabilityEnsemble(nn.Module):
    """The mean of its members' probabilities, returned as log-probabilities (logits of the ensemble)."""

    def __init__(self, members: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.ones(len(members)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, x):
        log_probs = torch.stack([torch.log_softmax(logits_of(call_model(m, x)).float(), -1) for m in self.members])
        w = self.weights.to(log_probs.device).view(-1, *([1] * (log_probs.dim() - 1)))
        return torch.logsumexp(log_probs + w.log(), dim=0)
