"""The ``data_free:`` section (synthesis of a transfer set from the teacher alone) and the boundary-sample option
of a transfer set (``data.transfer.boundary``). Ground-floor pydantic models only; the code is in this package."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from kdistill.configbase import Strict


class DeepInversionConfig(Strict):
    """DeepInversion (Yin et al. 2020): inputs optimised so the teacher's BatchNorm statistics match, see
    docs/data_free.md. Cost: ``batches * steps`` teacher forward+backward passes of ``batch_size`` inputs. The
    defaults are the settings of benchmarks/data_free.py (Fashion-MNIST, 85.96 % data-free student)."""

    batches: int = Field(20, ge=1, description="synthesised batches (the transfer set has batches * batch_size rows)")
    batch_size: int = Field(128, ge=2, description="inputs optimised together (BN statistics are per batch)")
    steps: int = Field(80, ge=1, description="Adam steps per batch")
    lr: float = Field(0.15, gt=0, description="Adam learning rate on the inputs (cosine decay to 0)")
    bn_weight: float = Field(10.0, ge=0, description="weight of R_feature (BN mean/variance matching)")
    first_bn_weight: float = Field(10.0, ge=0, description="extra factor on the first BN layer's R_feature (the "
                                                             "paper's code uses 10)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the CE toward the sampled target classes")
    tv_weight: float = Field(1e-3, ge=0, description="weight of the total-variation prior")
    l2_weight: float = Field(0.0, ge=0, description="weight of the l2-norm prior")
    compete_weight: float = Field(0.0, ge=0, description="Adaptive DeepInversion: weight of 1 - JS(teacher, "
                                                          "student) (needs a student during synthesis)")
    compete_temperature: float = Field(3.0, gt=0, description="temperature of the JS competition term")
    student_steps: int = Field(50, ge=0, description="adaptive only: KD steps of the student between batches")
    jitter: int = Field(2, ge=0, description="random shift (pixels) of the inputs at every step")
    flip: bool = Field(True, description="random horizontal flip at every step")
    init_std: float = Field(1.0, gt=0, description="standard deviation of the random initial inputs")
    clamp: Optional[tuple[float, float]] = Field((0.0, 1.0), description="valid input range [low, high] kept "
                                                 "after every step (null = unbounded inputs)")

    @model_validator(mode="after")
    def _clamp_order(self) -> "DeepInversionConfig":
        if self.clamp is not None and not self.clamp[0] < self.clamp[1]:
            raise ValueError(f"clamp must be [low, high] with low < high, got {list(self.clamp)}")
        return self


class DFADConfig(Strict):
    """DFAD (Fang et al. 2019): a generator trained to maximise the teacher-student discrepancy, the student to
    minimise it. Runs `iterations` rounds of one generator step and `student_steps` student steps."""

    iterations: int = Field(500, ge=1, description="generator steps (each followed by student_steps)")
    student_steps: int = Field(5, ge=1, description="student steps per generator step (paper: 5)")
    batch_size: int = Field(128, ge=2)
    z_dim: int = Field(100, ge=1, description="noise size of the generator")
    width: int = Field(64, ge=1, description="generator width w (channels 2w, 2w, w; the paper's is 64)")
    generator_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the generator (paper: 1e-3)")
    student_lr: float = Field(0.1, gt=0, description="SGD (momentum 0.9) learning rate of the student (paper: 0.1)")
    bn_weight: float = Field(0.0, ge=0, description="optional R_feature on generated batches for the generator "
                                                    "(0 = plain DFAD)")
    clamp: Optional[tuple[float, float]] = Field((0.0, 1.0), description="output range of the generator "
                                                 "(sigmoid scaled to [low, high]; null = unbounded)")


class BoundaryConfig(Strict):
    """Boundary samples: inputs moved by PGD steps toward where teacher and student disagree (maximising
    KL(teacher || student)), added to every training batch (see `kdistill.datafree.boundary`)."""

    fraction: float = Field(0.5, gt=0, le=4, description="perturbed copies per batch, as a fraction of the batch")
    steps: int = Field(3, ge=1, description="PGD steps")
    step_size: float = Field(0.05, gt=0, description="size of each signed-gradient step")
    epsilon: float = Field(0.15, gt=0, description="L-infinity radius around the original input")
    temperature: float = Field(1.0, gt=0, description="temperature of the KL being maximised")
    clamp: Optional[tuple[float, float]] = Field(None, description="valid input range kept after each step")


class DataFreeConfig(Strict):
    """``data_free:``: the student learns from inputs synthesised from the teacher (with ``data.train: none``
    no real training input is read)."""

    method: Literal["deepinversion", "dfad"] = "deepinversion"
    seed: int = Field(0, description="seed of the synthesis (initial inputs, target classes, generator)")
    deepinversion: DeepInversionConfig = DeepInversionConfig()
    dfad: DFADConfig = DFADConfig()
    cache_dir: Optional[str] = Field(None, description="folder of synthesised transfer sets, keyed by teacher "
                                     "fingerprint and settings (default: RUN_DIR/synthesis)")


__all__ = ["BoundaryConfig", "DFADConfig", "DataFreeConfig", "DeepInversionConfig", "boundary_of", "check_run", "train_is_none"]


def train_is_none(data_cfg) -> bool:
    """``data.train: none``: the run reads no real training input."""
    value = getattr(data_cfg, "train", None)
    return isinstance(value, str) and value.lower() == "none"


def boundary_of(data_cfg) -> Optional[BoundaryConfig]:
    """The ``data.transfer.boundary`` section (None when absent or when the data form has none)."""
    return getattr(getattr(data_cfg, "transfer", None), "boundary", None)


def check_run(cfg) -> None:
    """The cross-section rules of data-free runs and boundary samples (a `ValueError` with a one-line message;
    `RunConfig` turns it into a `ConfigError`). Runs after the section validators."""
    from kdistill.losses import get_loss

    none = train_is_none(cfg.data)
    boundary = boundary_of(cfg.data)
    df = cfg.data_free
    if not (none or df is not None or boundary is not None):
        return
    what = "data.train: none" if none else "data_free" if df is not None else "data.transfer.boundary"
    if none and df is None:
        raise ValueError("data.train: none leaves nothing to train the student on; add a data_free section "
                         "(e.g. data_free: {method: deepinversion}) or remove data.train")
    if cfg.scheme.name != "offline":
        raise ValueError(f"{what} runs with scheme 'offline' only, not '{cfg.scheme.name}'; remove scheme")
    if cfg.teacher is None:
        raise ValueError(f"{what} needs a 'teacher' (the student learns from it alone); add a teacher section")
    if none and not cfg.teacher.weights:
        raise ValueError("teacher.weights: a data-free run (data.train: none) cannot train its teacher; give the "
                         "trained teacher's weights file")
    if none and getattr(cfg.data, "train_size", None) is not None:
        raise ValueError("data.train_size: there is no training split with data.train: none; remove it")
    if none:
        for i, term in enumerate(cfg.distill.terms or []):
            if get_loss(term.loss).needs_labels:
                raise ValueError(f"distill.terms[{i}]: loss '{term.loss}' needs labels, and data.train: none has "
                                 f"none; use teacher-only losses such as kd")
    if cfg.teacher.cache is not None:
        raise ValueError(f"teacher.cache is not supported with {what} (the inputs are made during the run); "
                         f"remove it")
    if getattr(cfg.data, "augment", None) is not None and df is not None and df.method == "dfad":
        raise ValueError("data.augment is not supported with data_free.method dfad (it has no transfer set); "
                         "remove it")
    if cfg.compress or cfg.export is not None or cfg.audit is not None:
        raise ValueError(f"compress / export / audit are not supported with {what}; remove them (or distil first, "
                         f"then compress with a config that loads the student)")
    if df is not None and df.method == "dfad" and boundary is not None:
        raise ValueError("data.transfer.boundary: dfad trains on generated inputs, it has no transfer set to "
                         "enrich; remove boundary or use method deepinversion")
