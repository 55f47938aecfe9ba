"""Structured channel pruning to a MACs or parameter target, with torch-pruning (DepGraph, Fang et al. 2023).

Whole channels are removed (the layers really get smaller, so the model gets faster), together with everything
that depends on them: the next layer's inputs, BatchNorm statistics, channels tied by residual additions.
torch-pruning's ratio is per channel, while the target here is the fraction of multiply-adds (``of="macs"``) or
parameters (``of="params"``) removed; the channel ratio that reaches it is searched (see `prune`).

* ``scope="global"``: channels are ranked across all layers (torch-pruning's ``global_pruning``), so layers lose
  different fractions; ``"uniform"``: every layer loses the same fraction of its channels.
* Importance: ``l2`` / ``l1`` (group magnitude: the norm of all weights tied to a channel), ``taylor`` (first-order
  Taylor, ``|w * dL/dw|``, Molchanov et al. 2019; needs a backward on `taylor_batch`), ``random`` (seeded).
* The layers producing the model output (the classifier) keep their outputs.
* Hugging Face encoders (BERT-style): only the feed-forward inner channels (``intermediate.dense`` outputs,
  ``output.dense`` inputs) are pruned; attention and the hidden size are kept.

torch-pruning is an optional dependency: it is imported when `prune` is called. The pruned model is a plain
module of the same classes; `kdistill.compress.arch` records its shapes so it reloads without torch-pruning.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kdistill.compress.arch import call_model, flat_tensors, output_layers
from kdistill.errors import KDError

__all__ = ["OF", "IMPORTANCES", "SCOPES", "count_macs", "hf_mlp_layers", "prune"]

OF = ("macs", "params")
SCOPES = ("global", "uniform")
IMPORTANCES = ("l2", "l1", "taylor", "random")
TOLERANCE = 0.02  # accepted |reached - target|
STOP = 0.005  # the search stops when this close
MAX_TRIES = 16
MAX_RATIO = 0.99
HF_MLP_SUFFIXES = (".intermediate.dense", ".ffn.lin1")  # BERT/RoBERTa/ELECTRA..., DistilBERT


def _tp(where: str):
    try:
        import torch_pruning as tp
    except ImportError:
        raise KDError("structured pruning needs torch-pruning", where=where,
                      fix="pip install 'kdistill[deploy]' (or pip install torch-pruning)") from None
    return tp


def _check(target, of, scope, importance, iterative_steps, round_to, where) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) < 1.0:
        raise KDError(f"prune target must be the fraction removed, in (0, 1), got {target!r}", where=where,
                      fix="e.g. target: 0.5 removes half of the MACs")
    for name, value, allowed in (("of", of, OF), ("scope", scope, SCOPES), ("importance", importance, IMPORTANCES)):
        if value not in allowed:
            raise KDError(f"unknown {name} {value!r}", where=f"{where}.{name}", fix=f"use one of {', '.join(allowed)}")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise KDError(f"iterative_steps must be a positive integer, got {iterative_steps!r}",
                      where=f"{where}.iterative_steps", fix="e.g. 1 (one shot) or 5")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise KDError(f"round_to must be a positive integer or null, got {round_to!r}", where=f"{where}.round_to",
                      fix="e.g. 8 keeps channel counts multiples of 8")


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel``, or a module holding one (a sentence encoder); found by class
    hierarchy, so transformers is not imported."""
    return any(c.__name__ == "PreTrainedModel" for m in model.modules() for c in type(m).__mro__)


def hf_mlp_layers(model: nn.Module) -> list[str]:
    """Paths of the feed-forward input layers of an HF encoder (``...intermediate.dense``, DistilBERT ``ffn.lin1``)."""
    return [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p.endswith(HF_MLP_SUFFIXES)]


def count_macs(model: nn.Module, example: Any, where: str = "compress.prune") -> int:
    """Multiply-adds of one forward pass on `example` (torch-pruning's counter, layer hooks)."""
    tp = _tp(where)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # and its printed notes (e.g. on keyword-only inputs) are dropped
        macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _importance(tp, name: str):
    if name in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.RandomImportance()


