"""Collects a dags folder into a deterministic bundle, honouring .dagcastignore.

Collecting checks what the server would refuse before anything is written: files over the
size limits (said in MiB, not bytes), special files, and symlinks that are absolute, point
outside the folder or at something that does not ship. Symlinks inside the folder ship as
symlinks, directory symlinks too (the sidecar recreates them; Airflow follows them).
"""
from __future__ import annotations

import os
import posixpath
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pathspec

from chalicelib.bundle import BundleError, BundleInfo, Limits, write_bundle
from dagcast.exceptions import BundleInvalid, UsageProblem

if TYPE_CHECKING:
    from chalicelib.bundle.format import MemberCheck
    from dagcast.segment_cache import LastBundle

IGNORE_FILE = ".dagcastignore"
# gzip level 1: on 1,000 DAG files (8 MB) it compresses in 0.07 s instead of level 6's 0.26 s, for a
# bundle 40 % larger (1.5 MB instead of 1.0 MB); the time saved outweighs the extra upload on links
# faster than about 20 Mbit/s, and sidecars download from S3. Same files, same level: same sha256.
COMPRESSLEVEL = 1
BUILTIN_EXCLUDES = ["__pycache__/", "*.pyc", ".git/", ".venv/", ".DS_Store", IGNORE_FILE]


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'; bytes below 1 KiB as '512 B'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def ignore_spec(root: Path) -> pathspec.PathSpec:  # type: ignore[type-arg]
    lines = list(BUILTIN_EXCLUDES)
    ignore = root / IGNORE_FILE
    if ignore.is_file():
        lines += ignore.read_text(encoding="utf-8", errors="replace").splitlines()
    return pathspec.PathSpec.from_lines("gitignore", lines)


@dataclass
class Collected:
    """What a dags folder would ship: files and symlinks (sorted), and why it cannot, if it cannot."""

    root: Path
    paths: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # symlink path -> its target, as written
    sizes: dict[str, int] = field(default_factory=dict)  # regular file path -> size
    # regular file path -> (size, mtime, ctime (ns), inode, device) as walked: see dagcast.segment_cache
    stats: dict[str, tuple[int, int, int, int, int]] = field(default_factory=dict)
    walked_ns: int = 0  # when the walk began (time.time_ns())
    problems: list[dict[str, Any]] = field(default_factory=list)  # like validation errors

    def problem(self, code: str, path: str, why: str) -> None:
        self.problems.append({"code": code, "path": path, "line": None, "message": f"{path}: {why}"})

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def raise_problems(self) -> None:
        if self.problems:
            n = len(self.problems)
            raise BundleInvalid(f"{n} file{'s' if n != 1 else ''} of {self.root} cannot ship; nothing was uploaded",
                                self.problems)


