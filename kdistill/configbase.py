"""Config building blocks on the ground floor: the strict pydantic base, one-line validation errors, YAML reading
and ``--set`` overrides. Every task's config (and each scheme's section) is built from these.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kdistill.errors import ConfigError

__all__ = ["Strict", "apply_overrides", "format_validation_error", "parse_override", "read_yaml", "validate"]


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not be silently ignored); so are NaN and infinite numbers (an
    infinite learning rate or weight passes 'greater than 0' and would fail only after training started)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _field_path(loc: tuple[Union[int, str], ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "form:")) or part.endswith("]"):
            continue  # validator wrappers and union tags (`form:...`, see kdistill.data.sources) are not fields
        elif i and loc[i - 1] == "scheme" and out == "scheme":
            continue  # the union tag (scheme name) is not a field
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line: the first problem, its field path, and what is allowed."""
    first = err.errors()[0]
    path = _field_path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif kind == "missing":
        msg = "required field is missing"
    elif kind == "literal_error":
        expected = (first.get("ctx") or {}).get("expected", "")
        got = repr(first.get("input"))
        msg = f"got {got if len(got) <= 80 else got[:77] + '...'}; allowed: {expected}"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = first.get("ctx") or {}
        msg = f"unknown name {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags', '')}" \
            if kind == "union_tag_invalid" else "the 'name' field is missing"
    elif "input" in first and kind not in ("value_error",):
        got = repr(first.get("input"))
        msg = f"{msg} (got {got if len(got) <= 80 else got[:77] + '...'})"
    msg = msg.replace("Value error, ", "")
    more = len(err.errors()) - 1
    tail = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
    return " ".join(f"{source}: {path}: {msg}{tail}".split())


def validate(model: type, data: Any, source: str = "config"):
    """`model.model_validate(data)` with every problem turned into a one-line `ConfigError`."""
    if data is None:
        raise ConfigError(f"{source}: the config is empty", fix="see examples/*.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of fields, got {type(data).__name__}",
                          fix="see examples/*.yaml")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    except (ValueError, RecursionError):  # a YAML alias cycle (&a ... *a) or absurdly deep nesting
        raise ConfigError(f"{source}: a value refers to itself (a YAML alias cycle) or is nested too deeply",
                          fix="write the value out instead of using an alias") from None


def read_yaml(path: Union[str, Path]) -> Any:
    """The parsed YAML of a config file; every unreadable file is a one-line `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", fix="give the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of thousands of digits, nesting too deep
        problem = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0][:120]
        raise ConfigError(f"{path}: unreadable YAML value: {problem}") from None
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a", "b", "c"], VALUE parsed as YAML)."""
    key, sep, raw = text.partition("=")
    path = [p for p in key.strip().split(".")]
    if not sep or not key.strip() or any(not p for p in path):
        raise ConfigError(f"--set {text!r}: expected a dotted path and a value, e.g. train.steps=200",
                          fix="write --set section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err})",
                          fix="quote the value, e.g. --set 'distill.taps={s: \"0\"}'") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str], model: type) -> dict:
    """Apply ``--set a.b=VALUE`` overrides to the raw config mapping `data` (a copy is returned).

    Each path is checked against the pydantic `model` as it is walked: a field that does not exist is refused
    with the closest valid names; free-form mappings (``kwargs``, ``params``, ``taps``) accept any key. The merged
    mapping is then validated by the caller with the same schema as a file."""
    import copy

    data = copy.deepcopy(data) if data is not None else {}
    for text in overrides:
        path, value = parse_override(text)
        node, schema = data, model
        for depth, part in enumerate(path):
            where = ".".join(path[:depth + 1])
            if isinstance(node, list):  # an item of a list section, by index: scheme.teachers.0.train.steps
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {text!r}: '{where}': {'.'.join(path[:depth])} is a list of "
                                      f"{len(node)} items", fix=f"use an index from 0 to {len(node) - 1}")
                key: Any = int(part)
                item_schema = schema
            else:
                fields = _fields_of(schema)
                if fields is not None and part not in fields:
                    close = difflib.get_close_matches(part, sorted(fields), n=3, cutoff=0.5)
                    hint = f"did you mean {', '.join('.'.join(path[:depth] + [c]) for c in close)}? " \
                        if close else ""
                    raise ConfigError(f"--set {text!r}: '{where}' is not a config field",
                                      fix=f"{hint}valid here: {', '.join(sorted(fields))}")
                key, item_schema = part, None
            if depth == len(path) - 1:
                node[key] = value
                break
            child = node[key] if isinstance(node, list) else node.get(key)
            if child is None:
                child = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {text!r}: '{where}' is a value, not a section",
                                  fix=f"set it whole: --set {where}=...")
            node[key] = child
            if item_schema is not None:
                schema = _model_in(item_schema, child) if isinstance(child, dict) else item_schema
            elif isinstance(child, list):
                schema = _list_item_annotation(schema, part)
            else:
                schema = _field_model(schema, part, child)
            node = child
    return data


def _list_item_annotation(schema: Any, name: str) -> Any:
    """The item annotation of list field `name` of `schema` (None when unknown)."""
    import typing

    field = schema.model_fields.get(name) if isinstance(schema, type) and issubclass(schema, BaseModel) else None
    if field is None:
        return None
    for arg in (field.annotation, *typing.get_args(field.annotation)):
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return None


def _fields_of(schema: Any):
    """The field names of `schema` (None when free-form: any key allowed)."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        names = set(schema.model_fields)
        names |= {f.alias for f in schema.model_fields.values() if f.alias}
        return names
    return None


def _field_model(schema: Any, name: str, node: dict):
    """The pydantic model of field `name` of `schema` (a union picks its member by the node's 'name')."""
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return None
    field = schema.model_fields.get(name)
    if field is None:
        field = next((f for f in schema.model_fields.values() if f.alias == name), None)
    if field is None:
        return None
    return _model_in(field.annotation, node)


def _model_in(annotation: Any, node: dict):
    import typing

    if annotation is None:
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    models = [m for m in (_model_in(a, node) for a in args) if m is not None]
    if len(models) == 1:
        return models[0]
    tag = node.get("name") if isinstance(node, dict) else None
    for m in models:  # a discriminated union (e.g. scheme): the member whose name literal matches
        literal = m.model_fields.get("name")
        if literal is not None and tag in typing.get_args(literal.annotation):
            return m
    return None
