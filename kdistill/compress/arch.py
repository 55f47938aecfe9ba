"""A compressed model's architecture as JSON, so it reloads without the library that compressed it.

Pruning (`kdistill.compress.prune`) and low-rank factorization (`kdistill.compress.low_rank`) change layer shapes
and types, so a compressed state dict no longer fits the model its builder makes. `architecture(model)` records
the constructor arguments of every layer of a known type; `rebuild(fresh_model, spec)` replaces the layers whose
recorded arguments differ with freshly constructed ones, after which ``fresh_model.load_state_dict(saved)``
restores the compressed model exactly. Nothing here imports torch-pruning.

Spec format (JSON)::

    {"format": 1,
     "modules": {"features.0.0": {"type": "Conv2d", "args": {"in_channels": 3, "out_channels": 12, ...}}, ...},
     "attrs": {"encoder.layer.0.attention.self": {"all_head_size": 32}, ...}}

``attrs`` holds plain integer attributes that shape a module's forward pass (attention head counts and sizes)
and an HF model's ``config.intermediate_size`` (under the path of the module that first holds the config).

Also here, shared by pruning and factorization: `call_model` (a forward pass on an example that is a tensor, a
tuple of positional arguments or a dict of keyword arguments) and `output_layers` (the layers whose outputs are
the model's outputs, i.e. the classifier, which compression must leave whole).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from kdistill.errors import KDError

__all__ = ["FORMAT", "architecture", "call_model", "describe", "load_spec", "output_layers", "rebuild",
           "save_spec", "under"]

FORMAT = 1
# integer attributes that size a module's forward (HF attention modules); recorded when present
SHAPE_ATTRS = ("num_attention_heads", "attention_head_size", "all_head_size", "num_heads", "head_dim", "embed_dim")
CONFIG_ATTRS = ("intermediate_size",)


# -- forward passes and the output layer --------------------------------------------------------------------------
def call_model(model: nn.Module, example: Any):
    """``model(**example)`` for a dict, ``model(*example)`` for a tuple/list, else ``model(example)``."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a nested output (tensor, tuple/list, dict or HF ``ModelOutput``), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flat_tensors(item)]
    return []


def under(path: str, prefixes: Iterable[str]) -> bool:
    """True when module `path` is one of `prefixes` or inside one (``a.b`` is under ``a``)."""
    return any(path == p or path.startswith(p + ".") for p in prefixes if p)


LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() == b.numel()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensor subclasses without storage
        return a is b


def output_layers(model: nn.Module, example: Any) -> list[str]:
    """Paths of the Linear/Conv layers that produce the model's outputs (the classifier), from one forward pass.

    A layer counts when its output tensor *is* a model output, or shares its storage and size (a view such as
    ``.squeeze()`` or ``.flatten(1)`` of it). When none does and the model returns a single (B, C) tensor, the
    last layer run whose output width (last dim for Linear, dim 1 for a conv) equals C is taken. Runs in eval
    mode (no BatchNorm statistics updated, no dropout) without gradients; the mode is restored.
    """
    runs: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for path, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, path=path: runs.append((path, o)) if isinstance(o, torch.Tensor) else None))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    outputs = flat_tensors(out)
    found = [path for path, o in runs if any(o is t or _same_storage(o, t) for t in outputs)]
    if not found and isinstance(out, torch.Tensor) and out.dim() == 2:
        classes = out.shape[-1]
        for path, o in reversed(runs):
            module = model.get_submodule(path)
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            if width == classes:
                found = [path]
                break
    return list(dict.fromkeys(found))


# -- layer specs ------------------------------------------------------------------------------------------------
def _conv_args(m: nn.Module) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


def _bn_args(m: nn.Module) -> dict:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _registry() -> dict[str, tuple[type, Callable[[nn.Module], dict]]]:
    """type name -> (class, constructor arguments of an instance). Composite types (the low-rank layers) build
    their own children, so their children are not recorded separately."""
    from kdistill.compress.low_rank import LowRankConv, LowRankLinear

    return {
        "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                         "bias": m.bias is not None}),
        "Conv1d": (nn.Conv1d, _conv_args),
        "Conv2d": (nn.Conv2d, _conv_args),
        "Conv3d": (nn.Conv3d, _conv_args),
        "BatchNorm1d": (nn.BatchNorm1d, _bn_args),
        "BatchNorm2d": (nn.BatchNorm2d, _bn_args),
        "BatchNorm3d": (nn.BatchNorm3d, _bn_args),
        "LayerNorm": (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                               "elementwise_affine": m.elementwise_affine,
                                               "bias": getattr(m, "bias", None) is not None}),
        "GroupNorm": (nn.GroupNorm, lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels,
                                               "eps": m.eps, "affine": m.affine}),
        "Embedding": (nn.Embedding, lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                                               "padding_idx": m.padding_idx, "max_norm": m.max_norm,
                                               "norm_type": m.norm_type, "scale_grad_by_freq": m.scale_grad_by_freq,
                                               "sparse": m.sparse}),
        "PReLU": (nn.PReLU, lambda m: {"num_parameters": m.num_parameters}),
        "LowRankLinear": (LowRankLinear, lambda m: m.spec_args()),
        "LowRankConv": (LowRankConv, lambda m: m.spec_args()),
    }


