"""Per-example outputs a run keeps for its report: test-set logits and labels, sentence-pair similarities.

* ``predictions.safetensors`` (classification): ``labels`` (int64, N) and ``<model>_logits`` (float32, N x C)
  for teacher, student and baseline when present: the very logits the summary's accuracy, agreement and ECE
  were computed from. Its metadata holds ``ece_bins`` (the bins of the summary's ECE) and ``models``.
* ``similarities.safetensors`` (sentence embeddings): ``teacher`` and ``student`` (float64), the cosine
  similarities of the same held-out sentence pairs under each model (a seeded sample of at most `MAX_PAIRS` of
  the pairs the summary's Spearman was computed over), with ``pairs_total`` and ``spearman_pairs`` in metadata.

Both are written atomically (`kdistill.files.save_weights`) and read back by `load_arrays`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from kdistill.errors import CheckpointError
from kdistill.files import load_weights, save_weights

PREDICTIONS_FILE = "predictions.safetensors"
SIMILARITIES_FILE = "similarities.safetensors"
MAX_PAIRS = 20000

__all__ = ["MAX_PAIRS", "PREDICTIONS_FILE", "SIMILARITIES_FILE", "load_arrays", "save_predictions",
           "save_similarities"]


def save_predictions(path: Path, labels: torch.Tensor, logits: Mapping[str, torch.Tensor], *, ece_bins: int) -> None:
    """Write `labels` and each model's test-set `logits` (``{"teacher": ..., "student": ...}``) to `path`."""
    tensors = {"labels": labels.detach().long().cpu()}
    for name, value in logits.items():
        if value.shape[0] != labels.shape[0]:
            raise ValueError(f"{name} logits have {value.shape[0]} rows for {labels.shape[0]} labels")
        tensors[f"{name}_logits"] = value.detach().float().cpu()
    save_weights(Path(path), tensors, {"kind": "predictions", "ece_bins": int(ece_bins), "models": ",".join(logits)})


def save_similarities(path: Path, teacher: torch.Tensor, student: torch.Tensor, *, seed: int = 0) -> None:
    """Write the pairwise cosine similarities of the same sentence pairs under teacher and student (a seeded
    sample of at most `MAX_PAIRS` pairs)."""
    total = int(teacher.numel())
    keep = torch.arange(total)
    if total > MAX_PAIRS:
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:MAX_PAIRS].sort().values
    save_weights(Path(path), {"teacher": torch.as_tensor(teacher).double().reshape(-1)[keep],
                              "student": torch.as_tensor(student).double().reshape(-1)[keep]},
                 {"kind": "similarities", "pairs_total": total})


def load_arrays(path: Path) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """(tensors, metadata) of a file written here, or None when it does not exist. A damaged file is a
    `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    tensors = load_weights(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own types for damaged headers
        raise CheckpointError(f"cannot read {path}: {err}", fix="run the job again to re-create it") from None
    return tensors, meta
