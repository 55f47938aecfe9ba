"""Black-box teachers: a Python callable or a local HTTP endpoint that answers labels, probabilities or top-k.

``ApiTeacher`` sends input rows to the black box in requests of ``batch_size`` rows, within a query budget (rows
sent, counted across restarts in the answer cache: a run that would pass it stops before sending anything),
retries connection errors, HTTP 5xx and 429 with bounded exponential back-off, and writes every answer through to
the persistent `AnswerCache` (SQLite), so a restarted run never pays for a row twice.

Answers become training targets as follows (``probabilities``): probabilities are used as given (renormalised);
a top-k answer keeps its k probabilities and spreads the remaining mass evenly over the other classes; a hard
label becomes ``(1 - eps) * one_hot + eps / C`` (``label_smoothing`` eps). Every distribution is floored at
``1e-8`` and renormalised. `ApiTeacherModel` returns the log of that distribution as the teacher's logits:
for a softmax teacher ``log p = z - logsumexp(z)`` differs from its true logits ``z`` by one constant per row,
so ``softmax(log p / T) = softmax(z / T)`` and a KD temperature acts exactly as it would on the hidden logits
(the answer being the full, unrounded distribution). For top-k and hard-label answers the temperature softens
the reconstructed distribution instead.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kdistill.errors import KDError
from kdistill.teachers.api_cache import AnswerCache

RETRY_STATUS = (429, 500, 502, 503, 504)
FLOOR = 1e-8
DEFAULT_FIELDS = {"inputs": "inputs", "labels": "labels", "probs": "probs", "topk": "topk", "indices": "indices",
                  "topk_probs": "probs"}


class ApiError(KDError):
    """The black-box teacher cannot be reached, refuses the request, or answers something unusable."""


class Retryable(Exception):
    """A failure worth retrying (connection error, HTTP 5xx or 429), with the server's Retry-After if any."""

    def __init__(self, reason: str, retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


# ------------------------------------------------------------------------------------------------------------
# backends: numpy rows in, a raw answer out
# ------------------------------------------------------------------------------------------------------------

class CallableBackend:
    """A Python function ``rows -> answer`` by import path (``module:function``); with `kwargs`, the path names a
    factory called once as ``factory(**kwargs)`` that returns the function. ``as_torch`` passes a tensor."""

    def __init__(self, target: str, kwargs: Optional[Mapping[str, Any]] = None, *, as_torch: bool = False,
                 where: str = "teacher.call"):
        from kdistill.models import resolve_factory

        obj = resolve_factory(target, where)
        if kwargs:
            try:
                obj = obj(**kwargs)
            except TypeError as err:
                raise ApiError(f"cannot build the teacher function '{target}': {err}", where="teacher.kwargs",
                               fix="check the factory's keyword arguments") from None
        if not callable(obj):
            raise ApiError(f"'{target}' did not give a callable", where=where)
        self.fn, self.target, self.where, self.as_torch = obj, target, where, as_torch
        self.identity = f"call:{target}|kwargs:{json.dumps(dict(kwargs or {}), sort_keys=True, default=str)}|" \
                        f"{getattr(obj, 'identity', '')}"

    def __call__(self, rows: np.ndarray) -> Any:
        try:
            return self.fn(torch.from_numpy(rows) if self.as_torch else rows)
        except (ConnectionError, TimeoutError) as err:
            raise Retryable(f"{type(err).__name__}: {err}") from None


class HttpBackend:
    """POST ``{fields.inputs: [[...], ...]}`` as JSON to `url`; the answer is the parsed JSON body."""

    def __init__(self, url: str, fields: Optional[Mapping[str, str]] = None, *, timeout: float = 30.0,
                 where: str = "teacher.url"):
        self.url, self.timeout, self.where = url, float(timeout), where
        self.fields = {**DEFAULT_FIELDS, **(fields or {})}
        self.identity = f"url:{url}|fields:{json.dumps(self.fields, sort_keys=True)}"

    def __call__(self, rows: np.ndarray) -> Any:
        body = json.dumps({self.fields["inputs"]: rows.tolist()}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as err:
            if err.code in RETRY_STATUS:
                after = err.headers.get("Retry-After") if err.headers else None
                raise Retryable(f"HTTP {err.code}", _seconds(after)) from None
            raise ApiError(f"the teacher API at {self.url} refused the request: HTTP {err.code} {err.reason}",
                           where=self.where, fix="check the URL and the request fields (teacher.fields)") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                TimeoutError) as err:
            raise Retryable(str(getattr(err, "reason", err))) from None
        try:
            return json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(f"the teacher API at {self.url} answered something that is not JSON "
                           f"({text[:60]!r})", where=self.where,
                           fix="make the endpoint answer a JSON object with labels, probs or topk") from None


def _seconds(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------------------
# answers: raw -> one small dict per row ({"l": label} | {"p": probs} | {"i": indices, "p": probs})
# ------------------------------------------------------------------------------------------------------------

def parse_answers(raw: Any, rows: int, fields: Optional[Mapping[str, str]] = None,
                  where: str = "teacher") -> list[dict]:
    """The per-row answers of one request of `rows` rows; ApiError naming what is wrong otherwise."""
    f = {**DEFAULT_FIELDS, **(fields or {})}
    if isinstance(raw, tuple) and len(raw) == 2:
        raw = {f["topk"]: {f["indices"]: raw[0], f["topk_probs"]: raw[1]}}
    elif not isinstance(raw, Mapping):
        array = _array(raw, where, "the answer")
        raw = {f["labels"] if array.ndim == 1 else f["probs"]: array}
    try:
        if f["probs"] in raw:
            probs = _probabilities(_array(raw[f["probs"]], where, f["probs"]), rows, where, f["probs"])
            return [{"p": row.tolist()} for row in probs]
        if f["topk"] in raw:
            top = raw[f["topk"]]
            if not isinstance(top, Mapping):
                raise ValueError(f"'{f['topk']}' must be an object with '{f['indices']}' and '{f['topk_probs']}'")
            indices = _array(top[f["indices"]], where, f["indices"])
            probs = _array(top[f["topk_probs"]], where, f["topk_probs"])
            if indices.shape != probs.shape or indices.ndim != 2 or len(indices) != rows:
                raise ValueError(f"top-k indices {indices.shape} and probs {probs.shape} must both be ({rows}, k)")
            if (indices != np.round(indices)).any() or (indices < 0).any():
                raise ValueError("top-k indices must be non-negative integers")
            _probabilities(probs, rows, where, f["topk_probs"], partial=True)
            return [{"i": i.astype(int).tolist(), "p": p.tolist()} for i, p in zip(indices, probs)]
        if f["labels"] in raw:
            labels = _array(raw[f["labels"]], where, f["labels"]).reshape(-1)
            if len(labels) != rows:
                raise ValueError(f"{len(labels)} labels for {rows} rows")
            if (labels != np.round(labels)).any() or (labels < 0).any():
                raise ValueError("labels must be non-negative class indices")
            return [{"l": int(v)} for v in labels]
    except KeyError as err:
        raise ApiError(f"the teacher's top-k answer has no field {err}", where=where,
                       fix="set teacher.fields to the endpoint's names") from None
    except ValueError as err:
        raise ApiError(f"the teacher's answer is unusable: {err}", where=where,
                       fix="answer one label, probability row or top-k row per input row") from None
    keys = ", ".join(repr(k) for k in list(raw)[:5])
    raise ApiError(f"the teacher's answer has none of the fields '{f['labels']}', '{f['probs']}', '{f['topk']}' "
                   f"(it has {keys or 'none'})", where=where, fix="set teacher.fields to the endpoint's field names")


def _array(value: Any, where: str, name: str) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ApiError(f"the teacher's '{name}' is not an array of numbers", where=where,
                       fix="answer lists of numbers") from None
    if not np.isfinite(array).all():
        raise ApiError(f"the teacher's '{name}' holds NaN or Inf", where=where, fix="check the teacher")
    return array


def _probabilities(probs: np.ndarray, rows: int, where: str, name: str, *, partial: bool = False) -> np.ndarray:
    if probs.ndim != 2 or len(probs) != rows:
        raise ValueError(f"'{name}' has shape {probs.shape}, expected ({rows}, classes)")
    total = probs.sum(1)
    if (probs < 0).any() or (total > 1.01).any() or (not partial and (total < 0.99).any()):
        raise ValueError(f"'{name}' rows must be probabilities (>= 0, summing to 1; row sums "
                         f"{total.min():.3g}..{total.max():.3g})")
    return probs if partial else probs / total[:, None]


def distributions(answers: Sequence[dict], num_classes: int, label_smoothing: float = 0.0,
                  where: str = "teacher") -> np.ndarray:
    """The ``(N, C)`` float64 target distributions of parsed answers (see the module docstring)."""
    out = np.zeros((len(answers), num_classes))
    for row, answer in zip(out, answers):
        if "l" in answer:
            if answer["l"] >= num_classes:
                raise ApiError(f"the teacher answered class {answer['l']} but the data has {num_classes} classes",
                               where=where, fix="map the teacher's classes to 0..C-1")
            row[:] = label_smoothing / num_classes
            row[answer["l"]] += 1.0 - label_smoothing
        elif "i" in answer:
            idx = np.asarray(answer["i"], dtype=np.int64)
            if idx.size and idx.max() >= num_classes:
                raise ApiError(f"the teacher's top-k names class {idx.max()} but the data has {num_classes} classes",
                               where=where, fix="map the teacher's classes to 0..C-1")
            rest = num_classes - len(set(idx.tolist()))
            row[:] = max(0.0, 1.0 - float(np.sum(answer["p"]))) / rest if rest else 0.0
            row[idx] = answer["p"]
        else:
            if len(answer["p"]) != num_classes:
                raise ApiError(f"the teacher answered {len(answer['p'])} probabilities per row but the data has "
                               f"{num_classes} classes", where=where, fix="the teacher must score every class")
            row[:] = answer["p"]
    out = np.maximum(out, FLOOR)
    return out / out.sum(1, keepdims=True)


# ------------------------------------------------------------------------------------------------------------
# the teacher
# ------------------------------------------------------------------------------------------------------------

class ApiTeacher:
    """A black box with a budget, batching, bounded retries and a write-through answer cache.

    Args:
        backend: ``rows (np.float32 array) -> raw answer`` (`CallableBackend`, `HttpBackend` or any callable;
            raise `Retryable` for failures worth retrying).
        cache: the `AnswerCache` (its identity must name this teacher).
        budget: most rows ever sent for this teacher identity (None: no limit).
        batch_size: rows per request. retries: extra attempts per request. backoff: first wait in seconds,
        doubled each attempt, at most `max_backoff` (a server's Retry-After is honoured up to that bound).
    """

    def __init__(self, backend: Callable[[np.ndarray], Any], cache: AnswerCache, *, budget: Optional[int] = None,
                 batch_size: int = 64, retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0,
                 fields: Optional[Mapping[str, str]] = None, where: str = "teacher",
                 sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print):
        self.backend, self.cache, self.budget = backend, cache, budget
        self.batch_size, self.retries, self.backoff, self.max_backoff = batch_size, retries, backoff, max_backoff
        self.fields, self.where, self.sleep, self.log = fields, where, sleep, log
        self.requests = 0  # requests sent by this object (attempts included)

    def answers(self, rows: np.ndarray) -> list[dict]:
        """The parsed answer of every row, asking the black box only for rows not in the cache."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        keys = self.cache.keys(rows)
        missing = self.cache.missing(keys)
        if missing:
            self._query(rows, keys, missing)
        got = self.cache.get(keys)
        return [got[k] for k in keys]

    def probabilities(self, rows: np.ndarray, num_classes: int, label_smoothing: float = 0.0) -> np.ndarray:
        return distributions(self.answers(rows), num_classes, label_smoothing, self.where)

    def check_budget(self, missing: int) -> None:
        """ApiError (nothing sent) when `missing` more rows would pass the budget."""
        sent = self.cache.sent()
        if self.budget is not None and sent + missing > self.budget:
            raise ApiError(f"the teacher's query budget of {self.budget} rows is too small: these inputs need "
                           f"{missing} rows not yet answered and {sent} were already sent; nothing was sent",
                           where=f"{self.where}.budget",
                           fix=f"raise teacher.budget to at least {sent + missing}, or use fewer inputs "
                               f"(data.train_size, data.transfer)")

    def _query(self, rows: np.ndarray, keys: list[str], missing: list[str]) -> None:
        self.check_budget(len(missing))
        position = {}
        for i, key in enumerate(keys):
            position.setdefault(key, i)
        for lo in range(0, len(missing), self.batch_size):
            batch_keys = missing[lo:lo + self.batch_size]
            batch = rows[[position[k] for k in batch_keys]]
            self.cache.reserve(len(batch_keys), self.budget)
            try:
                parsed = parse_answers(self._send(batch), len(batch_keys), self.fields, self.where)
            except BaseException:
                self.cache.release(len(batch_keys))
                raise
            self.cache.put(dict(zip(batch_keys, parsed)))

    def _send(self, batch: np.ndarray) -> Any:
        for attempt in range(self.retries + 1):
            self.requests += 1
            try:
                return self.backend(batch)
            except Retryable as err:
                if attempt == self.retries:
                    raise ApiError(f"the teacher did not answer after {attempt + 1} attempt(s): {err.reason}",
                                   where=self.where, fix="check that the endpoint is running and reachable, or "
                                                         "raise teacher.retries / teacher.backoff") from None
                wait = min(self.max_backoff, self.backoff * 2 ** attempt)
                if err.retry_after is not None:
                    wait = min(self.max_backoff, max(wait, err.retry_after))
                self.log(f"teacher: {err.reason}; retrying in {wait:.2f} s ({attempt + 1}/{self.retries})")
                self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


class ApiTeacherModel(nn.Module):
    """A black-box teacher as a module: ``x -> log p`` (the answered distribution, used as logits)."""

    def __init__(self, teacher: ApiTeacher, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        self.teacher, self.num_classes, self.label_smoothing = teacher, int(num_classes), float(label_smoothing)
        # an empty frozen parameter: code that finds a model's device from its parameters works on the black box
        self.device_probe = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.teacher.probabilities(x.detach().float().cpu().numpy(), self.num_classes, self.label_smoothing)
        return torch.from_numpy(np.log(probs)).float().to(x.device)

    def label(self, *datasets: Any) -> int:
        """Ask for every row of `datasets` (`ArrayDataset`s or arrays) up front, in one budget check; returns the
        number of rows the black box was asked for."""
        before = self.teacher.cache.sent()
        self.teacher.answers(stacked_rows(datasets))
        return self.teacher.cache.sent() - before


def black_box(num_classes: int, answers: str, *, url: Optional[str] = None, call: Optional[str] = None,
              kwargs: Optional[Mapping[str, Any]] = None, identity: str = "", label_smoothing: float = 0.1,
              fields: Optional[Mapping[str, str]] = None, timeout: float = 30.0, **options: Any) -> ApiTeacherModel:
    """A black-box teacher module from Python (e.g. for `kdistill.distill`): `url` or `call` (with `kwargs`), its
    answer cache file `answers`, and `ApiTeacher` options (budget, batch_size, retries, backoff, max_backoff)."""
    if (url is None) == (call is None):
        raise ApiError("give exactly one of url or call", where="black_box")
    backend = HttpBackend(url, fields, timeout=timeout) if url is not None else CallableBackend(call, kwargs)
    cache = AnswerCache(answers, f"{backend.identity}|{identity}")
    return ApiTeacherModel(ApiTeacher(backend, cache, fields=fields, **options), num_classes, label_smoothing)


def stacked_rows(datasets: Sequence[Any]) -> np.ndarray:
    """The inputs of `ArrayDataset`s (or arrays / tensors) stacked into one float32 array."""
    parts = [d.tensors["x"] if hasattr(d, "tensors") else torch.as_tensor(d) for d in datasets if d is not None]
    return torch.cat([p.float() for p in parts]).numpy()


__all__ = ["ApiError", "ApiTeacher", "ApiTeacherModel", "CallableBackend", "black_box", "HttpBackend", "Retryable",
           "distributions", "parse_answers", "stacked_rows"]
