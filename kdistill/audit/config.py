"""The ``audit:`` section of a classification config (`kdistill.config.RunConfig.audit`) and the settings of
``kdistill audit``. Only ground-floor modules are imported, so `kdistill.config` can import it."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from kdistill.configbase import Strict

__all__ = ["AuditConfig", "AuditThresholds", "BackdoorVerdict", "CleanseSettings", "StripSettings"]


class AuditThresholds(Strict):
    """Limits the teacher must meet before distillation; an unset limit is reported, not checked."""

    min_accuracy: Optional[float] = Field(None, ge=0, le=1, description="lowest held-out top-1 accuracy")
    max_ece: Optional[float] = Field(None, ge=0, le=1, description="highest expected calibration error")
    max_backdoor_anomaly: Optional[float] = Field(None, gt=0, description="highest Neural Cleanse anomaly index of "
                                                                          "the smallest trigger (the paper flags > 2)")
    max_label_noise_fraction: Optional[float] = Field(None, ge=0, le=1, description="highest fraction of training "
                                                      "rows the teacher confidently assigns to another class")
    max_strip_fraction: Optional[float] = Field(None, ge=0, le=1, description="highest fraction of examined "
                                                "training rows whose STRIP entropy is below the clean threshold")
    refuse_backdoor: bool = Field(False, description="refuse a teacher the backdoor verdict flags "
                                                     "(audit.backdoor.rule)")


class StripSettings(Strict):
    """STRIP (Gao et al. 2019): prediction entropy of inputs superimposed with random held-out inputs."""

    rows: int = Field(128, ge=1, description="training rows examined (a seeded sample)")
    overlays: int = Field(16, ge=1, description="N: held-out inputs superimposed on each examined input")
    blend: Literal["add", "alpha"] = Field("add", description="'add': x + x_other (the paper's superimposition); "
                                                              "'alpha': (1 - alpha) x + alpha x_other")
    alpha: float = Field(0.5, gt=0, lt=1, description="weight of the held-out input for blend: alpha")
    percentile: float = Field(1.0, gt=0, lt=50, description="threshold = this percentile of clean held-out "
                                                            "inputs' entropies (the false rejection rate, %)")


class CleanseSettings(Strict):
    """Trigger reconstruction in the spirit of Neural Cleanse (Wang et al. 2019), kept CPU-cheap."""

    steps: int = Field(100, ge=1, description="optimisation steps (all classes optimised together)")
    batch: int = Field(16, ge=1, description="held-out inputs the trigger is optimised on")
    lr: float = Field(0.2, gt=0, description="Adam learning rate of mask and pattern")
    l1_weight: float = Field(0.01, gt=0, description="initial lambda of the mask's L1 norm")
    target_success: float = Field(0.9, gt=0, le=1, description="attack success a mask must reach to count")
    adapt_every: int = Field(10, ge=1, description="adjust lambda every this many steps (x1.5 up on success, "
                                                   "/1.5 down otherwise)")


class BackdoorVerdict(Strict):
    """How the two backdoor checks make one verdict (`kdistill.audit.teacher.backdoor_verdict`)."""

    rule: Literal["strip", "neural_cleanse", "either", "both"] = Field(
        "strip", description="which check's flag is the verdict: 'strip' (the default: in benchmarks/audit.py the "
                             "trigger reconstruction flagged 5 of 5 clean Fashion-MNIST teachers), 'neural_cleanse', "
                             "'either' or 'both'")
    strip_factor: float = Field(5.0, gt=1, description="STRIP flags when more than this many times its expected "
                                                       "fraction (strip.percentile) of training rows fall below "
                                                       "the clean threshold")


class AuditConfig(Strict):
    """The teacher audit: run as a stage after the teacher is ready and before distillation; a threshold the
    teacher violates stops the run (exit 2, the teacher's weights kept). See docs/audit.md."""

    enabled: bool = Field(True, description="false keeps the section but skips the audit")
    thresholds: AuditThresholds = AuditThresholds()
    noise_threshold: float = Field(0.9, gt=0, le=1, description="teacher probability of a class other than the "
                                                                "label that makes a training row a suspect")
    top_k: int = Field(20, ge=1, description="suspect rows listed in audit.json and the report")
    histogram_bins: int = Field(10, ge=2, description="bins of the confidence and entropy histograms")
    seed: int = Field(0, description="seed of the audit's sampling and trigger initialisation")
    strip: StripSettings = StripSettings()
    cleanse: CleanseSettings = CleanseSettings()
    backdoor: BackdoorVerdict = BackdoorVerdict()
