"""Student builders: a smaller encoder made from the teacher's config.

* Fewer layers, same width (DistilBERT, Sanh et al. 2019): the student has the teacher's class and config with
  ``num_layers`` transformer layers, initialised from chosen teacher layers; embeddings, pooler and heads
  (classifier, masked-LM head) are copied, so it starts from a working model.
* A smaller hidden size (TinyBERT, MiniLM students): everything is freshly initialised (seeded); loss terms on
  hidden states then learn a projection to the teacher's width (`kdistill.encoders.EncoderDistiller` builds it).
  ``embeddings="pca"`` initialises the token / position / type embeddings from the teacher's, projected onto the
  top principal directions of the teacher's word-embedding matrix (one shared projection, so the sum of the
  three embeddings is projected consistently).

A `SentenceEncoder` teacher gives a `SentenceEncoder` student with the same pooling and normalisation; with
``project_to_teacher=True`` a narrower student gets a linear projection to the teacher's embedding width, which
is part of the student (exported as the sentence-transformers ``Dense`` module) so its embeddings live in the
teacher's space.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from kdistill.encoders.layers import layer_map
from kdistill.encoders.models import SentenceEncoder, backbone_of, encoder_layout
from kdistill.errors import WiringError
from kdistill.models.layer_subset import renumbered_layers

__all__ = ["build_student", "student_config", "teacher_layers_of"]

_WHERE = "kdistill.encoders.build_student"
EMBEDDING_INITS = ("copy", "pca", "random")


def _intermediate_field(config) -> str:
    return "intermediate_size" if hasattr(config, "intermediate_size") else "hidden_dim"


def student_config(teacher_config, *, num_layers: Optional[int] = None, hidden_size: Optional[int] = None,
                   num_heads: Optional[int] = None, intermediate_size: Optional[int] = None, **overrides):
    """A copy of the teacher's config with a smaller shape.

    Defaults keep the teacher's values; with a new `hidden_size`, `num_heads` keeps the teacher's head width
    (``hidden_size / head_dim`` heads) and `intermediate_size` keeps the teacher's FFN ratio. Other config fields
    can be overridden by keyword (e.g. ``hidden_dropout_prob=0.0``).
    """
    config = copy.deepcopy(teacher_config)
    t_hidden, t_heads = int(config.hidden_size), int(config.num_attention_heads)
    t_inter = int(getattr(config, _intermediate_field(config)))
    hidden = int(hidden_size) if hidden_size is not None else t_hidden
    if num_heads is None:
        head_dim = t_hidden // t_heads
        if hidden % head_dim:
            raise WiringError(f"hidden_size {hidden} is not a multiple of the teacher's head width {head_dim}",
                              where=_WHERE, fix="give num_heads explicitly (a divisor of hidden_size)")
        num_heads = hidden // head_dim
    if hidden < 1 or num_heads < 1 or hidden % num_heads:
        raise WiringError(f"hidden_size {hidden} is not divisible by num_heads {num_heads}", where=_WHERE,
                          fix="choose num_heads dividing hidden_size (e.g. head width 32 or 64)")
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise WiringError(f"num_layers must be a positive integer, got {num_layers!r}", where=_WHERE)
        config.num_hidden_layers = num_layers
    config.hidden_size = hidden
    config.num_attention_heads = int(num_heads)
    inter = intermediate_size if intermediate_size is not None else max(1, round(hidden * t_inter / t_hidden))
    setattr(config, _intermediate_field(config), int(inter))
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise WiringError(f"{type(config).__name__} has no field {key!r}", where=_WHERE,
                              fix="check the spelling against the teacher's config.json")
        setattr(config, key, value)
    if hasattr(config, "architectures"):
        config.architectures = None
    return config


def teacher_layers_of(student: nn.Module) -> Optional[list[int]]:
    """The teacher layers a same-width student was initialised from (recorded in its config), or None."""
    layers = getattr(backbone_of(student).config, "kdistill_teacher_layers", None)
    return list(layers) if layers else None


def _layers_prefix(model: nn.Module) -> str:
    target = encoder_layout(model).layers
    for name, module in model.named_modules():
        if module is target:
            return name
    raise WiringError("cannot locate the transformer layers in the model", where=_WHERE)  # pragma: no cover


def _copy_layers(teacher: nn.Module, student: nn.Module, kept: list[int]) -> None:
    """Load the teacher's weights into the student: layer j <- teacher layer kept[j] (1-based), rest as is."""
    new_index = {old - 1: new for new, old in enumerate(kept)}
    state = renumbered_layers(teacher.state_dict(), _layers_prefix(teacher), _layers_prefix(student), new_index)
    with torch.no_grad():
        result = student.load_state_dict(state, strict=False)
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    if result.unexpected_keys:
        raise WiringError(f"teacher weights {result.unexpected_keys[:3]} have no place in the student",
                          where=_WHERE, fix="build the student from the same class as the teacher")