def collect(root: Path, limits: Limits | None = None) -> Collected:
    """Everything under root that ships, with its sizes checked against `limits` when given (see
    check_sizes). UsageProblem for a missing or empty folder; the other problems are listed in the result."""
    if not root.exists():
        raise UsageProblem(f"dags folder {root} does not exist")
    if not root.is_dir():
        raise UsageProblem(f"dags folder {root} is not a directory")
    spec = ignore_spec(root)
    found = Collected(root, walked_ns=time.time_ns())
    root_real = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        kept = []
        for d in sorted(dirnames):
            if spec.match_file(prefix + d + "/"):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                _link(found, root_real, prefix + d, os.path.join(dirpath, d))  # os.walk does not follow it: it ships as a link
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            rel = prefix + name
            if spec.match_file(rel):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError as exc:
                found.problem("unreadable", rel, f"cannot read it ({exc.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode):
                _link(found, root_real, rel, full)
            elif not stat.S_ISREG(st.st_mode):
                found.problem("special_file", rel, "not a regular file, a folder or a symlink (a socket, FIFO or device)")
            else:
                found.sizes[rel] = st.st_size
                found.stats[rel] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                found.paths.append(rel)
    _check_links(found)
    if not found.paths and not found.problems:
        raise UsageProblem(f"dags folder {root} has no files to deploy (after {IGNORE_FILE} and built-in excludes)")
    found.paths.sort()
    if limits is not None:
        check_sizes(found, limits)
    return found


def check_sizes(found: Collected, limits: Limits) -> None:
    """Note every file over a per-file limit and a bundle over the total or the member count."""
    for rel, size in sorted(found.sizes.items()):
        if size > limits.max_member_bytes:
            found.problem("member_too_large", rel,
                          f"{human_size(size)}, over the {human_size(limits.max_member_bytes)} per-file limit")
        elif rel.endswith(".py") and size > limits.max_py_bytes:
            found.problem("python_file_too_large", rel,
                          f"{human_size(size)}, over the {human_size(limits.max_py_bytes)} limit for a Python file")
    if len(found.paths) > limits.max_members:
        found.problems.append({"code": "too_many_members", "path": None, "line": None, "message":
                               f"{found.root}: {len(found.paths)} files, over the limit of {limits.max_members}"})
    if found.bytes > limits.max_total_bytes:
        found.problems.append({"code": "total_too_large", "path": None, "line": None, "message":
                               f"{found.root}: {human_size(found.bytes)} in all, over the "
                               f"{human_size(limits.max_total_bytes)} limit of the bundle's contents"})


def _link(found: Collected, root_real: str, rel: str, full: str) -> None:
    """A symlink ships when it is relative and stays inside the folder; _check_links sees the rest."""
    try:
        target = os.readlink(full)
    except OSError as exc:
        found.problem("unsafe_symlink", rel, f"cannot read the symlink ({exc.strerror})")
        return
    if os.path.isabs(target):
        found.problem("unsafe_symlink", rel, f"a symlink to the absolute path {target}: only relative links inside "
                      "the dags folder ship")
        return
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../"):
        found.problem("unsafe_symlink", rel, f"a symlink to {target}, outside the dags folder")
        return
    if resolved == "." or rel == resolved or rel.startswith(resolved + "/"):
        found.problem("unsafe_symlink", rel, f"a symlink to {target}, its own parent folder (a loop)")
        return
    real = os.path.realpath(full)
    if not os.path.exists(full):
        found.problem("unsafe_symlink", rel, f"a symlink to {target}, which does not exist")
        return
    if real != os.path.join(root_real, resolved):
        found.problem("unsafe_symlink", rel, f"a symlink to {target}, which goes through another symlink")
        return
    found.links[rel] = target
    found.paths.append(rel)


def _check_links(found: Collected) -> None:
    """A link must point at something that ships: a file, a folder holding files, or another link's folder."""
    shipped = set(found.paths)
    folders = {posixpath.dirname(p) for p in shipped}
    folders |= {"/".join(f.split("/")[: i + 1]) for f in list(folders) for i in range(f.count("/") + 1)}
    for rel, target in list(found.links.items()):
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if resolved in found.links:
            found.problem("unsafe_symlink", rel, f"a symlink to {target}, another symlink")
        elif resolved not in shipped and resolved not in folders:
            found.problem("unsafe_symlink", rel, f"a symlink to {target}, which does not ship "
                          f"(ignored, or a folder with nothing to ship)")
        else:
            continue
        del found.links[rel]
        found.paths.remove(rel)


def build(root: Path, out: BinaryIO, collected: Collected | None = None, check: MemberCheck | None = None,
          last: LastBundle | None = None, vouch: bool = True) -> BundleInfo:
    """The bundle of what `collect` found under root (collected now when not given), written to out
    (each member shown to `check` as it is; with the folder's `last` bundle, its segments and, with
    `vouch`, the files unchanged since: see dagcast.segment_cache). BundleInvalid when something
    cannot ship (a file that changes while it is bundled, too), naming the file; StaleVouch when a
    file `last` vouched for is not what it said (bundle again with vouch=False)."""
    from chalicelib.bundle.format import StaleVouch

    collected = collected or collect(root, Limits())
    collected.raise_problems()
    try:
        return write_bundle(root, collected.paths, out, compresslevel=COMPRESSLEVEL, check=check, reuse=last,
                            known=last.vouch(collected.stats) if last is not None and vouch else None)
    except StaleVouch:
        raise
    except BundleError as exc:
        raise BundleInvalid(f"{root} cannot be bundled; nothing was uploaded", [
            {"code": exc.code, "path": exc.path, "line": None, "message": str(exc)}]) from exc
