"""The audit's measurements, as functions of a model and tensors (no run directory, no config).

* `strip_entropy`: STRIP (Gao et al. 2019, "STRIP: a defence against trojan attacks on deep neural networks"):
  each input x is superimposed with N held-out inputs x_j (``add``: x + x_j, the paper's superimposition, or
  ``alpha``: (1 - a) x + a x_j) and the entropy of the model's prediction is averaged over the N copies::

      H(x) = (1/N) sum_j  - sum_c p_c(x ⊕ x_j) log2 p_c(x ⊕ x_j)

  A trojaned input keeps its (trigger's) class whatever is blended in: abnormally low H;
* `reconstruct_triggers`: for every target class t a mask m in [0, 1] and a pattern p (in the data's range)
  with x' = (1 - m) * x + m * p, minimising CE(f(x'), t) + lambda * |m|_1 (Neural Cleanse, Wang et al. 2019);
* `anomaly_index`: |L1_t - median| / (1.4826 * MAD) over the classes' minimal mask norms; a class whose norm is
  below the median with an index above 2 is flagged;
* `label_noise_suspects`, `confidence_histogram`, `per_class_accuracy`, `pairwise_agreement`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from kdistill.outputs import call_model, logits_of

__all__ = ["anomaly_index", "apply_trigger", "confidence_histogram", "entropy_bits", "label_noise_suspects",
           "pairwise_agreement", "per_class_accuracy", "predict", "reconstruct_triggers", "strip_entropy",
           "strip_picks", "superimpose", "trigger_success"]

MAD_CONSISTENCY = 1.4826  # MAD * 1.4826 estimates the standard deviation of normally distributed norms


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Logits of `model` on the rows of `x` (eval mode, no gradients, the model's mode restored)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            outs.append(logits_of(call_model(model, x[start:start + batch_size].to(device))).float().cpu())
    model.train(was)
    return torch.cat(outs) if outs else torch.zeros(0)


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (bits) of softmax(logits) along the last axis, computed in float64."""
    log_p = torch.log_softmax(logits.double(), -1)
    return -(log_p.exp() * log_p).sum(-1) / math.log(2)


def superimpose(x: torch.Tensor, others: torch.Tensor, blend: str = "add", alpha: float = 0.5) -> torch.Tensor:
    """x (B, ...) blended with others (B, N, ...): (B, N, ...)."""
    x = x.unsqueeze(1)
    if blend == "add":
        return x + others
    if blend == "alpha":
        return (1 - alpha) * x + alpha * others
    raise ValueError(f"unknown blend {blend!r}: use 'add' or 'alpha'")


def strip_picks(rows: int, pool: int, overlays: int, *, seed: int = 0, exclude_self: bool = False) -> torch.Tensor:
    """(rows, overlays) indices into the pool, drawn with replacement (seeded); with `exclude_self` row i never
    draws pool row i."""
    gen = torch.Generator().manual_seed(seed)
    if not exclude_self:
        return torch.randint(0, pool, (rows, overlays), generator=gen)
    if pool < 2:
        raise ValueError("STRIP needs at least 2 held-out inputs")
    offsets = torch.randint(1, pool, (rows, overlays), generator=gen)
    return (torch.arange(rows).unsqueeze(1) + offsets) % pool


