"""Streaming bundle validator and safe extractor.

A bundle is read exactly once. ``_Scan`` parses the gzip and tar layers itself (so
that every limit is enforced before data is inflated) and yields only members that
passed every rule; ``validate_stream`` and ``extract_bundle`` are two consumers of it.
"""

from __future__ import annotations

import ast
import bisect
import ctypes
import gc
import hashlib
import os
import re
import shutil
import stat
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from pydantic import BaseModel, ConfigDict, Field

from chalicelib.compile_workers import SUSPECT_BYTES, TOO_COMPLEX, CompileDeadline, CompileWorkers
from chalicelib.exceptions import DagcastError

if TYPE_CHECKING:
    from chalicelib.compile_workers import CompileSession
    from chalicelib.delta import DeltaCollector

__all__ = [
    "BundleRejected",
    "CompileCache",
    "Reuse",
    "FileEntry",
    "Issue",
    "Limits",
    "Report",
    "extract_bundle",
    "extract_delta",
    "files_digest",
    "validate_file",
    "validate_stream",
]

MiB = 1024 * 1024
MAX_ERRORS = 100
_CHUNK = 1 << 20  # raw read size, inflate step and member data chunk
_BLOCK = 512
_ZERO_BLOCK = b"\x00" * _BLOCK
_META_MAX = 1 << 20  # largest PAX / GNU long-name header data accepted
_META_RUN_MAX = 8  # consecutive extended headers before a real member
_TRAILER_MAX = 16 * MiB  # decompressed bytes tolerated after the end-of-archive block
_OCTAL = re.compile(rb"[0-7]*")


# The largest limits a deployment may set: what every sidecar and the Airflow bundle's fetch
# extract (they extract each version with the limits it was validated with, see Version.limits).
HARD_LIMITS = {
    "max_bundle_bytes": 1024 * MiB,
    "max_total_bytes": 4096 * MiB,
    "max_members": 1_000_000,
    "max_member_bytes": 1024 * MiB,
    "max_py_bytes": 16 * MiB,
    "max_path_bytes": 4096,
}
NAME_MAX = 255  # bytes in one path component, on every filesystem a sidecar writes to


class Limits(BaseModel):
    """Size and count limits; every one is enforced while streaming, none may exceed HARD_LIMITS."""

    model_config = ConfigDict(extra="forbid")

    max_bundle_bytes: int = Field(default=256 * MiB, gt=0, le=HARD_LIMITS["max_bundle_bytes"])  # compressed input
    max_total_bytes: int = Field(default=1024 * MiB, gt=0, le=HARD_LIMITS["max_total_bytes"])  # uncompressed sum
    max_members: int = Field(default=100_000, gt=0, le=HARD_LIMITS["max_members"])
    max_member_bytes: int = Field(default=100 * MiB, gt=0, le=HARD_LIMITS["max_member_bytes"])
    max_py_bytes: int = Field(default=10 * MiB, gt=0, le=HARD_LIMITS["max_py_bytes"])
    max_path_bytes: int = Field(default=1024, gt=0, le=HARD_LIMITS["max_path_bytes"])


class Issue(BaseModel):
    """One reason a bundle is rejected."""

    code: str
    path: str | None = None
    line: int | None = None
    message: str


class FileEntry(BaseModel):
    """A regular file of a valid bundle: its DAG ids given as literals, and how many DAG definitions
    in it have ids computed at parse time (`DAG(f"etl_{team}")` in a loop), which no scan can name."""

    path: str
    size: int
    sha256: str
    dag_ids: list[str] = []
    dynamic_dags: int = 0


class Report(BaseModel):
    """Outcome of validating (or extracting) one bundle."""

    valid: bool
    files: int
    bytes: int
    errors: list[Issue]
    errors_truncated: int = 0
    manifest: list[FileEntry]
    sha256: str
    compressed_bytes: int

    def summary(self) -> dict[str, Any]:
        """The public JSON contract of ``dagcast validate --json``."""
        return {
            "valid": self.valid,
            "files": self.files,
            "bytes": self.bytes,
            "errors": [e.model_dump() for e in self.errors],
        }

    @property
    def dag_ids(self) -> list[str]:
        """Every DAG id found in the manifest, sorted and de-duplicated."""
        return sorted({d for f in self.manifest for d in f.dag_ids})


class DeltaMismatch(DagcastError):
    """A delta did not turn its base version's files into the version it belongs to."""

    code = "delta_mismatch"


class BundleRejected(DagcastError):
    """extract_bundle refused a bundle; ``report`` says why."""

    code = "bundle_rejected"

    def __init__(self, report: Report) -> None:
        first = report.errors[0].message if report.errors else "bundle rejected"
        more = len(report.errors) + report.errors_truncated - 1
        super().__init__(first + (f" (and {more} more problems)" if more > 0 else ""))
        self.report = report


# --------------------------------------------------------------------------- scanning


class _Halt(Exception):
    """Stop reading the bundle; the issue is recorded by the scanner."""

    def __init__(self, code: str, message: str, path: str | None = None, *, drain: bool = False) -> None:
        super().__init__(message)
        self.issue = Issue(code=code, path=path, message=message)
        self.drain = drain  # keep hashing the raw input to EOF (corrupt data, not limits)


def _corrupt(message: str) -> _Halt:
    return _Halt("corrupt_archive", f"The bundle is not a valid gzip-compressed tar: {message}", drain=True)


class _Issues:
    def __init__(self) -> None:
        self.items: list[Issue] = []
        self.truncated = 0

    def add(self, issue: Issue, *, final: bool = False) -> None:
        """Keep the first MAX_ERRORS issues; a final (scan-stopping) one always stays visible."""
        if len(self.items) < MAX_ERRORS:
            self.items.append(issue)
        elif final:
            self.items[-1] = issue
            self.truncated += 1
        else:
            self.truncated += 1

    def __bool__(self) -> bool:
        return bool(self.items)


