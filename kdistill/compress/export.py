"""ONNX export, onnxruntime sessions and int8 (dynamic / static) quantization of a trained model.

* `export_onnx`: ``torch.onnx.export(dynamo=True)`` of the model's logits (or first tensor output) with a dynamic
  batch dimension (and a dynamic sequence length for dict inputs), one self-contained ``.onnx`` file (no external
  data), checked by ``onnx.checker``, written atomically. A model the exporter cannot translate is one
  `ExportError` line naming the operator and, when it can be found, the module that calls it.
* `quantize_onnx` (`kdistill.compress.onnx_int8`): onnxruntime's ``quantize_dynamic`` (int8 weights) or ``quantize_static`` (QDQ, per-channel
  int8 weights, activations calibrated on example batches).
* `OrtModel` (`kdistill.compress.ort`): an ONNX file behind an ``nn.Module`` face (a tensor or a dict of tensors in, a float32 tensor out),
  at a fixed thread count; works with `kdistill.outputs.call_model` and `kdistill.evaluate.predict_logits`.
* `parity` (`kdistill.compress.ort`): PyTorch fp32 against the ONNX model on held-out batches.

There is no fallback to the TorchScript exporter (``dynamo=False``): it is deprecated, and a silently different
graph would make the parity and timing numbers describe another model than the one the user asked for. A failed
dynamo export is reported instead, with the fix.

`onnx` and `onnxruntime` (the ``deploy`` extra) are imported inside the functions that need them, so importing this
module costs nothing and `kdistill` imports without them.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import torch
from torch import nn

from kdistill.compress.onnx_base import (TENSOR_INPUT, Example, ExportError, explain_export_error,  # noqa: F401
                                         output_tensor, require)
from kdistill.compress.onnx_int8 import quantize_onnx  # noqa: F401  (the public API of this module)
from kdistill.compress.ort import OrtModel, file_bytes, onnx_files, parity  # noqa: F401
from kdistill.files import fsync_dir, os_reason
from kdistill.outputs import call_model

__all__ = ["ExportError", "OrtModel", "explain_export_error", "export_onnx", "file_bytes", "onnx_files",
           "output_tensor", "parity", "quantize_onnx"]


# ---------------------------------------------------------------------------------------------------- export




class _LogitsOnly(nn.Module):
    """The wrapped model's logits or first tensor output (`output_tensor`) as one tensor, so a Hugging Face
    ModelOutput exports as a single ONNX output. `input`: a tensor, or a dict of tensors passed as keywords."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input: Any) -> torch.Tensor:  # noqa: A002
        return output_tensor(call_model(self.model, input))


def _at_least_two_rows(example: Example) -> Example:
    """The example with batch >= 2 (a batch of 1 would be specialized to a static size by torch.export)."""
    def grow(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t
    if isinstance(example, Mapping):
        return {k: grow(v) for k, v in example.items()}
    return grow(example)


def _dynamic_shapes(example: Example) -> dict:
    """torch.export dynamic shapes: dim 0 of every input is ``batch``; dim 1 of dict (token) inputs ``sequence``."""
    from torch.export import Dim

    batch = Dim("batch")
    if not isinstance(example, Mapping):
        return {"input": {0: batch}}
    sequence = Dim("sequence")
    return {"input": {k: ({0: batch, 1: sequence} if v.dim() >= 2 else {0: batch}) for k, v in example.items()}}


_NOISY_LOGGERS = ("torch.export", "torch._export", "torch._dynamo", "torch._subclasses.fake_tensor",
                  "torch.fx.experimental.symbolic_shapes", "torch.onnx")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter without its chatter: the graph dumps and tracebacks it logs or prints on failure (the failure
    becomes one `ExportError` line; what it prints to stderr is passed on after a success), and warnings about
    axis names it merges (``batch`` shared by several inputs)."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stderr(printed):
            warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
        if printed.getvalue():
            sys.stderr.write(printed.getvalue())
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _strip_debug_info(onnx, path: Path) -> None:
    """Drop what the exporter records for debugging (each node's stack trace, module path and FX names in
    ``metadata_props``, doc strings): it is a third of a small model's file and nothing a runtime reads."""
    model = onnx.load(str(path))
    graphs = [model.graph, *(f for f in model.functions)]
    for graph in graphs:
        graph.doc_string = ""
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for value in model.graph.value_info:
        del value.metadata_props[:]
    onnx.save(model, str(path))


def export_onnx(model: nn.Module, example: Example, path: Union[str, Path], *, where: str = "student") -> Path:
    """Export `model`'s logits (or first tensor output) to one ONNX file at `path` and check it.

    `example`: a tensor (ONNX input ``input``) or a dict of tensors such as a tokenizer's ``input_ids`` /
    ``attention_mask`` (inputs of those names, passed as keywords). The batch dimension is dynamic, and so is the
    sequence length (dim 1) of dict inputs. The file is written under a temp name in the same folder and renamed
    when complete. Raises `ExportError` (one line: the operator, the module when found, the fix)."""
    onnx = require("onnx")
    require("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dict_inputs = isinstance(example, Mapping)
    example = _at_least_two_rows({k: v.detach().cpu() for k, v in example.items()} if dict_inputs
                                 else example.detach().cpu())
    device = next((p.device for p in model.parameters()), None)  # restored after the export on the CPU
    was = model.training
    wrapper = _LogitsOnly(model).cpu().eval()
    names = list(example) if dict_inputs else [TENSOR_INPUT]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad(), _quiet_exporter():
            # the example goes in as a keyword: torch.onnx.export would take a trailing dict in `args` for kwargs
            torch.onnx.export(wrapper, (), str(tmp), kwargs={"input": example}, input_names=names,
                              output_names=["logits"], dynamo=True, external_data=False,
                              dynamic_shapes=_dynamic_shapes(example), optimize=True, verbose=False)
        _strip_debug_info(onnx, tmp)
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        raise ExportError(f"cannot write {path}: {os_reason(err)}", where=where,
                          fix="check free space and permissions") from None
    except Exception as err:  # the exporter raises its own (and torch.export's) error types
        raise explain_export_error(err, model, where=where) from err
    finally:
        model.train(was)
        if device is not None and device.type != "cpu":
            model.to(device)
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path
