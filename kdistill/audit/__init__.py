"""The teacher audit (classification): scrutinise a teacher before a student inherits its errors and backdoors.

Held-out accuracy (overall, per class), calibration (ECE, reliability bins, a confidence histogram), agreement
among an ensemble's teachers, label-noise suspects (training rows the teacher confidently assigns to another
class), STRIP (Gao et al. 2019) and a trigger reconstruction in the spirit of Neural Cleanse (Wang et al. 2019).
`kdistill.audit.checks` holds the measurements (functions of a model and tensors), `kdistill.audit.teacher` the
record of one teacher on a run's data, `kdistill.audit.stage` the run's ``audit`` stage and ``kdistill audit``.
Modules are imported on use; see docs/audit.md.
"""

from kdistill.audit.config import AuditConfig, AuditThresholds, CleanseSettings, StripSettings

__all__ = ["AuditConfig", "AuditThresholds", "CleanseSettings", "StripSettings"]