def taylor_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss whose gradients score channels for Taylor importance.

    * a callable: ``batch(model)`` returns the loss;
    * ``(inputs, targets)`` with integer targets: cross-entropy of ``model(inputs)``;
    * inputs only: cross-entropy against the model's own predictions (argmax) when it returns (B, C) logits,
      else half the mean square of its output tensors.
    """
    if callable(batch):
        return batch(model)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and not batch[1].is_floating_point():
        return F.cross_entropy(call_model(model, batch[0]), batch[1])
    out = call_model(model, batch)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return F.cross_entropy(out, out.detach().argmax(1))
    tensors = [t for t in flat_tensors(out) if t.is_floating_point() and t.requires_grad]
    return sum(0.5 * t.pow(2).mean() for t in tensors)


def _ignored(model: nn.Module, example: Any, ignore: Sequence[str], where: str) -> tuple[list[nn.Module], list[str]]:
    """Modules torch-pruning must not prune the outputs of: the output layer(s), `ignore`, and for HF encoders
    every Linear except the feed-forward inputs. Returns (modules, their paths)."""
    paths = list(output_layers(model, example))
    names = dict(model.named_modules())
    for path in ignore:
        if path not in names:
            raise KDError(f"no module '{path}' to ignore", where=f"{where}.ignore",
                          fix="use module paths as in model.named_modules() (e.g. 'features.0.0')")
        paths.append(path)
    if is_hf_model(model):
        mlp = hf_mlp_layers(model)
        if not mlp:
            raise KDError(f"cannot prune {type(model).__name__}: no feed-forward layers (intermediate.dense) found",
                          where=where, fix="prune a BERT-style encoder, or use compress.low_rank")
        paths += [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
                  and p not in mlp]
    paths = list(dict.fromkeys(paths))
    return [names[p] for p in paths], paths


def _prune_once(model: nn.Module, example: Any, ratio: float, *, global_pruning: bool, importance: str,
                ignore: Sequence[str], iterative_steps: int, round_to: Optional[int], taylor_batch: Any,
                seed: int, where: str) -> nn.Module:
    """A pruned deep copy of `model` at channel ratio `ratio` (eval mode while pruning, mode restored)."""
    tp = _tp(where)
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    trainable = {name: p.requires_grad for name, p in pruned.named_parameters()}
    pruned.eval().requires_grad_(True)  # the tracer follows autograd: frozen weights would hide their layers
    ignored, _ = _ignored(pruned, example, ignore, where)
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        try:
            pruner = tp.pruner.BasePruner(
                pruned, example, importance=_importance(tp, importance), global_pruning=global_pruning,
                pruning_ratio=ratio, iterative_steps=iterative_steps, ignored_layers=ignored, round_to=round_to)
        except Exception as err:  # torch-pruning's tracer fails on unsupported graphs with many error types
            raise KDError(f"torch-pruning cannot handle {type(model).__name__}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}", where=where,
                          fix="prune a supported model (convs, linears, norms, residual adds) or use "
                              "compress.low_rank") from None
        for _ in range(iterative_steps):
            if importance == "taylor":
                pruned.zero_grad(set_to_none=True)
                taylor_loss(pruned, taylor_batch if taylor_batch is not None else example).backward()
            try:
                pruner.step()
            except Exception as err:
                raise KDError(f"torch-pruning failed on {type(model).__name__}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}", where=where,
                              fix="ignore the layers it cannot handle (prune.ignore) or use compress.low_rank") \
                    from None
    pruned.zero_grad(set_to_none=True)
    try:
        with torch.no_grad():
            call_model(pruned, example)
    except Exception as err:  # a graph torch-pruning mis-traced: the shapes no longer fit
        raise KDError(f"{type(model).__name__} no longer runs after pruning: {type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}", where=where,
                      fix="ignore the layers around the failing op (prune.ignore) or use compress.low_rank") from None
    for name, p in pruned.named_parameters():
        p.requires_grad_(trainable.get(name, True))
    return pruned.train(was_training)


def _power_step(ratio: float, reached: float, target: float) -> Optional[float]:
    """The channel ratio for `target` under the model ``1 - reached = (1 - ratio)^p`` fitted to one try
    (p = 2 for a chain of convs pruned on both sides, 1 for a single layer); None when the try cannot fit it."""
    if not (0.0 < ratio < 1.0 and 0.0 < reached < 1.0):
        return None
    p = math.log(1.0 - reached) / math.log(1.0 - ratio)
    return 1.0 - (1.0 - target) ** (1.0 / p)


def _fix_hf_config(model: nn.Module) -> None:
    """After uniform pruning of an HF encoder, record the (common) feed-forward width in its config."""
    config = getattr(model, "config", None)
    if config is None:
        config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    widths = {model.get_submodule(p).out_features for p in hf_mlp_layers(model)}
    if config is not None and len(widths) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths.pop()


def prune(model: nn.Module, example: Any, *, target: float, of: str = "macs", scope: str = "global",
          importance: str = "l2", ignore: Sequence[str] = (), iterative_steps: int = 1,
          round_to: Optional[int] = None, taylor_batch: Any = None, seed: int = 0, tolerance: float = TOLERANCE,
          where: str = "compress.prune") -> tuple[nn.Module, dict]:
    """Remove channels from a copy of `model` until a fraction `target` of its MACs (or parameters) is gone.

    The measured reduction ``1 - after / before`` grows with torch-pruning's channel ratio, but not linearly
    (a conv's MACs scale with in x out channels) and in steps (whole channels). The ratio is searched in the
    bracket [0, 0.99]: the first try assumes ``kept = (1 - ratio)^2``, each next one fits ``kept = (1 - ratio)^p``
    to the last try (bisection of the bracket when that does not halve the error); each try is a fresh pruner on
    a fresh deep copy; at most 16 tries, stopping within 0.5 points of the target. The closest try is returned;
    if it is more than `tolerance` (2 points) away, a `KDError` says what was reached.

    Args:
        example: the input of one forward pass (tensor, tuple of arguments, or dict of keyword arguments), used to
            trace the dependency graph, find the output layer and count MACs.
        target: the fraction removed, in (0, 1).
        of: ``macs`` or ``params``.
        scope: ``global`` (rank channels across layers) or ``uniform`` (the same channel ratio in every layer).
        importance: ``l2``, ``l1``, ``taylor`` or ``random``.
        ignore: module paths whose outputs are kept (the output layer is always kept).
        iterative_steps: prune in this many steps of growing ratio (Taylor scores are recomputed each step).
        round_to: keep channel counts multiples of this.
        taylor_batch: for ``taylor``: the batch of the backward pass (see `taylor_loss`; default: `example`).
        seed: the random-importance seed.

    Returns:
        (pruned model, report ``{"of", "target", "reached", "macs_before", "macs_after", "params_before",
        "params_after", "scope", "importance", "channel_ratio", "tries", "ignored"}``).
    """
    _check(target, of, scope, importance, iterative_steps, round_to, where)
    target = float(target)
    _tp(where)
    _, ignored_paths = _ignored(model, example, ignore, where)
    macs_before, params_before = count_macs(model, example, where), _params(model)
    before = macs_before if of == "macs" else params_before
    measure: Callable[[nn.Module], int] = (lambda m: count_macs(m, example, where)) if of == "macs" else _params
    options = dict(global_pruning=scope == "global", importance=importance, ignore=ignore,
                   iterative_steps=iterative_steps, round_to=round_to, taylor_batch=taylor_batch, seed=seed,
                   where=where)

    best: Optional[tuple[float, float, nn.Module]] = None  # (|error|, ratio, model)
    best_reached = 0.0
    tries: list[tuple[float, float]] = []
    lo, hi = 0.0, MAX_RATIO
    ratio = _power_step(0.5, 1.0 - 0.25, target)  # MACs of a conv chain: kept ~ (1 - ratio)^2
    last_error = float("inf")
    for _ in range(MAX_TRIES):
        candidate = _prune_once(model, example, ratio, **options)
        reached = 1.0 - measure(candidate) / before
        tries.append((round(ratio, 4), round(reached, 4)))
        error = abs(reached - target)
        if best is None or error < best[0]:
            best, best_reached = (error, ratio, candidate), reached
        if error <= STOP:
            break
        if reached < target:
            lo = ratio
        else:
            hi = ratio
        if hi - lo < 1e-3:  # finer than any layer's channel step: a step of the staircase
            break
        # the power model through the last try; bisection when it stalls (error not halved) or is undefined
        nxt = _power_step(ratio, reached, target) if error < last_error / 2 else None
        last_error = error
        margin = 0.02 * (hi - lo)
        ratio = (lo + hi) / 2 if nxt is None else min(max(nxt, lo + margin), hi - margin)
    error, ratio, pruned = best
    if error > tolerance:
        raise KDError(f"pruning reached {best_reached:.3f} of the {of} removed, not the target {target:.3f} "
                      f"(channel ratios tried: {', '.join(f'{r}->{m}' for r, m in tries)})", where=where,
                      fix="choose a reachable target, scope: global, or fewer ignored layers")
    if is_hf_model(pruned):
        _fix_hf_config(pruned)
    macs_after, params_after = count_macs(pruned, example, where), _params(pruned)
    report = {"of": of, "target": target, "reached": round(best_reached, 4), "macs_before": macs_before,
              "macs_after": macs_after, "params_before": params_before, "params_after": params_after,
              "scope": scope, "importance": importance, "channel_ratio": round(ratio, 4), "tries": len(tries),
              "ignored": ignored_paths}
    return pruned, report
