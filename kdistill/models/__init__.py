"""Model zoo and builders: built-in names, or any factory by import path 'package.module:factory'."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Sequence

from torch import nn

from kdistill.errors import ConfigError
from kdistill.models.zoo import CNN1d, CNN2d, MLP, ResNet

BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn1d": CNN1d, "cnn2d": CNN2d,
                                                       "resnet": ResNet}


def resolve_factory(name: str, where: str = "model.name") -> Callable[..., nn.Module]:
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model '{name}' is neither built-in nor 'package.module:factory'", where=where,
                          fix=f"use one of {', '.join(sorted(BUILTIN_MODELS))}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import module '{module_name}': {err}", where=where,
                          fix="check the import path and that the package is installed") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module '{module_name}' has no attribute '{attr}'", where=where)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"'{name}' is not callable", where=where)
    return obj


def build_model(name: str, kwargs: dict[str, Any] | None = None, *, input_shape: Sequence[int] | None = None,
                num_classes: int | None = None, where: str = "model") -> nn.Module:
    """Build a model; `input_shape` and `num_classes` are passed when the factory accepts them."""
    factory = resolve_factory(name, f"{where}.name")
    kwargs = dict(kwargs or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (("input_shape", input_shape), ("num_classes", num_classes)):
        if value is not None and key in params and key not in kwargs:
            kwargs[key] = tuple(value) if key == "input_shape" else value
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"cannot build '{name}': {err}", where=f"{where}.kwargs",
                          fix="check the keyword arguments of the factory") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"'{name}' returned {type(model).__name__}, not a torch.nn.Module", where=f"{where}.name")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["BUILTIN_MODELS", "CNN1d", "CNN2d", "MLP", "ResNet", "build_model", "count_params", "resolve_factory"]
