"""Deterministic bundle writer: a DAG folder as a reproducible gzip-compressed PAX tar.

The same files always give the same bytes (and sha256): members are sorted by path,
metadata is normalised (mtime 0, uid/gid 0, empty owner names, mode 0o644), the gzip
headers carry no timestamp or file name, and the stream is cut into gzip members at
points that depend on the members alone (see SEGMENT_EVERY), so that the unchanged
parts of a new version keep the compressed bytes of the old one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import stat
import struct
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from chalicelib.bundle.threads import worker
from chalicelib.exceptions import BundleError, DagcastError

__all__ = ["BundleError", "BundleInfo", "BundleWriter", "DagcastError", "OutputFailed", "Segment", "SegmentSource",
           "StaleVouch", "write_bundle"]

_BLOCK = 512
_RECORD = 20 * _BLOCK
_READ_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

# A bundle is a run of gzip members ("segments"), each the tar bytes of consecutive members in path
# order, compressed on its own; the end-of-archive blocks are the last one. A segment ends after a
# member whose path's crc32 is 0 modulo SEGMENT_EVERY, or once it holds SEGMENT_BYTES: where segments
# end depends only on the members, so a change moves the bounds of its own segment alone, and every
# other segment of the new version is the same bytes as in the old one. A writer given those bytes
# (a SegmentSource: the CLI's last bundle, the base a delta is rebuilt on) writes them again instead
# of compressing them. gzip readers read the members as one stream (RFC 1952, 2.2).
SEGMENT_EVERY = 64
SEGMENT_BYTES = 1 << 20
_STREAM_AT = 2 * SEGMENT_BYTES  # a segment past this is compressed as it is written (never reused)
_IN_FLIGHT = 3  # segments handed to the deflate threads and not yet written: memory stays bounded
_DEFLATERS = ("deflate", "deflate-2")  # segments compress apart, so on two threads at once
_KEY_FORMAT = b"dagcast-segment-1\n"


@dataclass(frozen=True)
class Segment:
    """One gzip member of a bundle: what it holds (`key`, see segment_key; "" for one compressed as it
    was written, and for the end-of-archive one: never reused) and where its compressed bytes are."""

    key: str
    offset: int
    size: int
    raw: int  # tar bytes it holds
    first: str  # path of its first member ("" for the end-of-archive one)
    sha256: str = field(default="", compare=False)  # of its compressed bytes (the writer's: the CLI's cache checks it)


@dataclass(frozen=True)
class BundleInfo:
    """What write_bundle produced."""

    sha256: str
    size: int  # compressed bytes written
    files: int  # regular files
    bytes: int  # uncompressed total of regular files
    segments: tuple[Segment, ...] = field(default=(), compare=False, repr=False)
    reused: int = field(default=0, compare=False, repr=False)  # segments written from a SegmentSource


class MemberCheck(Protocol):
    """What write_bundle shows each member as it writes it (chalicelib.bundle.written.WrittenCheck)."""

    def wants(self, path: str, size: int, sha256: str | None = None) -> bool: ...
    def file(self, path: str, size: int, sha256: str, data: bytes | None) -> None: ...
    def symlink(self, path: str, linkname: str) -> None: ...


class SegmentSource(Protocol):
    """Compressed segments written before, by key: the bytes, or None when it does not have them."""

    def compressed(self, key: str) -> bytes | None: ...


class OutputFailed(OSError):
    """The bundle's output could not be written (a full disk, say): not a problem of the files read."""


class StaleVouch(BundleError):
    """A file write_bundle was told it knew (`known`) is not what it was told when it is read: the
    caller's record of it is stale, and bundling without it gives the right bundle."""