def strip_entropy(model: nn.Module, x: torch.Tensor, pool: torch.Tensor, overlays: int, *, blend: str = "add",
                  alpha: float = 0.5, seed: int = 0, exclude_self: bool = False) -> torch.Tensor:
    """STRIP entropy (bits) of each row of `x`: the mean prediction entropy over `overlays` copies, each blended
    with a row of `pool` drawn at random (seeded). With `exclude_self` (x is `pool`), row i never draws itself."""
    picks = strip_picks(len(x), len(pool), overlays, seed=seed, exclude_self=exclude_self)
    out = []
    rows = max(1, 4096 // overlays)
    for start in range(0, len(x), rows):
        stop = min(len(x), start + rows)
        blended = superimpose(x[start:stop], pool[picks[start:stop]], blend, alpha)
        logits = predict(model, blended.reshape(-1, *x.shape[1:]))
        out.append(entropy_bits(logits).reshape(stop - start, overlays).mean(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def apply_trigger(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x' = (1 - m) * x + m * p (mask and pattern broadcast over the batch)."""
    return (1 - mask) * x + mask * pattern


def _mask_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """One mask value per position: shared across channels of a (C, H, W) image, per element otherwise."""
    shape = tuple(input_shape)
    return (1, *shape[1:]) if len(shape) == 3 else shape


def reconstruct_triggers(model: nn.Module, x: torch.Tensor, num_classes: int, *, steps: int = 100,
                         lr: float = 0.1, l1_weight: float = 0.01, target_success: float = 0.9,
                         adapt_every: int = 10, seed: int = 0, bounds: Optional[tuple[float, float]] = None) -> dict:
    """For every class t, a small mask m_t and pattern p_t that send the rows of `x` to t.

    All classes are optimised together (one forward of C * B rows per step) with Adam on unconstrained
    parameters: m = sigmoid(a), p = lo + (hi - lo) * sigmoid(b), [lo, hi] the range of `x` (or `bounds`). The
    loss per class is mean CE(f(x'), t) + lambda_t * |m_t|_1. Every `adapt_every` steps lambda_t is multiplied by
    1.5 when the batch's attack success is at least `target_success` and divided by 1.5 otherwise (the adaptive
    lambda of Neural Cleanse, simplified); the smallest mask seen at a successful check is kept.

    Returns ``{"norms", "success", "reached", "masks", "patterns"}``: per class the kept mask's L1 norm, its
    success rate on `x`, whether it reached `target_success` (otherwise the last mask is kept), and the tensors.
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x = x.detach().float().to(device)
    lo, hi = bounds if bounds is not None else (float(x.min()), float(x.max()))
    shape = _mask_shape(x.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    mask_raw = (torch.randn((num_classes, *shape), generator=gen) * 0.1 - 2.0).to(device).requires_grad_(True)
    pattern_raw = (torch.randn((num_classes, *x.shape[1:]), generator=gen)).to(device).requires_grad_(True)
    lam = torch.full((num_classes,), float(l1_weight), device=device)
    targets = torch.arange(num_classes, device=device).repeat_interleave(len(x))
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=lr)
    best_norm = torch.full((num_classes,), float("inf"))
    best_mask = torch.zeros((num_classes, *shape))
    best_pattern = torch.zeros((num_classes, *x.shape[1:]))
    reached = torch.zeros(num_classes, dtype=torch.bool)
    try:
        for step in range(1, steps + 1):
            mask = torch.sigmoid(mask_raw)
            pattern = lo + (hi - lo) * torch.sigmoid(pattern_raw)
            triggered = apply_trigger(x.unsqueeze(0), mask.unsqueeze(1), pattern.unsqueeze(1))
            logits = logits_of(call_model(model, triggered.reshape(-1, *x.shape[1:]))).float()
            ce = nn.functional.cross_entropy(logits, targets, reduction="none").reshape(num_classes, -1).mean(1)
            norms = mask.reshape(num_classes, -1).sum(1)
            loss = (ce + lam * norms).sum()
            grads = torch.autograd.grad(loss, [mask_raw, pattern_raw])
            mask_raw.grad, pattern_raw.grad = grads
            opt.step()
            if step % adapt_every == 0 or step == steps:
                with torch.no_grad():
                    success = (logits.argmax(-1) == targets).float().reshape(num_classes, -1).mean(1)
                    ok = success >= target_success
                    for t in torch.nonzero(ok.cpu()).flatten().tolist():
                        if float(norms[t]) < float(best_norm[t]):
                            best_norm[t] = float(norms[t])
                            best_mask[t], best_pattern[t] = mask[t].detach().cpu(), pattern[t].detach().cpu()
                            reached[t] = True
                    lam = torch.where(ok, lam * 1.5, lam / 1.5)
        with torch.no_grad():  # classes that never reached the target keep their last mask
            mask = torch.sigmoid(mask_raw).cpu()
            pattern = (lo + (hi - lo) * torch.sigmoid(pattern_raw)).cpu()
            for t in range(num_classes):
                if not reached[t]:
                    best_mask[t], best_pattern[t] = mask[t], pattern[t]
                    best_norm[t] = float(mask[t].sum())
    finally:
        model.train(was)
    success = torch.stack([trigger_success(model, x.cpu(), best_mask[t], best_pattern[t], t)
                           for t in range(num_classes)])
    return {"norms": best_norm.double(), "success": success, "reached": reached, "masks": best_mask,
            "patterns": best_pattern}


def trigger_success(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                    target: int) -> torch.Tensor:
    """Fraction of the rows of `x` that `model` assigns to `target` once the trigger is applied."""
    if len(x) == 0:
        return torch.tensor(float("nan"))
    logits = predict(model, apply_trigger(x, mask, pattern))
    return (logits.argmax(-1) == target).float().mean()


def anomaly_index(norms: Sequence[float], cutoff: float = 2.0) -> dict:
    """The MAD-based anomaly index of each class's minimal trigger norm (Wang et al. 2019).

    index_t = |norm_t - median| / (1.4826 * MAD), MAD = median_t |norm_t - median|. Flagged: norm below the median
    and index above `cutoff`. With MAD = 0 an index is 0 at the median and infinite elsewhere.
    Returns ``{"median", "mad", "index", "flagged", "min_class", "score", "suspected_class"}``: ``score`` is the
    index of the class with the smallest norm, ``suspected_class`` the flagged class with the largest index."""
    values = torch.as_tensor([float(v) for v in norms], dtype=torch.float64)
    median = _median(values)
    deviations = (values - median).abs()
    mad = _median(deviations)
    scale = MAD_CONSISTENCY * mad
    if scale > 0:
        index = deviations / scale
    else:
        index = torch.where(deviations > 0, torch.full_like(deviations, float("inf")), torch.zeros_like(deviations))
    flagged = [t for t in range(len(values)) if values[t] < median and index[t] > cutoff]
    min_class = int(values.argmin())
    suspected = max(flagged, key=lambda t: float(index[t])) if flagged else None
    return {"median": median, "mad": mad, "index": [float(i) for i in index], "flagged": flagged,
            "min_class": min_class, "score": float(index[min_class]), "suspected_class": suspected}


def _median(values: torch.Tensor) -> float:
    """The median (the mean of the two middle values for an even count)."""
    ordered = values.sort().values
    n = len(ordered)
    return float(ordered[n // 2]) if n % 2 else float(ordered[n // 2 - 1:n // 2 + 1].mean())


def label_noise_suspects(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.9) -> dict:
    """Rows whose label the model confidently contradicts: p(class) >= `threshold` for a class other than the
    label (rows labelled -100 are skipped). Returns ``{"rows", "labels", "classes", "confidence", "checked"}``,
    rows sorted by confidence, highest first."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    labelled = labels != -100
    hit = labelled & (pred != labels) & (conf >= threshold)
    rows = torch.nonzero(hit).flatten()
    order = conf[rows].argsort(descending=True, stable=True)
    rows = rows[order]
    return {"rows": rows, "labels": labels[rows], "classes": pred[rows], "confidence": conf[rows],
            "checked": int(labelled.sum())}


def confidence_histogram(logits: torch.Tensor, bins: int = 10) -> dict:
    """Counts of the top-class probability in `bins` equal-width bins of [0, 1] (the last bin includes 1)."""
    conf = logits.float().softmax(-1).max(-1).values
    counts = torch.histc(conf.clamp(0, 1), bins=bins, min=0.0, max=1.0)
    return {"edges": [i / bins for i in range(bins + 1)], "counts": [int(c) for c in counts]}


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    """Top-1 accuracy of each class's rows (None for a class without rows)."""
    pred = logits.argmax(-1)
    out = []
    for c in range(num_classes):
        rows = labels == c
        out.append(float((pred[rows] == c).float().mean()) if rows.any() else None)
    return out


def pairwise_agreement(logits: Sequence[torch.Tensor]) -> list:
    """K x K matrix: fraction of rows where models i and j give the same top-1 class."""
    preds = [z.argmax(-1) for z in logits]
    return [[float((a == b).float().mean()) for b in preds] for a in preds]
