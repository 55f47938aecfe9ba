"""Layer maps: which student layer learns from which teacher layer.

Layer numbers follow Hugging Face's ``hidden_states``: ``0`` is the embedding layer's output and ``i`` (1..L) the
output of transformer layer ``i``. Attention and self-relation terms use the attention inside layer ``i`` (1..L;
layer 0 has none).

    layer_map("uniform", 4, 12)      -> [(1, 3), (2, 6), (3, 9), (4, 12)]   every k-th (TinyBERT, PKD-skip)
    layer_map("last", 4, 12)         -> [(1, 9), (2, 10), (3, 11), (4, 12)] onto the teacher's top layers (PKD-last)
    layer_map("last-1", 4, 12)       -> [(4, 12)]                           the last k pairs (MiniLM, DistilBERT)
    layer_map([[2, 6], [4, 12]], 4, 12)                                     explicit pairs, validated
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Union

from kdistill.errors import WiringError

__all__ = ["LayerSpec", "layer_map"]

LayerSpec = Union[str, Sequence[Sequence[int]]]

_LAST_K = re.compile(r"^last[-:](\d+)$")


def _depths(student_layers: int, teacher_layers: int, where: str) -> None:
    for role, n in (("student", student_layers), ("teacher", teacher_layers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise WiringError(f"the {role} depth must be a positive number of layers, got {n!r}", where=where)


def _pairs_from_name(name: str, m: int, n: int, where: str) -> list[tuple[int, int]]:
    if name in ("uniform", "last") or _LAST_K.match(name):
        if m > n:
            raise WiringError(f"layer map '{name}': the student has more layers ({m}) than the teacher ({n})",
                              where=where, fix="give explicit pairs [[student_layer, teacher_layer], ...]")
    if name == "uniform":
        return [(i, i * n // m) for i in range(1, m + 1)]
    if name == "last":
        return [(i, n - m + i) for i in range(1, m + 1)]
    match = _LAST_K.match(name)
    if match:
        k = int(match.group(1))
        if not 1 <= k <= m:
            raise WiringError(f"layer map '{name}': k={k} is outside 1..{m} (the student has {m} layers)",
                              where=where, fix=f"use last-1 .. last-{m}")
        return [(m - k + i, n - k + i) for i in range(1, k + 1)]
    raise WiringError(f"unknown layer map {name!r}", where=where,
                      fix="use 'uniform', 'last', 'last-K' (e.g. 'last-1') or explicit pairs [[s, t], ...]")


def layer_map(spec: LayerSpec, student_layers: int, teacher_layers: int, *, include_embeddings: bool = False,
              min_layer: int = 0, where: str = "layer_map") -> list[tuple[int, int]]:
    """Resolve a layer-map spec into validated ``(student_layer, teacher_layer)`` pairs.

    Args:
        spec: ``"uniform"`` (student layer i <- teacher layer floor(i * N / M): every k-th when M divides N, the
            last layers always paired), ``"last"`` (i <- N - M + i), ``"last-K"`` (the last K of those pairs), or
            explicit pairs ``[[s, t], ...]`` with ``0 <= s <= M`` and ``0 <= t <= N``.
        student_layers: M, the student's number of transformer layers.
        teacher_layers: N, the teacher's.
        include_embeddings: prepend the embedding-layer pair ``(0, 0)`` (TinyBERT's embedding loss).
        min_layer: the smallest allowed layer number (1 for attention / relation terms: layer 0 has no attention).
        where: the config field or term this map belongs to, for error messages.

    Returns:
        the pairs, in order, without duplicates.
    """
    m, n = student_layers, teacher_layers
    _depths(m, n, where)
    if isinstance(spec, str):
        pairs = _pairs_from_name(spec.strip().lower(), m, n, where)
    else:
        pairs = []
        if not isinstance(spec, Sequence) or not spec:
            raise WiringError(f"layer map must be a name or a non-empty list of pairs, got {spec!r}", where=where,
                              fix="e.g. 'uniform' or [[2, 6], [4, 12]]")
        for k, pair in enumerate(spec):
            if (isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
                raise WiringError(f"layer map entry {k} is {pair!r}, not a pair of layer numbers", where=where,
                                  fix="write pairs as [student_layer, teacher_layer], e.g. [4, 12]")
            s, t = int(pair[0]), int(pair[1])
            if not 0 <= s <= m or not 0 <= t <= n:
                raise WiringError(
                    f"layer pair [{s}, {t}] is out of range: the student has layers 0..{m} and the teacher 0..{n} "
                    f"(0 = embeddings)", where=where,
                    fix=f"use student layers 0..{m} and teacher layers 0..{n}, or a named map ('uniform', 'last')")
            pairs.append((s, t))
    if include_embeddings:
        pairs = [(0, 0)] + pairs
    low = [p for p in pairs if p[0] < min_layer or p[1] < min_layer]
    if low:
        raise WiringError(f"layer pair {list(low[0])} uses layer 0 (the embedding layer), which has no attention",
                          where=where, fix=f"use layers {min_layer} and above for attention / relation terms")
    seen, unique = set(), []
    for pair in pairs:
        if pair not in seen:
            seen.add(pair)
            unique.append(pair)
    return unique
