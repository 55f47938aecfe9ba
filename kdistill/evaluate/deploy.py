"""Latency of deployed artifacts: PyTorch models and ONNX files under onnxruntime (`OrtModel`), timed together.

The measurement follows `kdistill.evaluate.cost` (it reuses its functions, no second timing loop): at each fixed,
recorded thread count of `measurement_threads` (1 and all cores by default; torch models under `torch_threads`,
ONNX models switched to ``.at_threads(n)``), every model is timed in the same rounds (`timed_rounds`, order
rotated per round, time-budgeted), at batch 1 (latency) and at batch 32 (latency and throughput), and reported as
the median over the rounds with its spread.

`deployed_row` makes one row of summary.json's ``deployed`` list; `deployed_table` prints those rows.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from kdistill.errors import KDError
from kdistill.evaluate.cost import SPREAD_WARNING, measurement_threads, spread, timed_rounds, torch_threads

BATCH_SIZES = (1, 32)
RUNTIMES = ("torch", "onnxruntime")
_TIMING_KEYS = ("latency_ms_b1", "latency_spread_b1", "latency_ms_b32", "latency_spread_b32", "throughput",
                "throughput_spread")


def _rows(example: Any) -> int:
    """Number of rows (dim 0) of a tensor or of the first tensor of a dict."""
    if isinstance(example, Mapping):
        return int(next(iter(example.values())).shape[0])
    return int(example.shape[0])


def batch_of(example: Any, size: int) -> Any:
    """`size` rows of `example` (a tensor or a dict of tensors, sliced per key along dim 0): its first rows, or
    its rows repeated in turn when it has fewer. CPU, contiguous."""
    n = _rows(example)
    index = torch.arange(size) % n

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return (t[:size] if n >= size else t.index_select(0, index)).contiguous()

    if isinstance(example, Mapping):
        return {k: take(v) for k, v in example.items()}
    return take(example)


def _at_threads(model: nn.Module, count: int) -> nn.Module:
    """An ONNX model (anything with ``at_threads``) at `count` threads; a torch model as it is (torch's count is
    set around the measurement)."""
    return model.at_threads(count) if hasattr(model, "at_threads") else model


def deployed_timing(models: Mapping[str, nn.Module], example_b1: Any, example_b32: Any = None, *,
                    threads: Union[str, int] = "auto", repeats: int = 50) -> dict:
    """Batch-1 and batch-32 latency (ms) and batch-32 throughput (samples/s) of torch models and `OrtModel`s,
    timed interleaved in the same rounds, at each count of ``measurement_threads(threads)``.

    `example_b1` / `example_b32`: tensors or dicts of tensors; the first row of `example_b1` and 32 rows of
    `example_b32` (its rows repeated when fewer; `example_b1`'s when None) are used. Returns ``{"threads":
    [counts], "primary_threads": counts[0], "batch_sizes": [1, 32], "by_threads": {str(count): {name:
    {"latency_ms_b1", "latency_spread_b1", "latency_ms_b32", "latency_spread_b32", "throughput",
    "throughput_spread", and the per-round lists "*_rounds"}}}, "warnings": [lines]}``."""
    models = {name: (m if hasattr(m, "at_threads") else m.cpu()) for name, m in models.items()}
    x1 = batch_of(example_b1, 1)
    x32 = batch_of(example_b1 if example_b32 is None else example_b32, 32)
    counts = measurement_threads(threads)
    out = {"threads": counts, "primary_threads": counts[0], "batch_sizes": list(BATCH_SIZES), "by_threads": {},
           "warnings": []}
    for count in counts:
        at_count = {name: _at_threads(m, count) for name, m in models.items()}
        with torch_threads(count):
            one = timed_rounds(at_count, x1, repeats=repeats)
            many = timed_rounds(at_count, x32, repeats=repeats)
        at = out["by_threads"][str(count)] = {}
        for name in models:
            ms1 = [t * 1000 for t in one[name]]
            ms32 = [t * 1000 for t in many[name]]
            rate = [32 / t for t in many[name]]
            at[name] = {"latency_ms_b1": statistics.median(ms1), "latency_spread_b1": spread(ms1),
                        "latency_ms_b32": statistics.median(ms32), "latency_spread_b32": spread(ms32),
                        "throughput": statistics.median(rate), "throughput_spread": spread(rate),
                        "latency_ms_b1_rounds": ms1, "latency_ms_b32_rounds": ms32, "throughput_rounds": rate}
    out["warnings"] = _spread_warnings(out)
    return out


def _spread_warnings(timing: dict) -> list[str]:
    """One line when some measurement varies more than `SPREAD_WARNING` between rounds (as `measure_cost`)."""
    unstable = sorted(((entry[key], f"{name} {key.replace('_spread', '')} at {count} thread(s)")
                       for count, at in timing["by_threads"].items() for name, entry in at.items()
                       for key in ("latency_spread_b1", "latency_spread_b32")
                       if entry[key] > SPREAD_WARNING), reverse=True)
    if not unstable:
        return []
    return [f"warning: {len(unstable)} deployed timing(s) vary more than {100 * SPREAD_WARNING:.0f}% between "
            f"rounds (worst: {unstable[0][1]}, {100 * unstable[0][0]:.0f}%): another process is probably using "
            f"the CPU; the 1-thread numbers are the steadier ones"]


def artifact_bytes(file: Union[str, Path, None]) -> Optional[int]:
    """Size on disk of a deployed artifact: an ONNX file plus its external data, any other file, or a folder's
    files; None when there is no file."""
    if file is None:
        return None
    path = Path(file)
    if not path.exists():
        return None
    from kdistill.compress.export import file_bytes

    return file_bytes(path)


def deployed_row(name: str, *, runtime: str, file: Union[str, Path, None], metric: Mapping[str, Any],
                 agreement: Optional[float], timing: dict, key: Optional[str] = None) -> dict:
    """One row of summary.json's ``deployed`` list: the artifact (`file`, its bytes on disk), its quality
    (`metric`: e.g. accuracy / spearman / perplexity; `agreement`: top-1 agreement with the fp32 model) and its
    timing at the primary thread count plus every count's (`timing`: `deployed_timing`'s result, in which the
    model is named `key`, `name` by default)."""
    if runtime not in RUNTIMES:
        raise KDError(f"unknown runtime {runtime!r} for deployed row {name!r}", where="deployed",
                      fix=f"use one of {', '.join(RUNTIMES)}")
    key = name if key is None else key
    primary = str(timing["primary_threads"])
    by_threads = {count: {k: at[key][k] for k in _TIMING_KEYS} for count, at in timing["by_threads"].items()}
    head = by_threads[primary]
    return {"name": name, "runtime": runtime, "file": None if file is None else str(file),
            "bytes": artifact_bytes(file), **dict(metric), "agreement": agreement,
            "latency_ms_b1": head["latency_ms_b1"], "latency_ms_b32": head["latency_ms_b32"],
            "throughput": head["throughput"], "threads": timing["primary_threads"], "by_threads": by_threads,
            "batch_sizes": list(timing.get("batch_sizes", BATCH_SIZES))}


_ROW_KEYS = {"name", "runtime", "file", "bytes", "agreement", "latency_ms_b1", "latency_ms_b32", "throughput",
             "threads", "by_threads", "batch_sizes"}


def _number(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _metric_cell(row: Mapping[str, Any]) -> str:
    """The row's quality metrics (what `deployed_row` got as `metric`) as ``name value`` pairs."""
    items = [(k, v) for k, v in row.items() if k not in _ROW_KEYS and isinstance(v, (int, float))
             and not isinstance(v, bool)]
    return ", ".join(f"{k} {v:.4g}" for k, v in items) or "-"


def deployed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of deployed rows: name, runtime, metric, agreement, MB, ms@1, ms@32, samples/s,
    threads (timings at each row's primary thread count)."""
    header = ["name", "runtime", "metric", "agreement", "MB", "ms@1", "ms@32", "samples/s", "threads"]
    lines = [[str(row["name"]), str(row["runtime"]), _metric_cell(row), _number(row.get("agreement"), ".4f"),
              "-" if row.get("bytes") is None else f"{row['bytes'] / 1e6:.3f}",
              _number(row.get("latency_ms_b1"), ".3f"), _number(row.get("latency_ms_b32"), ".3f"),
              _number(row.get("throughput"), ".0f"), str(row.get("threads", "-"))] for row in rows]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    left = {0, 1, 2}
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])
