"""Leases on a sidecar's version folders: readers hold a shared lock, the sidecar prunes only what it can lock alone.

A reader (Airflow's DAG processor through `dagcast.airflow`) takes a shared flock on
`<root>/leases/<folder>` before it trusts `versions/<folder>` and keeps it while it reads from that
folder. The sidecar removes a version only while it holds the exclusive lock, so a version in
use is never pruned. The kernel drops the lock when the reader's process ends, so a crashed
reader leaves nothing behind to expire.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LEASES = "leases"


def lease_path(root: Path, version: str) -> Path:
    return root / LEASES / str(version)


class Lease:
    """A shared lock on one version, held until release() or the end of the process."""

    def __init__(self, root: Path, version: str) -> None:
        self.root = root
        self.version = version
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        path = lease_path(self.root, self.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                # The pruner unlinks the file while it holds the exclusive lock: a lock taken on
                # an unlinked inode protects nothing, so try again on the file now at the path.
                if _same_file(fd, path):
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def claim_for_removal(root: Path, version: str) -> Iterator[bool]:
    """Yield True when no reader holds `version` (it may then be removed), else False.

    Never blocks. When claimed, the lease file is removed on exit, while still locked.
    """
    path = lease_path(root, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            if _same_file(fd, path):
                path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
