"""Low-rank factorization: replace Linear layers and convolutions by two thinner layers (truncated SVD).

A layer computes ``y = W x + b`` with ``W`` of shape (out, in). With the SVD ``W = U S V^T`` (computed in float64),
the rank-r truncation ``W_r = U_r S_r V_r^T`` is the best rank-r approximation in the Frobenius and spectral norms
(Eckart-Young). It is split evenly between the two new layers::

    down.weight = sqrt(S_r) V_r^T   (r x in, no bias)
    up.weight   = U_r sqrt(S_r)     (out x r, the original bias)

so ``up(down(x)) = W_r x + b``. It saves parameters and multiply-adds only when ``r (in + out) < in * out``;
other layers are kept. The rank is fixed (`rank`) or the smallest one keeping a fraction `energy` of the
squared singular values: ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2``.

A convolution (groups 1) is the matrix ``W`` of shape (out, in * kernel) applied at every position (its weight
flattened per output channel; for a 1x1 conv, (out, in)). Its factorization is the channel decomposition: the
first new conv has ``r`` output channels with the original kernel, stride, padding, dilation and padding mode
and no bias (so padded positions stay zero and the result is unchanged), the second is a 1x1 conv ``r -> out``
with the original bias. Parameters and multiply-adds shrink when ``r (in * kernel + out) < in * kernel * out``.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn

from kdistill.compress.arch import output_layers, under
from kdistill.errors import KDError

__all__ = ["LowRankConv", "LowRankLinear", "factorize", "low_rank", "rank_for_energy", "split_weight"]


class LowRankLinear(nn.Module):
    """``up(down(x))``: Linear(in, rank, bias=False) then Linear(rank, out, bias)."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.rank, self.out_features = int(in_features), int(rank), int(out_features)
        self.down = nn.Linear(self.in_features, self.rank, bias=False)
        self.up = nn.Linear(self.rank, self.out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def spec_args(self) -> dict:
        return {"in_features": self.in_features, "rank": self.rank, "out_features": self.out_features,
                "bias": self.up.bias is not None}


class LowRankConv(nn.Module):
    """Two convolutions (``dim`` 1 or 2): in -> rank (the original kernel, stride, padding, dilation; no bias),
    then a 1x1 conv rank -> out (bias)."""

    def __init__(self, dim: int, in_channels: int, rank: int, out_channels: int, stride=1, padding=0,
                 padding_mode: str = "zeros", bias: bool = True, kernel_size=1, dilation=1):
        super().__init__()
        if dim not in (1, 2):
            raise KDError(f"LowRankConv supports 1-D and 2-D convolutions, got dim={dim}",
                          where="compress.low_rank")
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.dim, self.in_channels, self.rank, self.out_channels = dim, int(in_channels), int(rank), int(out_channels)
        self.down = conv(self.in_channels, self.rank, kernel_size, stride=stride, padding=padding, bias=False,
                         padding_mode=padding_mode, dilation=dilation)
        self.up = conv(self.rank, self.out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def spec_args(self) -> dict:
        d = self.down
        return {"dim": self.dim, "in_channels": self.in_channels, "rank": self.rank,
                "out_channels": self.out_channels, "stride": list(d.stride),
                "padding": d.padding if isinstance(d.padding, str) else list(d.padding),
                "padding_mode": d.padding_mode, "bias": self.up.bias is not None,
                "kernel_size": list(d.kernel_size), "dilation": list(d.dilation)}


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The (out, in * kernel) weight matrix of a Linear or a conv (its weight flattened per output channel)."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1)


def factorizable(layer: nn.Module) -> bool:
    """A Linear, or a Conv1d/Conv2d with groups 1 (any kernel)."""
    if type(layer) is nn.Linear:
        return True
    if type(layer) in (nn.Conv1d, nn.Conv2d):
        return layer.groups == 1
    return False


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest r with ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2`` (relative slack 1e-9 for rounding)."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    r = int(torch.searchsorted(kept, torch.tensor([energy - 1e-9], dtype=kept.dtype))[0]) + 1
    return max(1, min(r, len(s)))


def split_weight(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down (r x in), up (out x r), energy kept) of the float64 SVD of `w` (out x in), balanced by sqrt(S)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = max(1, min(int(rank), len(s)))
    root = s[:r].sqrt()
    total = float((s ** 2).sum())
    kept = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    return root[:, None] * vh[:r], u[:, :r] * root[None, :], kept


def factorize(layer: nn.Module, rank: int) -> tuple[nn.Module, float]:
    """(LowRankLinear or LowRankConv of rank `rank` equal to the truncated SVD of `layer`, energy kept).
    The new layer has the original's dtype and device."""
    w = _matrix(layer)
    down, up, kept = split_weight(w, rank)
    r = down.shape[0]
    out_f, in_f = w.shape[0], layer.weight.shape[1]
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = LowRankLinear(in_f, r, out_f, bias=has_bias)
    else:
        new = LowRankConv(1 if isinstance(layer, nn.Conv1d) else 2, in_f, r, out_f, stride=layer.stride,
                          padding=layer.padding, padding_mode=layer.padding_mode, bias=has_bias,
                          kernel_size=layer.kernel_size, dilation=layer.dilation)
    new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.down.weight.copy_(down.reshape(new.down.weight.shape).to(layer.weight.dtype))
        new.up.weight.copy_(up.reshape(new.up.weight.shape).to(layer.weight.dtype))
        if has_bias:
            new.up.bias.copy_(layer.bias)
    new.train(layer.training)
    return new, kept


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def low_rank(model: nn.Module, example: Any = None, *, rank: Optional[int] = None, energy: Optional[float] = None,
             skip: Sequence[str] = (), min_features: int = 16,
             where: str = "compress.low_rank") -> tuple[nn.Module, dict]:
    """Factorize every Linear and Conv1d/Conv2d (groups 1) of a copy of `model` (the input is not modified).

    Args:
        example: an input (tensor, tuple of arguments or dict of keyword arguments) for one forward pass that
            finds the output layer (see `kdistill.compress.arch.output_layers`), which is kept. Without it, the
            last Linear/conv registered in the model is taken as the output layer.
        rank: the rank of every factorized layer, or
        energy: in (0, 1]: per layer, the smallest rank keeping this fraction of the squared singular values.
        skip: module paths (and everything inside them) left as they are.
        min_features: layers with ``min(in, out) < min_features`` are kept (too small to gain).

    Returns:
        (model, report) with report ``{"layers": {path: {"in", "out", "rank", "energy_kept"}}, "params_before",
        "params_after", "kept": [{"path", "why"}]}``.
    """
    if (rank is None) == (energy is None):
        raise KDError("give exactly one of rank and energy", where=where,
                      fix="e.g. rank: 32 (fixed) or energy: 0.9 (the fraction of squared singular values kept)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise KDError(f"rank must be a positive integer, got {rank!r}", where=where, fix="e.g. rank: 32")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < float(energy) <= 1.0):
        raise KDError(f"energy must be in (0, 1], got {energy!r}", where=where, fix="e.g. energy: 0.9")
    if example is not None:
        heads = output_layers(model, example)
    else:
        layers = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        heads = layers[-1:]
    model = copy.deepcopy(model)
    params_before = _params(model)
    report_layers: dict[str, dict] = {}
    kept: list[dict] = []
    candidates = [(p, m) for p, m in model.named_modules() if p and factorizable(m)]
    for path, layer in candidates:
        if under(path, skip):
            kept.append({"path": path, "why": "skipped"})
            continue
        if path in heads:
            kept.append({"path": path, "why": "output layer"})
            continue
        out_ch, in_ch = layer.weight.shape[:2]
        if min(in_ch, out_ch) < min_features:
            kept.append({"path": path, "why": f"min(in, out) = {min(in_ch, out_ch)} < min_features {min_features}"})
            continue
        out_f, in_f = _matrix(layer).shape  # in_f: the fan-in (in channels x kernel for a conv)
        if energy is not None:
            s = torch.linalg.svdvals(_matrix(layer).double())
            r = rank_for_energy(s, float(energy))
        else:
            r = min(rank, in_f, out_f)
        if r * (in_f + out_f) >= in_f * out_f:
            kept.append({"path": path, "why": f"rank {r}: r*(in+out) = {r * (in_f + out_f)} >= in*out = "
                                              f"{in_f * out_f}, factorizing would not shrink it"})
            continue
        new, kept_energy = factorize(layer, r)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, new)
        report_layers[path] = {"in": int(in_f), "out": int(out_f), "rank": int(new.rank),
                               "energy_kept": round(kept_energy, 6)}
    return model, {"layers": report_layers, "params_before": params_before, "params_after": _params(model),
                   "kept": kept}
