"""The file lists of the bundles this machine deployed, by the bundle's sha256.

The everyday deploy comes from the machine that deployed the live version: when the live version's
sha256 is that of a bundle deployed from here, its file list (paths, sizes, sha256 and DAG ids, as the
local validation of those exact bytes found them) is read from here instead of downloaded (a
megabyte at 10,000 files, half a second on a 10 Mbit/s link). It only serves the DAG diff and the
delta: a wrong entry makes a delta that ingest refuses (the rebuilt bundle is checked against the
announced sha256), and the CLI then uploads the whole bundle. Kept in
$XDG_CACHE_HOME/dagcast/manifests (default ~/.cache/dagcast), the last KEEP of them; failures only
cost the download.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from chalicelib.bundle import FileEntry
from dagcast.config import cache_home

KEEP = 4
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _folder() -> Path:
    return cache_home() / "manifests"


def load(sha256: str) -> list[FileEntry] | None:
    """The file list of the bundle with this sha256, if one was deployed from here; None otherwise."""
    if not _SHA256.fullmatch(sha256):
        return None
    from chalicelib.manifest import decode_manifest

    try:
        return decode_manifest((_folder() / f"{sha256}.json").read_bytes())
    except (OSError, ValueError):
        return None


def save(sha256: str, entries: list[FileEntry]) -> None:
    """Keep the file list of a bundle just uploaded (written whole, then renamed into place)."""
    if not _SHA256.fullmatch(sha256):
        return
    from chalicelib.manifest import manifests

    folder = _folder()
    tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-")
        with os.fdopen(fd, "wb") as f:
            f.write(manifests().dump_json(entries))
        os.replace(tmp, folder / f"{sha256}.json")
        tmp = None
        kept = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # a half-written copy is never left behind