class _Inflater:
    """Reads the raw input once, hashing and counting it, and inflates it in bounded steps."""

    def __init__(self, raw: BinaryIO, max_bundle_bytes: int) -> None:
        self._raw = raw
        self._max = max_bundle_bytes
        self.sha = hashlib.sha256()
        self.compressed = 0
        self.inflated = 0
        self._raw_eof = False
        self._in = b""  # compressed bytes not yet consumed by the decompressor
        self._d: Any = None  # current zlib decompressor (None between gzip members)
        self._need_input = True
        self._buf = b""
        self._pos = 0

    def _read_raw(self) -> bytes:
        if self._raw_eof:
            return b""
        chunk = self._raw.read(_CHUNK)
        if not chunk:
            self._raw_eof = True
            return b""
        chunk = bytes(chunk)
        self.compressed += len(chunk)
        self.sha.update(chunk)
        if self.compressed > self._max:
            raise _Halt(
                "bundle_too_large",
                f"The bundle is larger than the limit of {self._max} compressed bytes",
            )
        return chunk

    def sniff(self) -> None:
        """Check the container format before anything is inflated."""
        while len(self._in) < 264 and not self._raw_eof:
            self._in += self._read_raw()
        head = self._in
        if head[:2] == b"\x1f\x8b":
            return
        if not head:
            raise _corrupt("the file is empty")
        if head == b"\x1f":
            raise _corrupt("the file is truncated (the gzip stream ends early)")
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
            kind = "a zip archive"
        elif head[257:262] == b"ustar":
            kind = "an uncompressed tar archive"
        elif head.startswith(b"BZh"):
            kind = "bzip2-compressed"
        elif head.startswith(b"\xfd7zXZ\x00"):
            kind = "xz-compressed"
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            kind = "zstd-compressed"
        else:
            kind = "not gzip-compressed"
        raise _Halt(
            "unsupported_format",
            f"The bundle is {kind}; bundles must be gzip-compressed tar files (.tar.gz)",
            drain=True,
        )

    def _inflate(self) -> bytes:
        """Next piece of decompressed data (at most one chunk); b"" at the end of the input."""
        while True:
            if self._d is None:
                while len(self._in) < 2 and not self._raw_eof:
                    self._in += self._read_raw()
                if not self._in:
                    return b""
                if self._in[:2] == b"\x1f\x8b":
                    self._d = zlib.decompressobj(31)
                    self._need_input = False
                elif not self._in.strip(b"\x00"):
                    self._in = b""  # zero padding after the gzip stream
                    continue
                else:
                    raise _corrupt("unexpected data after the end of the gzip stream")
            if not self._in and self._need_input:
                self._in = self._read_raw()
                if not self._in:
                    raise _corrupt("the file is truncated (the gzip stream ends early)")
            try:
                out: bytes = self._d.decompress(self._in, _CHUNK)
            except zlib.error as exc:
                raise _corrupt(f"corrupt gzip data ({exc})") from None
            if self._d.eof:
                self._in = self._d.unused_data
                self._d = None
            else:
                self._in = self._d.unconsumed_tail
                self._need_input = len(out) < _CHUNK
            if out:
                self.inflated += len(out)
                return out

    def chunk(self, n: int) -> bytes:
        """Up to n decompressed bytes (fewer when the buffer runs dry); b"" at the end."""
        if self._pos >= len(self._buf):
            self._buf = self._inflate()
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def read(self, n: int) -> bytes:
        """Exactly n decompressed bytes, or fewer only at the end of the data."""
        out = self.chunk(n)
        if len(out) == n or not out:
            return out
        parts = [out]
        have = len(out)
        while have < n:
            piece = self.chunk(n - have)
            if not piece:
                break
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Discard up to n decompressed bytes; returns how many were discarded."""
        done = 0
        while done < n:
            piece = self.chunk(min(_CHUNK, n - done))
            if not piece:
                break
            done += len(piece)
        return done

    def drain_raw(self) -> None:
        """Read (and hash) the rest of the raw input without inflating it."""
        while self._read_raw():
            pass


def _num(field: bytes) -> int:
    """Parse a tar numeric field (octal text or GNU base-256)."""
    if field and field[0] & 0x80:
        if field[0] != 0x80:
            raise _corrupt("negative or malformed numeric field in a tar header")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(text):
        raise _corrupt("malformed numeric field in a tar header")
    return int(text, 8) if text else 0


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """Parse PAX extended header records ("<len> <key>=<value>\\n")."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # trailing NUL padding
            break
        space = data.find(b" ", pos, pos + 21)
        length_text = data[pos:space]
        if space < 0 or not length_text.isdigit():
            raise _corrupt("malformed PAX extended header")
        end = pos + int(length_text)
        if end <= space + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise _corrupt("malformed PAX extended header")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise _corrupt("malformed PAX extended header")
        out[key] = value
        pos = end
    return out


def _display(raw: bytes) -> str:
    """A printable, repr-safe (and length-capped) form of a member name."""
    cut = len(raw) > 300
    text = raw[:300].decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text + ("..." if cut else "")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + ("..." if cut else "")


@dataclass
class _Member:
    """A member that passed every per-member rule."""

    path: str
    kind: str  # "file", "dir" or "symlink"
    mode: int
    size: int
    target: str = ""  # symlinks: target path relative to the bundle root


_SPECIAL = {
    b"1": ("hard_link", "hard links are not allowed"),
    b"3": ("special_file", "character devices are not allowed"),
    b"4": ("special_file", "block devices are not allowed"),
    b"6": ("special_file", "FIFOs (named pipes) are not allowed"),
    b"7": ("special_file", "contiguous files are not supported"),
    b"S": ("special_file", "sparse files are not supported"),
}
_NO_DATA_TYPES = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))


