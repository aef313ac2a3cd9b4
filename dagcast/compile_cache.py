"""The CLI's compile cache on disk: sha256 of .py bytes already compiled by this Python -> DAG ids.

Kept in $XDG_CACHE_HOME/dagcast (default ~/.cache/dagcast), one file per Python and validator
version. A missing or unreadable file is an empty cache; the cache never decides validity,
it only spares compiling the same bytes twice (see chalicelib.validation.CompileCache).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from chalicelib.validation import CompileCache

MAX_ENTRIES = 100_000


def _path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dagcast" / f"compiled-{CompileCache.TAG.replace(':', '-')}.json"


def load() -> CompileCache:
    try:
        entries = json.loads(_path().read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    return CompileCache({k: v for k, v in entries.items() if isinstance(v, list)}, max_entries=MAX_ENTRIES)


def save(cache: CompileCache) -> None:
    """Write the cache back when it learned something; failures only cost speed next time."""
    if not cache.added:
        return
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".compiled-")
        with os.fdopen(fd, "w") as f:
            json.dump(cache.entries, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:
        pass
