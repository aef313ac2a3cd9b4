"""Manifest diffs: pure functions shared by the ingest function and the CLI's --dry-run.

DeployDiff lives here rather than with the other models so that the CLI, which needs only
this, does not build every API model at start (chalicelib.models re-exports it).
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from chalicelib.validation import FileEntry

MAX_LISTED = 50


class DeployDiff(BaseModel):
    """What a deploy changes against the version live when it was validated."""

    dags_added: list[str] = Field(default_factory=list)
    dags_removed: list[str] = Field(default_factory=list)
    dags_added_count: int = 0
    dags_removed_count: int = 0
    files_added: int = 0
    files_removed: int = 0
    files_changed: int = 0
    changed_paths: list[str] = Field(default_factory=list)


def diff_manifests(old: list[FileEntry] | None, new: list[FileEntry]) -> DeployDiff:
    """DAGs added and removed, files added, removed and changed, between two manifests."""
    old = old or []
    before = {f.path: f for f in old}
    after = {f.path: f for f in new}
    old_dags = {d for f in old for d in f.dag_ids}
    new_dags = {d for f in new for d in f.dag_ids}
    changed = sorted(p for p in before.keys() & after.keys() if before[p].sha256 != after[p].sha256)
    return DeployDiff(
        dags_added=sorted(new_dags - old_dags)[:MAX_LISTED],
        dags_removed=sorted(old_dags - new_dags)[:MAX_LISTED],
        dags_added_count=len(new_dags - old_dags),
        dags_removed_count=len(old_dags - new_dags),
        files_added=len(after.keys() - before.keys()),
        files_removed=len(before.keys() - after.keys()),
        files_changed=len(changed),
        changed_paths=changed[:MAX_LISTED],
    )


def summary(diff: DeployDiff) -> str:
    """'+2 DAGs, -1 DAG: etl_old, 14 files changed'."""
    parts = []
    if diff.dags_added_count:
        parts.append(f"+{diff.dags_added_count} DAG{'s' if diff.dags_added_count != 1 else ''}")
    if diff.dags_removed_count:
        n = diff.dags_removed_count
        parts.append(f"-{n} DAG{'s' if n != 1 else ''}: {', '.join(diff.dags_removed)}")
    changed = diff.files_changed + diff.files_added + diff.files_removed
    parts.append(f"{changed} file{'s' if changed != 1 else ''} changed")
    return ", ".join(parts)
