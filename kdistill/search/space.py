"""The search space against the config: dotted paths checked before any trial, values sampled by Optuna and
written into a copy of the raw config mapping."""

from __future__ import annotations

import copy
from typing import Any

from kdistill.configbase import apply_overrides
from kdistill.errors import ConfigError
from kdistill.search.config import ParamSpec

__all__ = ["assign", "check_space", "is_plain", "resolve_path", "suggest"]


def is_plain(choices: list) -> bool:
    """Choices Optuna stores as they are (None, bool, int, float, str); others are stored as their index."""
    return all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)


def resolve_path(raw: dict, path: str) -> list:
    """`path` as keys and list indices into `raw`: a list section is entered by index (``compress.0.prune``) or
    by kind, the first item naming it (``compress.prune.target``: the first prune step; a ``- prune`` shorthand
    item of `raw` is expanded to its mapping)."""
    keys: list = []
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, list):
            keys.append(part)
            node = node.get(part) if isinstance(node, dict) else None
            if node is None and keys == ["compress"]:
                node = []  # the compress section is a list (empty by default)
            continue
        where = ".".join(map(str, keys))
        if part.isdigit():
            index = int(part)
            if index >= len(node):
                raise ConfigError(f"search.space.{path}: {where} has {len(node)} items, no index {index}",
                                  fix="use the index of an existing item")
        else:
            named = [i for i, item in enumerate(node) if item == part or (isinstance(item, dict) and part in item)]
            if not named:
                raise ConfigError(f"search.space.{path}: no item of {where} is a {part!r}",
                                  fix=f"add a '{part}' item to {where}, or give an item's index")
            index = named[0]
            if node[index] == part:
                node[index] = {part: {}}
            keys.append(index)
            node = node[index]
            keys.append(part)
            node = node.get(part)
            continue
        if isinstance(node[index], str):  # the shorthand "- prune": its settings mapping
            node[index] = {node[index]: {}}
        keys.append(index)
        node = node[index]
    return keys


def assign(raw: dict, values: dict[str, Any]) -> dict:
    """A copy of the raw config mapping with each searched path set to its value."""
    out = copy.deepcopy(raw)
    for path, value in values.items():
        keys = resolve_path(out, path)
        node = out
        for key in keys[:-1]:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]
        node[keys[-1]] = copy.deepcopy(value)
    return out


def check_space(raw: dict, space: dict[str, ParamSpec], task) -> None:
    """Every path names a config field (the closest names are suggested otherwise) and every range end / choice
    gives a valid config: a one-line `ConfigError` naming ``search.space.<path>`` before any trial runs."""
    for path, spec in space.items():
        keys = resolve_path(copy.deepcopy(raw), path)
        dotted = ".".join(str(k) for k in keys)
        try:
            apply_overrides(raw, [f"{dotted}=null"], task.config)
        except ConfigError as err:
            raise ConfigError(f"search.space.{path}: {err.what.split(': ', 1)[-1]}", fix=err.fix) from None
        samples = spec.choices if spec.choices is not None else \
            ([int(spec.low), int(spec.high)] if spec.int else [spec.low, spec.high])
        for value in samples:
            try:
                task.parse(assign(raw, {path: value}), f"search.space.{path} = {value!r}")
            except ConfigError as err:
                raise ConfigError(err.what, fix=err.fix or "change the range or the choices") from None


def suggest(trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The trial's value of each searched path (Optuna's ``suggest_*``; a list of non-scalar choices is searched
    as its index)."""
    values: dict[str, Any] = {}
    for path, spec in space.items():
        if spec.choices is not None:
            if is_plain(spec.choices):
                values[path] = trial.suggest_categorical(path, spec.choices)
            else:
                values[path] = spec.choices[trial.suggest_categorical(path, list(range(len(spec.choices))))]
        elif spec.int:
            values[path] = trial.suggest_int(path, int(spec.low), int(spec.high), step=int(spec.step or 1),
                                             log=spec.log)
        else:
            values[path] = trial.suggest_float(path, spec.low, spec.high, step=spec.step, log=spec.log)
    return values
