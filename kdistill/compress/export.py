"""ONNX export, onnxruntime sessions and int8 (dynamic / static) quantization of a trained model.

* `export_onnx`: ``torch.onnx.export(dynamo=True)`` of the model's logits (or first tensor output) with a dynamic
  batch dimension (and a dynamic sequence length for dict inputs), one self-contained ``.onnx`` file (no external
  data), checked by ``onnx.checker``, written atomically. A model the exporter cannot translate is one
  `ExportError` line naming the operator and, when it can be found, the module that calls it.
* `quantize_onnx`: onnxruntime's ``quantize_dynamic`` (int8 weights) or ``quantize_static`` (QDQ, per-channel
  int8 weights, activations calibrated on example batches).
* `OrtModel`: an ONNX file behind an ``nn.Module`` face (a tensor or a dict of tensors in, a float32 tensor out),
  at a fixed thread count; works with `kdistill.outputs.call_model` and `kdistill.evaluate.predict_logits`.
* `parity`: PyTorch fp32 against the ONNX model on held-out batches.

There is no fallback to the TorchScript exporter (``dynamo=False``): it is deprecated, and a silently different
graph would make the parity and timing numbers describe another model than the one the user asked for. A failed
dynamo export is reported instead, with the fix.

`onnx` and `onnxruntime` (the ``deploy`` extra) are imported inside the functions that need them, so importing this
module costs nothing and `kdistill` imports without them.
"""

from __future__ import annotations

import io
import linecache
import logging
import os
import re
import sys
import traceback
import warnings
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from kdistill.errors import KDError, WiringError
from kdistill.files import fsync_dir, os_reason
from kdistill.outputs import call_model, logits_of

Example = Union[torch.Tensor, Mapping[str, torch.Tensor]]
TENSOR_INPUT = "input"  # the ONNX input name of a model that takes one tensor
MODES = ("dynamic", "static")
ISSUES = "https://github.com/pytorch/pytorch/issues"


class ExportError(KDError):
    """A model cannot be exported to ONNX, or an ONNX file cannot be quantized or loaded."""


def _require(module: str):
    """Import an optional ``deploy`` dependency, or raise one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed", where="export",
                          fix="pip install 'kdistill[deploy]' (onnx, onnxscript, onnxruntime)") from None


# ---------------------------------------------------------------------------------------------------- export


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


def export_onnx(model: nn.Module, example: Example, path: Union[str, Path], *, where: str = "student") -> Path:
    """Export `model`'s logits (or first tensor output) to one ONNX file at `path` and check it.

    `example`: a tensor (ONNX input ``input``) or a dict of tensors such as a tokenizer's ``input_ids`` /
    ``attention_mask`` (inputs of those names, passed as keywords). The batch dimension is dynamic, and so is the
    sequence length (dim 1) of dict inputs. The file is written under a temp name in the same folder and renamed
    when complete. Raises `ExportError` (one line: the operator, the module when found, the fix)."""
    onnx = _require("onnx")
    _require("onnxscript")
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


# ---------------------------------------------------------------------------------------------------- files


def onnx_files(path: Union[str, Path]) -> list[Path]:
    """The ONNX file and the external data files its initializers point to (none for a self-contained file)."""
    path = Path(path)
    files = [path]
    try:
        onnx = _require("onnx")
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unreadable file: count it alone
        return files
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                data = path.parent / entry.value
                if data not in files and data.is_file():
                    files.append(data)
    return files


def file_bytes(path: Union[str, Path]) -> int:
    """Bytes on disk of an ONNX file plus its external data (any other file: its size; a folder: its files)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if path.suffix == ".onnx":
        return sum(p.stat().st_size for p in onnx_files(path))
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------- feeds


