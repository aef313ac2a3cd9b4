"""What a deploy records about the git checkout it came from."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def describe(folder: Path) -> dict[str, Any] | None:
    """Commit SHA, branch, author, subject and a dirty flag, or None outside a git checkout."""
    head = _git(folder, "log", "-1", "--format=%H%x00%an <%ae>%x00%s")
    if not head:
        return None
    sha, author, subject = (head.split("\0") + ["", ""])[:3]
    branch = _git(folder, "rev-parse", "--abbrev-ref", "HEAD")
    status = _git(folder, "status", "--porcelain", "--", ".")
    return {
        "sha": sha,
        "branch": None if branch in (None, "HEAD") else branch,
        "author": author[:256],
        "subject": subject[:1024],
        "dirty": bool(status),
    }