def _name(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def key_line(path: str, kind: bytes, size: int, what: str) -> bytes:
    """One member as a segment's key covers it: path, tar type, size and the file's sha256 or the
    symlink's target as written (length-prefixed: no two members give the same bytes)."""
    name, value = _name(path), _name(what)
    return b"%d:%s%s%d:%d:%s" % (len(name), name, kind, size, len(value), value)


def segment_key(lines: Iterable[bytes]) -> str:
    """What a segment holds (key_line of each member): the same members, compressed at the same level,
    give the same bytes (a SegmentSource holds the segments of one level)."""
    digest = hashlib.sha256(_KEY_FORMAT)
    for line in lines:
        digest.update(line)
    return digest.hexdigest()


def member_bytes(path: str, size: int, kind: bytes, linkname: str = "") -> int:
    """The tar bytes of one member as the writer frames it: its header block(s), its data padded."""
    header = _BLOCK if _plain(path, size, linkname) else len(
        _tarfile_header(path, size, kind, 0o777 if kind == tarfile.SYMTYPE else 0o644, linkname))
    return header + size + (-size % _BLOCK)


def segment_ends(path: str, raw: int) -> bool:
    """Whether a segment ends after the member at `path`, the segment holding `raw` tar bytes with it."""
    return zlib.crc32(_name(path)) % SEGMENT_EVERY == 0 or raw >= SEGMENT_BYTES


def gzip_header(compresslevel: int) -> bytes:
    """The header of each gzip member: XFL says level 1 or 9 (2 to 8 all say 0)."""
    xfl = b"\x02" if compresslevel == 9 else b"\x04" if compresslevel == 1 else b"\x00"
    # magic, deflate, no flags, mtime 0, xfl, OS "unknown": no name, no timestamp.
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff"


def _deflater(compresslevel: int) -> Any:
    return zlib.compressobj(compresslevel, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, 0)


def gzip_member(raw: bytes, compresslevel: int) -> bytes:
    """One segment, compressed (on a deflate thread)."""
    zip_ = _deflater(compresslevel)
    return b"".join((gzip_header(compresslevel), zip_.compress(raw), zip_.flush(),
                     struct.pack("<II", zlib.crc32(raw), len(raw) & 0xFFFFFFFF)))


def _check_relpath(rel: str) -> str:
    """Return rel if it is a clean relative POSIX path, else raise BundleError."""
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or posixpath.normpath(rel) != rel
        or rel == "."
        or rel.split("/", 1)[0] == ".."
    ):
        raise BundleError(f"{rel!r}: not a clean relative path inside the DAG folder")
    return rel


_USTAR_TAIL = b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155)


def _plain(name: str, size: int, linkname: str) -> bool:
    """Whether the member's header is one ustar block (else tarfile writes PAX records before it)."""
    return len(name) <= 100 and len(linkname) <= 100 and name.isascii() and linkname.isascii() and size < 0o77777777777


def _header(name: str, size: int, kind: bytes, linkname: str = "") -> bytes:
    """The tar header block(s) of one member, byte-identical to tarfile's PAX_FORMAT output.

    Short ASCII names need no PAX record, so their single ustar block is built directly
    (building it through TarInfo costs more than compressing the file); anything else
    goes through tarfile.
    """
    mode = 0o777 if kind == tarfile.SYMTYPE else 0o644
    if _plain(name, size, linkname):
        block = b"".join((
            name.encode().ljust(100, b"\0"),
            b"%07o\0" % mode,
            b"0000000\0" * 2,  # uid, gid
            b"%011o\0" % size,
            b"00000000000\0",  # mtime
            b"        ",  # checksum placeholder
            kind,
            linkname.encode().ljust(100, b"\0"),
            _USTAR_TAIL,
        )).ljust(tarfile.BLOCKSIZE, b"\0")
        return block[:148] + b"%06o\0" % sum(block) + block[155:]
    return _tarfile_header(name, size, kind, mode, linkname)


