"""Where a result came from: the git revision of the source tree (ground floor; committed results record it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_revision(root: Path = ROOT) -> str:
    """``HEAD``'s commit, with ``+uncommitted`` when tracked files have changes (untracked ones such as logs are
    ignored); ``unknown`` outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+uncommitted" if dirty.strip() else "")
