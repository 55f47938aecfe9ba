"""What the ONNX modules share: the `ExportError`, optional imports of the ``deploy`` extra, the tensor a deployed
model returns, and one-line explanations of the exporter's failures (`explain_export_error`: the operator, the
module that calls it and, for code torch.export cannot trace, the source line)."""

from __future__ import annotations

import linecache
import re
import traceback
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from kdistill.errors import KDError, WiringError
from kdistill.outputs import logits_of

__all__ = ["Example", "ExportError", "ISSUES", "MODES", "TENSOR_INPUT", "explain_export_error", "output_tensor",
           "require"]

Example = Union[torch.Tensor, Mapping[str, torch.Tensor]]
TENSOR_INPUT = "input"  # the ONNX input name of a model that takes one tensor
MODES = ("dynamic", "static")
ISSUES = "https://github.com/pytorch/pytorch/issues"


class ExportError(KDError):
    """A model cannot be exported to ONNX, or an ONNX file cannot be quantized or loaded."""


def require(module: str):
    """Import an optional ``deploy`` dependency, or raise one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed", where="export",
                          fix="pip install 'kdistill[deploy]' (onnx, onnxscript, onnxruntime)") from None


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a deployed model returns: the logits (`kdistill.outputs.logits_of`), else the first tensor of
    a Hugging Face output without logits (``last_hidden_state`` of an encoder)."""
    try:
        return logits_of(output)
    except WiringError:
        if isinstance(output, Mapping):
            first = next((v for v in output.values() if torch.is_tensor(v)), None)
            if first is not None:
                return first
        raise


_OP_PATTERNS = (
    re.compile(r"op='(aten\.\w+|prims\.\w+|\w+\.\w+)'"),  # DispatchError: <OpOverload(op='aten.x', ...)>
    re.compile(r"torch\.ops\.((?:aten|prims|quantized|torchvision)\.\w+)"),  # target=torch.ops.aten.x.default
    re.compile(r"\b(aten(?:\.|::)\w+)"),
)


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and its causes (``raise ... from``), outermost first."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _operator(errors: list[BaseException]) -> Optional[str]:
    """The ``aten.xxx`` operator an export error names, innermost error first."""
    for err in reversed(errors):
        text = str(err)
        for pattern in _OP_PATTERNS:
            found = pattern.search(text)
            if found:
                return found.group(1).replace("::", ".")
    return None


def _module_paths(model: nn.Module) -> dict[int, str]:
    """{id(module): path} of `model`'s modules; the model itself is ``""``."""
    return {id(m): name for name, m in model.named_modules()}


def _clean_module_path(path: str) -> str:
    """An ``nn_module_stack`` path without the tracer's ``L['self']`` and this module's wrapper prefix."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path[len("model."):] if path.startswith("model.") else ("" if path == "model" else path)


def _frames(errors: list[BaseException]) -> list:
    """The traceback frames of `errors`, innermost first (the innermost error's first)."""
    frames = []
    for err in reversed(errors):
        tb = err.__traceback__
        frames += reversed([frame for frame, _ in traceback.walk_tb(tb)] if tb else [])
    return frames


def _module_of(errors: list[BaseException], model: nn.Module) -> Optional[str]:
    """The module path of `model` where the export failed (``""``: the model's own forward): the failing graph
    node's ``nn_module_stack`` (ONNX translation), else the innermost traceback frame that runs the forward of one
    of `model`'s modules (torch.export tracing); None when neither is found."""
    frames = _frames(errors)
    for frame in frames:
        node = frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node) and node.op == "call_function":
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                return _clean_module_path(list(stack.values())[-1][0])
    paths = _module_paths(model)
    for frame in frames:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            return paths[id(owner)]
    return None


def _user_line(errors: list[BaseException]) -> Optional[str]:
    """``file:line (code)`` of the innermost traceback frame in the user's code (outside torch and kdistill)."""
    skip = (str(Path(torch.__file__).parent.parent), str(Path(__file__).parent.parent))
    for frame in _frames(errors):
        filename = frame.f_code.co_filename
        if filename.startswith("<") or filename.startswith(skip):
            continue
        code = linecache.getline(filename, frame.f_lineno).strip()
        return f"{filename}:{frame.f_lineno}" + (f" ({code[:80]})" if code else "")
    return None


def _describe(model: nn.Module, module: str) -> str:
    """``module 'path' (ClassName)`` of a submodule, ``the forward of ClassName`` for the model itself."""
    if not module:
        return f"the forward of {type(model).__name__}"
    try:
        return f"module '{module}' ({type(model.get_submodule(module)).__name__})"
    except AttributeError:
        return f"module '{module}'"


def explain_export_error(err: BaseException, model: nn.Module, *, where: str = "student") -> ExportError:
    """One `ExportError` line for a failed ONNX export: the operator, the module path and the source line when
    they can be found in the exporter's error and its traceback, and the fix."""
    if isinstance(err, KDError):
        return ExportError(err.what, where=err.where or where, fix=err.fix)
    errors = _chain(err)
    op = _operator(errors)
    module = _module_of(errors, model)
    inner = next((e for e in reversed(errors) if str(e).strip()), err)
    first_line = str(inner).strip().splitlines()[0][:160] if str(inner).strip() else type(inner).__name__
    if op:
        what = f"cannot export {where} to ONNX: operator {op}"
        what += f" in {_describe(model, module)}" if module is not None else ""
        what += " has no ONNX translation"
        target = _describe(model, module) if module else f"the code that calls {op}"
        fix = (f"replace {target} with exportable operations, or export with torch.onnx.export(..., "
               f"custom_translation_table={{torch.ops.{op}.default: <onnxscript function>}}), or file an issue "
               f"at {ISSUES}")
    else:
        line = _user_line(errors)
        what = f"cannot export {where} to ONNX"
        what += f": {_describe(model, module)}" if module is not None else ""
        what += f" at {line}" if line else ""
        what += f" ({type(inner).__name__}: {first_line})"
        fix = ("make the forward traceable by torch.export (no Python control flow on tensor values, no "
               f"data-dependent output shapes): rewrite {'that code' if line else 'the offending code'} or "
               f"replace {_describe(model, module) if module is not None else 'the module'}, or file an issue at "
               f"{ISSUES}")
    return ExportError(what, where="export", fix=fix)
