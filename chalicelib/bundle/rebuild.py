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

import hashlib
import tempfile
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from chalicelib.bundle.delta import MAX_DELTA_BYTES
from chalicelib.bundle.format import BundleInfo, BundleWriter, key_line, segment_key
from chalicelib.bundle.report import BundleRejected, DeltaMismatch, Limits, triples_digest
from chalicelib.bundle.rules import BundleScan, relative_link
from chalicelib.bundle.scan import _Member
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


_SPOOL_IN_MEMORY = 64 * 1024 * 1024  # compressed base bytes kept in memory; beyond, on local disk


class BaseSegments:
    """The base bundle's segments (gzip members), learnt as a scan reads the base through this: the
    members each holds, whose key says which bytes a new segment holding the same members has, and
    its compressed bytes, spooled as read. A segment is only offered when it holds whole members and
    nothing else (a base bundle not written by format.BundleWriter may not); offered bytes that are
    not those of its members make a bundle whose sha256 is not the announced one, and that is checked.
    """

    def __init__(self, raw: BinaryIO, compresslevel: int) -> None:
        self._raw = raw
        self._level = compresslevel
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, prefix="dagcast-base-")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()  # the inflate thread reads through this while the writer asks
        self._ends: list[tuple[int, int]] = []
        self._done = 0  # segments of _ends accounted for
        self._start = (0, 0)  # (compressed, decompressed) offsets where the next one starts
        self._lines: list[bytes] = []
        self._first: int | None = None  # decompressed offset of its first member
        self._found: dict[str, tuple[int, int]] = {}  # key -> (offset, size) of compressed bytes
        self.offered = 0

    def watch(self, scan: BundleScan) -> None:
        scan.inf.ends = self._ends

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(n)
        if chunk:
            with self._lock:
                self._spool.seek(0, 2)
                self._spool.write(chunk)
        return chunk

    def member(self, member: _Member, sha256: str | None) -> None:
        """A member of the base as the scan yields it (with its sha256 as recorded, for a file)."""
        self.passed(member.offset)
        if self._first is None:
            self._first = member.offset
        if member.kind == "file" and sha256 is not None:
            self._lines.append(key_line(member.path, b"0", member.size, sha256))
        elif member.kind == "symlink":
            self._lines.append(key_line(member.path, b"2", 0,
                                        relative_link(member.path.rpartition("/")[0], member.target)))
        else:
            self._lines.append(b"?")  # nothing a writer writes: no key matches it

    def passed(self, offset: int) -> None:
        """The scan is at `offset` of the decompressed stream: the segments ending by then are known."""
        while self._done < len(self._ends) and self._ends[self._done][1] <= offset:
            compressed, decompressed = self._ends[self._done]
            self._done += 1
            if self._lines and self._first == self._start[1] and decompressed == offset:
                self._found[segment_key(self._lines, self._level)] = (self._start[0], compressed - self._start[0])
            self._start, self._lines, self._first = (compressed, decompressed), [], None

    def compressed(self, key: str) -> bytes | None:
        at = self._found.get(key)
        if at is None:
            return None
        with self._lock:
            self._spool.seek(at[0])
            data = self._spool.read(at[1])
        self.offered += 1
        return data

    def close(self) -> None:
        self._spool.close()


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
    their bytes, the base's as kept (their verdicts reused: see WrittenCheck)."""
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
            if scan.end_at is not None:
                segments.passed(scan.end_at)
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

