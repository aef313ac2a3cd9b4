"""The CLI's compile cache on disk: sha256 of .py bytes already compiled by this Python -> DAG ids.

Kept in $XDG_CACHE_HOME/dagcast (default ~/.cache/dagcast), one file per Python and validator
version. A missing or unreadable file is an empty cache; the cache never decides validity,
it only spares compiling the same bytes twice (see chalicelib.bundle.CompileCache).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from chalicelib.bundle import CompileCache
from dagcast.config import cache_home

MAX_ENTRIES = 100_000
JOURNAL_MAX = 20_000  # entries appended since the file was last written whole


class DiskCache(CompileCache):
    """The cache as loaded from disk, knowing how many entries its journal holds."""

    journaled: int = 0


def _path() -> Path:
    return cache_home() / f"compiled-{CompileCache.TAG.replace(':', '-')}.json"


def _journal(path: Path) -> Path:
    return path.with_suffix(".log")


def load() -> DiskCache:
    """The file's entries, then its journal's (one JSON `[sha256, dag_ids]` per line; a torn line is skipped)."""
    path = _path()
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    journaled = 0
    try:
        with _journal(path).open() as f:
            for line in f:
                journaled += 1
                try:
                    digest, dag_ids = json.loads(line)
                except (ValueError, TypeError):
                    continue  # an interrupted append: that file is compiled again, nothing worse
                if isinstance(digest, str):
                    entries[digest] = dag_ids
    except OSError:
        pass
    cache = DiskCache({k: v for k, v in entries.items() if isinstance(v, list)}, max_entries=MAX_ENTRIES)
    cache.journaled = journaled
    return cache


def save(cache: CompileCache) -> None:
    """Keep what the cache learned; failures only cost speed next time. The everyday deploy compiles a
    file or two: those are appended to the journal rather than the whole file (megabytes) rewritten."""
    if not cache.added:
        return
    path = _path()
    new = list(cache.entries.items())[-cache.added:]
    journaled = cache.journaled if isinstance(cache, DiskCache) else JOURNAL_MAX
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and journaled + len(new) <= JOURNAL_MAX:
            with _journal(path).open("a") as f:
                f.write("".join(json.dumps([k, v], separators=(",", ":")) + "\n" for k, v in new))
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".compiled-")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(cache.entries, separators=(",", ":")))  # the C encoder (json.dump's is Python)
        os.replace(tmp, path)
        _journal(path).unlink(missing_ok=True)
    except OSError:
        pass


# --- compiling in parallel ------------------------------------------------------------------

PARALLEL_MIN = 1500  # uncached .py files; below this, starting worker processes costs more than it saves
SAMPLE = 64  # files hashed to decide whether most of the folder is new to the cache


def _compile_part(root: str, relpaths: list[str]) -> dict[str, list[str]]:
    """In a worker process: the validator's own Python check (`_check_python`, what validate_stream runs
    on every .py member) on these files' bytes, read from the folder; returns the files that compiled, by
    the sha256 of those bytes, with their DAG ids. Bytes that change before they are bundled have another
    sha256: the validator compiles them itself. Files of SUSPECT_BYTES and more are left to the validator,
    which compiles them in a bounded worker."""
    import hashlib

    from chalicelib.bundle.compile_workers import SUSPECT_BYTES
    from chalicelib.bundle.python import _check_python

    learned: dict[str, list[str]] = {}
    for rel in relpaths:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                source = f.read(SUSPECT_BYTES)
        except OSError:
            continue  # the bundler says why it cannot ship
        if len(source) >= SUSPECT_BYTES:
            continue
        issue, dag_ids = _check_python(source, rel)
        if issue is None:
            learned[hashlib.sha256(source).hexdigest()] = dag_ids
    return learned


class Prewarm:
    """Compiles the .py files of a dags folder that `cache` has not seen, in worker processes, while the
    caller builds the bundle; `join()` puts what they learned into the cache. Only an optimization:
    whatever fails (no processes allowed, a worker dies) leaves the cache as it was, and the validator
    compiles those files itself. Entries come from the validator's own check, keyed by exact bytes."""

    def __init__(self, root: Path, relpaths: list[str], cache: CompileCache, workers: int | None = None) -> None:
        self._cache = cache
        self._futures: list[Any] = []
        self._pool: Any = None
        cpus = workers or os.cpu_count() or 1
        py = [p for p in relpaths if p.endswith(".py") and not (root / p).is_symlink()]
        if cpus < 2 or len(py) < PARALLEL_MIN:
            return
        # the everyday deploy changes a file or two: a sample tells, without reading every file
        sample = py[:: max(1, len(py) // SAMPLE)]
        if sum(cache.get(_sha256_of(root / p)) is None for p in sample) < len(sample) // 2:
            return
        todo = [p for p in py if cache.get(_sha256_of(root / p)) is None]
        if len(todo) < PARALLEL_MIN:
            return
        try:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: this process has threads (the API look-ahead)
            self._pool = ProcessPoolExecutor(max_workers=cpus, mp_context=multiprocessing.get_context("spawn"))
            size = -(-len(todo) // cpus)
            self._futures = [self._pool.submit(_compile_part, str(root), todo[i:i + size])
                             for i in range(0, len(todo), size)]
        except (OSError, ImportError, RuntimeError, ValueError):
            self.close()

    @property
    def compiling(self) -> bool:
        """Whether workers were started (many files new to the cache): until join(), the cache lacks them."""
        return bool(self._futures)

    def join(self) -> int:
        """Wait for the workers; returns how many entries they added to the cache."""
        added = 0
        for future in self._futures:
            try:
                for digest, dag_ids in future.result().items():
                    if self._cache.get(digest) is None:
                        self._cache.put(digest, dag_ids)
                        added += 1
            except Exception:  # noqa: BLE001 - a worker that failed only costs speed: the validator compiles
                continue
        self.close()
        return added

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures = []


def _sha256_of(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""  # unreadable: the bundler reports it
