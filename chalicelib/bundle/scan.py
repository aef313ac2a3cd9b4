"""The gzip and tar layers of a bundle, read once, in bounded steps.

`TarStream` parses gzip members and tar headers (ustar, PAX, GNU long names) itself, hashing the
raw bytes as they pass, so that every limit (compressed input, each member, the uncompressed
total, member count, extended headers, data after the end-of-archive block) is enforced from the
headers before the data is inflated, and the scan stops at the first limit crossed. `tarfile` with
the `data` extraction filter checks paths and modes, but not this: it reads a PAX or GNU long-name
header whole into memory whatever size it declares, keeps a `TarInfo` for every member in memory,
has no notion of an uncompressed total or a member count, and hashing the raw input in the same
pass would need a second wrapper anyway. What a member may be (paths, types, symlinks) is the next
layer's job (`rules.py`): `TarStream` calls `_check` for each member.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any, BinaryIO, Self

from chalicelib.bundle.report import MAX_ERRORS, Issue, Limits, MiB
from chalicelib.bundle.threads import worker

_CHUNK = 1 << 20  # raw read size, inflate step and member data chunk
_BLOCK = 512
_ZERO_BLOCK = b"\x00" * _BLOCK
_META_MAX = 1 << 20  # largest PAX / GNU long-name header data accepted
_META_RUN_MAX = 8  # consecutive extended headers before a real member
_TRAILER_MAX = 16 * MiB  # decompressed bytes tolerated after the end-of-archive block
_OCTAL = re.compile(rb"[0-7]*")



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
    """Reads the raw input once, hashing and counting it, and inflates it in bounded steps.

    Once a full step is taken, the next one (at most one chunk of output, the same bounds) runs on the
    inflate thread (chalicelib.bundle.threads) while the caller parses this one; its error is raised
    when the caller gets to its data, as when it was inflated then. `settle()` before reading the
    hash or the counts, or the raw input itself."""

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
        self._ahead: Future[bytes] | None = None  # the next step, taken on the inflate thread
        self.read_ahead = True  # the consumer turns it off when reading ahead would only slow it down
        self.position = 0  # decompressed bytes handed to the consumer
        self.head = b""  # the first bytes of the input (its first gzip header), once sniffed
        # with a list here: (compressed, decompressed) offsets of the end of each gzip member inflated
        self.ends: list[tuple[int, int]] | None = None

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
        self.head = head[:10]
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
        """Next step of decompressed data: one chunk, or less when more input must be read first (the
        gzip members of the input read so far, a bundle's segments, are inflated in one step
        together: nothing more is read for a step than before); b"" at the end."""
        out = self._inflate_piece(_CHUNK)
        if len(out) == _CHUNK or not out or self._d is not None or not self._in:  # a full step, the end, input to read
            return out
        pieces, have = [out], len(out)
        while have < _CHUNK and self._d is None and self._in:  # a gzip member ended: on with the next, read
            piece = self._inflate_piece(_CHUNK - have)
            if not piece:
                break
            pieces.append(piece)
            have += len(piece)
        return b"".join(pieces)

    def _inflate_piece(self, limit: int) -> bytes:
        """Next piece of decompressed data (at most `limit` bytes); b"" at the end of the input."""
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
                out: bytes = self._d.decompress(self._in, limit)
            except zlib.error as exc:
                raise _corrupt(f"corrupt gzip data ({exc})") from None
            if self._d.eof:
                self._in = self._d.unused_data
                self._d = None
                if self.ends is not None:
                    self.ends.append((self.compressed - len(self._in), self.inflated + len(out)))
            else:
                self._in = self._d.unconsumed_tail
                self._need_input = len(out) < limit
            if out:
                self.inflated += len(out)
                return out

    def _step(self) -> bytes:
        """The next piece of decompressed data (the one read ahead, if any), and the one after it set going
        when this one was a full chunk (more is likely to come: a small archive is read in the caller's
        thread alone, one step at a time, as its consumer gets to it)."""
        ahead, self._ahead = self._ahead, None
        out = ahead.result() if ahead is not None else self._inflate()
        if len(out) == _CHUNK and self.read_ahead:
            self._ahead = worker("inflate").submit(self._inflate)
        return out

    def settle(self) -> None:
        """Wait for the step read ahead: its data (or error) stays for the next chunk."""
        if self._ahead is not None:
            wait((self._ahead,))

    def chunk(self, n: int) -> bytes:
        """Up to n decompressed bytes (fewer when the buffer runs dry); b"" at the end."""
        if self._pos >= len(self._buf):
            self._buf = self._step()
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        self.position += len(out)
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
        self.settle()
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
    offset: int = 0  # where its first header block is in the decompressed stream



_NO_DATA_TYPES = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))



class TarStream:
    """One pass over a gzip-compressed tar: yields the members `_check` accepts, records every issue.

    Used as a context manager: on leaving it (the end, a break, an error) no step read ahead is still
    running, so its hash and counts are final and nothing reads the input once the block is left."""

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
        self._global_pax: dict[bytes, bytes] = {}
        self._end = False
        self.end_at: int | None = None  # where the end-of-archive block is in the decompressed stream

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inf.settle()

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
        start = self.inf.position
        while True:
            block = self.inf.read(_BLOCK)
            if len(block) < _BLOCK:
                if not block and self._members == 0 and meta_run == 0:
                    raise _corrupt("the tar archive is empty (no end-of-archive marker)")
                raise _corrupt("the file is truncated (unexpected end of the tar data)")
            if block == _ZERO_BLOCK:
                if meta_run:
                    raise _corrupt("an extended header is not followed by a member")
                self.end_at = start
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
            member = self._member(block, kind, size, {**self._global_pax, **pax}, long_name, long_link)
            if member is not None:
                member.offset = start
            return member

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
        self._count()
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

        self._sized(shown, data_size)  # size limits first: they stop the scan before any data is inflated
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

    def _count(self) -> None:
        self._members += 1
        if self._members > self.limits.max_members:
            raise _Halt("too_many_members", f"The bundle has more than {self.limits.max_members} members")

    def _sized(self, shown: str, data_size: int) -> None:
        """The size limits of a member's data, checked before any of it is read."""
        limits = self.limits
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

    def admit(self, raw_name: bytes, raw_kind: bytes, mode: int, raw_link: bytes, size: int) -> _Member | None:
        """Every rule of the stream's members, for a member that is not read from it (one a rebuild
        writes): the count and size limits, then `_check`. The member, or None when it is refused
        (its issue is recorded; a limit halts the scan, as it would have halted the stream)."""
        if self.halted:
            return None
        shown = _display(raw_name)
        try:
            self._count()
            self._sized(shown, size)
            result = self._check(raw_name, shown, raw_kind, mode, raw_link, size)
        except _Halt as exc:
            self._halt(exc)
            return None
        if isinstance(result, Issue):
            self.issues.add(result)
            return None
        if result is not None and result.kind == "file":
            self.files += 1
            self.bytes += result.size
        return result


    def _check(
        self, raw_name: bytes, shown: str, raw_kind: bytes, mode: int, raw_link: bytes, size: int
    ) -> Issue | _Member | None:
        """The per-member rules (see rules.BundleScan): the member, an Issue, or None (root entry)."""
        raise NotImplementedError
