"""The one loss registry: every loss registered once, with what it needs.

A `LossSpec` says how a term of that loss is called and checked:

* ``kind``: ``label`` (CE on labels, no teacher), ``response`` (logits vs logits), ``feature`` (tapped tensors,
  element by element), ``relation`` (sample-to-sample relations), ``contrastive`` (stateful heads or views),
  ``layer`` (encoder per-layer features, averaged over layer pairs) or ``embedding`` (sentence embeddings);
  response losses also serve LM token-level KD on ``(B, T, V)`` logits (the chunked head losses call them);
* ``needs_labels`` / ``needs_teacher``: what the batch and the objective must provide;
* ``sparse``: the name of its k + 1 bucket version for a top-k teacher (`kdistill.losses.sparse`), if any;
* ``gating``: its teacher signal can be gated per position (the ``selective`` scheme);
* ``same_shape``: it compares tensors element by element, so differing shapes get a learned adapter;
* ``module``: a stateful ``nn.Module`` class (built from the first batch's widths) instead of a function;
* ``feature``, ``min_layer``, ``default_layers``: which per-layer encoder feature a term reads and how the encoder
  distiller pairs layers (``layer`` losses, and the ``feature`` losses that also serve layer pairs);
* ``on_taps``: usable between a tapped student tensor and a tapped teacher tensor (the classification objective
  of `kdistill.distiller`); False for losses that need the encoder distiller (layer pairs, masking, two views).
* ``cross_vocab``: it compares next-token distributions over two *different* vocabularies (cross-tokenizer LM
  distillation, `kdistill.llm.cross_distiller`): the same-vocabulary check does not apply, and it needs a text view
  of the data (both tokenizations of the same text, aligned); every other teacher loss needs one vocabulary.

`call_term` is the one place a functional term is called with its calling convention.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from kdistill.errors import WiringError
from kdistill.losses.sparse import SparseDistribution, sparse_loss

KINDS = ("label", "response", "feature", "relation", "contrastive", "layer", "embedding")


@dataclass(frozen=True)
class LossSpec:
    name: str
    kind: str
    fn: Optional[Callable[..., Any]] = None
    module: Optional[type] = None
    needs_labels: bool = False
    needs_teacher: bool = True
    sparse: Optional[str] = None
    gating: bool = False
    same_shape: bool = False
    feature: Optional[str] = None
    min_layer: int = 0
    default_layers: Optional[Union[str, list]] = None
    on_taps: bool = True
    cross_vocab: bool = False
    summary: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"loss '{self.name}': unknown kind '{self.kind}' (allowed: {', '.join(KINDS)})")
        if (self.fn is None) == (self.module is None):
            raise ValueError(f"loss '{self.name}': give exactly one of fn and module")


_REGISTRY: dict[str, LossSpec] = {}


def register(spec: LossSpec, *aliases: str) -> LossSpec:
    """Register `spec` under its name (and aliases); a name is registered once."""
    for name in (spec.name, *aliases):
        if name in _REGISTRY and _REGISTRY[name] is not spec:
            raise ValueError(f"loss '{name}' is registered twice")
        _REGISTRY[name] = spec
    return spec


def loss_names(*kinds: str, on_taps: Optional[bool] = None) -> list[str]:
    """Registered names (aliases included), optionally only those of some kinds / usable on taps, sorted."""
    return sorted(n for n, s in _REGISTRY.items()
                  if (not kinds or s.kind in kinds) and (on_taps is None or s.on_taps == on_taps))


def get_loss(name: str, *, where: str = "distill.terms", kinds: tuple[str, ...] = ()) -> LossSpec:
    """The spec of `name`; an unknown name (or one of another kind) is a `WiringError` with the closest names."""
    spec = _REGISTRY.get(name)
    if spec is None or (kinds and spec.kind not in kinds):
        allowed = loss_names(*kinds)
        close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        what = f"unknown loss '{name}'" if spec is None else f"loss '{name}' ({spec.kind}) cannot be used here"
        raise WiringError(what, where=where, fix=f"{hint}choose one of {', '.join(allowed)}")
    return spec


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def call_term(spec: LossSpec, student: Any, teacher: Any, labels: Any, params: dict) -> Any:
    """Call the functional loss of `spec` with its calling convention: ``fn(student, labels)`` for label losses,
    ``fn(student, teacher, labels)`` for losses that need labels, else ``fn(student, teacher)``; a teacher given
    as a top-k `SparseDistribution` goes to the loss's k + 1 bucket version."""
    if spec.kind == "label":
        return spec.fn(student, labels, **params)
    if spec.needs_labels:
        return spec.fn(student, teacher, labels, **params)
    if isinstance(teacher, SparseDistribution):
        return sparse_loss(spec.name, student, teacher, params)
    return spec.fn(student, teacher, **params)
