"""Build a shallower student from a causal-LM teacher by keeping some of its decoder layers.

This is the DistilBERT / DistilGPT2 initialisation (Sanh et al. 2019): the student has the teacher's class and
widths, ``k`` of its ``L`` decoder layers, and copies of the teacher's embeddings, final norm and output head,
so it starts from a working language model instead of random weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from kdistill.errors import WiringError
from kdistill.models.layer_subset import renumbered_layers

__all__ = ["decoder_layers_path", "student_from_teacher"]

_WHERE = "kdistill.llm.student_from_teacher"

# Module paths of the decoder-layer list, per family; the first that exists wins.
_LAYER_PATHS = (
    "model.layers",  # Llama family: Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM, ...
    "transformer.h",  # GPT-2 family
)

# Config fields that hold one entry per decoder layer and must be subset with the layers.
_PER_LAYER_CONFIG_FIELDS = ("layer_types", "no_rope_layers")


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted path of the ``nn.ModuleList`` of decoder layers (``model.layers`` or ``transformer.h``)."""
    for path in _LAYER_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return path
    raise WiringError(
        f"unsupported architecture {type(model).__name__}: no decoder layer list at {' or '.join(_LAYER_PATHS)}",
        where=_WHERE,
        fix="pass a Hugging Face Llama-family (model.model.layers) or GPT-2 (model.transformer.h) causal LM",
    )


def _kept_layers(num_layers: int, every: int | None, layers: Sequence[int] | None) -> list[int]:
    """Resolve ``every`` / ``layers`` into a strictly increasing list of teacher layer indices."""
    if (every is None) == (layers is None):
        raise WiringError(
            "pass exactly one of every= or layers=",
            where=_WHERE,
            fix="e.g. student_from_teacher(teacher, every=3) or student_from_teacher(teacher, layers=[0, 5, 11])",
        )
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise WiringError(
                f"every must be a positive integer, got {every!r}",
                where=f"{_WHERE}(every)",
                fix=f"use 2 or 3 (the teacher has {num_layers} layers)",
            )
        return list(range(0, num_layers, every))
    kept = []
    for index in layers:  # type: ignore[union-attr]
        if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise WiringError(
                f"layer index {index!r} out of range for a teacher with {num_layers} layers",
                where=f"{_WHERE}(layers)",
                fix=f"use indices in [0, {num_layers - 1}] (negative indices count from the end)",
            )
        kept.append(index % num_layers)
    if not kept or any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
        raise WiringError(
            f"layers must be a non-empty, strictly increasing list of distinct indices, got {list(layers)}",
            where=f"{_WHERE}(layers)",
            fix=f"e.g. layers={list(range(0, num_layers, 2))}",
        )
    return kept


def _student_config(teacher: nn.Module, kept: list[int], num_layers: int):
    config = copy.deepcopy(teacher.config)
    for name in ("quantization_config", "_pre_quantization_dtype"):  # GGUF / quantized teachers: student is plain
        if hasattr(config, name):
            try:
                delattr(config, name)
            except AttributeError:
                setattr(config, name, None)
    config.num_hidden_layers = len(kept)  # GPT-2 maps this onto n_layer
    for name in _PER_LAYER_CONFIG_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            setattr(config, name, type(value)(value[i] for i in kept))
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(kept))):
        raise WiringError(
            f"{type(teacher).__name__} scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx), "
            f"so re-indexed layers {kept} would compute differently",
            where=_WHERE,
            fix=f"keep a prefix of the layers, e.g. layers={list(range(len(kept)))}",
        )
    return config


def student_from_teacher(
    teacher: nn.Module, *, every: int | None = None, layers: Sequence[int] | None = None
) -> nn.Module:
    """A new causal LM of the teacher's class with a subset of its decoder layers, all weights copied.

    Args:
        teacher: a Hugging Face causal LM of the Llama family (``teacher.model.layers``) or GPT-2
            (``teacher.transformer.h``). Not modified.
        every: keep teacher layers ``0, every, 2*every, ...`` (``every=3`` on 30 layers keeps 10).
        layers: explicit, strictly increasing teacher layer indices to keep (negative ones count from the end).

    Returns:
        the student, same class / dtype / device / train-or-eval mode as the teacher, with
        ``config.num_hidden_layers = k`` (per-layer config lists such as ``layer_types`` subset accordingly),
        student layer ``j`` = a copy of teacher layer ``layers[j]``, and copies of the embeddings, final norm and
        output head (tied embeddings stay tied). Each student layer has ``layer_idx = j``, so the KV cache and
        ``generate`` work. A GGUF/quantized teacher's ``quantization_config`` is dropped: the student is a plain
        float model that ``save_pretrained`` can write.
    """
    path = decoder_layers_path(teacher)
    num_layers = len(teacher.get_submodule(path))
    kept = _kept_layers(num_layers, every, layers)
    config = _student_config(teacher, kept, num_layers)

    reference = next(teacher.parameters())
    student = type(teacher)(config).to(device=reference.device, dtype=reference.dtype)

    state = renumbered_layers(teacher.state_dict(), path, path, {old: new for new, old in enumerate(kept)})
    with torch.no_grad():
        result = student.load_state_dict(state, strict=False)
    student.tie_weights()
    missing = [key for key in result.missing_keys if not _is_tied(student, key)]
    if missing or result.unexpected_keys:
        raise WiringError(
            f"could not copy the teacher's weights into the student: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}",
            where=_WHERE,
            fix="this architecture keeps per-layer state outside its decoder layers; report it, or build the "
            "student config by hand",
        )
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    return student


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether parameter `key` shares storage with another parameter of `model` (e.g. a tied output head)."""
    try:
        tensor = model.get_parameter(key)
    except AttributeError:
        return False
    pointer = tensor.data_ptr()
    return any(p.data_ptr() == pointer and name != key for name, p in model.named_parameters(remove_duplicate=False))
