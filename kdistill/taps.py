"""Taps: capture intermediate outputs of any model by dotted module path, with forward hooks.

A tap spec is ``"module.path"`` or ``"module.path:selector"``; the selector picks from a tuple/list output by
index (``:0``), from a dict or a Hugging Face ``ModelOutput`` by key (``:last_hidden_state``), and may chain
(``:hidden_states.3``); ``:0`` on a plain tensor output is the tensor itself. The model's code is never changed. ``""`` (empty path) taps the model's own output.

    taps = Taps(model, {"feat": "features.2", "attn": "encoder.layer.1.attention.self:1"})
    with taps:                      # hooks registered; removed on exit
        out = model(x)
        feats = taps.pop()          # {"feat": tensor, "attn": tensor}
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import torch
from torch import nn

from kdistill.errors import TapError


def parse_spec(spec: str) -> tuple[str, list[str]]:
    path, _, selector = spec.partition(":")
    parts = [p for p in selector.split(".") if p] if selector else []
    return path.strip(), parts


def select(value: Any, parts: list[str], spec: str = "") -> Any:
    """Apply a selector chain (indices or keys) to a module output."""
    for part in parts:
        if torch.is_tensor(value) and part == "0":
            # Hugging Face layers return a tuple in some versions and the bare hidden states in others:
            # ':0' on a tensor means the tensor itself, so one config works with both.
            continue
        if isinstance(value, (tuple, list)):
            try:
                value = value[int(part)]
            except (ValueError, IndexError):
                raise TapError(f"tap '{spec}': output is a {type(value).__name__} of length {len(value)}, "
                               f"cannot select '{part}'", fix="use an index from 0 to len-1") from None
        elif isinstance(value, Mapping) or hasattr(value, "keys"):
            keys = list(value.keys())
            if part not in keys:
                raise TapError(f"tap '{spec}': output has no key '{part}'", fix=f"choose one of {keys}")
            value = value[part]
        elif hasattr(value, part):
            value = getattr(value, part)
        else:
            raise TapError(f"tap '{spec}': cannot select '{part}' from a {type(value).__name__}")
    return value


def find_module(model: nn.Module, path: str, spec: str | None = None) -> nn.Module:
    """The submodule at a dotted path, or a TapError listing the closest existing names."""
    if path == "":
        return model
    names = dict(model.named_modules())
    if path in names:
        return names[path]
    close = difflib.get_close_matches(path, [n for n in names if n], n=5, cutoff=0.4)
    if not close:  # fall back to names sharing the last component
        last = path.split(".")[-1]
        close = [n for n in names if n.endswith(last)][:5]
    hint = f"closest: {', '.join(close)}" if close else "list names with model.named_modules()"
    raise TapError(f"no module '{path}' in {type(model).__name__}", where=f"tap '{spec or path}'", fix=hint)


class Taps:
    """Forward hooks on named module paths of one model. Each forward stores the latest output per tap."""

    def __init__(self, model: nn.Module, specs: Mapping[str, str], detach: bool = False):
        self.model = model
        self.specs = dict(specs)
        self.detach = detach
        self._targets = {}
        for name, spec in self.specs.items():
            path, parts = parse_spec(spec)
            self._targets[name] = (find_module(model, path, spec), parts, spec)
        self._handles: list = []
        self._values: dict[str, Any] = {}

    def _hook(self, name: str, parts: list[str], spec: str):
        def hook(module, inputs, output):
            value = select(output, parts, spec)
            self._values[name] = value.detach() if self.detach and torch.is_tensor(value) else value
        return hook

    def attach(self) -> "Taps":
        if not self._handles:
            for name, (module, parts, spec) in self._targets.items():
                self._handles.append(module.register_forward_hook(self._hook(name, parts, spec)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._values.clear()

    def pop(self) -> dict[str, Any]:
        """The values captured since the last pop; a tap whose module did not run is an error."""
        missing = [n for n in self.specs if n not in self._values]
        if missing:
            raise TapError(f"tap(s) {missing} captured nothing in the last forward",
                           where=f"{type(self.model).__name__}",
                           fix="the module did not run; check the path (e.g. a branch not taken)")
        values, self._values = self._values, {}
        return values

    def __enter__(self) -> "Taps":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.specs)
