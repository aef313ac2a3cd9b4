"""The engine: one pass over a bundle, every member to its consumers.

`_run` drives a `BundleScan` and hands each member to the Python check (inline, or in bounded
worker processes), to an extraction sink, and to a delta collector, and builds the `Report`.
`validate_stream` is the consumer that only validates; `extract.py` adds the one that writes.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from chalicelib.bundle.cache import CompileCache, Reuse
from chalicelib.bundle.compile_workers import SUSPECT_BYTES, TOO_COMPLEX, CompileDeadline, CompileWorkers
from chalicelib.bundle.dag_ids import split_dynamic
from chalicelib.bundle.python import _check_python
from chalicelib.bundle.report import FileEntry, Issue, Limits, MiB, Report
from chalicelib.bundle.rules import BundleScan

if TYPE_CHECKING:
    from chalicelib.bundle.compile_workers import CompileSession
    from chalicelib.bundle.delta import DeltaCollector
    from chalicelib.bundle.segments import SegmentTracker


class Sink(Protocol):
    """Where extraction writes the members (extract._Extractor)."""

    def mkdir(self, rel: str) -> None: ...
    def add_symlink(self, rel: str, target: str) -> None: ...
    def open_file(self, rel: str, mode: int) -> int: ...
    def write(self, fd: int, data: bytes) -> None: ...
    def close_file(self, fd: int) -> None: ...
    def link(self, rel: str, source: str) -> bool: ...


_REUSE_MAX = 8 * MiB  # members up to this size are hashed in memory before deciding to link
INLINE_NO_READ_AHEAD = 256 * 1024  # Python compiled here past which the scan stops reading ahead
PARALLEL_AFTER = 1 * MiB  # new Python compiled in the scanning process before worker processes take the rest


def _run(
    fileobj: BinaryIO,
    limits: Limits | None,
    check_python: bool,
    sink: Sink | None,
    reuse: Reuse | None = None,
    cache: CompileCache | None = None,
    collect: DeltaCollector | None = None,
    present: frozenset[str] = frozenset(),
    workers: CompileWorkers | None = None,
    parallel: bool = False,
    deadline: float | None = None,
    segments: SegmentTracker | None = None,
) -> Report:
    """Drive one scan with one consumer (validation only, or extraction).

    `collect` is shown every member (with the bytes of the files it asks for) to build a delta;
    `present` names paths that exist beside the archive (see BundleScan.finish). Python files of
    SUSPECT_BYTES and more are compiled in a bounded worker (of `workers`, or of a pool of one made
    for this scan); with `parallel`, once PARALLEL_AFTER bytes of Python new to `cache` were compiled
    here, the rest goes to `workers` too. Past `deadline` (a time.monotonic() value) the scan stops
    with a validation_timeout issue. `segments` is told each member, to learn the bundle's segments.
    """
    manifest: list[FileEntry] = []
    compiler = _Compiler(cache, workers, parallel, deadline)
    with BundleScan(fileobj, limits or Limits()) as scan:
        if segments is not None:
            segments.watch(scan)
        try:
            _members(scan, manifest, check_python, sink, reuse, cache, collect, compiler, segments)
            if segments is not None:
                segments.finish(scan)
            compiler.finish(manifest, scan)
        except CompileDeadline:
            scan.issues.add(timed_out(compiler), final=True)
            scan.halted = True
        finally:
            compiler.close()
    if sink is None or not scan.issues:
        scan.finish(present)
    valid = not scan.issues
    return Report(
        valid=valid,
        files=scan.files,
        bytes=scan.bytes,
        errors=scan.issues.items,
        errors_truncated=scan.issues.truncated,
        manifest=manifest if valid else [],
        sha256=scan.inf.sha.hexdigest(),
        compressed_bytes=scan.inf.compressed,
    )


def timed_out(compiler: _Compiler) -> Issue:
    """The issue of a bundle whose deadline passed while `compiler` compiled it."""
    took = f" after {compiler.seconds:.0f} s" if compiler.seconds >= 1 else ""
    return Issue(code="validation_timeout", message=(
        f"The bundle could not be validated in time{took}: it holds more Python than the validator "
        "checks before its deadline"
    ))


class _Compiler:
    """Compiles a bundle's Python files new to the cache.

    A file of SUSPECT_BYTES or more is compiled alone in a bounded worker process (see
    chalicelib.bundle.compile_workers), so that hostile code cannot take this process's memory or time;
    smaller files are compiled here, or, with `parallel`, once PARALLEL_AFTER bytes were compiled
    here, by the workers (started a quarter of the way there, so they are ready; a bundle with a
    few new files never starts them). Once a file came back too complex nothing more is compiled:
    the bundle is rejected, and the deadline is kept."""

    def __init__(
        self, cache: CompileCache | None, workers: CompileWorkers | None, parallel: bool, deadline: float | None
    ) -> None:
        self._cache = cache
        self._pool = workers
        self._own_pool: CompileWorkers | None = None
        self._parallel = parallel and workers is not None and workers.size > 1
        self._deadline = deadline
        self._session: CompileSession | None = None
        self._inline = 0  # bytes compiled in this process
        self._started = time.monotonic()
        self.stopped = False  # a file was too complex: compile nothing more

    @property
    def inline_bytes(self) -> int:
        """Bytes of Python compiled in this process so far."""
        return self._inline

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._started

    def tick(self) -> None:
        """CompileDeadline once the bundle's deadline passed (called for every member)."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise CompileDeadline("the bundle's deadline passed")

    def check(self, index: int, path: str, sha256: str, code: bytes) -> tuple[Issue | None, list[str]] | None:
        """The file's issue (or None) and DAG ids; None when a worker was given it (see finish)."""
        self.tick()
        if self.stopped or (self._session is not None and self._session.too_complex):
            return None
        if len(code) >= SUSPECT_BYTES:
            self._ensure_session(wait=True).submit_alone(index, path, code)
            return None
        if self._parallel and self._inline >= PARALLEL_AFTER // 4 and self._session is None:
            self._ensure_session(wait=False)  # None while another bundle has them: stay inline
            if self._session is None:
                self._parallel = False
        if self._parallel and self._session is not None and self._inline >= PARALLEL_AFTER:
            self._session.submit(index, path, code)
            return None
        self._inline += len(code)
        issue, dag_ids = _check_python(code, path)
        if issue is None and self._cache is not None:
            self._cache.put(sha256, dag_ids)
        elif issue is not None and issue.code == TOO_COMPLEX:
            self.stopped = True
        return issue, dag_ids

    def _ensure_session(self, wait: bool) -> CompileSession:
        if self._session is None:
            pool = self._pool
            if pool is None:  # a scan without a pool of its own (the CLI): one bounded worker, for this scan only
                pool = self._own_pool = CompileWorkers(workers=1)
            self._session = pool.session(self._deadline, wait=wait)
        return self._session  # type: ignore[return-value]

    def finish(self, manifest: list[FileEntry], scan: BundleScan) -> None:
        """Fill in what the workers found: DAG ids in the manifest, issues after the others."""
        if self._session is None:
            return
        for index, issue, dag_ids in self._session.results():
            entry = manifest[index]
            if issue is None:
                entry.dag_ids, entry.dynamic_dags = split_dynamic(dag_ids)
                if self._cache is not None:
                    self._cache.put(entry.sha256, dag_ids)
            else:
                scan.issues.add(Issue.model_validate(issue))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        if self._own_pool is not None:
            self._own_pool.close()


