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
from kdistill.evaluate import accuracy, agreement, cost_report, expected_calibration_error, predict_logits
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


def teacher_train_config(teacher_cfg, train_cfg: TrainConfig) -> TrainConfig:
    """`teacher.train`, or the run's `train`; ``train.deterministic`` covers the whole run."""
    teacher_train = teacher_cfg.train or train_cfg
    if train_cfg.deterministic and not teacher_train.deterministic:
        teacher_train = teacher_train.model_copy(update={"deterministic": True})
    return teacher_train


# -- evaluation ----------------------------------------------------------------------------------------------------
def evaluate(model: nn.Module, test: ArrayDataset, eval_cfg, *, reference_logits: Optional[torch.Tensor] = None,
             cost: bool = True) -> dict:
    """Accuracy, ECE (and agreement with a reference model), plus cost (params, bytes, FLOPs, latency)."""
    logits = predict_logits(model, test)
    labels = test.tensors["y"]
    report = {"accuracy": accuracy(logits, labels),
              "ece": expected_calibration_error(logits, labels, eval_cfg.ece_bins)}
    if reference_logits is not None:
        report["agreement"] = agreement(logits, reference_logits)
    if cost:
        report.update(cost_report(model, test.tensors["x"][:1], latency_repeats=eval_cfg.latency_repeats,
                                  throughput_batch=eval_cfg.throughput_batch))
    return report


def top1_accuracy(model: nn.Module, test: ArrayDataset) -> float:
    return accuracy(predict_logits(model, test), test.tensors["y"])


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

    @classmethod
    def start(cls, cfg: "RunConfig", run_dir=None, *, progress: bool = True, log=print,
              trust_checkpoint: bool = False) -> "SchemeJob":
        """Claim the run directory (writes the resolved config.yaml; refuses another run's), load and check data."""
        folder = RunDir(run_dir, cfg, dump=dump_config, load=load_resolved)
        folder.claim()
        bundle = load_data(cfg.data)
        check_labels(bundle.train, bundle.num_classes)
        check_labels(bundle.test, bundle.num_classes)
        return cls(cfg, bundle, folder, progress, log, trust_checkpoint)

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
        """Test accuracy during training when ``eval_every`` asks for it (else None)."""
        if not train_cfg.eval_every:
            return None
        return lambda model: {"accuracy": top1_accuracy(model, self.bundle.test)}

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
        return evaluate(model, test if test is not None else self.bundle.test, self.cfg.eval, **options)

    def finish(self, models: dict, **extra: Any) -> dict:
        """The summary ``{scheme, dataset, **extra, models}``, written atomically to RUN_DIR/summary.json."""
        summary = {"scheme": self.cfg.scheme.name, "dataset": self.bundle.name, **extra, "models": models}
        self.run_dir.write_summary(summary)
        return summary


def scheme_run(plan: Callable[[SchemeJob], dict]) -> Callable[..., dict]:
    """A scheme's ``run(cfg, run_dir=None, *, progress, log, trust_checkpoint) -> summary`` from its plan over the
    started `SchemeJob` (`trust_checkpoint` allows full unpickling of .pt/.pth teacher weights: trusted only)."""

    @functools.wraps(plan)
    def run(cfg: "RunConfig", run_dir=None, *, progress: bool = True, log=print,
            trust_checkpoint: bool = False) -> dict:
        return plan(SchemeJob.start(cfg, run_dir, progress=progress, log=log, trust_checkpoint=trust_checkpoint))

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
