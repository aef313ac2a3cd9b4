"""A bundle's segments (its gzip members, see format.SEGMENT_EVERY): learnt as a scan reads it, and
kept as the version's segment index, so that a bundle rebuilt from it copies the segments it keeps.

`SegmentTracker` follows a scan (a validation, a rebuild's read of its base): the members each gzip
member holds, hence its key, where its compressed bytes are and how many tar bytes it holds. Only a
gzip member holding whole members and nothing else is one (a bundle not written by
format.BundleWriter may hold none). `SegmentIndex` is what ingest stores beside a version: its
segments and the level they were compressed at. Nothing here is trusted for what a bundle holds: a
segment copied under a key it does not hold gives a bundle whose sha256 is not the announced one.
"""
from __future__ import annotations

import gzip
import json
import tempfile
import threading
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from chalicelib.bundle.format import Segment, gzip_header, key_line, segment_key
from chalicelib.bundle.rules import BundleScan, relative_link
from chalicelib.bundle.scan import _Member

INDEX_MAX_BYTES = 64 * 1024 * 1024  # an index inflated: about 100 bytes a segment, 64 files a segment
SPOOL_IN_MEMORY = 64 * 1024 * 1024  # compressed base bytes kept in memory; beyond, on local disk
_LEVEL_OF_XFL = {4: 1, 2: 9}  # the levels a gzip header names (RFC 1952 XFL); others say 0


class SegmentIndexError(ValueError):
    """A stored segment index that is not one."""


@dataclass(frozen=True)
class SegmentIndex:
    """A version's segments, compressed at `level`: the keyed ones are what a rebuild may copy."""

    level: int
    segments: tuple[Segment, ...]

    def encode(self) -> bytes:
        rows = [[s.key, s.offset, s.size, s.raw, s.first] for s in self.segments]
        return gzip.compress(json.dumps({"version": 1, "level": self.level, "segments": rows},
                                        separators=(",", ":")).encode(), compresslevel=6, mtime=0)

    @classmethod
    def decode(cls, raw: bytes) -> SegmentIndex:
        inflate = zlib.decompressobj(wbits=31)
        try:
            data = inflate.decompress(raw, INDEX_MAX_BYTES)
            if inflate.unconsumed_tail or not inflate.eof:
                raise SegmentIndexError("the segment index is truncated or too large")
            doc = json.loads(data)
            if doc["version"] != 1:
                raise SegmentIndexError(f"segment index version {doc['version']!r} is not known")
            return cls(int(doc["level"]), tuple(Segment(str(k), int(o), int(n), int(r), str(f))
                                                for k, o, n, r, f in doc["segments"]))
        except (zlib.error, ValueError, KeyError, TypeError) as exc:
            raise SegmentIndexError(f"not a segment index: {exc}") from exc

    def keyed(self) -> dict[str, Segment]:
        return {s.key: s for s in self.segments if s.key}


class SegmentTracker:
    """A scan's gzip members, told each member as the scan yields it (`member`), then where the end of
    the archive is (`finish`)."""

    def __init__(self) -> None:
        self._ends: list[tuple[int, int]] = []  # (compressed, decompressed) end of each gzip member
        self._done = 0  # of _ends accounted for
        self._start = (0, 0)  # where the next gzip member starts
        self._lines: list[bytes] = []
        self._first: _Member | None = None
        self.segments: list[Segment] = []

    def watch(self, scan: BundleScan) -> None:
        scan.inf.ends = self._ends
        self._scan = scan

    @property
    def level(self) -> int | None:
        """The level the bundle's first gzip header says (see level_of), once the scan read it."""
        return level_of(self._scan.inf.head)

    def index(self) -> SegmentIndex | None:
        """The bundle's segments as an index, when its level is told (and it has keyed segments)."""
        level = self.level
        if level is None or not any(s.key for s in self.segments):
            return None
        return SegmentIndex(level, tuple(self.segments))

    def member(self, member: _Member, sha256: str | None) -> None:
        """A member as the scan yields it, with its file's sha256 (None: no key covers it)."""
        self._passed(member.offset)
        if self._first is None:
            self._first = member
        if member.kind == "file" and sha256 is not None:
            self._lines.append(key_line(member.path, b"0", member.size, sha256))
        elif member.kind == "symlink":
            self._lines.append(key_line(member.path, b"2", 0, relative_link(member.path.rpartition("/")[0], member.target)))
        else:
            self._lines.append(b"?")  # nothing a writer writes: no key matches it

    def finish(self, scan: BundleScan) -> None:
        """After the scan: the last gzip members, up to the end-of-archive block."""
        if scan.end_at is not None:
            self._passed(scan.end_at)
            self._lines, self._first = [], None
            self._passed(scan.inf.position)  # the end-of-archive segment: it holds no member, no key

    def _passed(self, offset: int) -> None:
        while self._done < len(self._ends) and self._ends[self._done][1] <= offset:
            compressed, decompressed = self._ends[self._done]
            self._done += 1
            whole = self._first is not None and self._first.offset == self._start[1] and decompressed == offset
            key = segment_key(self._lines) if whole else ""
            self.segments.append(Segment(key, self._start[0], compressed - self._start[0],
                                         decompressed - self._start[1], self._first.path if self._first else ""))
            self._start, self._lines, self._first = (compressed, decompressed), [], None


def level_of(head: bytes) -> int | None:
    """The level a bundle's first gzip header says it was compressed at, when it is one the writer
    tells apart (1 or 9: see format.gzip_header)."""
    level = _LEVEL_OF_XFL.get(head[8]) if len(head) >= 10 else None
    return level if level is not None and head[:10] == gzip_header(level) else None


class BaseSegments(SegmentTracker):
    """A base bundle read through this (by a rebuild's scan) offers its segments to the writer of the
    new one (a format.SegmentSource): their compressed bytes are spooled as they are read."""

    def __init__(self, raw: BinaryIO, compresslevel: int) -> None:
        super().__init__()
        self._raw = raw
        self._level = compresslevel
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="dagcast-base-")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()  # the inflate thread reads through this while the writer asks
        self.offered = 0

    def read(self, n: int = -1) -> bytes:
        chunk: Any = self._raw.read(n)
        if chunk:
            with self._lock:
                self._spool.seek(0, 2)
                self._spool.write(chunk)
        return bytes(chunk)

    def passed(self, offset: int) -> None:
        """The scan is at `offset` of the decompressed stream: the segments ending by then are known."""
        self._passed(offset)

    def compressed(self, key: str) -> bytes | None:
        if self.level != self._level:  # copied at another level, the bytes would differ
            return None
        for seg in reversed(self.segments):  # the one asked for ended last, most often
            if seg.key == key:
                with self._lock:
                    self._spool.seek(seg.offset)
                    data = self._spool.read(seg.size)
                self.offered += 1
                return data
        return None

    def close(self) -> None:
        self._spool.close()