def _pca_basis(word_embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """(D_t, k): the top-k principal directions of the rows of the word-embedding matrix."""
    e = word_embeddings.detach().double()
    e = e - e.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(e, full_matrices=False)
    return vh[:k].T.contiguous()


def _init_embeddings_pca(teacher: nn.Module, student: nn.Module) -> None:
    t_emb, s_emb = backbone_of(teacher).embeddings, backbone_of(student).embeddings
    k = int(backbone_of(student).config.hidden_size)
    basis = _pca_basis(t_emb.word_embeddings.weight, k)
    with torch.no_grad():
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            t_table, s_table = getattr(t_emb, name, None), getattr(s_emb, name, None)
            if t_table is None or s_table is None:
                continue
            rows = min(t_table.weight.shape[0], s_table.weight.shape[0])
            projected = t_table.weight[:rows].double() @ basis
            s_table.weight[:rows] = projected.to(s_table.weight.dtype)


def build_student(teacher: nn.Module, *, num_layers: Optional[int] = None, layers: Optional[Sequence[int]] = None,
                  hidden_size: Optional[int] = None, num_heads: Optional[int] = None,
                  intermediate_size: Optional[int] = None, embeddings: Optional[str] = None,
                  project_to_teacher: bool = True, seed: int = 0, config_overrides: Optional[dict] = None) -> nn.Module:
    """A smaller student of the teacher's class.

    Args:
        teacher: an HF encoder (``AutoModel``, ``...ForSequenceClassification``, ``...ForMaskedLM``) or a
            `SentenceEncoder`. Not modified.
        num_layers: the student's depth (default: ``len(layers)``, else the teacher's).
        layers: same width only: the teacher layers (1-based, as in ``hidden_states``) to copy, one per student
            layer, strictly increasing. Default with a same-width student: ``layer_map("uniform", M, N)``'s
            teacher side (e.g. 2, 4, 6 of 6 for M = 3).
        hidden_size, num_heads, intermediate_size: a narrower student (see `student_config`); all transformer
            weights are then freshly initialised.
        embeddings: ``copy`` (same width; the default there), ``pca`` (narrower: the teacher's embeddings
            projected on their top principal directions) or ``random`` (the default for a narrower student).
        project_to_teacher: `SentenceEncoder` teacher only: give a narrower student a linear projection to the
            teacher's embedding width.
        seed: the initialisation seed (the caller's global RNG is untouched).
        config_overrides: other config fields for the student (e.g. ``{"hidden_dropout_prob": 0.0}``).

    Returns:
        the student, in train mode, on the teacher's device and dtype. A same-width student records the copied
        layers in ``config.kdistill_teacher_layers`` (see `teacher_layers_of`).
    """
    if isinstance(teacher, SentenceEncoder):
        encoder = build_student(teacher.encoder, num_layers=num_layers, layers=layers, hidden_size=hidden_size,
                                num_heads=num_heads, intermediate_size=intermediate_size, embeddings=embeddings,
                                seed=seed, config_overrides=config_overrides)
        projection = None
        width, target = int(encoder.config.hidden_size), teacher.dim
        if project_to_teacher and width != target:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                projection = nn.Linear(width, target)
            projection.to(next(encoder.parameters()).dtype)
        return SentenceEncoder(encoder, pooling=teacher.pooling, projection=projection,
                               normalize=teacher.normalize).train()

    t_layout = encoder_layout(teacher)
    n = t_layout.num_layers
    t_config = backbone_of(teacher).config if not hasattr(teacher, "config") else teacher.config
    narrower = hidden_size is not None and int(hidden_size) != t_layout.hidden_size
    if layers is not None:
        if narrower:
            raise WiringError(f"cannot copy teacher layers {list(layers)} into a student of hidden size {hidden_size} "
                              f"(the teacher's is {t_layout.hidden_size})", where=_WHERE,
                              fix="drop layers= (a narrower student is freshly initialised) or keep the width")
        if num_layers is not None and num_layers != len(layers):
            raise WiringError(f"num_layers={num_layers} but {len(layers)} teacher layers were chosen", where=_WHERE,
                              fix="give one teacher layer per student layer, or omit num_layers")
        num_layers = len(layers)
        kept = [p[1] for p in layer_map([[i + 1, t] for i, t in enumerate(layers)], num_layers, n,
                                        min_layer=1, where=f"{_WHERE}(layers)")]
        if len(kept) != len(layers) or any(b <= a for a, b in zip(kept, kept[1:])):
            raise WiringError(f"layers must be strictly increasing teacher layers, got {list(layers)}",
                              where=f"{_WHERE}(layers)", fix=f"e.g. {list(range(2, n + 1, 2))}")
    num_layers = num_layers if num_layers is not None else n
    if embeddings is None:
        embeddings = "random" if narrower else "copy"
    if embeddings not in EMBEDDING_INITS:
        raise WiringError(f"unknown embeddings init {embeddings!r}", where=_WHERE, fix=f"use one of {EMBEDDING_INITS}")
    if narrower and embeddings == "copy":
        raise WiringError("embeddings='copy' needs the teacher's width", where=_WHERE,
                          fix="use embeddings='pca' or 'random' for a narrower student")
    if not narrower and embeddings == "pca":
        raise WiringError("embeddings='pca' is for a narrower student", where=_WHERE,
                          fix="a same-width student copies the teacher's embeddings (embeddings='copy')")
    if layers is not None and embeddings != "copy":
        raise WiringError(f"layers={list(layers)} are copied only with embeddings='copy'", where=_WHERE,
                          fix="drop layers= for a freshly initialised student")

    config = student_config(t_config, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                            intermediate_size=intermediate_size, **(config_overrides or {}))
    if not narrower and embeddings == "copy":
        if layers is None:
            layers = [t for _, t in layer_map("uniform", num_layers, n, where=_WHERE)]
        config.kdistill_teacher_layers = [int(t) for t in layers]
    reference = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher)(config)
    student.to(device=reference.device, dtype=reference.dtype)
    if not narrower and embeddings == "copy":
        _copy_layers(teacher, student, list(layers))
    elif embeddings == "pca":
        _init_embeddings_pca(teacher, student)
    return student.train()