COMPOSITE = ("LowRankLinear", "LowRankConv")


def describe(module: nn.Module) -> Optional[dict]:
    """``{"type": name, "args": {...}}`` of a module of a known type (exact class match), else None."""
    for name, (cls, args) in _registry().items():
        if type(module) is cls:
            return {"type": name, "args": args(module)}
    return None


def architecture(model: nn.Module) -> dict:
    """The JSON spec of `model`: every module of a known type (not inside a low-rank layer) with its constructor
    arguments, plus the shape attributes of attention modules and HF configs' ``intermediate_size``."""
    modules: dict[str, dict] = {}
    attrs: dict[str, dict] = {}
    composite: list[str] = []
    configs: set[int] = set()
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in configs:  # an HF config, recorded where first held
            configs.add(id(config))
            found = {f"config.{a}": getattr(config, a) for a in CONFIG_ATTRS
                     if isinstance(getattr(config, a, None), int)}
            if found:
                attrs[path] = found
        if not path or under(path, composite):
            continue
        spec = describe(module)
        if spec is not None:
            modules[path] = spec
            if spec["type"] in COMPOSITE:
                composite.append(path)
        found = {a: getattr(module, a) for a in SHAPE_ATTRS
                 if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)}
        if found:
            attrs[path] = {**attrs.get(path, {}), **found}
    return {"format": FORMAT, "modules": modules, "attrs": attrs}


def _construct(spec: dict, path: str, where: str) -> nn.Module:
    registry = _registry()
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in registry:
        raise KDError(f"unknown layer type {kind!r} at '{path}' in the architecture spec", where=where,
                      fix=f"known types: {', '.join(sorted(registry))}; write the spec with kdistill.compress.arch")
    cls, _ = registry[kind]
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(spec.get("args") or {}).items()}
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise KDError(f"cannot build {kind} at '{path}' from the spec: {err}", where=where,
                      fix="the spec is damaged or from another version; re-create it") from None


def _reference(module: nn.Module, model: nn.Module) -> Optional[torch.Tensor]:
    for source in (module, model):
        for t in list(source.parameters()) + list(source.buffers()):
            if t.is_floating_point():
                return t
    return None


def _set_dotted(obj: Any, name: str, value: Any) -> None:
    *parents, last = name.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _get_dotted(obj: Any, name: str) -> Any:
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj


def rebuild(model: nn.Module, spec: dict, *, where: str = "compress.arch") -> nn.Module:
    """Make `model` (built by the original builder) match `spec`, in place: each recorded module whose current
    type or arguments differ is replaced by a fresh one of the recorded type and arguments (on the old module's
    device and dtype; weights are whatever `load_state_dict` loads next); recorded attributes are set.
    Parents are rebuilt before their children. Returns `model`."""
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("modules"), dict):
        raise KDError("not an architecture spec (format 1)", where=where,
                      fix="pass the dict written by kdistill.compress.arch.architecture / save_spec")
    for path in sorted(spec["modules"], key=lambda p: (p.count("."), p)):
        recorded = spec["modules"][path]
        try:
            current = model.get_submodule(path)
        except AttributeError:
            raise KDError(f"the model has no module '{path}' recorded in the architecture spec", where=where,
                          fix="build the model with the same builder and arguments as the compressed one") from None
        if describe(current) == {"type": recorded.get("type"), "args": recorded.get("args")}:
            continue
        fresh = _construct(recorded, path, where)
        ref = _reference(current, model)
        if ref is not None:
            fresh = fresh.to(device=ref.device, dtype=ref.dtype)
        fresh.train(current.training)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, fresh)
    for path, values in (spec.get("attrs") or {}).items():
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise KDError(f"the model has no module '{path}' recorded in the architecture spec", where=where,
                          fix="build the model with the same builder and arguments as the compressed one") from None
        for name, value in values.items():
            if _get_dotted(module, name) != value:
                _set_dotted(module, name, value)
    return model


def save_spec(path, spec: dict) -> None:
    """Write the spec as JSON, atomically."""
    from kdistill.files import write_json_atomic

    write_json_atomic(Path(path), spec, indent=1, sort_keys=True)


def load_spec(path) -> dict:
    """Read a spec written by `save_spec`; a missing or unreadable file is a one-line `KDError`."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise KDError(f"architecture spec not found: {path}", where="compress.arch",
                      fix="save it with the compressed weights (kdistill.compress.arch.save_spec)") from None
    except (OSError, ValueError) as err:
        raise KDError(f"cannot read architecture spec {path}: {err}", where="compress.arch",
                      fix="the file is damaged; re-create it") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise KDError(f"{path} is not an architecture spec (format {FORMAT})", where="compress.arch",
                      fix="pass the file written by kdistill.compress.arch.save_spec")
    return spec
