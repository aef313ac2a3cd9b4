"""What validation and extraction may reuse: compiled files by digest, an earlier version's files.

`CompileCache` spares compiling the same bytes twice (the CLI keeps one on disk, ingest one per
warm function); `Reuse` lets extraction hard-link a file identical to the one an earlier,
immutable version already holds. Neither skips a rule: a lookup is by the sha256 of the bytes
being checked now.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from chalicelib.bundle.report import FileEntry


class CompileCache:
    """Python files already compiled, by the sha256 of their exact bytes (and this Python and validator).

    Only a file that compiled is ever added, with the DAG ids found in it; a lookup needs the
    digest of the bytes being validated now, so different bytes can never hit an entry. The
    cache only saves compiling the same bytes twice: every other rule still runs on every member.
    """

    TAG = f"{sys.implementation.cache_tag}:v2"  # v2: DAG definitions with computed ids are counted

    def __init__(self, entries: dict[str, list[str]] | None = None, max_entries: int = 200_000) -> None:
        self.entries: dict[str, list[str]] = dict(entries or {})
        self.max_entries = max_entries
        self.added = 0

    def get(self, sha256: str) -> list[str] | None:
        return self.entries.get(sha256)

    def put(self, sha256: str, dag_ids: list[str]) -> None:
        if sha256 not in self.entries:
            if len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)))
            self.entries[sha256] = dag_ids
            self.added += 1


@dataclass(frozen=True)
class Reuse:
    """An earlier extracted version whose identical files extraction may hard-link (versions are immutable)."""

    folder: Path
    files: dict[str, tuple[str, int]]  # path -> (sha256, size)

    @cached_property
    def present(self) -> frozenset[str]:
        """Its files and the folders they are in (see extract_delta): made once, as the files never change."""
        return present_with(self.files)

    @cached_property
    def entries(self) -> dict[str, FileEntry]:
        """Its files as a new version's manifest lists the ones it keeps: made once, like `present`."""
        return {path: FileEntry.model_construct(path=path, size=size, sha256=sha256, dag_ids=[])
                for path, (sha256, size) in self.files.items()}

    @classmethod
    def from_manifest(cls, folder: Path, manifest: list[FileEntry]) -> Reuse:
        return cls(folder, {f.path: (f.sha256, f.size) for f in manifest})



def present_with(files: Iterable[str]) -> frozenset[str]:
    """The paths and every folder they are in."""
    present = set(files)
    for path in list(present):
        parent = path.rpartition("/")[0]
        while parent and parent not in present:
            present.add(parent)
            parent = parent.rpartition("/")[0]
    return frozenset(present)