def _tarfile_header(name: str, size: int, kind: bytes, mode: int, linkname: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    # TarInfo defaults: mtime 0, uid/gid 0, uname/gname "".
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_HOLD_AT = 1 << 20  # a file up to this is held from being hashed to being written; a larger one is read again


@dataclass
class Planned:
    """A member of a bundle planned before it is written: a file (its bytes, when held) or a symlink."""

    rel: str
    kind: bytes  # tarfile.REGTYPE or tarfile.SYMTYPE
    size: int
    what: str  # the file's sha256, or the symlink's target as written
    data: bytes | None = None
    vouched: bool = False  # its sha256 is the caller's word (write_bundle's `known`), not hashed here

    def line(self) -> bytes:
        return key_line(self.rel, self.kind, self.size, self.what)

    def tar_bytes(self) -> int:
        return member_bytes(self.rel, self.size, self.kind, self.what if self.kind == tarfile.SYMTYPE else "")


def runs(members: Iterable[Planned]) -> Iterator[tuple[list[Planned], int]]:
    """Members in path order, cut into segments by the writer's rule: each with its tar bytes."""
    run: list[Planned] = []
    raw = 0
    for member in members:
        run.append(member)
        raw += member.tar_bytes()
        if segment_ends(member.rel, raw):
            yield run, raw
            run, raw = [], 0
    if run:
        yield run, raw


def write_run(writer: BundleWriter, run: list[Planned], raw: int, reuse: SegmentSource | None,
              read: Callable[[Planned], Iterable[bytes]]) -> None:
    """One segment of `runs`: its bytes from `reuse` when it has them, else its members framed (the
    writer ends the segment after the last one, by the same rule), a file's bytes its own or `read`'s."""
    key = segment_key(m.line() for m in run)
    data = reuse.compressed(key) if reuse is not None else None
    if data is not None:
        files = [m for m in run if m.kind == tarfile.REGTYPE]
        writer.add_segment(key, data, run[0].rel, raw, len(files), sum(m.size for m in files))
        return
    for m in run:
        if m.kind == tarfile.SYMTYPE:
            writer.add_symlink(m.rel, m.what)
        else:
            writer.add_file(m.rel, m.size, (m.data,) if m.data is not None else read(m), m.what)


def write_bundle(root: Path, relpaths: Iterable[str], out: BinaryIO, *, compresslevel: int = 6,
                 check: MemberCheck | None = None, reuse: SegmentSource | None = None,
                 known: Callable[[str], tuple[str, int] | None] | None = None) -> BundleInfo:
    """Write the given files of root to out as a deterministic bundle.

    relpaths are POSIX paths relative to root (already filtered by the caller). Symlinks
    are kept as symlinks when they are relative, resolve inside root, point at another
    bundled path and do not go through another symlink; anything else raises BundleError.
    With `check`, each member is shown to it as it is gathered: each file with its sha256 (and
    its bytes, when the check wants them), each symlink with its target as written.

    The files are gathered a segment at a time (see SEGMENT_EVERY): each file hashed, then, once
    the segment is whole, its bytes from `reuse` when it has the segment, else its files framed
    and compressed. `known` (path -> (sha256, size) or None) names the regular files whose sha256
    the caller vouches for as they are now (the CLI: unchanged since it hashed them); they are
    read only when their segment is compressed, and must then still have that sha256 (StaleVouch).
    """
    root_real = os.path.realpath(root)
    paths = sorted({_check_relpath(p) for p in relpaths})
    wanted = set(paths)
    implied: set[str] = set()
    for p in paths:
        parent = posixpath.dirname(p)
        while parent and parent not in implied:
            implied.add(parent)
            parent = posixpath.dirname(parent)

    dir_ok: dict[str, bool] = {"": True}

    def parent_is_real(rel: str) -> bool:
        parent = posixpath.dirname(rel)
        ok = dir_ok.get(parent)
        if ok is None:
            ok = os.path.realpath(os.path.join(root_real, parent)) == os.path.join(root_real, parent)
            dir_ok[parent] = ok
        return ok

    def gathered() -> Iterator[Planned]:
        for rel in paths:
            if not parent_is_real(rel):
                raise BundleError(f"{rel}: a parent directory is a symlink or missing; refusing to follow it", path=rel)
            vouched = known(rel) if known is not None else None
            if vouched is not None and (check is None or not check.wants(rel, vouched[1], vouched[0])):
                if check is not None:
                    check.file(rel, vouched[1], vouched[0], None)
                yield Planned(rel, tarfile.REGTYPE, vouched[1], vouched[0], vouched=True)
            else:
                yield _gather(rel, root_real, wanted, implied, check)

    writer = BundleWriter(out, compresslevel)
    try:
        for run, raw in runs(gathered()):
            write_run(writer, run, raw, reuse, lambda m: _read_again(m, root_real))
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def _gather(rel: str, root_real: str, wanted: set[str], implied: set[str], check: MemberCheck | None) -> Planned:
    """One member read from the folder: a file hashed (its bytes held when small), or a symlink."""
    full = os.path.join(root_real, rel)
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            linkname = _symlink_linkname(rel, full, root_real, wanted, implied)
            if check is not None:
                check.symlink(rel, linkname)
            return Planned(rel, tarfile.SYMTYPE, 0, linkname)
        raise BundleError(f"{rel}: cannot read file ({exc.strerror})", path=rel) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{rel}: not a regular file", path=rel)
        digest = hashlib.sha256()
        wants = check is not None and check.wants(rel, st.st_size)
        parts: list[bytes] | None = [] if wants or st.st_size <= _HOLD_AT else None
        for chunk in _read_exactly(fd, rel, st.st_size):
            digest.update(chunk)
            if parts is not None:
                parts.append(chunk)
    except OSError as exc:
        raise BundleError(f"{rel}: cannot read file ({exc.strerror})", path=rel) from exc
    finally:
        os.close(fd)
    data = None if parts is None else b"".join(parts)
    member = Planned(rel, tarfile.REGTYPE, st.st_size, digest.hexdigest(), data)
    if check is not None:
        check.file(rel, member.size, member.what, data if wants else None)
    if member.size > _HOLD_AT:
        member.data = None  # read again when written
    return member


def _read_again(member: Planned, root_real: str) -> Iterator[bytes]:
    """A file's bytes read when its segment is written, which must be the ones hashed before."""
    rel = member.rel
    try:
        fd = os.open(os.path.join(root_real, rel), _OPEN_FLAGS)
    except OSError as exc:
        raise BundleError(f"{rel}: cannot read file ({exc.strerror})", path=rel) from exc
    try:
        digest = hashlib.sha256()
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BundleError(f"{rel}: not a regular file", path=rel)
            for chunk in _read_exactly(fd, rel, member.size):
                digest.update(chunk)
                yield chunk
        except OSError as exc:
            raise BundleError(f"{rel}: cannot read file ({exc.strerror})", path=rel) from exc
        if digest.hexdigest() != member.what:
            if member.vouched:
                raise StaleVouch(f"{rel}: not the file its recorded sha256 says", path=rel)
            raise BundleError(f"{rel}: changed while it was being bundled", path=rel)
    finally:
        os.close(fd)


def _read_exactly(fd: int, rel: str, size: int) -> Iterator[bytes]:
    got = 0
    while True:
        chunk = os.read(fd, min(_READ_CHUNK, size - got + 1))
        if not chunk:
            break
        got += len(chunk)
        if got > size:
            raise BundleError(f"{rel}: file grew while it was being bundled", path=rel)
        yield chunk
    if got != size:
        raise BundleError(f"{rel}: file shrank while it was being bundled", path=rel)


class BundleWriter:
    """The members of a bundle, given in path order, as the deterministic archive write_bundle makes.

    write_bundle feeds it a folder; the ingest function feeds it an earlier version merged with an
    uploaded delta (chalicelib.bundle.rebuild), and gets the same bytes as bundling the folder. Each
    segment is compressed on a deflate thread (chalicelib.bundle.threads) while the caller frames the
    next files, unless `reuse` has its bytes; whether it has is asked when the next member comes (or
    at the end), so a source that learns segments as it reads them has read past this one. Segments
    are written to `out` in order, by the caller's thread.
    """

    def __init__(self, out: BinaryIO, compresslevel: int = 6, reuse: SegmentSource | None = None) -> None:
        self._out = out
        self._level = compresslevel
        self._reuse = reuse
        self.sha = hashlib.sha256()
        self.size = 0  # compressed bytes written
        self._offset = 0  # tar bytes framed
        self._parts: list[bytes] = []  # the open segment's tar bytes (unless it is streamed)
        self._raw = 0
        self._lines: list[bytes] = []  # its members, as its key covers them
        self._stream: Any = None  # the open segment's deflater, once it outgrew _STREAM_AT
        self._crc = 0
        self._first = ""  # the open segment's first member
        self._held: tuple[str, bytes, str] | None = None  # a closed segment, reuse not yet asked
        self._queue: deque[tuple[str, Future[bytes] | bytes, int, str]] = deque()  # (key, bytes, raw, first)
        self._turn = 0
        self.segments: list[Segment] = []
        self.files = 0
        self.bytes = 0
        self.reused = 0  # segments written again from `reuse`

    # -- output, in order
    def _write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        try:
            self._out.write(data)
        except OSError as exc:
            raise OutputFailed(exc.errno, f"cannot write the bundle: {exc.strerror or exc}") from exc

    def _emit_next(self) -> None:
        key, item, raw, first = self._queue.popleft()
        data = item.result() if isinstance(item, Future) else item  # a deflate thread's error is raised here
        self.segments.append(Segment(key, self.size, len(data), raw, first, hashlib.sha256(data).hexdigest()))
        self._write(data)

    def _settle(self) -> None:
        """Hand the closed segment over: its earlier bytes from `reuse`, or a deflate thread's."""
        if self._held is None:
            return
        key, raw, first = self._held
        self._held = None
        data = self._reuse.compressed(key) if self._reuse is not None else None
        if data is not None:
            self.reused += 1
            self._queue.append((key, data, len(raw), first))
        else:
            pool = worker(_DEFLATERS[self._turn % len(_DEFLATERS)])
            self._turn += 1
            self._queue.append((key, pool.submit(gzip_member, raw, self._level), len(raw), first))
        self._bound()

    def _bound(self) -> None:
        while len(self._queue) > _IN_FLIGHT:
            self._emit_next()

    # -- framing
    def _open(self, rel: str) -> None:
        self._settle()
        if not self._lines:
            self._first = rel

    def _put(self, data: bytes) -> None:
        self._offset += len(data)
        self._raw += len(data)
        if self._stream is not None:
            self._crc = zlib.crc32(data, self._crc)
            self._write(self._stream.compress(data))
            return
        self._parts.append(data)
        if self._raw > _STREAM_AT:
            self._start_stream()

    def _start_stream(self) -> None:
        """The open segment is too large to hold: every segment before it is written, and it is
        compressed as it comes."""
        self._settle()
        while self._queue:
            self._emit_next()
        self.segments.append(Segment("", self.size, 0, 0, self._first))  # the rest is known when it ends
        self._stream_sha = hashlib.sha256()
        self._stream = _deflater(self._level)
        self._write_streamed(gzip_header(self._level))
        parts, self._parts = self._parts, []
        for part in parts:
            self._crc = zlib.crc32(part, self._crc)
            self._write_streamed(self._stream.compress(part))

    def _write_streamed(self, data: bytes) -> None:
        self._stream_sha.update(data)
        self._write(data)

    def _member_done(self, rel: str) -> None:
        if segment_ends(rel, self._raw):
            self._end_segment()

    def _end_segment(self) -> None:
        if self._stream is not None:
            self._write_streamed(self._stream.flush())
            self._write_streamed(struct.pack("<II", self._crc, self._raw & 0xFFFFFFFF))
            start = self.segments[-1].offset
            self.segments[-1] = Segment("", start, self.size - start, self._raw, self._first,
                                        self._stream_sha.hexdigest())
            self._stream, self._crc = None, 0
        elif self._parts:
            self._held = (segment_key(self._lines), b"".join(self._parts), self._first)
        self._parts, self._lines, self._raw = [], [], 0

    def add_file(self, rel: str, size: int, chunks: Iterable[bytes], sha256: str) -> None:
        """A regular file of `size` bytes whose sha256 the caller knows (it is what the segment's key
        says it holds); `chunks` must add up to exactly that size (BundleError otherwise)."""
        self._open(rel)
        self._put(_header(rel, size, tarfile.REGTYPE))
        got = 0
        for chunk in chunks:
            got += len(chunk)
            if got > size:
                raise BundleError(f"{rel}: more bytes than its size of {size}", path=rel)
            self._put(chunk)
        if got != size:
            raise BundleError(f"{rel}: {got} bytes, not its size of {size}", path=rel)
        pad = -size % _BLOCK
        if pad:
            self._put(b"\x00" * pad)
        self.files += 1
        self.bytes += size
        self._lines.append(key_line(rel, tarfile.REGTYPE, size, sha256))
        self._member_done(rel)

    def add_symlink(self, rel: str, linkname: str) -> None:
        """A symlink whose target, as written in the archive, is linkname (relative to rel's folder)."""
        self._open(rel)
        self._put(_header(rel, 0, tarfile.SYMTYPE, linkname))
        self._lines.append(key_line(rel, tarfile.SYMTYPE, 0, linkname))
        self._member_done(rel)

    def add_segment(self, key: str, data: bytes, first: str, raw: int, files: int, nbytes: int) -> None:
        """A whole segment's compressed bytes, as an earlier bundle has them: `files` regular files of
        `nbytes` (and any symlinks) from `first`, `raw` tar bytes, which the members the caller would
        give one by one make a segment of (a rebuild plans the new bundle's segments with the same
        rules). Only between segments: after a member that ended one, or first."""
        self._settle()
        if self._lines or self._stream is not None:
            raise ValueError("a segment is added in the middle of another one")
        self._queue.append((key, data, raw, first))
        self._offset += raw
        self.files += files
        self.bytes += nbytes
        self.reused += 1
        self._bound()

    def discard(self) -> None:
        """Abandon the archive (the caller failed): nothing more is written to `out` once this returns."""
        self._held = None
        self._parts = []
        while self._queue:
            item = self._queue.popleft()[1]
            if isinstance(item, Future):
                item.exception()

    def close(self) -> BundleInfo:
        try:
            self._settle()
            self._end_segment()
            self._settle()
            # End of archive, a segment of its own: two zero blocks, then pad to a full record like tar does.
            end = 2 * _BLOCK
            end += -(self._offset + end) % _RECORD
            self._offset += end
            self._queue.append(("", gzip_member(b"\x00" * end, self._level), end, ""))
            while self._queue:
                self._emit_next()
        except BaseException:
            self.discard()
            raise
        return BundleInfo(sha256=self.sha.hexdigest(), size=self.size, files=self.files, bytes=self.bytes,
                          segments=tuple(self.segments), reused=self.reused)


def _symlink_linkname(rel: str, full: str, root_real: str, wanted: set[str], implied: set[str]) -> str:
    """The target of a permitted symlink as the archive writes it (relative to its folder), or
    BundleError naming the problem."""
    try:
        target = os.readlink(full)
    except OSError as exc:
        raise BundleError(f"{rel}: cannot read symlink ({exc.strerror})", path=rel) from exc
    if os.path.isabs(target):
        raise BundleError(f"{rel}: symlink to absolute path {target!r} is not allowed", path=rel)
    base = posixpath.dirname(rel)
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == "." or resolved == ".." or resolved.startswith("../"):
        raise BundleError(f"{rel}: symlink target {target!r} points outside the DAG folder", path=rel)
    if rel == resolved or rel.startswith(resolved + "/"):
        raise BundleError(f"{rel}: symlink target {target!r} points at its own parent (a loop)", path=rel)
    if not os.path.exists(full):
        raise BundleError(f"{rel}: symlink target {target!r} does not exist", path=rel)
    if os.path.realpath(full) != os.path.join(root_real, resolved):
        raise BundleError(f"{rel}: symlink target {target!r} goes through another symlink or does not exist", path=rel)
    if resolved not in wanted and resolved not in implied:
        raise BundleError(f"{rel}: symlink target {resolved!r} is not part of the bundle", path=rel)
    return posixpath.relpath(resolved, base or ".")
