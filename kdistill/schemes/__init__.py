"""Training schemes: who teaches whom, and when. Each is a plan of rounds handed to the one `Engine`.

``run(cfg, run_dir)`` runs the scheme named by ``cfg.scheme.name`` (default ``offline``); see docs/schemes.md.
Each scheme module holds its config section (``MutualScheme``, ...) next to its code; `kdistill.config` gathers
them into `RunConfig`. Modules are imported on use, so importing `kdistill.schemes` stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

SCHEMES: dict[str, str] = {
    "offline": "kdistill.schemes.offline:run",
    "mutual": "kdistill.schemes.mutual:run",
    "born_again": "kdistill.schemes.self_distill:run_born_again",
    "byot": "kdistill.schemes.self_distill:run_byot",
    "snapshot": "kdistill.schemes.self_distill:run_snapshot",
    "multi_teacher": "kdistill.schemes.multi_teacher:run",
    "specialists": "kdistill.schemes.specialists:run",
    "assistant": "kdistill.schemes.assistant:run",
    "lifelong": "kdistill.schemes.lifelong:run",
    "cross_modal": "kdistill.schemes.cross_modal:run",
    "selective": "kdistill.schemes.selective:run",
}


def scheme_runner(name: str):
    from kdistill.errors import ConfigError

    if name not in SCHEMES:
        raise ConfigError(f"unknown scheme '{name}'", where="scheme.name", fix=f"use one of {', '.join(SCHEMES)}")
    module, _, attr = SCHEMES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def run(cfg, run_dir: Optional[Path] = None, *, progress: bool = True, log=print,
        trust_checkpoint: bool = False, weak_teacher: str = "warn") -> dict:
    """Run the job of a config with its scheme; returns the summary (also written to RUN_DIR/summary.json).
    `trust_checkpoint` allows full unpickling of .pt/.pth teacher weights (trusted files only);
    `weak_teacher` "refuse" stops at a teacher at chance level on the test set (default "warn")."""
    return scheme_runner(cfg.scheme.name)(cfg, run_dir, progress=progress, log=log,
                                          trust_checkpoint=trust_checkpoint, weak_teacher=weak_teacher)


__all__ = ["SCHEMES", "run", "scheme_runner"]