class _Scan:
    """One pass over a bundle: yields checked members and records every issue."""

    def __init__(self, fileobj: BinaryIO, limits: Limits) -> None:
        self.limits = limits
        self.inf = _Inflater(fileobj, limits.max_bundle_bytes)
        self.issues = _Issues()
        self.halted = False
        self.files = 0
        self.bytes = 0
        self._members = 0
        self._declared = 0  # declared data bytes (members and extended headers)
        self._read = 0  # data bytes actually read
        self._remaining = 0  # unread data bytes of the current member
        self._padding = 0
        self._kinds: dict[str, str] = {}
        self._implied: set[str] = set()
        self._symlinks: dict[str, str] = {}
        self._global_pax: dict[bytes, bytes] = {}
        self._end = False

    # -- issue helpers
    def _halt(self, exc: _Halt) -> None:
        self.issues.add(exc.issue, final=True)
        self.halted = True
        if exc.drain:
            try:
                self.inf.drain_raw()
            except _Halt as again:
                self.issues.add(again.issue, final=True)

    # -- member data
    def data(self) -> Iterator[bytes]:
        """Chunks of the current member's data; stops early (and halts) on errors."""
        try:
            while self._remaining:
                piece = self.inf.chunk(min(_CHUNK, self._remaining))
                if not piece:
                    raise _corrupt("the archive ends in the middle of a file")
                self._remaining -= len(piece)
                self._read += len(piece)
                if self._read > self.limits.max_total_bytes:
                    raise self._total_halt()
                yield piece
        except _Halt as exc:
            self._halt(exc)

    def _total_halt(self) -> _Halt:
        return _Halt(
            "total_too_large",
            f"The bundle's contents exceed the limit of {self.limits.max_total_bytes} uncompressed bytes",
        )

    def _skip_rest(self) -> None:
        want = self._remaining + self._padding
        if want and self.inf.skip(want) != want:
            raise _corrupt("the archive ends in the middle of a file")
        self._read += self._remaining
        self._remaining = self._padding = 0

    # -- the member iterator
    def members(self) -> Iterator[_Member]:
        """Yield every member that passes the rules, in archive order."""
        if self.halted:
            return
        try:
            self.inf.sniff()
            while not self._end:
                self._skip_rest()
                member = self._next()
                if member is None:
                    continue  # rejected (issue recorded) or the "." entry; or the end
                if member.kind == "file":
                    self.files += 1
                    self.bytes += member.size
                yield member
                if self.halted:
                    return
        except _Halt as exc:
            self._halt(exc)

    def _read_meta(self, size: int) -> bytes:
        if size > _META_MAX:
            raise _corrupt(f"an extended tar header of {size} bytes is too large")
        self._declared += size
        if self._declared > self.limits.max_total_bytes:
            raise self._total_halt()
        data = self.inf.read(size)
        pad = -size % _BLOCK
        if len(data) != size or self.inf.skip(pad) != pad:
            raise _corrupt("the archive ends in the middle of a header")
        return data

    def _next(self) -> _Member | None:
        """Parse headers up to the next real member and check it.

        Returns None for a rejected member (its issue is recorded), for a "." entry, and at the
        end of the archive (which also sets ``_end``).
        """
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        meta_run = 0
        while True:
            block = self.inf.read(_BLOCK)
            if len(block) < _BLOCK:
                if not block and self._members == 0 and meta_run == 0:
                    raise _corrupt("the tar archive is empty (no end-of-archive marker)")
                raise _corrupt("the file is truncated (unexpected end of the tar data)")
            if block == _ZERO_BLOCK:
                if meta_run:
                    raise _corrupt("an extended header is not followed by a member")
                self._finish_stream()
                self._end = True
                return None
            stored = _num(block[148:156])
            unsigned = sum(block) - sum(block[148:156]) + 8 * 32
            if stored != unsigned:
                high = sum(1 for b in block[:148] + block[156:] if b > 127)
                if stored != unsigned - 256 * high:
                    raise _corrupt("a tar header checksum does not match (not a tar file, or damaged)")
            kind = block[156:157]
            size = _num(block[124:136])
            if kind in (b"x", b"g", b"L", b"K"):
                meta_run += 1
                if meta_run > _META_RUN_MAX:
                    raise _corrupt("too many consecutive extended headers")
                data = self._read_meta(size)
                if kind == b"x":
                    pax.update(_parse_pax(data))
                elif kind == b"g":
                    self._global_pax.update(_parse_pax(data))
                elif kind == b"L":
                    long_name = data.split(b"\x00", 1)[0]
                else:
                    long_link = data.split(b"\x00", 1)[0]
                continue
            return self._member(block, kind, size, {**self._global_pax, **pax}, long_name, long_link)

    def _finish_stream(self) -> None:
        """After the end-of-archive block: allow a little padding, then the gzip end must follow."""
        extra = self.inf.skip(_TRAILER_MAX + 1)
        if extra > _TRAILER_MAX:
            raise _corrupt("too much data after the end-of-archive marker")

    def _member(
        self,
        block: bytes,
        kind: bytes,
        size: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> _Member | None:
        limits = self.limits
        self._members += 1
        if self._members > limits.max_members:
            raise _Halt("too_many_members", f"The bundle has more than {limits.max_members} members")
        if b"size" in pax:
            if not pax[b"size"].isdigit() or len(pax[b"size"]) > 20:
                raise _corrupt("malformed size in a PAX header")
            size = int(pax[b"size"])
        raw_kind = b"0" if kind in (b"\x00", b"0") else kind
        data_size = 0 if raw_kind in _NO_DATA_TYPES else size

        raw_name = block[0:100].split(b"\x00", 1)[0]
        if block[257:263] == b"ustar\x00":
            prefix = block[345:500].split(b"\x00", 1)[0]
            if prefix:
                raw_name = prefix + b"/" + raw_name
        if long_name is not None:
            raw_name = long_name
        if pax.get(b"path"):
            raw_name = pax[b"path"]
        raw_link = block[157:257].split(b"\x00", 1)[0]
        if long_link is not None:
            raw_link = long_link
        if pax.get(b"linkpath"):
            raw_link = pax[b"linkpath"]
        shown = _display(raw_name)

        # Size limits first: they stop the scan before any data is inflated.
        if data_size > limits.max_member_bytes:
            raise _Halt(
                "member_too_large",
                f"{shown} is {data_size} bytes, over the limit of {limits.max_member_bytes} bytes per file",
                shown,
            )
        self._declared += data_size
        if self._declared > limits.max_total_bytes:
            raise _Halt(
                "total_too_large",
                f"The bundle's contents exceed the limit of {limits.max_total_bytes} uncompressed bytes "
                f"(reached at {shown})",
                shown,
            )
        self._remaining = data_size
        self._padding = -data_size % _BLOCK

        if raw_kind == b"0" and raw_name.endswith(b"/") and kind == b"\x00":
            raw_kind = b"5"  # old-style directory entry
        if any(k.startswith(b"GNU.sparse.") for k in pax):
            raw_kind = b"S"
        mode = _num(block[100:108])
        result = self._check(raw_name, shown, raw_kind, mode, raw_link, data_size)
        if isinstance(result, Issue):
            self.issues.add(result)
            return None
        return result

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
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            return bad("path_traversal", "the path contains '..' (it could escape the DAG folder)")
        if any(len(p.encode()) > NAME_MAX for p in parts):
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
        shown = _display(path.encode())
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


# --------------------------------------------------------------------------- python checks

_DAG_LINE = re.compile(rb"[dD][aA][gG]|[\x80-\xff]+")
_CODING = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
_UTF8_NAMES = (b"utf-8", b"utf8", b"utf_8", b"utf-8-sig")


def _check_python(source: bytes, path: str) -> tuple[Issue | None, list[str]]:
    """Compile source exactly as Python imports it; return an issue or the DAG ids it defines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, path, "exec", dont_inherit=True)
            dag_ids = _find_dag_ids(source, path)
    except SyntaxError as exc:
        line = exc.lineno if isinstance(exc.lineno, int) and exc.lineno > 0 else None
        where = f", line {line}" if line else ""
        message = f"{path}{where}: {type(exc).__name__}: {exc.msg}"
        return Issue(code="syntax_error", path=path, line=line, message=message), []
    except RecursionError:
        return _python_error(path, "the code is nested too deeply to compile"), []
    except MemoryError:
        return Issue(code="python_too_complex", path=path,
                     message=f"{path}: too complex to compile: it needs more memory than allowed"), []
    except Exception as exc:  # noqa: BLE001 - ValueError (NUL bytes), LookupError (unknown codec), ...
        return _python_error(path, f"{type(exc).__name__}: {exc}"), []
    return None, dag_ids


def _python_error(path: str, why: str) -> Issue:
    return Issue(code="python_error", path=path, message=f"{path}: cannot be compiled: {why}")


def _find_dag_ids(source: bytes, path: str) -> list[str]:
    """DAG ids defined in source, which compiles: from the DAG(...) calls and @dag decorators alone
    when the scanner can locate them with certainty, else from the whole module's AST."""
    found = _scan_dag_ids(source)
    if found is not None:
        return found
    # The AST is acyclic and dies here: keeping the cyclic GC off until it is freed avoids
    # GC passes over thousands of fresh nodes (this roughly halves the cost of the parse).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _dag_ids(compile(source, path, "exec", ast.PyCF_ONLY_AST, dont_inherit=True), source)
    finally:
        if gc_was_enabled:
            gc.enable()


def _const_str(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _callee(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _dag_id_of_call(call: ast.Call) -> tuple[bool, str | None]:
    """(explicit id given?, literal id or None) from positional arg 0 or dag_id=; a call with *args
    or **kwargs that may hold the id counts as given, with no literal."""
    if call.args and not isinstance(call.args[0], ast.Starred):
        return True, _const_str(call.args[0])
    for kw in call.keywords:
        if kw.arg == "dag_id":
            return True, _const_str(kw.value)
    if any(isinstance(a, ast.Starred) for a in call.args) or any(kw.arg is None for kw in call.keywords):
        return True, None
    return False, None


# In the DAG id lists of the checker, its workers and the compile cache, one of these stands for each
# DAG definition whose id is computed at parse time (no real DAG id can be a NUL); FileEntry counts them.
DYNAMIC = "\x00"


def split_dynamic(raw: list[str]) -> tuple[list[str], int]:
    """(literal DAG ids, number of definitions with computed ids) of a checker's DAG id list."""
    dynamic = raw.count(DYNAMIC)
    return (raw if not dynamic else [d for d in raw if d != DYNAMIC]), dynamic


def _dag_lines(source: bytes) -> list[int] | None:
    """Sorted numbers of the lines that can hold a DAG definition; None when unknown (odd codecs)."""
    head = source.split(b"\n", 2)[:2]
    cookie = next((m.group(1).lower() for h in head if (m := _CODING.match(h))), None)
    if cookie is not None and cookie not in _UTF8_NAMES:
        return None  # line splitting of the raw bytes may not match the decoded source
    if b"\r" in source or not source.isascii():
        return [i for i, text in enumerate(source.splitlines(), 1) if _DAG_LINE.search(text)]
    lower = source.lower()
    lines: list[int] = []
    line, last = 1, 0
    pos = lower.find(b"dag")
    while pos >= 0:
        line += lower.count(b"\n", last, pos)
        last = pos
        if not lines or lines[-1] != line:
            lines.append(line)
        pos = lower.find(b"dag", pos + 3)
    return lines


def _dag_ids(tree: ast.AST, source: bytes) -> list[str]:
    """DAG ids defined with string literals: DAG(...) calls and @dag-decorated functions.

    Only nodes whose lines mention "dag" (any case) or hold non-ASCII text (identifiers
    are NFKC-normalised) are visited, which skips most of a typical file.
    """
    lines = _dag_lines(source)
    if lines is not None and not lines:
        return []
    found: set[str] = set()
    dynamic = 0
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Call):
            if _callee(node.func) == "DAG":
                given, dag_id = _dag_id_of_call(node)
                if dag_id is not None:
                    found.add(dag_id)
                elif given:
                    dynamic += 1
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if _callee(dec) == "dag":
                    found.add(node.name)
                elif isinstance(dec, ast.Call) and _callee(dec.func) == "dag":
                    given, dag_id = _dag_id_of_call(dec)
                    if not given:
                        found.add(node.name)
                    elif dag_id is not None:
                        found.add(dag_id)
                    else:
                        dynamic += 1
        for name in node._fields:
            value = getattr(node, name, None)
            for child in value if isinstance(value, list) else (value,):
                if not isinstance(child, ast.AST):
                    continue
                if lines is not None:
                    end = getattr(child, "end_lineno", None)
                    if end is not None:
                        start = child.lineno  # type: ignore[attr-defined]
                        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                            start = min([start, *(d.lineno for d in child.decorator_list)])
                        i = bisect.bisect_left(lines, start)
                        if i == len(lines) or lines[i] > end:
                            continue
                stack.append(child)
    return sorted(found) + [DYNAMIC] * dynamic


# A lexical scanner finds every site the AST rules above can match, so only those few
# expressions are parsed: compiling the bytes is the whole cost of most files. It works on
# UTF-8 text whose code (outside strings and comments) is ASCII, and gives up (None: use
# the whole AST) wherever a site cannot be delimited with certainty. A rule's site always
# shows the ASCII name "DAG" or "dag": identifiers are NFKC-normalised, and non-ASCII code
# makes the scanner give up. Every alternative of the patterns starts with a literal
# character, which lets the regex engine skip straight to the next candidate.
_NL = r"(?:\r\n|\r|\n)"
_STRING = (  # any string literal, from its opening quote (prefixes do not change where it ends)
    r"'''[^'\\]*(?:(?:\\[\s\S]|'(?!''))[^'\\]*)*'''"
    r'|"""[^"\\]*(?:(?:\\[\s\S]|"(?!""))[^"\\]*)*"""'
    rf"|'[^'\\\r\n]*(?:\\(?:{_NL}|.)[^'\\\r\n]*)*'"
    rf'|"[^"\\\r\n]*(?:\\(?:{_NL}|.)[^"\\\r\n]*)*"'
    r"""|'|\""""  # a quote that starts no literal: the scanner is lost
)
_SCAN = re.compile(
    rf"{_STRING}"
    r"|#[^\r\n]*"
    r"|DAG(?!\w)"
    r"|\n[ \t\f]*(?:@|case(?!\w))|\r[ \t\f]*(?:@|case(?!\w))"  # a decorator; a case clause (class patterns)
)
_TOKENS = re.compile(rf"{_STRING}|#[^\r\n]*|\\\r\n|\\\r|\\\n|\(|\[|\{{|\)|\]|\}}|\r\n|\r|\n")
_GAP = re.compile(rf"(?:[ \t\f]|\\{_NL})*")
_GAP_LINES = re.compile(rf"(?:[ \t\f]|\\{_NL}|#[^\r\n]*|{_NL}|\))*")
_BLANK_LINES = re.compile(rf"(?:{_NL}[ \t\f]*(?:#[^\r\n]*)?)+")
_DEF = re.compile(rf"(?:async(?:[ \t\f]|\\{_NL})+)?def(?:[ \t\f]|\\{_NL})+([A-Za-z_][A-Za-z0-9_]*)")
_CLASS = re.compile(r"class(?![A-Za-z0-9_])")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_PEP701 = sys.version_info >= (3, 12)  # f-strings are tokenized like code (nested quotes, comments)
_UNSURE = -2


def _scan_dag_ids(source: bytes) -> list[str] | None:
    """The DAG ids _dag_ids would find in the AST of source, or None when the scanner is unsure."""
    body = source[3:] if source.startswith(b"\xef\xbb\xbf") else source
    for line in body.split(b"\n", 2)[:2]:
        if b"coding" in line:  # ASCII bytes may even spell "DAG" in another codec (UTF-7)
            cookie = _CODING.match(line)
            if cookie is None or cookie.group(1).lower() not in _UTF8_NAMES or line.count(b"coding") > 1:
                return None
    ascii_only = body.isascii()
    if ascii_only and b"DAG" not in body and b"dag" not in body:
        return []
    try:
        text = "\n" + body.decode("utf-8")  # every line, the first included, follows a line break
    except UnicodeDecodeError:
        return None
    # Every site shows "DAG" or "dag" in ASCII code: no need to look past the last one.
    last = len(text) if not ascii_only else max(text.rfind("DAG"), text.rfind("dag"))
    calls: list[tuple[int, int]] = []  # (start of "DAG", its opening parenthesis)
    decorators: list[int] = []  # positions of "@" starting a line
    code = 0  # start of the code after the last string or comment
    for m in _SCAN.finditer(text):
        start = m.start()
        if start > last:
            break
        c = text[start]
        if c in "'\"#":
            if not ascii_only and not text[code:start].isascii():
                return None
            code = m.end()
            if c == "#":
                continue
            if code - start == 1:
                return None
            before = text[start - 1]  # f-strings, also after "if" or "not": harmless
            if before in "fFtT" or (before in "rR" and text[start - 2] in "fFtT"):
                literal = text[start:code]  # its replacement fields are code (calls, never decorators)
                if _PEP701 or "DAG" in literal or not literal.isascii():
                    fields = _fstring_fields(literal)
                    if fields is None or any("DAG" in f or not f.isascii() for f in fields):
                        return None
        elif c == "D":
            if text[start - 1] in _WORD or not text[start - 1].isascii():
                continue  # the end of a longer name
            paren = _call_paren(text, start)
            if paren == _UNSURE:
                return None
            if paren >= 0:
                calls.append((start, paren))
        elif m.group().endswith("@"):
            brk = start - 1 if text.startswith("\r\n", start - 1) else start
            if brk > 0 and text[brk - 1] == "\\":
                return None  # the line may continue the one before (or end a comment in a backslash)
            decorators.append(m.end() - 1)
        else:
            return None
    if not ascii_only and not text[code:].isascii():
        return None
    found: set[str] = set()
    dynamic = 0
    covered = 0
    for start, paren in calls:
        if start < covered:
            continue  # nested in a DAG call already parsed
        end = _bracket_end(text, paren)
        node = _parse_expression("DAG" + text[paren:end]) if end > 0 else None
        if node is None:
            return None
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and _callee(sub.func) == "DAG":
                given, dag_id = _dag_id_of_call(sub)
                if dag_id is not None:
                    found.add(dag_id)
                elif given:
                    dynamic += 1
        covered = end
    for at in decorators:
        ok, dag_id = _decorator_dag_id(text, at)
        if not ok:
            return None
        if dag_id == DYNAMIC:
            dynamic += 1
        elif dag_id is not None:
            found.add(dag_id)
    return sorted(found) + [DYNAMIC] * dynamic


def _fstring_fields(literal: str) -> list[str] | None:
    """The replacement fields of an f-string (from its opening quote), or None when unsure.

    Sure only of fields without quotes, comments, backslashes, "{{" or "}}": those end where
    the literal text says under every Python since 3.6, including PEP 701's (3.12), which
    tokenizes fields like code.
    """
    width = 3 if len(literal) >= 6 and literal[0] * 3 == literal[:3] else 1
    body = literal[width:-width]
    fields: list[str] = []
    depth = 0
    opened = 0
    i = 0
    while i < len(body):
        c = body[i]
        pair = body[i : i + 2]
        if depth == 0:
            if c == "\\":
                if pair[1:] in ("{", "}", "N"):
                    return None
                i += 1
            elif pair in ("{{", "}}"):
                i += 1
            elif c == "{":
                depth, opened = 1, i
            elif c == "}":
                return None
        elif c in "'\"#\\\r\n" or pair in ("{{", "}}"):
            return None
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                fields.append(body[opened + 1 : i])
        i += 1
    return fields if depth == 0 else None


def _call_paren(text: str, start: int) -> int:
    """For the name "DAG" at start: the position of the "(" calling it, -1 if none, _UNSURE."""
    end = start + 3
    after = _GAP.match(text, end).end()  # type: ignore[union-attr]  # always matches
    if text.startswith("(", after):
        j = start
        while text[j - 1] in " \t\f":
            j -= 1
        if text[j - 1] in "\r\n":
            brk = j - 2 if text.startswith("\r\n", j - 2) else j - 1
            return _UNSURE if brk > 0 and text[brk - 1] == "\\" else after
        for word in ("def", "class"):  # "def DAG(": a definition, not a call
            k = j - len(word)
            if k >= 1 and text.startswith(word, k) and text[k - 1] not in _WORD:
                return -1
        return after
    # "DAG" then a comment or line break (inside brackets), or "(DAG)(...)": leave it to the AST.
    beyond = _GAP_LINES.match(text, end).end()  # type: ignore[union-attr]
    return _UNSURE if text.startswith("(", beyond) else -1


def _bracket_walk(text: str, pos: int) -> Iterator[tuple[re.Match[str], str, int]]:
    """Tokens from pos with the bracket depth after each; stops (unsure) at an unterminated quote."""
    depth = 0
    for m in _TOKENS.finditer(text, pos):
        c = text[m.start()]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in "'\"" and m.end() - m.start() == 1:
            return
        yield m, c, depth


def _bracket_end(text: str, pos: int) -> int:
    """The position after the bracket matching the one at pos; -1 when not found."""
    for m, c, depth in _bracket_walk(text, pos):
        if c in ")]}" and depth == 0:
            return m.end()
    return -1


def _line_end(text: str, pos: int) -> int:
    """The position of the line break ending the logical line that goes on at pos; -1 if unsure."""
    for m, c, depth in _bracket_walk(text, pos):
        if depth < 0:
            return -1  # pos was inside brackets: not a decorator
        if c in "\r\n" and depth == 0:
            return m.start()
    return -1


def _decorator_dag_id(text: str, at: int) -> tuple[bool, str | None]:
    """(sure?, DAG id) for the decorator whose "@" is at `at` (or an "@" operator starting a line);
    the id is DYNAMIC for a @dag(...) whose id is computed."""
    end = _line_end(text, at + 1)
    if end < 0:
        return False, None
    expression = text[at + 1 : end]
    if "dag" not in expression:
        return True, None
    node = _parse_expression("(" + expression + "\n)")
    if node is None:
        return False, None
    given, dag_id = False, None
    if _callee(node) != "dag":
        if not (isinstance(node, ast.Call) and _callee(node.func) == "dag"):
            return True, None
        given, dag_id = _dag_id_of_call(node)
    name = _decorated_name(text, end)
    if name is None:
        return False, None
    if not name:
        return True, None  # a class: only functions make DAGs
    if given and dag_id is None:
        return True, DYNAMIC
    return True, dag_id if given else name


def _decorated_name(text: str, pos: int) -> str | None:
    """Name of the function that the decorators ending at pos decorate; "" for a class; None if unsure."""
    while True:
        m = _BLANK_LINES.match(text, pos)
        if m is None:
            return None
        pos = m.end()
        if text.startswith("@", pos):
            pos = _line_end(text, pos + 1)
            if pos < 0:
                return None
            continue
        if (d := _DEF.match(text, pos)) is not None:
            return d.group(1)
        return "" if _CLASS.match(text, pos) else None


def _parse_expression(code: str) -> ast.expr | None:
    try:
        return cast(ast.Expression, compile(code, "<dag>", "eval", ast.PyCF_ONLY_AST, dont_inherit=True)).body
    except Exception:  # noqa: BLE001 - any failure only means the scanner is unsure
        return None


# --------------------------------------------------------------------------- consumers


class _Extractor:
    """Writes checked members strictly below dest, never following existing symlinks."""

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    _FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

    def __init__(self, dest: Path) -> None:
        os.mkdir(dest, 0o755)
        self.dest = dest
        self._fds: dict[str, int] = {}
        self._made: list[str] = [""]
        self._symlinks: list[tuple[str, str]] = []
        try:
            root = os.open(dest, self._DIR_FLAGS)
            os.fchmod(root, 0o755)
        except OSError:
            os.rmdir(dest)
            raise
        self._fds[""] = root

    def _dir(self, rel: str) -> int:
        """An fd for directory rel (created if missing); refuses symlinks and non-directories."""
        fd = self._fds.get(rel)
        if fd is not None:
            return fd
        if len(self._fds) > 256:
            self._close_dirs()
        parts = rel.split("/")
        have = 0
        for i in range(len(parts) - 1, 0, -1):
            if "/".join(parts[:i]) in self._fds:
                have = i
                break
        fd = self._fds["/".join(parts[:have])]
        for i in range(have, len(parts)):
            sub = "/".join(parts[: i + 1])
            try:
                os.mkdir(parts[i], 0o755, dir_fd=fd)
                self._made.append(sub)
                made = True
            except FileExistsError:
                made = False
            fd = os.open(parts[i], self._DIR_FLAGS, dir_fd=fd)  # ELOOP / ENOTDIR on anything odd
            self._fds[sub] = fd
            if made:
                os.fchmod(fd, 0o755)
        return fd

    def mkdir(self, rel: str) -> None:
        self._dir(rel)

    def open_file(self, rel: str, mode: int) -> int:
        parent, _, name = rel.rpartition("/")
        fd = os.open(name, self._FILE_FLAGS, 0o600, dir_fd=self._dir(parent))
        os.fchmod(fd, 0o755 if mode & 0o111 else 0o644)
        return fd

    @staticmethod
    def write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    @staticmethod
    def close_file(fd: int) -> None:
        try:
            if _syncfs is None:  # no syncfs(2): make each file durable on its own
                os.fsync(fd)
        finally:
            os.close(fd)

    def link(self, rel: str, source: str) -> bool:
        """Hard-link an identical, non-executable file of an earlier version instead of writing it;
        False if not possible (the caller then writes the bytes itself)."""
        parent, _, name = rel.rpartition("/")
        fd = self._dir(parent)
        try:
            os.link(source, name, dst_dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o111:  # the bundle's member is a plain 0644 file
            os.unlink(name, dir_fd=fd)
            return False
        return True

    def add_symlink(self, rel: str, target: str) -> None:
        self._symlinks.append((rel, target))

    def finish(self) -> None:
        """Create symlinks (after every file exists), then fsync all directories."""
        for rel, target in self._symlinks:
            parent, _, name = rel.rpartition("/")
            os.symlink(relative_link(parent, target), name, dir_fd=self._dir(parent))
        if _syncfs is not None:
            # One flush of the filesystem makes every file and directory written here durable,
            # far cheaper than an fsync per file; the caller renames the folder into place after.
            if _syncfs(self._fds[""]) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs failed: {os.strerror(err)}")
        else:
            for rel in self._made:
                os.fsync(self._dir(rel))
        self._close_dirs(keep_root=False)

    def _close_dirs(self, keep_root: bool = True) -> None:
        for rel, fd in list(self._fds.items()):
            if rel or not keep_root:
                os.close(fd)
                del self._fds[rel]

    def abort(self) -> None:
        self._close_dirs(keep_root=False)
        shutil.rmtree(self.dest, ignore_errors=True)


def _load_syncfs() -> Any:
    """libc's syncfs(2) where there is one (Linux), else None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def relative_link(parent: str, target: str) -> str:
    """Path of target (relative to the root) as seen from directory parent: "../"s then names."""
    here = parent.split("/") if parent else []
    there = target.split("/")
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    return "/".join([".."] * (len(here) - common) + there[common:])


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

    @classmethod
    def from_manifest(cls, folder: Path, manifest: list[FileEntry]) -> Reuse:
        return cls(folder, {f.path: (f.sha256, f.size) for f in manifest})


_REUSE_MAX = 8 * MiB  # members up to this size are hashed in memory before deciding to link
PARALLEL_AFTER = 1 * MiB  # new Python compiled in the scanning process before worker processes take the rest


def _run(
    fileobj: BinaryIO,
    limits: Limits | None,
    check_python: bool,
    sink: _Extractor | None,
    reuse: Reuse | None = None,
    cache: CompileCache | None = None,
    collect: DeltaCollector | None = None,
    present: frozenset[str] = frozenset(),
    workers: CompileWorkers | None = None,
    parallel: bool = False,
    deadline: float | None = None,
) -> Report:
    """Drive one scan with one consumer (validation only, or extraction).

    `collect` is shown every member (with the bytes of the files it asks for) to build a delta;
    `present` names paths that exist beside the archive (see _Scan.finish). Python files of
    SUSPECT_BYTES and more are compiled in a bounded worker (of `workers`, or of a pool of one made
    for this scan); with `parallel`, once PARALLEL_AFTER bytes of Python new to `cache` were compiled
    here, the rest goes to `workers` too. Past `deadline` (a time.monotonic() value) the scan stops
    with a validation_timeout issue.
    """
    scan = _Scan(fileobj, limits or Limits())
    manifest: list[FileEntry] = []
    compiler = _Compiler(cache, workers, parallel, deadline)
    try:
        try:
            _members(scan, manifest, check_python, sink, reuse, cache, collect, compiler)
            compiler.finish(manifest, scan)
        except CompileDeadline:
            took = f" after {compiler.seconds:.0f} s" if compiler.seconds >= 1 else ""
            scan.issues.add(Issue(code="validation_timeout", message=(
                f"The bundle could not be validated in time{took}: it holds more Python than the validator "
                "checks before its deadline"
            )), final=True)
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


class _Compiler:
    """Compiles a bundle's Python files new to the cache.

    A file of SUSPECT_BYTES or more is compiled alone in a bounded worker process (see
    chalicelib.compile_workers), so that hostile code cannot take this process's memory or time;
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

    def finish(self, manifest: list[FileEntry], scan: _Scan) -> None:
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
    scan: _Scan,
    manifest: list[FileEntry],
    check_python: bool,
    sink: _Extractor | None,
    reuse: Reuse | None,
    cache: CompileCache | None,
    collect: DeltaCollector | None,
    compiler: _Compiler,
) -> None:
    """The member loop of _run: each member to the sink, the collector, the compiler and the manifest."""
    for member in scan.members():
        if sink is not None and scan.issues:
            break  # extraction stops at the first problem
        compiler.tick()
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
        fd = sink.open_file(member.path, member.mode) if sink is not None and not deferred else -1
        try:
            for piece in scan.data():
                digest.update(piece)
                if keep:
                    parts.append(piece)
                if fd >= 0:
                    _Extractor.write(fd, piece)
        finally:
            if fd >= 0:
                _Extractor.close_file(fd)
        if scan.halted:
            break
        sha256 = digest.hexdigest()
        if deferred and sink is not None and reuse is not None and earlier is not None:
            source = os.path.join(reuse.folder, member.path)
            if earlier[0] != sha256 or not sink.link(member.path, source):
                fd = sink.open_file(member.path, member.mode)
                try:
                    for piece in parts:
                        _Extractor.write(fd, piece)
                finally:
                    _Extractor.close_file(fd)
        if collect is not None:
            collect.add_file(member.path, member.mode, sha256, parts if collecting else None)
        dag_ids: list[str] = []
        cached = cache.get(sha256) if want_python and cache is not None else None
        if cached is not None:
            dag_ids = list(cached)
        elif want_python:
            checked = compiler.check(len(manifest), member.path, sha256, b"".join(parts))
            del parts
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
) -> Report:
    """Validate a bundle read once from fileobj. Never raises for any input bytes.

    With `cache`, .py files whose exact bytes compiled before are not compiled again; with
    `collect`, the members a delta against an earlier version needs are handed to it. Large Python
    files are compiled in bounded worker processes (`workers`, kept warm by the caller, or one made
    for this call), and with `parallel` a bundle with many new Python files is compiled by them too
    (the report is the same, except that their issues follow the others). Past `deadline`
    (time.monotonic()) the bundle is rejected with validation_timeout. CompileWorkerError when a
    worker dies for another reason than its bounds.
    """
    return _run(fileobj, limits, check_python, None, cache=cache, collect=collect, workers=workers,
                parallel=parallel, deadline=deadline)


def validate_file(path: Path, limits: Limits | None = None) -> Report:
    """Validate the bundle at path (OSError from opening it propagates)."""
    with open(path, "rb") as fh:
        return validate_stream(fh, limits)


def extract_bundle(
    fileobj: BinaryIO, dest: Path, limits: Limits | None = None, *, check_python: bool = False, reuse: Reuse | None = None
) -> Report:
    """Validate and extract a bundle into dest, a directory that must not exist yet.

    Raises BundleRejected (after removing dest) when the bundle breaks any rule; other
    errors (for example a full disk) also remove dest and then propagate. DAG ids are
    only filled in the manifest when check_python is true. With `reuse`, files whose bytes
    equal the earlier version's are hard-linked from it instead of written again.
    """
    return _extract(dest, lambda sink: _run(fileobj, limits, check_python, sink, reuse))


def _extract(dest: Path, fill: Callable[[_Extractor], Report]) -> Report:
    """Create dest, fill it, and finish it when the report is valid; on an invalid report
    (BundleRejected) or any error dest is removed."""
    sink = _Extractor(dest)
    try:
        report = fill(sink)
        if report.valid:
            sink.finish()
    except BaseException:
        sink.abort()
        raise
    if not report.valid:
        sink.abort()
        raise BundleRejected(report)
    return report


def files_digest(entries: Iterable[FileEntry]) -> str:
    """sha256 over a version's regular files (path, size, sha256; sorted by path)."""
    h = hashlib.sha256()
    for path, size, sha256 in sorted((e.path, e.size, e.sha256) for e in entries):
        h.update(f"{path}\0{size}\0{sha256}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _copy_verified(sink: _Extractor, rel: str, source: str, sha256: str) -> None:
    """Write rel as a plain file with the bytes of source, which must hash to sha256 (a base copy that
    cannot be linked: it is executable, say, and the new version's file is not)."""
    try:
        with open(source, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            data = f.read()
    except OSError as exc:
        raise DeltaMismatch(f"{rel}: the earlier version's copy cannot be read ({exc.strerror})") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DeltaMismatch(f"{rel}: the earlier version's copy was changed on disk")
    fd = sink.open_file(rel, 0o644)
    try:
        _Extractor.write(fd, data)
    finally:
        _Extractor.close_file(fd)


def extract_delta(
    fileobj: BinaryIO,
    dest: Path,
    base: Reuse,
    removed: Collection[str],
    files_sha256: str,
    limits: Limits | None = None,
) -> Report:
    """Build version folder dest (which must not exist yet) from an earlier version and a delta.

    The delta archive (see chalicelib.delta) is checked and extracted like a bundle; every file
    of `base` not in `removed` and not in the archive is hard-linked from base.folder. The
    result must match `files_sha256`, the digest of the new version's file list. Raises
    BundleRejected when the archive breaks a rule, DeltaMismatch when the result would differ
    from the version (or a base file cannot be reused); dest is removed on any error. The
    returned report's manifest lists every file of the result.
    """
    gone = set(removed)
    kept = {path: entry for path, entry in base.files.items() if path not in gone}
    present = set(kept)
    for path in kept:
        parent = path.rpartition("/")[0]
        while parent and parent not in present:
            present.add(parent)
            parent = parent.rpartition("/")[0]

    def fill(sink: _Extractor) -> Report:
        report = _run(fileobj, limits, False, sink, present=frozenset(present))
        if not report.valid:
            return report
        entries = list(report.manifest)
        written = {e.path for e in entries}
        for path, (sha256, size) in kept.items():
            if path in written:
                continue
            source = os.path.join(base.folder, path)
            if not sink.link(path, source):
                _copy_verified(sink, path, source, sha256)
            entries.append(FileEntry.model_construct(path=path, size=size, sha256=sha256, dag_ids=[]))
        if files_digest(entries) != files_sha256:
            raise DeltaMismatch("the files after applying the delta differ from the version's file list")
        entries.sort(key=lambda e: e.path)
        return report.model_copy(update={"manifest": entries, "files": len(entries), "bytes": sum(e.size for e in entries)})

    return _extract(dest, fill)
