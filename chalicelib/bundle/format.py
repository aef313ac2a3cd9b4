"""Deterministic bundle writer: a DAG folder as a reproducible gzip-compressed PAX tar.

The same files always give the same bytes (and sha256): members are sorted by path,
metadata is normalised (mtime 0, uid/gid 0, empty owner names, mode 0o644) and the
gzip header carries no timestamp or file name.
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
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from chalicelib.bundle.threads import worker
from chalicelib.exceptions import BundleError, DagcastError

__all__ = ["BundleError", "BundleInfo", "BundleWriter", "DagcastError", "OutputFailed", "write_bundle"]

_BLOCK = 512
_RECORD = 20 * _BLOCK
_FLUSH_AT = 1 << 20  # compress in ~1 MiB batches
_IN_FLIGHT = 2  # batches handed to the deflate thread and not yet written: memory stays bounded
_READ_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class BundleInfo:
    """What write_bundle produced."""

    sha256: str
    size: int  # compressed bytes written
    files: int  # regular files
    bytes: int  # uncompressed total of regular files


class MemberCheck(Protocol):
    """What write_bundle shows each member as it writes it (chalicelib.bundle.written.WrittenCheck)."""

    def wants(self, path: str, size: int) -> bool: ...
    def file(self, path: str, size: int, sha256: str, data: bytes | None) -> None: ...
    def symlink(self, path: str, linkname: str) -> None: ...


class OutputFailed(OSError):
    """The bundle's output could not be written (a full disk, say): not a problem of the files read."""


