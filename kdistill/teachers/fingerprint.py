"""What identifies a teacher, a dataset and its augmentation: the parts of a teacher-output cache's key."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import torch
from torch import nn

from kdistill.errors import CacheError


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the module's state dict: names, dtypes, shapes and bytes, plus its class."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_fingerprint(teacher: Any) -> dict:
    """What identifies a teacher: its weights and taps (a LiveTeacher or a module), or its own `fingerprint()`."""
    if hasattr(teacher, "fingerprint") and callable(teacher.fingerprint):
        return dict(teacher.fingerprint())
    model = teacher if isinstance(teacher, nn.Module) else getattr(teacher, "model", None)
    if not isinstance(model, nn.Module):
        raise CacheError(f"cannot tell which teacher a {type(teacher).__name__} is, so a cache of its outputs could "
                         f"not be checked later", fix="give it a fingerprint() method returning a dict of what "
                                                      "identifies it, or pass an nn.Module / LiveTeacher")
    taps = getattr(getattr(teacher, "taps", None), "specs", None) or {}
    return {"weights": weights_fingerprint(model), "taps": dict(sorted(taps.items()))}


def dataset_fingerprint(dataset: Any) -> str:
    if hasattr(dataset, "fingerprint") and callable(dataset.fingerprint):
        return str(dataset.fingerprint())
    raise CacheError(f"dataset '{getattr(dataset, 'name', type(dataset).__name__)}' has no fingerprint(), so a cache "
                     f"of teacher outputs for it could not be checked later",
                     fix="use an ArrayDataset or give the dataset a fingerprint() method (a hash of its contents)")


def augmentation_of(dataset: Any) -> Optional[dict]:
    """The dataset's declared input augmentation settings (None: inputs are the same every epoch)."""
    aug = getattr(dataset, "augmentation", None)
    if not aug:
        return None
    if not isinstance(aug, Mapping):
        aug = {"augmentation": repr(aug), "views": None}
    return dict(aug)


def augmentation_views(dataset: Any) -> int:
    """Views to cache per sample: 1 without augmentation; refuses augmentation drawn fresh at every step."""
    aug = augmentation_of(dataset)
    if aug is None:
        return 1
    views = aug.get("views")
    if not views:
        name = getattr(dataset, "name", type(dataset).__name__)
        raise CacheError(f"dataset '{name}' augments its inputs randomly at every step ({_describe(aug)}); cached "
                         f"teacher outputs would be targets for inputs the student never sees",
                         where="teacher.cache",
                         fix="set a fixed number of augmentation views (data.augment.views: N, the cache then "
                             "stores N views per sample keyed by (index, aug_seed)), or drop teacher.cache and "
                             "run the teacher live")
    return int(views)


def _describe(aug: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in aug.items() if k != "views") or "augmented"
