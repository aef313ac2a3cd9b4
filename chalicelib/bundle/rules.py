"""What a member of a bundle may be: the per-member and whole-archive rules.

`BundleScan` is the tar stream of `scan.py` with the rules applied to each member as its header
is read: names (UTF-8, no NUL, no backslash, relative, no `..`, length of the path and of each
component), types (regular files, directories, relative symlinks inside the bundle; no hard links,
devices, FIFOs or sparse files), modes (no setuid/setgid/sticky), Python file size, and structure
(no duplicates, no member under a file or a symlink). `finish` adds the checks that need every
member: symlink targets exist and are not symlinks themselves, and the bundle is not empty.
"""
from __future__ import annotations

from typing import BinaryIO

from chalicelib.bundle.report import NAME_MAX, Issue, Limits
from chalicelib.bundle.scan import TarStream, _display, _Halt, _Member

_SPECIAL = {
    b"1": ("hard_link", "hard links are not allowed"),
    b"3": ("special_file", "character devices are not allowed"),
    b"4": ("special_file", "block devices are not allowed"),
    b"6": ("special_file", "FIFOs (named pipes) are not allowed"),
    b"7": ("special_file", "contiguous files are not supported"),
    b"S": ("special_file", "sparse files are not supported"),
}


class BundleScan(TarStream):
    """One pass over a bundle: yields the members that pass every rule and records every issue."""

    def __init__(self, fileobj: BinaryIO, limits: Limits) -> None:
        super().__init__(fileobj, limits)
        self._kinds: dict[str, str] = {}
        self._implied: set[str] = set()
        self._symlinks: dict[str, str] = {}

    def _check(
        self, raw_name: bytes, shown: str, raw_kind: bytes, mode: int, raw_link: bytes, size: int
    ) -> Issue | _Member | None:
        """Apply the per-member rules; returns the member, an Issue, or None (root entry)."""
        limits = self.limits

        def bad(code: str, why: str) -> Issue:
            return Issue(code=code, path=shown, message=f"{shown or '(empty name)'}: {why}")

        if not raw_name:
            return bad("invalid_name", "a member has an empty name")
        if b"\x00" in raw_name:
            return bad("invalid_name", "the name contains a NUL byte")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return bad("invalid_name", "the name is not valid UTF-8")
        if len(raw_name) > limits.max_path_bytes:
            return bad("path_too_long", f"the path is longer than {limits.max_path_bytes} bytes")
        if "\\" in name:
            return bad("backslash_in_path", "the path contains a backslash")
        if name.startswith("/"):
            return bad("absolute_path", "absolute paths are not allowed")
        parts = name.split("/")
        if "" in parts or "." in parts:
            parts = [p for p in parts if p not in ("", ".")]
        if ".." in parts:
            return bad("path_traversal", "the path contains '..' (it could escape the DAG folder)")
        # no component can be longer than the whole name: only a long name needs its parts measured
        if len(raw_name) > NAME_MAX and any(len(p.encode()) > NAME_MAX for p in parts):
            return bad("path_too_long", f"a file or folder name in the path is longer than {NAME_MAX} bytes")
        if raw_kind in _SPECIAL:
            code, why = _SPECIAL[raw_kind]
            if raw_kind == b"1":
                why += f" (links to {_display(raw_link)})"
            return bad(code, why)
        if raw_kind not in (b"0", b"2", b"5"):
            return bad("special_file", f"unsupported tar member type {raw_kind!r}")
        kind = {b"0": "file", b"2": "symlink", b"5": "dir"}[raw_kind]
        if not parts:
            if kind == "dir":
                return None  # the "." entry of the root directory
            return bad("invalid_name", "the name does not name a file")
        if kind == "file" and name.endswith("/"):
            return bad("invalid_name", "a regular file's name ends with '/'")
        path = "/".join(parts)
        if path != name:
            shown = _display(path.encode())  # else `shown` is already this name's display form
        if mode & 0o7000:
            return bad(
                "unsafe_mode", f"setuid, setgid and sticky bits are not allowed (mode {mode & 0o7777:o})"
            )

        target = ""
        if kind == "symlink":
            ok, target = self._symlink_target(parts, raw_link)
            if not ok:
                return bad("unsafe_symlink", target)
        elif kind == "file" and path.endswith(".py") and size > limits.max_py_bytes:
            return bad(
                "python_file_too_large",
                f"the Python file is {size} bytes, over the limit of {limits.max_py_bytes} bytes",
            )

        # Structure: duplicates, files used as directories, members under symlinks.
        seen = self._kinds.get(path)
        if seen is not None:
            if seen == kind:
                return bad("duplicate_path", "the path appears more than once in the bundle")
            return bad("duplicate_path", f"the path appears both as a {seen} and as a {kind}")
        if kind != "dir" and path in self._implied:
            if kind == "symlink":
                return bad("unsafe_symlink", "other members are stored under this symlink")
            return bad("duplicate_path", "the path is a file but other members are stored under it")
        # Directories already in _implied are known to be plain directories, and so are all
        # their ancestors: only walk up through parents not seen before.
        new_parents: list[str] = []
        parent = path.rpartition("/")[0]
        while parent and parent not in self._implied:
            parent_kind = self._kinds.get(parent)
            if parent_kind == "file":
                return bad("duplicate_path", f"its parent {_display(parent.encode())} is a file")
            if parent_kind == "symlink":
                return bad("unsafe_symlink", f"its parent {_display(parent.encode())} is a symlink")
            new_parents.append(parent)
            parent = parent.rpartition("/")[0]
        if len(self._implied) + len(new_parents) > limits.max_members:
            raise _Halt("too_many_members", f"The bundle has more than {limits.max_members} directories")
        self._implied.update(new_parents)
        self._kinds[path] = kind
        if kind == "symlink":
            self._symlinks[path] = target
        return _Member(path=path, kind=kind, mode=mode, size=size, target=target)

    @staticmethod
    def _symlink_target(parts: list[str], raw_link: bytes) -> tuple[bool, str]:
        """(True, target relative to the bundle root) or (False, why it is unsafe)."""
        if not raw_link:
            return False, "the symlink has an empty target"
        if b"\x00" in raw_link:
            return False, "the symlink target contains a NUL byte"
        try:
            link = raw_link.decode("utf-8")
        except UnicodeDecodeError:
            return False, "the symlink target is not valid UTF-8"
        if "\\" in link:
            return False, "the symlink target contains a backslash"
        if link.startswith("/"):
            return False, f"symlinks must be relative, this one points to {_display(raw_link)}"
        resolved = parts[:-1]
        for piece in link.split("/"):
            if piece in ("", "."):
                continue
            if piece == "..":
                if not resolved:
                    return False, f"the symlink points outside the bundle ({_display(raw_link)})"
                resolved = resolved[:-1]
            else:
                resolved = [*resolved, piece]
        if not resolved:
            return False, "the symlink points at the bundle root"
        if resolved == parts[: len(resolved)]:
            return False, "the symlink points at itself or one of its parent directories (a loop)"
        return True, "/".join(resolved)

    def finish(self, present: frozenset[str] = frozenset()) -> None:
        """Checks that need the whole member list: symlink targets and an empty bundle.

        `present`: paths (files and their directories) that exist beside the archive's members,
        as when a delta is applied over an earlier version's files.
        """
        if self.halted:
            return
        for path, target in self._symlinks.items():
            shown = _display(path.encode())
            pieces = target.split("/")
            prefixes = ["/".join(pieces[: i + 1]) for i in range(len(pieces))]
            via = next((p for p in prefixes if p in self._symlinks), None)
            if via is not None:
                how = "points to another symlink" if via == target else "goes through another symlink"
                self.issues.add(
                    Issue(code="unsafe_symlink", path=shown, message=f"{shown}: the symlink {how} ({via})")
                )
            elif target not in self._kinds and target not in self._implied and target not in present:
                self.issues.add(
                    Issue(
                        code="unsafe_symlink",
                        path=shown,
                        message=f"{shown}: the symlink target {target} does not exist in the bundle",
                    )
                )
        if self.files == 0 and not present and not self.issues:
            self.issues.add(Issue(code="empty_bundle", message="The bundle contains no files"))




def relative_link(parent: str, target: str) -> str:
    """Path of target (relative to the root) as seen from directory parent: "../"s then names."""
    here = parent.split("/") if parent else []
    there = target.split("/")
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    return "/".join([".."] * (len(here) - common) + there[common:])

