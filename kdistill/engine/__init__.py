"""The training engine (Accelerate), checkpoints and the resumable data order."""

from kdistill.engine.checkpoint import load_latest, load_weights, save_weights
from kdistill.engine.loop import Engine, Interrupted, get_accelerator, lr_lambda
from kdistill.engine.sampler import StepSampler

__all__ = ["Engine", "Interrupted", "StepSampler", "get_accelerator", "load_latest", "load_weights", "lr_lambda",
           "save_weights"]
