"""Validating a bundle as it is written, without reading it again.

A `WrittenCheck` is shown each member as the deterministic writer (format.BundleWriter) writes it,
and reports what validating the written bundle (validate_stream) would: every member goes through
every rule of a bundle (rules.BundleScan, fed the members instead of a stream), each Python file is
compiled (`cache` spares bytes compiled before), and the manifest is made as it goes. The CLI checks
the bundle it writes this way; the ingest function checks a bundle it rebuilds from a delta, where a
file the delta leaves unchanged may keep the verdict the base version's validation gave its exact
bytes (`kept`), when that is sound (see WrittenCheck).
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING

from chalicelib.bundle.compile_workers import CompileDeadline
from chalicelib.bundle.dag_ids import split_dynamic
from chalicelib.bundle.format import BundleInfo
from chalicelib.bundle.report import FileEntry, Issue, Limits, Report
from chalicelib.bundle.rules import BundleScan
from chalicelib.bundle.validate import _Compiler, timed_out

if TYPE_CHECKING:
    from chalicelib.bundle.cache import CompileCache
    from chalicelib.bundle.compile_workers import CompileWorkers
    from chalicelib.bundle.delta import DeltaCollector


class WrittenCheck:
    """Validates a bundle as it is written; `report()` once it is, then says what validate_stream of
    the written bytes would (the property tests hold it to that).

    `verdicts` (path -> the base's manifest entry) serves `kept`: a file the writer copies unchanged
    from a base version keeps the base's verdict and DAG ids. That is only sound when the base's bytes
    being copied are the ones that were validated, by this validator: ingest reads the base bundle at
    the object version its version record pins (S3 never changes one), and only when the record names
    this validator (CompileCache.TAG). Every rule still runs on a kept file (with the limits given
    here, the deployment's as they are now); only its compile check is not done again.
    """

    def __init__(self, limits: Limits, verdicts: Mapping[str, FileEntry] | None = None, *,
                 cache: CompileCache | None = None, workers: CompileWorkers | None = None, parallel: bool = False,
                 deadline: float | None = None, collect: DeltaCollector | None = None) -> None:
        self._limits = limits
        self._verdicts = verdicts or {}
        self._cache = cache
        self._collect = collect
        self._scan = BundleScan(io.BytesIO(), limits)  # fed the members as they are written, never a stream
        self._compiler = _Compiler(cache, workers, parallel, deadline)
        self._manifest: list[FileEntry] = []
        self._timed_out = False
        self._closed = False
        self.reused = 0  # files whose verdict came from the base
        self.symlinks: dict[str, str] = {}  # path -> target (from the root) of each symlink admitted

    def wants(self, path: str, size: int, sha256: str | None = None) -> bool:
        """Whether file() needs the bytes of this file: Python to compile (unless its sha256, when known
        beforehand, is one the cache has the verdict of), or one the delta collector may carry."""
        if self._collect is not None and self._collect.wants(size):
            return True
        if not path.endswith(".py"):
            return False
        return sha256 is None or self._cache is None or self._cache.get(sha256) is None

    def kept(self, path: str, size: int, sha256: str) -> None:
        """A file copied unchanged from the base: its verdict is the base's (`verdicts`, which lists it)."""
        if self._admit(path, size):
            if self._collect is not None:
                self._collect.add_file(path, 0o644, sha256, None)
            self._manifest.append(self._verdicts[path])
            self.reused += 1

    def file(self, path: str, size: int, sha256: str, data: bytes | None) -> None:
        """A regular file as written; `data` is its bytes when wants() said so (else None)."""
        if not self._admit(path, size):
            return
        if self._collect is not None:
            self._collect.add_file(path, 0o644, sha256, None if data is None else [data])
        dag_ids: list[str] = []
        if path.endswith(".py"):
            cached = self._cache.get(sha256) if self._cache is not None else None
            if cached is not None:
                dag_ids = list(cached)
            else:
                assert data is not None, "a Python file the cache does not know is checked with its bytes"
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
        if member is not None:
            self.symlinks[member.path] = member.target
            if self._collect is not None:
                self._collect.add_symlink(member.path, member.target)

    def _admit(self, path: str, size: int) -> bool:
        return not self._timed_out and self._scan.admit(
            path.encode("utf-8", "surrogateescape"), b"0", 0o644, b"", size) is not None

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
        """The written bundle's report (`info`: what the writer wrote)."""
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
