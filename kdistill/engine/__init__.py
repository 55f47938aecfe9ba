"""The training engine (Accelerate), checkpoints and the resumable data order.

`loop` (the `Engine` and its steps), `runtime` (Accelerator, optimizer, LR schedule, signals), `batches` (the
micro-batches of each step on the device), `metrics` (``metrics.jsonl`` and the window of loss terms),
`checkpoint` (atomic, checksummed checkpoints), `sampler` (the data order as a function of the step)."""

from kdistill.engine.checkpoint import load_latest, load_weights, save_weights
from kdistill.engine.loop import Engine, Interrupted
from kdistill.engine.runtime import get_accelerator, lr_lambda
from kdistill.engine.sampler import StepSampler

__all__ = ["Engine", "Interrupted", "StepSampler", "get_accelerator", "load_latest", "load_weights", "lr_lambda",
           "save_weights"]
