"""A version's bundle rebuilt from an earlier version's bundle and an uploaded delta.

`dagcast deploy` on a slow link uploads a delta (see chalicelib.bundle.delta) instead of the bundle
when the deployment has a live version. The ingest function turns it back into the bundle the CLI
built, byte for byte: the delta is read with every rule of a bundle (bounded to MAX_DELTA_BYTES
uncompressed, held in memory), the base bundle is streamed member by member, and the two are merged
in path order through the same deterministic writer (format.BundleWriter). The result is checked
against the digest of the new version's file list here, and against the sha256 and size the deploy
announced by the caller; then it is validated like any uploaded bundle: read again, or, with a
`RebuiltCheck`, as it is written (see there for when the base's verdicts may be reused).
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from chalicelib.bundle.compile_workers import CompileDeadline
from chalicelib.bundle.dag_ids import split_dynamic
from chalicelib.bundle.delta import MAX_DELTA_BYTES
from chalicelib.bundle.format import BundleInfo, BundleWriter
from chalicelib.bundle.report import BundleRejected, DeltaMismatch, FileEntry, Issue, Limits, Report, triples_digest
from chalicelib.bundle.rules import BundleScan, relative_link
from chalicelib.bundle.validate import _Compiler, _run, timed_out

if TYPE_CHECKING:
    from chalicelib.bundle.cache import CompileCache
    from chalicelib.bundle.compile_workers import CompileWorkers
    from chalicelib.bundle.delta import DeltaCollector


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


class RebuiltCheck:
    """Validates a rebuilt bundle as rebuild_bundle writes it, without reading it again: every member
    goes through every rule of a bundle again, with the deployment's limits as they are now, and each
    Python file of the delta is compiled (`cache` spares bytes compiled before). A file the delta leaves
    unchanged keeps the verdict the base version's validation gave its exact bytes: its entry in the
    base's manifest (`verdicts`, by path), DAG ids included.

    That is only sound when the base's bytes being read are the ones that were validated, by this
    validator: the caller reads the base bundle at the object version its version record pins (S3
    never changes one), and only when the record names this validator (CompileCache.TAG). Anything
    else is validated by reading the rebuilt bundle, like any upload.
    """

    def __init__(self, limits: Limits, verdicts: Mapping[str, FileEntry], *, cache: CompileCache | None = None,
                 workers: CompileWorkers | None = None, parallel: bool = False, deadline: float | None = None,
                 collect: DeltaCollector | None = None) -> None:
        self._limits = limits
        self._verdicts = verdicts
        self._cache = cache
        self._collect = collect
        self._scan = BundleScan(io.BytesIO(), limits)  # fed the members as they are written, never a stream
        self._compiler = _Compiler(cache, workers, parallel, deadline)
        self._manifest: list[FileEntry] = []
        self._timed_out = False
        self._closed = False
        self.reused = 0  # files whose verdict came from the base

    def file(self, path: str, size: int, sha256: str, data: bytes | None) -> None:
        """A regular file as written: `data` for one of the delta's, None for the base's unchanged one."""
        if self._timed_out or self._scan.admit(path.encode("utf-8", "surrogateescape"), b"0", 0o644, b"", size) is None:
            return
        if self._collect is not None:
            self._collect.add_file(path, 0o644, sha256, None if data is None else [data])
        if data is None:
            known = self._verdicts[path]  # rebuild_bundle took this file's size and sha256 from the same list
            self._manifest.append(known)
            self.reused += 1
            return
        dag_ids: list[str] = []
        if path.endswith(".py"):
            cached = self._cache.get(sha256) if self._cache is not None else None
            if cached is not None:
                dag_ids = list(cached)
            else:
                try:
                    checked = self._compiler.check(len(self._manifest), path, sha256, data)
                except CompileDeadline:
                    self._time_out()
                    return
                if checked is not None:
                    issue, dag_ids = checked
                    if issue is not None:
                        self._scan.issues.add(issue)
        ids, dynamic = split_dynamic(dag_ids)
        self._manifest.append(FileEntry(path=path, size=size, sha256=sha256, dag_ids=ids, dynamic_dags=dynamic))

    def symlink(self, path: str, linkname: str) -> None:
        """A symlink as written: `linkname` relative to its folder."""
        if self._timed_out:
            return
        member = self._scan.admit(path.encode("utf-8", "surrogateescape"), b"2", 0o777,
                                  linkname.encode("utf-8", "surrogateescape"), 0)
        if member is not None and self._collect is not None:
            self._collect.add_symlink(member.path, member.target)

    def _time_out(self) -> None:
        self._timed_out = True
        self._scan.issues.add(timed_out(self._compiler), final=True)
        self._scan.halted = True

    def close(self) -> None:
        """Release the compile workers' session (once; report() does, and so must a caller that gives up)."""
        if not self._closed:
            self._closed = True
            self._compiler.close()

    def report(self, info: BundleInfo) -> Report:
        """The rebuilt bundle's report, once it is written (`info`: what the writer wrote)."""
        scan = self._scan
        try:
            if not self._timed_out:
                self._compiler.finish(self._manifest, scan)
        except CompileDeadline:
            self._time_out()
        finally:
            self.close()
        if info.size > self._limits.max_bundle_bytes and not scan.halted:
            scan.issues.add(Issue(code="bundle_too_large", message=(
                f"The bundle is larger than the limit of {self._limits.max_bundle_bytes} compressed bytes")), final=True)
            scan.halted = True
        scan.finish()
        valid = not scan.issues
        return Report(valid=valid, files=scan.files, bytes=scan.bytes, errors=scan.issues.items,
                      errors_truncated=scan.issues.truncated, manifest=self._manifest if valid else [],
                      sha256=info.sha256, compressed_bytes=info.size)


