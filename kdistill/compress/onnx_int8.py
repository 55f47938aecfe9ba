"""int8 ONNX models with onnxruntime: ``quantize_dynamic`` (int8 weights, activations quantized at run time) or
``quantize_static`` (QDQ, per-channel int8 weights, activation ranges calibrated on example batches)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from kdistill.compress.onnx_base import MODES, Example, ExportError, require
from kdistill.compress.ort import _feeds
from kdistill.errors import KDError
from kdistill.files import fsync_dir, os_reason

__all__ = ["quantize_onnx"]




# ---------------------------------------------------------------------------------------------------- int8


def _model_inputs(path: Path) -> dict[str, str]:
    """{input name: onnxruntime type string} of an ONNX file's graph inputs (initializers excluded)."""
    onnx = require("onnx")
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
    import contextlib
    import io

    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    quiet = io.StringIO()  # symbolic shape inference prints notes ("unsupported broadcast ...") to stdout
    given = src
    src, out = Path(src).resolve(), Path(out).resolve()
    # it also writes scratch files (sym_shape_infer_temp.onnx, *.data) into the working directory: run it in a
    # temporary one so nothing is left behind in the user's folder
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        try:
            with contextlib.redirect_stdout(quiet):
                quant_pre_process(str(src), str(out), skip_symbolic_shape=False)
            return out
        except Exception:  # symbolic shape inference rejects some graphs: quantize the original
            out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        try:
            with contextlib.redirect_stdout(quiet):
                quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            return out
        except Exception:
            out.unlink(missing_ok=True)
            return given


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
    require("onnx")
    quantization = require("onnxruntime.quantization")
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
