"""What a version changed file by file against the version before it, and a text diff of one file.

Pure functions over manifests and bundle streams: the control plane finds the two versions and
opens their bundles; nothing here talks to AWS. A file's text is read from the bundle with the
same scanner (and limits) that validated it, and only when the manifest says it is small enough.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import BinaryIO

from chalicelib.bundle import FileEntry, Limits
from chalicelib.bundle.rules import BundleScan
from chalicelib.exceptions import DiffRefused, StorageError
from chalicelib.models import FileChange

MAX_LISTED_FILES = 500  # per list (added, removed, changed); the totals say how many there are
DIFF_MAX_BYTES = 256 * 1024  # the largest file (either side) the API diffs
DIFF_MAX_LINES = 5000  # of the unified diff itself


def file_changes(base: list[FileEntry] | None, new: list[FileEntry]) -> tuple[list[FileChange], list[FileChange], list[FileChange]]:
    """(added, removed, changed) between two manifests, each sorted by path, with sizes."""
    before = {f.path: f for f in base or []}
    after = {f.path: f for f in new}
    added = [FileChange(path=p, size=after[p].size) for p in sorted(after.keys() - before.keys())]
    removed = [FileChange(path=p, size=before[p].size) for p in sorted(before.keys() - after.keys())]
    changed = [FileChange(path=p, size=after[p].size, base_size=before[p].size)
               for p in sorted(before.keys() & after.keys()) if before[p].sha256 != after[p].sha256]
    return added, removed, changed


def check_diffable(path: str, *entries: FileEntry | None) -> None:
    """Refuse (before reading anything) a file that is too large on either side to diff."""
    for entry in entries:
        if entry is not None and entry.size > DIFF_MAX_BYTES:
            raise DiffRefused(f"{path} is {entry.size} bytes, over the {DIFF_MAX_BYTES // 1024} KiB a text diff is "
                              "shown for; compare it locally")


def read_member(body: BinaryIO, limits: Limits, path: str, max_bytes: int = DIFF_MAX_BYTES) -> bytes:
    """One regular file's bytes from a bundle stream (members are in path order: the scan stops past it)."""
    with BundleScan(body, limits) as scan:
        for member in scan.members():
            if member.path > path and member.kind != "dir":
                break
            if member.path != path:
                continue
            if member.kind != "file":
                raise DiffRefused(f"{path} is a {member.kind} in the bundle, not a file")
            if member.size > max_bytes:
                raise DiffRefused(f"{path} is {member.size} bytes, over the {max_bytes // 1024} KiB a text diff is shown for")
            data = b"".join(scan.data())
            if scan.halted or len(data) != member.size:
                break
            return data
    problem = scan.issues.items[0].message if scan.issues else f"{path} is not in it"
    raise StorageError(f"cannot read {path} from the stored bundle: {problem}")


def text_of(path: str, data: bytes) -> list[str]:
    """The lines of a text file; DiffRefused for a binary one (a NUL byte, or not UTF-8)."""
    if b"\x00" in data:
        raise DiffRefused(f"{path} is a binary file; no text diff is shown for it")
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as exc:
        raise DiffRefused(f"{path} is not UTF-8 text (byte {exc.start}); no text diff is shown for it") from exc


def unified(path: str, old: list[str], new: list[str], old_label: str, new_label: str) -> tuple[str, bool]:
    """A unified diff of two texts (an added or removed file against nothing) and whether it was cut short."""
    lines: Iterable[str] = difflib.unified_diff(old, new, f"{old_label}/{path}" if old_label else "/dev/null",
                                                f"{new_label}/{path}" if new_label else "/dev/null")
    out: list[str] = []
    for line in lines:
        if len(out) >= DIFF_MAX_LINES:
            return "".join(out), True
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out), False
