"""ONNX files on onnxruntime: `OrtModel` (an ONNX file behind an ``nn.Module`` face, at a fixed thread count),
`parity` (PyTorch against the ONNX model on held-out batches), and the bytes an ONNX model takes on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from kdistill.compress.onnx_base import Example, ExportError, output_tensor, require
from kdistill.outputs import call_model

__all__ = ["OrtModel", "file_bytes", "onnx_files", "parity"]


# ---------------------------------------------------------------------------------------------------- files


def onnx_files(path: Union[str, Path]) -> list[Path]:
    """The ONNX file and the external data files its initializers point to (none for a self-contained file)."""
    path = Path(path)
    files = [path]
    try:
        onnx = require("onnx")
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
    ort = require("onnxruntime")
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
