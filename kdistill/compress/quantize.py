"""Quantization-aware distillation: int8 fake quantization of weights and activations during training.

`prepare_qat` wraps every ``nn.Linear`` and ``nn.Conv1d/2d`` in a `FakeQuantized` module that computes

    y = layer(fq_act(x); weight = fq_w(W))

with torchao's `IntxFakeQuantizer` (``torchao.quantization.qat``):

* weights: int8, symmetric, one scale per output channel (``per_channel``), which is what onnxruntime's static
  QDQ quantization writes (``per_channel=True``, ``QInt8`` symmetric weights);
* activations: int8, asymmetric, dynamic ranges per sample (torchao's ``per_token`` granularity over the
  flattened sample). onnxruntime's static int8 uses one calibrated range per tensor instead: the ranges differ
  slightly, the rounding the student learns to tolerate is the same 8-bit grid. (torchao has no per-tensor
  activation fake quantizer; its QAT API `QATConfig` swaps Linear layers only, so convolutions are wrapped here
  around the same torchao quantizers.)

Gradients pass the rounding straight through (torchao's fake quantizers). `strip_qat` removes the wrappers and
returns the plain float model, whose weights are then quantized for real by the export (`kdistill.compress.export`:
onnxruntime static int8, calibrated on training batches). Parameter names change under the wrapper
(``features.0.layer.weight``): a QAT stage's ``.safetensors`` is read back through `prepare_qat` + `strip_qat`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdistill.errors import KDError

__all__ = ["FakeQuantized", "prepare_qat", "strip_qat"]

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _import_torchao() -> None:
    """Import torchao once with its import-time log lines and warnings about GPU kernels (which a CPU build
    cannot load and this module does not use) kept out of the user's output."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization.qat  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _quantizers():
    try:
        _import_torchao()
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    except ImportError:
        raise KDError("compress.quantize mode 'qat' needs torchao", where="compress.quantize",
                      fix="pip install 'kdistill[deploy]' (or pip install torchao)") from None
    weight = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True))
    activation = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))
    return weight, activation


class FakeQuantized(nn.Module):
    """A Linear / Conv layer computed on int8 fake-quantized inputs and weights (see the module docstring)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.weight_fq, self.act_fq = _quantizers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = layer.weight
        wq = self.weight_fq(w.reshape(w.shape[0], -1)).reshape(w.shape)
        xq = self.act_fq(x.reshape(x.shape[0], -1)).reshape(x.shape) if x.dim() > 1 else x
        if isinstance(layer, nn.Linear):
            return nn.functional.linear(xq, wq, layer.bias)
        return layer._conv_forward(xq, wq, layer.bias)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def prepare_qat(model: nn.Module, *, skip: Sequence[str] = ()) -> nn.Module:
    """Wrap (in place) every Linear / Conv1d / Conv2d layer not under a `skip` path in `FakeQuantized`; returns
    the model. A model with no such layer is refused (nothing would be quantized)."""
    targets = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE) and name
               and not any(name == s or name.startswith(s + ".") for s in skip)]
    if not targets:
        raise KDError(f"compress.quantize: {type(model).__name__} has no Linear or Conv1d/Conv2d layer to quantize",
                      where="compress.quantize", fix="remove the quantize step for this model")
    for name in targets:
        _replace(model, name, FakeQuantized(model.get_submodule(name)))
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """Replace (in place) every `FakeQuantized` wrapper by its float layer; returns the model."""
    for name in [n for n, m in model.named_modules() if isinstance(m, FakeQuantized)]:
        _replace(model, name, model.get_submodule(name).layer)
    return model