def _members(
    scan: BundleScan,
    manifest: list[FileEntry],
    check_python: bool,
    sink: Sink | None,
    reuse: Reuse | None,
    cache: CompileCache | None,
    collect: DeltaCollector | None,
    compiler: _Compiler,
    segments: SegmentTracker | None = None,
) -> None:
    """The member loop of _run: each member to the sink, the collector, the compiler and the manifest."""
    for member in scan.members():
        if sink is not None and scan.issues:
            break  # extraction stops at the first problem
        compiler.tick()
        if segments is not None and member.kind != "file":
            segments.member(member, None)
        if member.kind == "dir":
            if sink is not None:
                sink.mkdir(member.path)
            if collect is not None:
                collect.add_dir(member.path)
            continue
        if member.kind == "symlink":
            if sink is not None:
                sink.add_symlink(member.path, member.target)
            if collect is not None:
                collect.add_symlink(member.path, member.target)
            continue
        earlier = reuse.files.get(member.path) if reuse is not None and sink is not None else None
        deferred = earlier is not None and earlier[1] == member.size and member.size <= _REUSE_MAX and not member.mode & 0o111
        want_python = check_python and member.path.endswith(".py")
        collecting = collect is not None and collect.wants(member.size)
        keep = want_python or deferred or collecting
        parts: list[bytes] = []
        digest = hashlib.sha256()
        writing = sink if sink is not None and not deferred else None
        fd = writing.open_file(member.path, member.mode) if writing is not None else -1
        try:
            for piece in scan.data():
                digest.update(piece)
                if keep:
                    parts.append(piece)
                if writing is not None:
                    writing.write(fd, piece)
        finally:
            if writing is not None:
                writing.close_file(fd)
        if scan.halted:
            break
        sha256 = digest.hexdigest()
        if segments is not None:
            segments.member(member, sha256)
        if deferred and sink is not None and reuse is not None and earlier is not None:
            source = os.path.join(reuse.folder, member.path)
            if earlier[0] != sha256 or not sink.link(member.path, source):
                fd = sink.open_file(member.path, member.mode)
                try:
                    for piece in parts:
                        sink.write(fd, piece)
                finally:
                    sink.close_file(fd)
        if collect is not None:
            collect.add_file(member.path, member.mode, sha256, parts if collecting else None)
        dag_ids: list[str] = []
        cached = cache.get(sha256) if want_python and cache is not None else None
        if cached is not None:
            dag_ids = list(cached)
        elif want_python:
            checked = compiler.check(len(manifest), member.path, sha256, b"".join(parts))
            del parts
            if compiler.inline_bytes >= INLINE_NO_READ_AHEAD:
                # compile() holds the GIL for long stretches: a step read ahead then only makes this
                # thread wait for it at each switch (a first deploy of 10,000 files: 10 % slower)
                scan.inf.read_ahead = False
            if checked is not None:
                issue, dag_ids = checked
                if issue is not None:
                    scan.issues.add(issue)
        ids, dynamic = split_dynamic(dag_ids)
        entry = FileEntry(path=member.path, size=member.size, sha256=sha256, dag_ids=ids, dynamic_dags=dynamic)
        manifest.append(entry)


