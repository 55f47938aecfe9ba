"""One forward of an encoder, collecting the features that loss terms ask for.

Feature keys:

* ``hidden.{i}``: hidden state ``i`` (0 = embedding output), ``(B, T, D)``, from ``output_hidden_states``;
* ``query.{i}`` / ``key.{i}`` / ``value.{i}``: the attention projections of transformer layer ``i`` (1-based),
  ``(B, T, D)`` with the heads concatenated, captured by forward hooks on the projection modules;
* ``attention.{i}``: the attention probabilities of layer ``i``, ``(B, H, T, T)``, recomputed from its query and
  key projections (so they are defined without attention dropout and with any attention implementation);
* ``logits``: the model's logits (classification or masked-LM heads);
* ``embedding``: the sentence embedding (a `SentenceEncoder`'s output, or the mean of the last hidden states);
* ``mask``: the ``(B, T)`` bool attention mask (always present).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from kdistill.encoders.models import SentenceEncoder, backbone_of, encoder_layout, mean_pool
from kdistill.errors import WiringError
from kdistill.losses.encoder import attention_probabilities

__all__ = ["encoder_features", "encoder_inputs", "feature_key", "trim_padding"]

PROJECTIONS = ("query", "key", "value")


def feature_key(kind: str, layer: int) -> str:
    return f"{kind}.{layer}"


def trim_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the columns after the longest real sequence of the batch (right padding): same results, less work."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return inputs
    length = int(mask.sum(dim=1).max()) if mask.numel() else 0
    if length >= mask.shape[1] or length == 0:
        return inputs
    return {k: v[:, :length] if torch.is_tensor(v) and v.ndim == 2 and v.shape == mask.shape else v
            for k, v in inputs.items()}


def encoder_inputs(batch: Mapping[str, Any], key: str = "x") -> dict[str, torch.Tensor]:
    """The keyword inputs of an HF encoder from a batch: ``batch[key]`` as a dict of tensors, or a tensor of
    token ids with the batch's ``attention_mask`` (and ``token_type_ids``) beside it; padding trimmed."""
    x = batch.get(key, batch["x"])
    if isinstance(x, Mapping):
        inputs = dict(x)
    elif torch.is_tensor(x):
        inputs = {"input_ids": x}
        for name in ("attention_mask", "token_type_ids"):
            if name in batch:
                inputs[name] = batch[name]
    else:
        raise WiringError(f"batch['{key}'] is a {type(x).__name__}", where="kdistill.encoders",
                          fix="give token ids as a tensor (with 'attention_mask' in the batch) or a dict of tensors")
    if "input_ids" not in inputs:
        raise WiringError(f"batch['{key}'] has no 'input_ids'", where="kdistill.encoders",
                          fix="tokenize the text (input_ids, attention_mask)")
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return trim_padding(inputs)


def _parse(keys: Iterable[str]) -> tuple[set[int], dict[str, set[int]], set[int], bool, bool]:
    hidden, projections, attention = set(), {k: set() for k in PROJECTIONS}, set()
    logits = embedding = False
    for key in keys:
        kind, _, layer = key.partition(".")
        if kind == "hidden":
            hidden.add(int(layer))
        elif kind in PROJECTIONS:
            projections[kind].add(int(layer))
        elif kind == "attention":
            attention.add(int(layer))
            projections["query"].add(int(layer))
            projections["key"].add(int(layer))
        elif kind == "logits":
            logits = True
        elif kind == "embedding":
            embedding = True
        elif kind != "mask":
            raise WiringError(f"unknown encoder feature {key!r}", where="kdistill.encoders.encoder_features")
    return hidden, projections, attention, logits, embedding


def encoder_features(model: nn.Module, inputs: Mapping[str, torch.Tensor],
                     keys: Iterable[str]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run `model` once on `inputs` (keyword tensors) and return ``(output, {feature key: tensor})``.

    `model` is an HF encoder (any head) or a `SentenceEncoder`; for a `SentenceEncoder` the output is the
    sentence embedding.
    """
    hidden, projections, attention, want_logits, want_embedding = _parse(keys)
    needs_layers = any(projections.values())
    layout = encoder_layout(model) if needs_layers else None
    captured: dict[str, torch.Tensor] = {}
    handles = []
    if layout is not None:
        for kind, layers in projections.items():
            for layer in sorted(layers):
                if not 1 <= layer <= layout.num_layers:
                    raise WiringError(f"{type(backbone_of(model)).__name__} has transformer layers "
                                      f"1..{layout.num_layers}, not {layer}", where=f"feature {kind}.{layer}",
                                      fix="check the layer map against the model's depth")

                def hook(module, args, output, name=feature_key(kind, layer)):
                    captured[name] = output

                handles.append(layout.projection(layer, kind).register_forward_hook(hook))
    mask = inputs.get("attention_mask")
    kwargs = dict(inputs)
    try:
        if isinstance(model, SentenceEncoder):
            out_hf = model.encoder(**kwargs, output_hidden_states=bool(hidden))
            output = model.embed(out_hf.last_hidden_state, mask)
        else:
            out_hf = model(**kwargs, output_hidden_states=bool(hidden) or want_embedding)
            output = out_hf
    finally:
        for h in handles:
            h.remove()
    feats: dict[str, torch.Tensor] = dict(captured)
    feats["mask"] = mask.bool() if mask is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    if hidden:
        states = out_hf.hidden_states
        for layer in sorted(hidden):
            if not 0 <= layer < len(states):
                raise WiringError(f"{type(backbone_of(model)).__name__} has hidden states 0..{len(states) - 1}, "
                                  f"not {layer}", where=f"feature hidden.{layer}",
                                  fix="check the layer map against the model's depth")
            feats[feature_key("hidden", layer)] = states[layer]
    for layer in sorted(attention):
        feats[feature_key("attention", layer)] = attention_probabilities(
            captured[feature_key("query", layer)], captured[feature_key("key", layer)], layout.num_heads,
            feats["mask"])
    if want_logits:
        logits = getattr(out_hf, "logits", None)
        if logits is None:
            raise WiringError(f"{type(model).__name__} has no logits", where="kdistill.encoders",
                              fix="use a model with a head (AutoModelForSequenceClassification / ForMaskedLM), "
                                  "or drop the 'kd' / 'ce' / 'mlm' terms")
        feats["logits"] = logits
    if want_embedding:
        if isinstance(model, SentenceEncoder):
            feats["embedding"] = output
        else:
            last = getattr(out_hf, "last_hidden_state", None)
            if last is None:
                last = out_hf.hidden_states[-1]
            feats["embedding"] = mean_pool(last, mask)
    return output, feats
