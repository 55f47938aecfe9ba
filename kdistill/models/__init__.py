"""Model zoo and builders: built-in names, or any factory by import path 'package.module:factory'."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import nn

from kdistill.errors import ConfigError
from kdistill.models.zoo import CNN1d, CNN2d, MLP, ResNet

BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn1d": CNN1d, "cnn2d": CNN2d,
                                                       "resnet": ResNet}
# the folders of the config files read in this process (`kdistill.tasks.load_any` adds them): model import paths
# are also looked up there, after the working directory
CONFIG_FOLDERS: list[Path] = []


def add_config_folder(folder: Optional[Path]) -> None:
    if folder is not None and Path(folder).resolve() not in CONFIG_FOLDERS:
        CONFIG_FOLDERS.append(Path(folder).resolve())


def import_roots(extra: Iterable[Path] = ()) -> list[Path]:
    """Where a model's import path is looked for besides the installed packages: the working directory, then
    `extra` (the config file's folder), as ``python -m`` and similar tools do."""
    roots: list[Path] = []
    for folder in (Path.cwd(), *extra):
        folder = Path(folder).resolve()
        if folder not in roots:
            roots.append(folder)
    return roots


def import_module(module_name: str, *, roots: Iterable[Path] = (), where: str = "model.name"):
    """Import `module_name` from the installed packages, else from the first of `import_roots(roots)` that holds
    its top-level package (that folder is then appended to ``sys.path``, so the package's own imports work)."""
    top = module_name.split(".")[0]
    searched = import_roots(roots)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:  # the module itself imports something missing
            raise ConfigError(f"importing '{module_name}' failed: {err}", where=where,
                              fix="install what that module imports") from None
    except ImportError as err:
        raise ConfigError(f"importing '{module_name}' failed: {err}", where=where,
                          fix="check the module's own imports") from None
    for folder in searched:
        if (folder / f"{top}.py").is_file() or (folder / top).is_dir():
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
            importlib.invalidate_caches()
            try:
                return importlib.import_module(module_name)
            except ImportError as err:
                raise ConfigError(f"importing '{module_name}' from {folder} failed: {err}", where=where,
                                  fix="check the module path and the module's own imports") from None
    looked = ", ".join(str(f) for f in searched)
    raise ConfigError(f"cannot import module '{module_name}': no '{top}.py' or '{top}/' in {looked}, nor among the "
                      f"installed packages", where=where,
                      fix=f"run from the folder that holds '{top}', put it next to the config file, "
                          f"'pip install -e' its project, or add its folder to PYTHONPATH")


def resolve_factory(name: str, where: str = "model.name", *, roots: Iterable[Path] = ()) -> Callable[..., nn.Module]:
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model '{name}' is neither built-in nor 'package.module:factory'", where=where,
                          fix=f"use one of {', '.join(sorted(BUILTIN_MODELS))}")
    module = import_module(module_name, roots=roots or CONFIG_FOLDERS, where=where)
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


__all__ = ["BUILTIN_MODELS", "CNN1d", "CNN2d", "MLP", "ResNet", "add_config_folder", "build_model", "count_params",
           "import_module", "import_roots", "resolve_factory"]