def _np_dtype(onnx_type: str):
    """numpy dtype of an onnxruntime input type string such as ``tensor(float)`` / ``tensor(int64)``."""
    import numpy as np

    kind = onnx_type[len("tensor("):-1] if onnx_type.startswith("tensor(") else onnx_type
    return {"float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64,
            "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}.get(kind, np.float32)


def _feeds(inputs: Mapping[str, str], batch: Any, where: str = "onnx") -> dict:
    """onnxruntime feeds {input name: numpy array} from a tensor or a dict of tensors. `inputs` maps each model
    input name to its type string. Dict keys that are not model inputs are dropped (an ArrayDataset batch's
    ``x`` feeds a one-input model)."""
    import numpy as np

    if isinstance(batch, Mapping):
        picked = {k: v for k, v in batch.items() if k in inputs}
        if not picked and len(inputs) == 1 and "x" in batch:
            picked = {next(iter(inputs)): batch["x"]}
    elif len(inputs) == 1:
        picked = {next(iter(inputs)): batch}
    else:
        raise ExportError(f"the ONNX model takes {len(inputs)} inputs ({', '.join(inputs)}) but got one tensor",
                          where=where, fix="pass a dict of tensors keyed by those names")
    missing = [name for name in inputs if name not in picked]
    if missing:
        raise ExportError(f"inputs {', '.join(missing)} of the ONNX model are missing from the batch "
                          f"(it has {', '.join(batch) if isinstance(batch, Mapping) else 'one tensor'})",
                          where=where, fix="pass every input the model was exported with")
    feeds = {}
    for name, value in picked.items():
        array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        feeds[name] = np.ascontiguousarray(array.astype(_np_dtype(inputs[name]), copy=False))
    return feeds


# ---------------------------------------------------------------------------------------------------- runtime


def _session(path: Path, threads: int):
    """An onnxruntime CPU session at `threads` intra-op threads, one inter-op thread, sequential execution."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: no optimizer chatter on stderr
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}", where="onnxruntime", fix="export the model first")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own error types
        line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ExportError(f"onnxruntime cannot load {path}: {line}", where="onnxruntime",
                          fix="re-export the model; the file is damaged or uses an operator onnxruntime lacks") \
            from None


class OrtModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, as an ``nn.Module``: ``forward`` takes a tensor or a dict of
    tensors (keys that are not model inputs are dropped) and returns the first output as a float32 tensor.

    It has no trainable parameters; one empty, frozen parameter (``device_anchor``) lets helpers that find a
    model's device with ``next(model.parameters())`` (`kdistill.evaluate.predict_logits`) see the CPU.
    ``.eval()`` / ``.train()`` change nothing. Sessions are cached per thread count and shared with the models
    `at_threads` returns."""

    def __init__(self, path: Union[str, Path], threads: int = 1, *, _sessions: Optional[dict] = None):
        super().__init__()
        self.path = Path(path)
        self.threads = int(threads)
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        self._sessions = {} if _sessions is None else _sessions
        session = self.session  # fail now on a missing or damaged file
        self.input_names = [i.name for i in session.get_inputs()]
        self.input_types = {i.name: i.type for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    @property
    def session(self):
        """The onnxruntime session at this model's thread count (created once per count)."""
        if self.threads not in self._sessions:
            self._sessions[self.threads] = _session(self.path, self.threads)
        return self._sessions[self.threads]

    def at_threads(self, threads: int) -> "OrtModel":
        """The same ONNX file at `threads` intra-op threads (sessions shared, created on first use)."""
        if int(threads) == self.threads:
            return self
        return OrtModel(self.path, threads, _sessions=self._sessions)

    @property
    def file_bytes(self) -> int:
        """Bytes on disk of the ``.onnx`` file plus any external data file."""
        return file_bytes(self.path)

    def forward(self, x: Any = None, **inputs: torch.Tensor) -> torch.Tensor:
        """The first output on `x` (a tensor or a dict of tensors) or on keyword tensors (``model(**batch)``)."""
        batch = inputs if x is None else x
        out = self.session.run(self.output_names[:1], _feeds(self.input_types, batch, where=str(self.path)))[0]
        return torch.from_numpy(out).float()

    def __getstate__(self):
        """Pickle / deepcopy without the (unpicklable) sessions; they are re-created on use."""
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.threads}"


def _to(batch: Example, device: torch.device) -> Example:
    """A tensor or a dict of tensors on `device`."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch.to(device)


@torch.no_grad()
def parity(model: nn.Module, ort_model: nn.Module, batches: Iterable[Example]) -> dict:
    """PyTorch fp32 against the ONNX model on held-out `batches` (tensors or dicts of input tensors):
    ``{"max_abs_diff", "top1_agreement", "samples"}`` over the logits (top-1 along the last dim; a sample of a
    sequence output agrees when every position does). The PyTorch model runs on its own device."""
    was = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    worst, same, samples = 0.0, 0, 0
    try:
        for batch in batches:
            ref = output_tensor(call_model(model, _to(batch, device))).float().cpu()
            got = output_tensor(call_model(ort_model, batch)).float().cpu()
            if ref.shape != got.shape:
                raise ExportError(f"the ONNX model gives shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}",
                                  where="parity", fix="re-export the model with this example's input layout")
            worst = max(worst, float((ref - got).abs().max()) if ref.numel() else 0.0)
            top_ref, top_got = ref.argmax(-1), got.argmax(-1)
            same += int((top_ref == top_got).all(dim=tuple(range(1, top_ref.dim()))).sum()) \
                if top_ref.dim() > 1 else int((top_ref == top_got).sum())
            samples += ref.shape[0]
    finally:
        model.train(was)
    return {"max_abs_diff": worst, "top1_agreement": same / samples if samples else float("nan"),
            "samples": samples}


# ---------------------------------------------------------------------------------------------------- int8


def _model_inputs(path: Path) -> dict[str, str]:
    """{input name: onnxruntime type string} of an ONNX file's graph inputs (initializers excluded)."""
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    out = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        kind = {onnx.TensorProto.FLOAT: "float", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "double",
                onnx.TensorProto.BOOL: "bool", onnx.TensorProto.UINT8: "uint8",
                onnx.TensorProto.INT8: "int8"}.get(elem, "float")
        out[value.name] = f"tensor({kind})"
    return out


def _calibration_reader(inputs: Mapping[str, str], calibration: Iterable[Example]):
    """An onnxruntime `CalibrationDataReader` over `calibration` batches converted to feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    feeds = [_feeds(inputs, batch, where="calibration") for batch in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.position = 0

        def get_next(self):
            if self.position >= len(feeds):
                return None
            self.position += 1
            return feeds[self.position - 1]

        def rewind(self):
            self.position = 0

        def __len__(self):
            return len(feeds)

    return Reader(), len(feeds)


def _has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (8-bit dot products without saturation; then no weight range reduction)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux / not readable: ARM and recent x86 need no reduction
    return bool(re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags)) or not re.search(r"\bavx2\b", flags)


def _preprocessed(src: Path, out: Path) -> Path:
    """`src` after onnxruntime's quantization pre-processing (shape inference, graph optimization such as
    Conv+BatchNorm folding, which gives better int8 models) written to `out`, or `src` itself when that step
    fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=False)
        return out
    except Exception:  # symbolic shape inference rejects some graphs: quantize the original
        out.unlink(missing_ok=True)
        try:
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            return out
        except Exception:
            out.unlink(missing_ok=True)
            return src


