"""The stored form of a version's file list: gzip-compressed JSON, read back bounded."""
from __future__ import annotations

import gzip
import json

import pytest

from chalicelib.bundle import FileEntry
from chalicelib.manifest import ManifestError, decode_manifest, encode_manifest, manifests


def entries(n: int) -> list[FileEntry]:
    return [FileEntry(path=f"team_{i % 25}/pipeline_{i}.py", size=5000 + i, sha256=f"{i:064x}", dag_ids=[f"p_{i}"])
            for i in range(n)]


def test_round_trip_is_deterministic_and_much_smaller_than_json() -> None:
    files = entries(2000)
    raw = encode_manifest(files)
    assert raw == encode_manifest(files), "same list, same bytes (no mtime in the gzip header)"
    assert decode_manifest(raw) == files
    assert len(raw) * 3 < len(manifests().dump_json(files))


def test_manifests_written_before_compression_still_read() -> None:
    files = entries(3)
    assert decode_manifest(manifests().dump_json(files)) == files


def test_inflating_stops_at_the_bound() -> None:
    bomb = gzip.compress(json.dumps([{"path": "a" * 100, "size": 1, "sha256": "0" * 64}] * 50_000).encode())
    with pytest.raises(ManifestError, match="inflates past 100000 bytes"):
        decode_manifest(bomb, max_bytes=100_000)


@pytest.mark.parametrize("raw", [b"\x1f\x8b not gzip at all", gzip.compress(b"{not json"), gzip.compress(b"[1, 2]")[:-6]])
def test_corrupt_manifests_are_one_error(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        decode_manifest(raw)
