"""The last bundle made from each DAG folder, kept so that the next one reuses what did not change.

A bundle is a run of gzip members, each holding consecutive files (chalicelib.bundle.format): the
everyday deploy changes a file or two, and every other segment of its bundle is byte for byte one
of the last bundle's. The writer asks this cache for each segment by its key (what it holds) and
writes the bytes kept here instead of compressing the files again. Every segment read back is
checked against the sha256 recorded when it was written, so a damaged or stale copy costs only the
compression it would have saved.

It also keeps each file's sha256 with what the folder walk saw of it (size, mtime, ctime, inode,
device), the way git's index does: a file whose walk shows the same is not read again to be hashed
(nor at all, when its segment is reused). ctime cannot be set by a program and changes with every
write, so a file written since it was hashed shows another; one whose ctime was within RACY_NS of
the moment it was hashed could still be written in the same clock tick, and is hashed again.

Kept in $XDG_CACHE_HOME/dagcast/bundles (default ~/.cache/dagcast), one bundle per folder, the last
KEEP folders; failures only cost the work they would have saved.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dagcast.config import cache_home

if TYPE_CHECKING:
    from chalicelib.bundle.format import BundleInfo

KEEP = 4
RACY_NS = 2_000_000_000  # a file changed this close to being hashed is hashed again next time
_VERSION = 2


def _folder() -> Path:
    return cache_home() / "bundles"


def _name(dags_path: Path, compresslevel: int) -> str:
    where = os.path.realpath(dags_path).encode("utf-8", "surrogateescape")
    return f"{hashlib.sha256(where).hexdigest()[:24]}-{compresslevel}"


class LastBundle:
    """The segments of the last bundle made from a folder, by key (a format.SegmentSource)."""

    def __init__(self, fd: int, segments: dict[str, tuple[int, int, str]],
                 files: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> None:
        self._fd = fd
        self._segments = segments
        self._files = files or {}  # path -> (sha256, what the walk saw when it was hashed)
        self.hits = 0
        self.vouched = 0

    def vouch(self, stats: dict[str, tuple[int, int, int, int, int]]) -> Callable[[str], tuple[str, int] | None]:
        """For write_bundle's `known`: the sha256 and size of a file the walk saw exactly as when it was
        hashed (stats: path -> (size, mtime, ctime, inode, device), see bundler.Collected)."""

        def known(rel: str) -> tuple[str, int] | None:
            kept = self._files.get(rel)
            seen = stats.get(rel)
            if kept is None or seen is None or tuple(kept[1]) != seen:
                return None
            self.vouched += 1
            return kept[0], seen[0]

        return known

    def compressed(self, key: str) -> bytes | None:
        at = self._segments.get(key)
        if at is None:
            return None
        offset, size, sha256 = at
        try:
            data = os.pread(self._fd, size, offset)
        except OSError:
            return None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            return None
        self.hits += 1
        return data

    def close(self) -> None:
        os.close(self._fd)


def load(dags_path: Path, compresslevel: int) -> LastBundle | None:
    """The last bundle made from this folder at this level, or None (none kept, or unreadable)."""
    base = _folder() / _name(dags_path, compresslevel)
    try:
        fd = os.open(f"{base}.tgz", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        index = json.loads(Path(f"{base}.json").read_text())
        if index.get("version") != _VERSION:
            raise ValueError("another layout")
        segments = {str(k): (int(o), int(n), str(s)) for k, o, n, s in index["segments"] if k}
        files = {str(p): (str(sha), tuple(int(x) for x in seen)) for p, (sha, seen) in index["files"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        os.close(fd)
        return None
    return LastBundle(fd, segments, files)


def scratch() -> tuple[IO[bytes], str | None]:
    """The file a new bundle is written to: in the cache folder (its path is the second item), so
    that keeping it as the folder's last bundle is a rename, not a copy; a plain temporary file
    (and None) when the folder cannot be written. The caller removes the path if it is not kept."""
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out = tempfile.NamedTemporaryFile(dir=folder, prefix=".bundle-", delete=False)  # noqa: SIM115 - the caller's
    except OSError:
        return tempfile.TemporaryFile(prefix="dagcast-bundle-"), None  # noqa: SIM115 - the caller's
    return out, out.name


def save(dags_path: Path, compresslevel: int, written_at: str, info: BundleInfo,
         hashed: dict[str, tuple[str, tuple[int, int, int, int, int]]] | None = None, started_ns: int = 0) -> None:
    """Keep the bundle written at `written_at` (a scratch() file, flushed) as the folder's last: renamed
    into place, then its index. `hashed`: path -> (sha256, what the walk saw), of the files as
    bundled; `started_ns` (time.time_ns()) is when the walk began: a file whose ctime is not RACY_NS
    before it is left out (see above)."""
    settled = started_ns - RACY_NS
    files = {p: [sha, list(seen)] for p, (sha, seen) in (hashed or {}).items() if seen[2] < settled}
    folder = _folder()
    base = folder / _name(dags_path, compresslevel)
    written: list[str] = []
    try:
        fd, index = tempfile.mkstemp(dir=folder, prefix=".index-")
        written.append(index)
        with os.fdopen(fd, "w") as out:  # dumps, not dump: json.dump encodes in Python, 5x slower
            out.write(json.dumps({"version": _VERSION, "sha256": info.sha256,
                                  "segments": [[s.key, s.offset, s.size, s.sha256] for s in info.segments],
                                  "files": files}, separators=(",", ":")))
        os.replace(written_at, f"{base}.tgz")  # the index names digests: a reader between the two renames
        os.replace(index, f"{base}.json")  # finds segments that do not match, and compresses them
        written.clear()
        kept = sorted(folder.glob("*.tgz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        stale = time.time() - 3600  # scratch files of a CLI that was killed
        for left in [*folder.glob(".bundle-*"), *folder.glob(".index-*")]:
            if left.stat().st_mtime < stale:
                left.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
    finally:
        for path in written:
            Path(path).unlink(missing_ok=True)  # a half-written copy is never left behind

