"""Manifest diffs: pure functions shared by the ingest function and the CLI's --dry-run.

DeployDiff lives here rather than with the other models so that the CLI, which needs only
this, does not build every API model at start (chalicelib.models re-exports it).
"""
from __future__ import annotations

import functools
import gzip
import zlib
from typing import Any

from pydantic import Field, TypeAdapter

from chalicelib.bundle import FileEntry, Model

MAX_LISTED = 50
# A version's file list, stored gzip-compressed: paths and JSON keys repeat, so 10,000 files take
# about a quarter of the bytes on the CLI's download (the sha256 digests are most of what is left).
MANIFEST_CONTENT_TYPE = "application/gzip"
MANIFEST_MAX_BYTES = 512 * 1024 * 1024  # inflated: far above a million-file manifest's size


class ManifestError(ValueError):
    """A stored manifest that is not one (corrupt, or inflating past MANIFEST_MAX_BYTES)."""


@functools.cache
def manifests() -> TypeAdapter[Any]:
    """The file list's (de)serializer, built on first use (the CLI imports this module at start)."""
    return TypeAdapter(list[FileEntry])


def encode_manifest(entries: list[FileEntry]) -> bytes:
    return gzip.compress(manifests().dump_json(entries), compresslevel=6, mtime=0)


def decode_manifest(raw: bytes, max_bytes: int = MANIFEST_MAX_BYTES) -> list[FileEntry]:
    """The file list from its stored form: gzip-compressed JSON, or plain JSON (manifests written before
    they were compressed). Inflating stops at max_bytes."""
    if raw[:2] == b"\x1f\x8b":
        inflate = zlib.decompressobj(wbits=31)
        try:
            data = inflate.decompress(raw, max_bytes)
        except zlib.error as exc:
            raise ManifestError(f"the manifest is not valid gzip: {exc}") from exc
        if inflate.unconsumed_tail or not inflate.eof:
            raise ManifestError(f"the manifest is truncated or inflates past {max_bytes} bytes")
        raw = data
    try:
        found: list[FileEntry] = manifests().validate_json(raw)
        return found
    except ValueError as exc:
        raise ManifestError(f"the manifest is not a file list: {exc}") from exc


class DeployDiff(Model):
    """What a deploy changes against the version live when it was validated.

    DAG ids are those given as literals; a DAG definition whose id is computed at parse time
    (`DAG(f"etl_{team}")` in a loop) cannot be named before Airflow parses it, so files holding
    such definitions are listed instead, and when the new version has any, literal ids that are
    gone are only "maybe removed": the computed ones may build them.
    """

    dags_added: list[str] = Field(default_factory=list)
    dags_removed: list[str] = Field(default_factory=list)
    dags_added_count: int = 0
    dags_removed_count: int = 0
    dags_maybe_removed: list[str] = Field(default_factory=list)
    dynamic_dags: int = Field(0, description="DAG definitions with computed ids in the new version")
    dynamic_files: list[str] = Field(default_factory=list, description="files of the new version that hold them")
    dynamic_files_removed: list[str] = Field(default_factory=list, description="files with computed DAG ids that are gone")
    files_added: int = 0
    files_removed: int = 0
    files_changed: int = 0
    changed_paths: list[str] = Field(default_factory=list)

    @property
    def removes_dags(self) -> bool:
        return bool(self.dags_removed_count or self.dags_maybe_removed or self.dynamic_files_removed)


def diff_manifests(old: list[FileEntry] | None, new: list[FileEntry]) -> DeployDiff:
    """DAGs added and removed, files added, removed and changed, between two manifests."""
    old = old or []
    before = {f.path: f for f in old}
    after = {f.path: f for f in new}
    old_dags = {d for f in old for d in f.dag_ids}
    new_dags = {d for f in new for d in f.dag_ids}
    changed = sorted(p for p in before.keys() & after.keys() if before[p].sha256 != after[p].sha256)
    dynamic_files = sorted(f.path for f in new if f.dynamic_dags)
    gone = sorted(old_dags - new_dags)
    removed_dynamic = sorted(f.path for f in old if f.dynamic_dags and f.path not in after)
    return DeployDiff(
        dags_added=sorted(new_dags - old_dags)[:MAX_LISTED],
        dags_removed=[] if dynamic_files else gone[:MAX_LISTED],
        dags_added_count=len(new_dags - old_dags),
        dags_removed_count=0 if dynamic_files else len(gone),
        dags_maybe_removed=gone[:MAX_LISTED] if dynamic_files else [],
        dynamic_dags=sum(f.dynamic_dags for f in new),
        dynamic_files=dynamic_files[:MAX_LISTED],
        dynamic_files_removed=removed_dynamic[:MAX_LISTED],
        files_added=len(after.keys() - before.keys()),
        files_removed=len(before.keys() - after.keys()),
        files_changed=len(changed),
        changed_paths=changed[:MAX_LISTED],
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def summary(diff: DeployDiff) -> str:
    """'+2 DAGs, -1 DAG: etl_old, 3 DAGs in 1 file whose ids are computed at parse time, 14 files changed'."""
    parts = []
    if diff.dags_added_count:
        parts.append(f"+{_plural(diff.dags_added_count, 'DAG')}")
    if diff.dags_removed_count:
        parts.append(f"-{_plural(diff.dags_removed_count, 'DAG')}: {', '.join(diff.dags_removed)}")
    if diff.dags_maybe_removed:
        parts.append(f"{_plural(len(diff.dags_maybe_removed), 'DAG')} no longer given by name "
                     f"(maybe built at parse time): {', '.join(diff.dags_maybe_removed)}")
    if diff.dynamic_dags:
        parts.append(f"{_plural(diff.dynamic_dags, 'DAG')} in {_plural(len(diff.dynamic_files), 'file')} "
                     "whose ids are computed at parse time")
    if diff.dynamic_files_removed:
        parts.append(f"removes {_plural(len(diff.dynamic_files_removed), 'file')} with DAGs computed at parse time: "
                     f"{', '.join(diff.dynamic_files_removed)}")
    changed = diff.files_changed + diff.files_added + diff.files_removed
    parts.append(f"{_plural(changed, 'file')} changed")
    return ", ".join(parts)
