"""Writing a checked bundle (or a delta over an earlier version) to a new folder, safely.

`_Extractor` writes strictly below its folder through directory file descriptors opened with
`O_NOFOLLOW` (never following a symlink, even one made by a concurrent writer), creates symlinks
only after every file exists, makes the folder durable with one `syncfs` (an fsync per file
elsewhere), and removes it on any failure. The caller renames the finished folder into place.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, BinaryIO

from chalicelib.bundle.cache import Reuse, present_with
from chalicelib.bundle.report import BundleRejected, DeltaMismatch, Limits, Report, files_digest
from chalicelib.bundle.rules import relative_link
from chalicelib.bundle.validate import _run


class _Extractor:
    """Writes checked members strictly below dest, never following existing symlinks."""

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    _FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

    def __init__(self, dest: Path) -> None:
        os.mkdir(dest, 0o755)
        self.dest = dest
        self._fds: dict[str, int] = {}
        self._made: list[str] = [""]
        self._symlinks: list[tuple[str, str]] = []
        try:
            root = os.open(dest, self._DIR_FLAGS)
            os.fchmod(root, 0o755)
        except OSError:
            os.rmdir(dest)
            raise
        self._fds[""] = root

    def _dir(self, rel: str) -> int:
        """An fd for directory rel (created if missing); refuses symlinks and non-directories."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        if len(self._fds) > 256:
            self._close_dirs()
        parts = rel.split("/")
        have = 0
        for i in range(len(parts) - 1, 0, -1):
            if "/".join(parts[:i]) in self._fds:
                have = i
                break
        fd = self._fds["/".join(parts[:have])]
        for i in range(have, len(parts)):
            sub = "/".join(parts[: i + 1])
            try:
                os.mkdir(parts[i], 0o755, dir_fd=fd)
                self._made.append(sub)
                made = True
            except FileExistsError:
                made = False
            fd = os.open(parts[i], self._DIR_FLAGS, dir_fd=fd)  # ELOOP / ENOTDIR on anything odd
            self._fds[sub] = fd
            if made:
                os.fchmod(fd, 0o755)
        return fd

    def mkdir(self, rel: str) -> None:
        self._dir(rel)

    def open_file(self, rel: str, mode: int) -> int:
        parent, _, name = rel.rpartition("/")
        fd = os.open(name, self._FILE_FLAGS, 0o600, dir_fd=self._dir(parent))
        os.fchmod(fd, 0o755 if mode & 0o111 else 0o644)
        return fd

    @staticmethod
    def write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    @staticmethod
    def close_file(fd: int) -> None:
        try:
            if _syncfs is None:  # no syncfs(2): make each file durable on its own
                os.fsync(fd)
        finally:
            os.close(fd)

    def link(self, rel: str, source: str) -> bool:
        """Hard-link an identical, non-executable file of an earlier version instead of writing it;
        False if not possible (the caller then writes the bytes itself)."""
        parent, _, name = rel.rpartition("/")
        fd = self._dir(parent)
        try:
            os.link(source, name, dst_dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o111:  # the bundle's member is a plain 0644 file
            os.unlink(name, dir_fd=fd)
            return False
        return True

    def add_symlink(self, rel: str, target: str) -> None:
        self._symlinks.append((rel, target))

    def finish(self) -> None:
        """Create symlinks (after every file exists), then fsync all directories."""
        for rel, target in self._symlinks:
            parent, _, name = rel.rpartition("/")
            os.symlink(relative_link(parent, target), name, dir_fd=self._dir(parent))
        if _syncfs is not None:
            # One flush of the filesystem makes every file and directory written here durable,
            # far cheaper than an fsync per file; the caller renames the folder into place after.
            if _syncfs(self._fds[""]) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs failed: {os.strerror(err)}")
        else:
            for rel in self._made:
                os.fsync(self._dir(rel))
        self._close_dirs(keep_root=False)

    def _close_dirs(self, keep_root: bool = True) -> None:
        for rel, fd in list(self._fds.items()):
            if rel or not keep_root:
                os.close(fd)
                del self._fds[rel]

    def abort(self) -> None:
        self._close_dirs(keep_root=False)
        shutil.rmtree(self.dest, ignore_errors=True)


def _load_syncfs() -> Any:
    """libc's syncfs(2) where there is one (Linux), else None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def extract_bundle(
    fileobj: BinaryIO, dest: Path, limits: Limits | None = None, *, check_python: bool = False, reuse: Reuse | None = None
) -> Report:
    """Validate and extract a bundle into dest, a directory that must not exist yet.

    Raises BundleRejected (after removing dest) when the bundle breaks any rule; other
    errors (for example a full disk) also remove dest and then propagate. DAG ids are
    only filled in the manifest when check_python is true. With `reuse`, files whose bytes
    equal the earlier version's are hard-linked from it instead of written again.
    """
    return _extract(dest, lambda sink: _run(fileobj, limits, check_python, sink, reuse))


def _extract(dest: Path, fill: Callable[[_Extractor], Report]) -> Report:
    """Create dest, fill it, and finish it when the report is valid; on an invalid report
    (BundleRejected) or any error dest is removed."""
    sink = _Extractor(dest)
    try:
        report = fill(sink)
        if report.valid:
            sink.finish()
    except BaseException:
        sink.abort()
        raise
    if not report.valid:
        sink.abort()
        raise BundleRejected(report)
    return report



def _copy_verified(sink: _Extractor, rel: str, source: str, sha256: str) -> None:
    """Write rel as a plain file with the bytes of source, which must hash to sha256 (a base copy that
    cannot be linked: it is executable, say, and the new version's file is not)."""
    try:
        with open(source, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            data = f.read()
    except OSError as exc:
        raise DeltaMismatch(f"{rel}: the earlier version's copy cannot be read ({exc.strerror})") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DeltaMismatch(f"{rel}: the earlier version's copy was changed on disk")
    fd = sink.open_file(rel, 0o644)
    try:
        _Extractor.write(fd, data)
    finally:
        _Extractor.close_file(fd)


def extract_delta(
    fileobj: BinaryIO,
    dest: Path,
    base: Reuse,
    removed: Collection[str],
    files_sha256: str,
    limits: Limits | None = None,
) -> Report:
    """Build version folder dest (which must not exist yet) from an earlier version and a delta.

    The delta archive (see chalicelib.bundle.delta) is checked and extracted like a bundle; every file
    of `base` not in `removed` and not in the archive is hard-linked from base.folder. The
    result must match `files_sha256`, the digest of the new version's file list. Raises
    BundleRejected when the archive breaks a rule, DeltaMismatch when the result would differ
    from the version (or a base file cannot be reused); dest is removed on any error. The
    returned report's manifest lists every file of the result.
    """
    gone = set(removed)
    kept = {path: entry for path, entry in base.files.items() if path not in gone} if gone else base.files
    present = present_with(kept) if gone else base.present

    def fill(sink: _Extractor) -> Report:
        report = _run(fileobj, limits, False, sink, present=present)
        if not report.valid:
            return report
        entries = list(report.manifest)
        written = {e.path for e in entries}
        known = base.entries
        for path, (sha256, _) in kept.items():
            if path in written:
                continue
            source = os.path.join(base.folder, path)
            if not sink.link(path, source):
                _copy_verified(sink, path, source, sha256)
            entries.append(known[path])
        if files_digest(entries) != files_sha256:
            raise DeltaMismatch("the files after applying the delta differ from the version's file list")
        entries.sort(key=lambda e: e.path)
        return report.model_copy(update={"manifest": entries, "files": len(entries), "bytes": sum(e.size for e in entries)})

    return _extract(dest, fill)