def quantize_onnx(src: Union[str, Path], dst: Union[str, Path], mode: str, *,
                  calibration: Optional[Iterable[Example]] = None, per_channel: bool = True,
                  reduce_range: Optional[bool] = None) -> Path:
    """An int8 copy of the ONNX model `src` at `dst` (written under a temp name, then renamed).

    ``mode="dynamic"``: int8 weights, activations quantized at run time (``quantize_dynamic``; no data needed).
    ``mode="static"``: QDQ format, per-channel int8 weights and uint8 activations whose ranges come from the
    `calibration` batches (tensors or dicts of tensors, as the model takes them). `reduce_range` (7-bit weights)
    defaults to on for x86 CPUs without VNNI, where 8-bit products can saturate."""
    if mode not in MODES:
        raise ExportError(f"unknown quantization mode '{mode}'", where="export.quantize",
                          fix=f"use one of {', '.join(MODES)}")
    if mode == "static" and calibration is None:
        raise ExportError("static int8 quantization needs calibration batches", where="export.quantize",
                          fix="pass calibration= a few hundred held-out inputs, or use mode 'dynamic'")
    _require("onnx")
    quantization = _require("onnxruntime.quantization")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX file not found: {src}", where="export.quantize", fix="export the model first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    reduce_range = (not _has_vnni()) if reduce_range is None else reduce_range
    tmp = dst.with_name(f".{dst.name}.tmp")
    source = _preprocessed(src, dst.with_name(f".{dst.name}.pre.onnx"))
    try:
        if mode == "dynamic":
            quantization.quantize_dynamic(str(source), str(tmp), per_channel=per_channel, reduce_range=reduce_range,
                                          weight_type=quantization.QuantType.QInt8)
        else:
            reader, count = _calibration_reader(_model_inputs(source), calibration)
            if not count:
                raise ExportError("static int8 quantization got no calibration batches", where="export.quantize",
                                  fix="pass a non-empty iterable of example inputs")
            quantization.quantize_static(str(source), str(tmp), reader, quant_format=quantization.QuantFormat.QDQ,
                                         per_channel=per_channel, reduce_range=reduce_range,
                                         activation_type=quantization.QuantType.QUInt8,
                                         weight_type=quantization.QuantType.QInt8)
        os.replace(tmp, dst)
    except KDError:
        raise
    except OSError as err:
        raise ExportError(f"cannot write {dst}: {os_reason(err)}", where="export.quantize",
                          fix="check free space and permissions") from None
    except Exception as err:  # onnxruntime's quantizer raises plain exceptions
        line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ExportError(f"onnxruntime cannot quantize {src} ({mode}): {line}", where="export.quantize",
                          fix="try the other mode, per_channel=False, or keep the fp32 model") from None
    finally:
        tmp.unlink(missing_ok=True)
        if source != src:
            source.unlink(missing_ok=True)
    fsync_dir(dst.parent)
    return dst
