"""A version's bundle rebuilt from an earlier version's bundle and an uploaded delta.

`dagcast deploy` on a slow link uploads a delta (see chalicelib.bundle.delta) instead of the bundle
when the deployment has a live version. The ingest function turns it back into the bundle the CLI
built, byte for byte: the delta is read with every rule of a bundle (bounded to MAX_DELTA_BYTES
uncompressed, held in memory), the base bundle is streamed member by member, and the two are merged
in path order through the same deterministic writer (format.BundleWriter), which writes the base's
segments that the new version keeps as they were compressed (`BaseSegments`). The result is checked
against the digest of the new version's file list here, and against the sha256 and size the deploy
announced by the caller; then it is validated like any uploaded bundle: read again, or, with a
`WrittenCheck`, as it is written (see there for when the base's verdicts may be reused).
"""
from __future__ import annotations

import bisect
import hashlib
import io
import shutil
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from tarfile import REGTYPE, SYMTYPE
from typing import BinaryIO, cast

from chalicelib.bundle.delta import MAX_DELTA_BYTES
from chalicelib.bundle.format import BundleInfo, BundleWriter, Planned, Segment, gzip_member, runs, write_run
from chalicelib.bundle.report import BundleRejected, DeltaMismatch, Limits, triples_digest
from chalicelib.bundle.rules import BundleScan, relative_link
from chalicelib.bundle.segments import SPOOL_IN_MEMORY, BaseSegments, SegmentIndex
from chalicelib.bundle.validate import _run
from chalicelib.bundle.written import WrittenCheck