class _GzipSink:
    """Deterministic gzip writer that hashes and counts the compressed output.

    Batches are compressed, hashed and written by the deflate thread (chalicelib.bundle.threads), in
    order, while the caller reads and frames the next files; the bytes are the same as compressing in
    the caller's thread, since the batches and their order are."""

    def __init__(self, out: BinaryIO, compresslevel: int) -> None:
        self._out = out
        self._zip = zlib.compressobj(compresslevel, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, 0)
        self._crc = 0
        self._raw = 0
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._inflight: deque[Future[None]] = deque()
        self.sha = hashlib.sha256()
        self.size = 0
        xfl = b"\x02" if compresslevel == 9 else b"\x04" if compresslevel == 1 else b"\x00"
        # magic, deflate, no flags, mtime 0, xfl, OS "unknown": no name, no timestamp.
        self._emit(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff")

    def _emit(self, data: bytes) -> None:
        if data:
            self.sha.update(data)
            self.size += len(data)
            try:
                self._out.write(data)
            except OSError as exc:
                raise OutputFailed(exc.errno, f"cannot write the bundle: {exc.strerror or exc}") from exc

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= _FLUSH_AT:
            self._compress()

    def _compress(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        if not data:
            return
        self._inflight.append(worker("deflate").submit(self._deflate, data))
        while len(self._inflight) > _IN_FLIGHT:
            self._inflight.popleft().result()  # the deflate thread's error, if any, is raised here

    def _deflate(self, data: bytes) -> None:
        """In the deflate thread: one batch, after the ones before it."""
        self._crc = zlib.crc32(data, self._crc)
        self._raw += len(data)
        self._emit(self._zip.compress(data))

    def settle(self) -> None:
        """Wait until every batch handed over is written (raises the first error of one)."""
        while self._inflight:
            self._inflight.popleft().result()

    def discard(self) -> None:
        """The writer is abandoned (an error): wait for the batches in flight, so that nothing is written
        to `out` after the caller has moved on, and drop their errors."""
        self._pending.clear()
        while self._inflight:
            self._inflight.popleft().exception()

    def close(self) -> None:
        try:
            self._compress()
            self.settle()
        except BaseException:
            self.discard()
            raise
        self._emit(self._zip.flush())
        self._emit(struct.pack("<II", self._crc, self._raw & 0xFFFFFFFF))


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


def _header(name: str, size: int, kind: bytes, linkname: str = "") -> bytes:
    """The tar header block(s) of one member, byte-identical to tarfile's PAX_FORMAT output.

    Short ASCII names need no PAX record, so their single ustar block is built directly
    (building it through TarInfo costs more than compressing the file); anything else
    goes through tarfile.
    """
    mode = 0o777 if kind == tarfile.SYMTYPE else 0o644
    if len(name) <= 100 and len(linkname) <= 100 and name.isascii() and linkname.isascii() and size < 0o77777777777:
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


def write_bundle(root: Path, relpaths: Iterable[str], out: BinaryIO, *, compresslevel: int = 6,
                 check: MemberCheck | None = None) -> BundleInfo:
    """Write the given files of root to out as a deterministic bundle.

    relpaths are POSIX paths relative to root (already filtered by the caller). Symlinks
    are kept as symlinks when they are relative, resolve inside root, point at another
    bundled path and do not go through another symlink; anything else raises BundleError.
    With `check`, each member is shown to it as written: each file with its sha256 (and its
    bytes, when the check wants them), each symlink with its target as written.
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

    writer = BundleWriter(out, compresslevel)
    try:
        for rel in paths:
            full = os.path.join(root_real, rel)
            if not parent_is_real(rel):
                raise BundleError(f"{rel}: a parent directory is a symlink or missing; refusing to follow it")
            try:
                fd = os.open(full, _OPEN_FLAGS)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    linkname = _symlink_linkname(rel, full, root_real, wanted, implied)
                    writer.add_symlink(rel, linkname)
                    if check is not None:
                        check.symlink(rel, linkname)
                    continue
                raise BundleError(f"{rel}: cannot read file ({exc.strerror})") from exc
            digest = hashlib.sha256()
            parts: list[bytes] | None = None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise BundleError(f"{rel}: not a regular file")
                chunks = _read_exactly(fd, rel, st.st_size)
                if check is not None:
                    parts = [] if check.wants(rel, st.st_size) else None
                    chunks = _teed(chunks, digest, parts)
                writer.add_file(rel, st.st_size, chunks)
            except OutputFailed:
                raise
            except OSError as exc:
                raise BundleError(f"{rel}: cannot read file ({exc.strerror})") from exc
            finally:
                os.close(fd)
            if check is not None:
                check.file(rel, st.st_size, digest.hexdigest(), None if parts is None else b"".join(parts))
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def _teed(chunks: Iterable[bytes], digest: Any, parts: list[bytes] | None) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        if parts is not None:
            parts.append(chunk)
        yield chunk


def _read_exactly(fd: int, rel: str, size: int) -> Iterator[bytes]:
    got = 0
    while True:
        chunk = os.read(fd, min(_READ_CHUNK, size - got + 1))
        if not chunk:
            break
        got += len(chunk)
        if got > size:
            raise BundleError(f"{rel}: file grew while it was being bundled")
        yield chunk
    if got != size:
        raise BundleError(f"{rel}: file shrank while it was being bundled")


class BundleWriter:
    """The members of a bundle, given in path order, as the deterministic archive write_bundle makes.

    write_bundle feeds it a folder; the ingest function feeds it an earlier version merged with an
    uploaded delta (chalicelib.bundle.rebuild), and gets the same bytes as bundling the folder.
    """

    def __init__(self, out: BinaryIO, compresslevel: int = 6) -> None:
        self._sink = _GzipSink(out, compresslevel)
        self._offset = 0
        self.files = 0
        self.bytes = 0

    def raw(self, block: bytes) -> None:
        self._sink.write(block)
        self._offset += len(block)

    def add_file(self, rel: str, size: int, chunks: Iterable[bytes]) -> None:
        """A regular file of `size` bytes; `chunks` must add up to exactly that (BundleError otherwise)."""
        self.raw(_header(rel, size, tarfile.REGTYPE))
        got = 0
        for chunk in chunks:
            got += len(chunk)
            if got > size:
                raise BundleError(f"{rel}: more bytes than its size of {size}")
            self._sink.write(chunk)
        if got != size:
            raise BundleError(f"{rel}: {got} bytes, not its size of {size}")
        pad = -size % _BLOCK
        if pad:
            self._sink.write(b"\x00" * pad)
        self._offset += size + pad
        self.files += 1
        self.bytes += size

    def add_symlink(self, rel: str, linkname: str) -> None:
        """A symlink whose target, as written in the archive, is linkname (relative to rel's folder)."""
        self.raw(_header(rel, 0, tarfile.SYMTYPE, linkname))

    def discard(self) -> None:
        """Abandon the archive (the caller failed): nothing more is written to `out` once this returns."""
        self._sink.discard()

    def close(self) -> BundleInfo:
        # End of archive: two zero blocks, then pad to a full record like tar does.
        self._offset += 2 * _BLOCK
        self._sink.write(b"\x00" * (2 * _BLOCK + (-self._offset % _RECORD)))
        self._sink.close()
        return BundleInfo(sha256=self._sink.sha.hexdigest(), size=self._sink.size, files=self.files, bytes=self.bytes)


def _symlink_linkname(rel: str, full: str, root_real: str, wanted: set[str], implied: set[str]) -> str:
    """The target of a permitted symlink as the archive writes it (relative to its folder), or
    BundleError naming the problem."""
    try:
        target = os.readlink(full)
    except OSError as exc:
        raise BundleError(f"{rel}: cannot read symlink ({exc.strerror})") from exc
    if os.path.isabs(target):
        raise BundleError(f"{rel}: symlink to absolute path {target!r} is not allowed")
    base = posixpath.dirname(rel)
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == "." or resolved == ".." or resolved.startswith("../"):
        raise BundleError(f"{rel}: symlink target {target!r} points outside the DAG folder")
    if rel == resolved or rel.startswith(resolved + "/"):
        raise BundleError(f"{rel}: symlink target {target!r} points at its own parent (a loop)")
    if not os.path.exists(full):
        raise BundleError(f"{rel}: symlink target {target!r} does not exist")
    if os.path.realpath(full) != os.path.join(root_real, resolved):
        raise BundleError(f"{rel}: symlink target {target!r} goes through another symlink or does not exist")
    if resolved not in wanted and resolved not in implied:
        raise BundleError(f"{rel}: symlink target {resolved!r} is not part of the bundle")
    return posixpath.relpath(resolved, base or ".")