def rebuild_bundle(
    base: BinaryIO, limits: Limits, delta: UploadedDelta, removed: Collection[str], files_sha256: str, out: BinaryIO,
    base_files: Mapping[str, tuple[str, int]], compresslevel: int = 6, check: RebuiltCheck | None = None,
) -> BundleInfo:
    """Write to out the bundle of the base version's files, less `removed`, with the delta's files and
    symlinks (a delta carries every symlink of its version). DeltaMismatch when the base bundle is not
    in the canonical form write_bundle makes, or the result's file list does not match files_sha256.
    `compresslevel` must be the one the new bundle was written with for the bytes to be the same.

    `base_files` (path -> (sha256, size)): the base version's file list as ingest recorded it when it
    validated that bundle. Its files' bytes are not hashed again here: a base member it does not list,
    at that size, is a mismatch, and bytes that differ from it change the result's sha256, which the
    caller checks against the one the deploy announced (and validation hashes every file anyway).
    With `check`, each member written is shown to it (see RebuiltCheck), in the order written."""
    gone = set(removed)
    pending = delta.paths
    writer = BundleWriter(out, compresslevel)
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
            writer.add_file(rel, len(data), (data,))
            sha256 = hashlib.sha256(data).hexdigest()
            entries.append((rel, len(data), sha256))
            if check is not None:
                check.file(rel, len(data), sha256, data)

    try:
        with BundleScan(base, limits) as scan:  # nothing reads the base's stream once it is left
            previous = ""
            for member in scan.members():
                if member.path <= previous:
                    raise DeltaMismatch(f"the base version's bundle is not in path order at {member.path}")
                previous = member.path
                emit_delta_until(member.path)
                gone_or_new = member.path in gone or member.path in delta.files or member.path in delta.symlinks
                if member.kind != "file" or gone_or_new:
                    for _ in scan.data():  # a base symlink the delta does not repeat is gone with its version
                        pass
                    continue
                known = base_files.get(member.path)
                if known is None or known[1] != member.size:
                    raise DeltaMismatch(f"the base version's bundle does not match its file list at {member.path}")
                writer.add_file(member.path, member.size, scan.data())
                entries.append((member.path, member.size, known[0]))
                if check is not None:
                    check.file(member.path, member.size, known[0], None)
            if scan.issues:
                raise DeltaMismatch(f"the base version's bundle cannot be read: {scan.issues.items[0].message}")
        emit_delta_until(None)
        info = writer.close()
    except BaseException:
        writer.discard()
        raise
    if triples_digest(entries) != files_sha256:
        raise DeltaMismatch("the base version's files with the delta applied are not the files the deploy announced")
    return info

