"""Deltas: what changed in a version against the version live before it, as a small archive.

Most deploys change a file or two of hundreds. The ingest function sees every member of an
upload once while it validates it, so it keeps the bytes of the files that differ from the
live version's manifest and writes them, with every directory and symlink of the upload, as
a second small archive. A sidecar still on that live version downloads the delta instead of
the bundle, extracts it with the same rules, hard-links every other file from its own copy of
the base version, and checks the result against `files_sha256`, a digest of the validated
bundle's file list; on any difference it fetches the whole bundle (see
chalicelib.bundle.extract.extract_delta).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass

from chalicelib.bundle.report import FileEntry, MiB, files_digest
from chalicelib.bundle.rules import relative_link

MAX_DELTA_BYTES = 16 * MiB  # changed bytes kept in memory while validating; beyond this, no delta
MAX_REMOVED_CHARS = 64_000  # the removed paths travel in the version record and the announcement


@dataclass(frozen=True)
class BuiltDelta:
    data: bytes  # the archive (gzip-compressed PAX tar)
    sha256: str  # of data
    files: int  # files in the archive
    removed: list[str]  # files of the base that the new version no longer has
    files_sha256: str  # files_digest of the new version


class DeltaCollector:
    """Fed every member of a bundle during validation (see validate._run); builds its delta.

    `base` maps the live version's file paths to their sha256. A file goes into the delta when
    its bytes differ from the base's, or when it is executable (linked copies keep the base's mode).
    """

    def __init__(self, base: dict[str, str], max_bytes: int = MAX_DELTA_BYTES) -> None:
        self.base = base
        self._max = max_bytes
        self._files: list[tuple[str, int, bytes]] = []
        self._dirs: list[str] = []
        self._symlinks: list[tuple[str, str]] = []
        self._seen: set[str] = set()
        self._bytes = 0
        self.abandoned: str | None = None  # why there will be no delta

    def wants(self, size: int) -> bool:
        """Whether a member of this size should be offered with its bytes."""
        return self.abandoned is None and self._bytes + size <= self._max

    def add_dir(self, path: str) -> None:
        self._dirs.append(path)

    def add_symlink(self, path: str, target: str) -> None:
        self._symlinks.append((path, target))

    def add_file(self, path: str, mode: int, sha256: str, parts: list[bytes] | None) -> None:
        self._seen.add(path)
        if self.abandoned is not None or (self.base.get(path) == sha256 and not mode & 0o111):
            return
        if parts is None:
            self._abandon(f"more than {self._max} changed bytes")
            return
        data = b"".join(parts)
        self._bytes += len(data)
        self._files.append((path, mode, data))

    def _abandon(self, why: str) -> None:
        self.abandoned = why
        self._files.clear()

    def build(self, manifest: list[FileEntry], total_bytes: int) -> BuiltDelta | None:
        """The delta of a valid bundle (its manifest and uncompressed size), or None when the
        whole bundle would do as well (most of it changed) or the change is too large to carry."""
        if self.abandoned is None and self._bytes * 2 > total_bytes:
            self._abandon("most of the bundle changed")
        removed = sorted(self.base.keys() - self._seen)
        if self.abandoned is None and sum(len(p) + 3 for p in removed) > MAX_REMOVED_CHARS:
            self._abandon(f"{len(removed)} files removed")
        if self.abandoned is not None:
            return None
        data = _archive(self._dirs, self._files, self._symlinks)
        return BuiltDelta(
            data=data,
            sha256=hashlib.sha256(data).hexdigest(),
            files=len(self._files),
            removed=removed,
            files_sha256=files_digest(manifest),
        )


def _archive(dirs: list[str], files: list[tuple[str, int, bytes]], symlinks: list[tuple[str, str]]) -> bytes:
    buf = io.BytesIO()
    # No timestamp in the gzip header (TarInfo's mtime is 0 too): a redelivery, or a second worker, that
    # builds the same deploy's delta writes the same bytes, so whichever write lands last matches the
    # sha256 the version recorded.
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in dirs:
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, mode, data in files:
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o755 if mode & 0o111 else 0o644
            tar.addfile(info, io.BytesIO(data))
        for path, target in symlinks:
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.SYMTYPE, 0o777
            info.linkname = relative_link(path.rpartition("/")[0], target)
            tar.addfile(info)
    return buf.getvalue()