def validate_stream(
    fileobj: BinaryIO,
    limits: Limits | None = None,
    *,
    check_python: bool = True,
    cache: CompileCache | None = None,
    collect: DeltaCollector | None = None,
    workers: CompileWorkers | None = None,
    parallel: bool = False,
    deadline: float | None = None,
    segments: SegmentTracker | None = None,
) -> Report:
    """Validate a bundle read once from fileobj. Never raises for any input bytes.

    With `cache`, .py files whose exact bytes compiled before are not compiled again; with
    `collect`, the members a delta against an earlier version needs are handed to it. Large Python
    files are compiled in bounded worker processes (`workers`, kept warm by the caller, or one made
    for this call), and with `parallel` a bundle with many new Python files is compiled by them too
    (the report is the same, except that their issues follow the others). Past `deadline`
    (time.monotonic()) the bundle is rejected with validation_timeout. CompileWorkerError when a
    worker dies for another reason than its bounds. With `segments`, the bundle's segments are learnt
    as it is read (see SegmentTracker.index).
    """
    return _run(fileobj, limits, check_python, None, cache=cache, collect=collect, workers=workers,
                parallel=parallel, deadline=deadline, segments=segments)


def validate_file(path: Path, limits: Limits | None = None) -> Report:
    """Validate the bundle at path (OSError from opening it propagates)."""
    with open(path, "rb") as fh:
        return validate_stream(fh, limits)