@dataclass
class UploadedDelta:
    """The members of a checked delta archive: file bytes and symlink targets (paths from the root), and
    the sha256 of the archive as read."""

    files: dict[str, bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def paths(self) -> list[str]:
        return sorted(self.files.keys() | self.symlinks.keys())


class _Held:
    """An extraction sink that keeps the members in memory (validate.Sink)."""

    def __init__(self) -> None:
        self.delta = UploadedDelta()
        self._open: dict[int, tuple[str, list[bytes]]] = {}

    def mkdir(self, rel: str) -> None:
        pass  # bundles hold no directory entries: a folder exists because a file is in it

    def add_symlink(self, rel: str, target: str) -> None:
        self.delta.symlinks[rel] = target

    def open_file(self, rel: str, mode: int) -> int:
        fd = len(self._open)
        self._open[fd] = (rel, [])
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self._open[fd][1].append(data)

    def close_file(self, fd: int) -> None:
        rel, parts = self._open.pop(fd)
        self.delta.files[rel] = b"".join(parts)

    def link(self, rel: str, source: str) -> bool:
        return False


def read_delta(fileobj: BinaryIO, limits: Limits, base_files: Collection[str], removed: Collection[str]) -> UploadedDelta:
    """The delta archive checked with a bundle's rules (its symlinks may point at base files that stay).

    BundleRejected names what is wrong with it; nothing of it is kept past MAX_DELTA_BYTES.
    """
    gone = set(removed)
    present: set[str] = set()
    for path in base_files:
        if path in gone:
            continue
        present.add(path)
        parent = path.rpartition("/")[0]
        while parent and parent not in present:
            present.add(parent)
            parent = parent.rpartition("/")[0]
    bounded = limits.model_copy(update={"max_total_bytes": min(limits.max_total_bytes, MAX_DELTA_BYTES)})
    sink = _Held()
    report = _run(fileobj, bounded, False, sink, present=frozenset(present))
    if not report.valid:
        raise BundleRejected(report)
    sink.delta.sha256 = report.sha256  # a valid archive was read, and hashed, to its end
    return sink.delta


def rebuild_bundle(
    base: BinaryIO, limits: Limits, delta: UploadedDelta, removed: Collection[str], files_sha256: str, out: BinaryIO,
    base_files: Mapping[str, tuple[str, int]], compresslevel: int = 6, check: WrittenCheck | None = None,
    base_index: SegmentIndex | None = None,
) -> BundleInfo:
    """Write to out the bundle of the base version's files, less `removed`, with the delta's files and
    symlinks (a delta carries every symlink of its version). DeltaMismatch when the base bundle is not
    in the canonical form write_bundle makes, or the result's file list does not match files_sha256.
    `compresslevel` must be the one the new bundle was written with for the bytes to be the same.

    `base_files` (path -> (sha256, size)): the base version's file list as ingest recorded it when it
    validated that bundle. Its files' bytes are not hashed again here: a base member it does not list,
    at that size, is a mismatch, and bytes that differ from it change the result's sha256, which the
    caller checks against the one the deploy announced (and validation hashes every file anyway).
    With `check`, each member written is shown to it, in the order written: the delta's files with
    their bytes, the base's as kept (their verdicts reused: see WrittenCheck).

    With `base_index` (the base's segments as ingest recorded them, at this level), the new bundle's
    segments are planned from the file lists alone: the ones the base has are copied from it without
    being inflated, and only the base's segments holding files of the others are read (see
    _IndexedRebuild). Without, the base is scanned whole and offers its segments as it goes."""
    if base_index is not None and base_index.level == compresslevel:
        return _IndexedRebuild(base, limits, delta, removed, base_files, base_index, check).write(
            out, files_sha256, compresslevel)
    gone = set(removed)
    pending = delta.paths
    segments = BaseSegments(base, compresslevel)
    writer = BundleWriter(out, compresslevel, segments)
    entries: list[tuple[str, int, str]] = []  # (path, size, sha256): what the digest covers
    at = 0

    def emit_delta_until(path: str | None) -> None:
        nonlocal at
        while at < len(pending) and (path is None or pending[at] < path):
            rel = pending[at]
            at += 1
            if rel in delta.symlinks:
                linkname = relative_link(rel.rpartition("/")[0], delta.symlinks[rel])
                writer.add_symlink(rel, linkname)
                if check is not None:
                    check.symlink(rel, linkname)
                continue
            data = delta.files[rel]
            sha256 = hashlib.sha256(data).hexdigest()
            writer.add_file(rel, len(data), (data,), sha256)
            entries.append((rel, len(data), sha256))
            if check is not None:
                check.file(rel, len(data), sha256, data)

    try:
        with BundleScan(cast(BinaryIO, segments), limits) as scan:  # nothing reads the base's stream once it is left
            segments.watch(scan)
            previous = ""
            for member in scan.members():
                if member.path <= previous:
                    raise DeltaMismatch(f"the base version's bundle is not in path order at {member.path}")
                previous = member.path
                known = base_files.get(member.path)
                segments.member(member, known[0] if known is not None and known[1] == member.size else None)
                emit_delta_until(member.path)
                gone_or_new = member.path in gone or member.path in delta.files or member.path in delta.symlinks
                if member.kind != "file" or gone_or_new:
                    for _ in scan.data():  # a base symlink the delta does not repeat is gone with its version
                        pass
                    continue
                if known is None or known[1] != member.size:
                    raise DeltaMismatch(f"the base version's bundle does not match its file list at {member.path}")
                writer.add_file(member.path, member.size, scan.data(), known[0])
                entries.append((member.path, member.size, known[0]))
                if check is not None:
                    check.kept(member.path, member.size, known[0])
            if scan.issues:
                raise DeltaMismatch(f"the base version's bundle cannot be read: {scan.issues.items[0].message}")
            segments.finish(scan)
        emit_delta_until(None)
        info = writer.close()
    except BaseException:
        writer.discard()
        raise
    finally:
        segments.close()
    if triples_digest(entries) != files_sha256:
        raise DeltaMismatch("the base version's files with the delta applied are not the files the deploy announced")
    return info


class _IndexedRebuild:
    """A rebuild planned from the file lists: the new bundle's members in path order, cut into segments
    by the writer's own rule (format.runs), each copied from the base when the base's index has its
    key (this is the writer's SegmentSource), else written member by member (the base's files read
    from the one base segment that holds each, inflated and scanned with a bundle's rules)."""

    def __init__(self, base: BinaryIO, limits: Limits, delta: UploadedDelta, removed: Collection[str],
                 base_files: Mapping[str, tuple[str, int]], index: SegmentIndex, check: WrittenCheck | None) -> None:
        self._limits = limits
        self._delta = delta
        self._files = base_files
        self._check = check
        self._keyed = index.keyed()
        self._held = [s for s in index.segments if s.first]  # in path order: the base's files by segment
        self._firsts = [s.first for s in self._held]
        self._open: tuple[int, dict[str, bytes]] = (-1, {})
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="dagcast-base-")  # noqa: SIM115 - closed in write()
        try:
            shutil.copyfileobj(base, self._spool, 1 << 20)
        except BaseException:
            self._spool.close()
            raise
        gone = set(removed) | delta.files.keys() | delta.symlinks.keys()
        self._paths = sorted([p for p in base_files if p not in gone] + delta.paths)

    def write(self, out: BinaryIO, files_sha256: str, level: int) -> BundleInfo:
        try:
            members = [self._member(p) for p in self._paths]
            if triples_digest([(m.rel, m.size, m.what) for m in members if m.kind == REGTYPE]) != files_sha256:
                raise DeltaMismatch("the base version's files with the delta applied are not the files the deploy announced")
            if self._check is not None:
                for m in members:
                    self._show(self._check, m)
            writer = BundleWriter(out, level)
            try:
                for run, raw in runs(members):
                    write_run(writer, run, raw, self, lambda m: (self._base_file(m.rel, m.size),))
                return writer.close()
            except BaseException:
                writer.discard()
                raise
        finally:
            self._spool.close()

    def _member(self, path: str) -> Planned:
        if path in self._delta.symlinks:
            return Planned(path, SYMTYPE, 0, relative_link(path.rpartition("/")[0], self._delta.symlinks[path]))
        data = self._delta.files.get(path)
        if data is not None:
            return Planned(path, REGTYPE, len(data), hashlib.sha256(data).hexdigest(), data)
        sha256, size = self._files[path]
        return Planned(path, REGTYPE, size, sha256)

    def _show(self, check: WrittenCheck, m: Planned) -> None:
        if m.kind == SYMTYPE:
            check.symlink(m.rel, m.what)
        elif m.data is not None:
            check.file(m.rel, m.size, m.what, m.data)
        else:
            check.kept(m.rel, m.size, m.what)

    def compressed(self, key: str) -> bytes | None:
        """A base segment by key (format.SegmentSource)."""
        known = self._keyed.get(key)
        return self._read(known) if known is not None else None

    def _read(self, segment: Segment) -> bytes:
        self._spool.seek(segment.offset)
        data = self._spool.read(segment.size)
        if len(data) != segment.size:
            raise DeltaMismatch("the base version's bundle is shorter than its segment index says")
        return data

    def _base_file(self, path: str, size: int) -> bytes:
        """A base file's bytes, from the base segment that holds it (read with every rule of a bundle)."""
        at = bisect.bisect_right(self._firsts, path) - 1
        if at != self._open[0]:
            if at < 0:
                raise DeltaMismatch(f"the base version's segment index does not hold {path}")
            segment = self._held[at]
            files: dict[str, bytes] = {}
            alone = io.BytesIO(self._read(segment) + gzip_member(bytes(1024), 1))  # with an end-of-archive
            with BundleScan(alone, self._limits) as scan:
                for member in scan.members():
                    if member.kind == "file":
                        files[member.path] = b"".join(scan.data())
                if scan.issues:
                    raise DeltaMismatch(f"the base version's bundle cannot be read: {scan.issues.items[0].message}")
            self._open = (at, files)
        data = self._open[1].get(path)
        if data is None or len(data) != size:
            raise DeltaMismatch(f"the base version's bundle does not match its file list at {path}")
        return data
