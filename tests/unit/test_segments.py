"""A bundle is cut into gzip members ("segments") at points that depend on its members alone, so the
unchanged parts of a new version keep the compressed bytes of the old one: a writer given them
(the CLI's last bundle, the base a delta is rebuilt on) writes them again instead of compressing,
and the bytes are those of compressing everything."""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import random
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rebuild import delta_of, file_list, write

from chalicelib.bundle import Limits, validate_stream
from chalicelib.bundle import format as bundle_format
from chalicelib.bundle import rebuild as rebuild_module
from chalicelib.bundle.format import SEGMENT_EVERY, BundleInfo, SegmentSource, segment_ends, write_bundle
from chalicelib.bundle.rebuild import read_delta, rebuild_bundle
from chalicelib.bundle.report import DeltaMismatch
from chalicelib.bundle.segments import SegmentIndex, SegmentIndexError, SegmentTracker
from dagcast import segment_cache


def folder(root: Path, files: int = 400, size: int = 900) -> list[str]:
    tree = {f"dags/team_{i % 7}/dag_{i:04}.py": (f"# dag {i}\n" + "x = 1\n" * (size // 6)).encode()
            for i in range(files)}
    return write(root, tree)


def members(data: bytes) -> list[bytes]:
    """The gzip members of a bundle, as bytes."""
    out, rest = [], data
    while rest:
        d = zlib.decompressobj(31)
        d.decompress(rest)
        assert d.eof
        out.append(rest[: len(rest) - len(d.unused_data)])
        rest = d.unused_data
    return out


def bundled(root: Path, paths: list[str], reuse: SegmentSource | None = None) -> tuple[bytes, BundleInfo]:
    out = io.BytesIO()
    info = write_bundle(root, paths, out, compresslevel=1, reuse=reuse)
    return out.getvalue(), info


class Kept:
    """A segment source holding the segments of one bundle (as the CLI's cache does)."""

    def __init__(self, data: bytes, writer: BundleInfo) -> None:
        self.by_key = {s.key: data[s.offset:s.offset + s.size] for s in writer.segments if s.key}
        self.asked: list[str] = []

    def compressed(self, key: str) -> bytes | None:
        self.asked.append(key)
        return self.by_key.get(key)


def test_a_bundle_is_gzip_members_any_gzip_reader_reads_as_one_tar(tmp_path: Path) -> None:
    paths = folder(tmp_path)
    data, writer = bundled(tmp_path, paths)
    parts = members(data)
    assert len(parts) == len(writer.segments) > 400 // SEGMENT_EVERY  # cut about every SEGMENT_EVERY files
    assert [len(p) for p in parts] == [s.size for s in writer.segments]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert sorted(m.name for m in tar.getmembers()) == sorted(paths)
    assert len(gzip.decompress(data)) % (20 * 512) == 0
    assert validate_stream(io.BytesIO(data)).valid


def test_where_segments_end_depends_on_the_members_so_a_change_touches_its_own_segment_alone(tmp_path: Path) -> None:
    paths = folder(tmp_path)
    before = members(bundled(tmp_path, paths)[0])
    (tmp_path / paths[200]).write_text("# changed\n")
    after = members(bundled(tmp_path, paths)[0])
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed[:-1] == [changed[0]] and changed[-1] == len(after) - 1  # its segment, and the end-of-archive
    # one (padded to a full tar record: its size follows the total's)


def test_a_segment_also_ends_once_it_holds_a_mebibyte(tmp_path: Path) -> None:
    names = [n for n in (f"f{i:03}.txt" for i in range(200)) if not segment_ends(n, 0)][:40]
    write(tmp_path, {n: os.urandom(100_000) for n in names})  # no path ends one: only the size does
    data, writer = bundled(tmp_path, names)
    assert len(writer.segments) >= 4  # 4 MB of files, cut at 1 MiB (and the end-of-archive one)
    assert max(len(gzip.decompress(p)) for p in members(data)) < 2 * 1024 * 1024


def test_a_file_too_large_to_hold_is_compressed_as_it_is_read_and_bundles_the_same(tmp_path: Path) -> None:
    tree = {"a.py": b"x = 1\n", "big.bin": os.urandom(3 * 1024 * 1024), "z.py": b"y = 2\n"}
    paths = write(tmp_path, tree)
    data, writer = bundled(tmp_path, paths)
    assert "" in [s.key for s in writer.segments[:-1]]  # streamed: never offered for reuse
    assert data == bundled(tmp_path, paths, Kept(data, writer))[0]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert tar.extractfile("big.bin").read() == tree["big.bin"]  # type: ignore[union-attr]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.integers(1, 300), changed=st.sets(st.integers(0, 299), max_size=5), added=st.integers(0, 3))
def test_writing_again_from_the_last_bundles_segments_gives_the_bytes_of_compressing_all(
    files: int, changed: set[int], added: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = folder(root, files, 200)
        old, writer = bundled(root, paths)
        for i in changed:
            if i < files:
                (root / paths[i]).write_text(f"# changed {i}\n")
        paths += write_more(root, added)
        fresh = bundled(root, paths)[0]
        kept = Kept(old, writer)
        again, rewriter = bundled(root, paths, kept)
        assert again == fresh
        unchanged = len(set(kept.by_key) & set(kept.asked))
        assert rewriter.reused == unchanged
        if not changed and not added:
            assert rewriter.reused == len(writer.segments) - 1  # all but the end-of-archive one


def write_more(root: Path, n: int) -> list[str]:
    names = [f"dags/new_{i}.py" for i in range(n)]
    for name in names:
        (root / name).write_text(f"# new {name}\n")
    return names


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where a test's DAG folder goes, with the CLI's cache (XDG_CACHE_HOME) of its own beside it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "dags"


def test_the_cli_keeps_its_last_bundle_and_a_damaged_copy_only_costs_the_compression(
    tmp_path: Path, root: Path
) -> None:
    paths = folder(root)
    assert segment_cache.load(root, 1) is None
    scratch, written_at = segment_cache.scratch()
    assert written_at is not None
    with scratch as tmp:
        first = write_bundle(root, paths, tmp, compresslevel=1)
        tmp.flush()
        segment_cache.save(root, 1, written_at, first)
    (root / paths[3]).write_text("# changed\n")
    fresh = io.BytesIO()
    write_bundle(root, paths, fresh, compresslevel=1)
    last = segment_cache.load(root, 1)
    assert last is not None and segment_cache.load(root, 9) is None  # per level
    again = io.BytesIO()
    write_bundle(root, paths, again, compresslevel=1, reuse=last)
    last.close()
    assert again.getvalue() == fresh.getvalue() and last.hits == len(first.segments) - 2
    kept = next((tmp_path / "cache" / "dagcast" / "bundles").glob("*.tgz"))
    damaged = bytearray(kept.read_bytes())
    for i in range(5, len(damaged), 16):
        damaged[i] ^= 0xFF
    kept.write_bytes(bytes(damaged))
    last = segment_cache.load(root, 1)
    assert last is not None
    again = io.BytesIO()
    write_bundle(root, paths, again, compresslevel=1, reuse=last)
    last.close()
    assert again.getvalue() == fresh.getvalue() and last.hits == 0


def test_a_rebuild_writes_the_bases_unchanged_segments_as_they_were_compressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = folder(tmp_path)
    base, base_writer = bundled(tmp_path, paths)
    (tmp_path / paths[10]).write_text("# changed\n")
    (tmp_path / paths[300]).unlink()
    new = bundled(tmp_path, [p for p in paths if p != paths[300]])[0]
    delta, removed, digest = delta_of(new, base)
    uploaded = read_delta(io.BytesIO(delta), Limits(), list(file_list(base)), removed)
    compressed: list[int] = []
    real = bundle_format.gzip_member
    monkeypatch.setattr(bundle_format, "gzip_member", lambda raw, level: compressed.append(len(raw)) or real(raw, level))
    out = io.BytesIO()
    rebuild_bundle(io.BytesIO(base), Limits(), uploaded, removed, digest, out, file_list(base), 1)
    assert out.getvalue() == new
    assert len(compressed) == 3  # the two segments changed, and the end-of-archive one
    assert len(base_writer.segments) > 6


def learnt(data: bytes) -> SegmentIndex | None:
    tracker = SegmentTracker()
    assert validate_stream(io.BytesIO(data), check_python=False, segments=tracker).valid
    return tracker.index()


def indexed(base: bytes, new: bytes, index: SegmentIndex | None, level: int = 1) -> bytes:
    delta, removed, digest = delta_of(new, base)
    uploaded = read_delta(io.BytesIO(delta), Limits(), list(file_list(base)), removed)
    out = io.BytesIO()
    rebuild_bundle(io.BytesIO(base), Limits(), uploaded, removed, digest, out, file_list(base), level, base_index=index)
    return out.getvalue()


def grow(root: Path, files: int, rng: random.Random) -> dict[str, bytes]:
    return {f"d{rng.randrange(4)}/f{i:03}.py": rng.randbytes(rng.randrange(0, 3000)) for i in range(files)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), files=st.integers(1, 200), edits=st.integers(0, 6), link=st.booleans())
def test_a_rebuild_planned_from_the_index_is_byte_for_byte_the_bundle_of_the_new_folder(
    seed: int, files: int, edits: int, link: bool
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        old = grow(root, files, rng)
        base, info = bundled(root / "old", write(root / "old", old))
        new = dict(old)
        for _ in range(edits):
            name = rng.choice(sorted(new))
            action = rng.randrange(3)
            if action == 0:
                new[name] = rng.randbytes(rng.randrange(0, 3000))
            elif action == 1 and len(new) > 1:
                del new[name]
            else:
                new[f"d{rng.randrange(4)}/n{rng.randrange(10**6)}.py"] = rng.randbytes(rng.randrange(0, 300))
        links = {"zz_alias": sorted(new)[0]} if link else {}
        expected = bundled(root / "new", write(root / "new", new, links))[0]
        index = learnt(base)
        assert index == SegmentIndex(1, info.segments) or index is None and len(info.segments) < 2
        from_index = indexed(base, expected, SegmentIndex(1, info.segments))
        assert from_index == expected


def test_the_index_learnt_by_reading_a_bundle_is_the_one_its_writer_made(tmp_path: Path) -> None:
    paths = folder(tmp_path)
    os.symlink("team_1/dag_0001.py", tmp_path / "dags/zz_alias.py")
    data, info = bundled(tmp_path, [*paths, "dags/zz_alias.py"])
    index = learnt(data)
    assert index is not None and [(s.key, s.offset, s.size, s.raw, s.first) for s in index.segments] == [
        (s.key, s.offset, s.size, s.raw, s.first) for s in info.segments]
    assert SegmentIndex.decode(index.encode()) == index
    with pytest.raises(SegmentIndexError):
        SegmentIndex.decode(b"not an index")
    with pytest.raises(SegmentIndexError):
        SegmentIndex.decode(gzip.compress(b'{"version": 1, "level": 1, "segments": [["k", 0]]}'))
    assert learnt(bundled(tmp_path, paths)[0]) is not None
    six = io.BytesIO()
    write_bundle(tmp_path, paths, six, compresslevel=6)  # its gzip header cannot say which level it is
    assert learnt(six.getvalue()) is None


def test_a_rebuild_from_the_index_inflates_only_the_base_segments_it_does_not_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = folder(tmp_path, 1500)
    base, info = bundled(tmp_path, paths)
    (tmp_path / paths[10]).write_text("# changed\n")
    new = bundled(tmp_path, paths)[0]
    scans: list[int] = []
    real = rebuild_module.BundleScan

    def counting(fileobj: Any, limits: Limits) -> Any:
        scans.append(len(fileobj.getvalue()))
        return real(fileobj, limits)

    monkeypatch.setattr(rebuild_module, "BundleScan", counting)
    assert indexed(base, new, SegmentIndex(1, info.segments)) == new
    assert len(scans) == 1 and scans[0] < len(base) // 8  # one base segment, not the base


def test_an_index_that_lies_never_gives_the_new_folders_bundle(tmp_path: Path) -> None:
    paths = folder(tmp_path)
    base, info = bundled(tmp_path, paths)
    (tmp_path / paths[10]).write_text("# changed\n")
    new = bundled(tmp_path, paths)[0]
    segs = list(info.segments)
    segs[3], segs[4] = (dataclasses.replace(segs[3], key=segs[4].key, raw=segs[4].raw),
                        dataclasses.replace(segs[4], key=segs[3].key, raw=segs[3].raw))
    assert indexed(base, new, SegmentIndex(1, tuple(segs))) != new  # the caller refuses it by its sha256
    shifted = [dataclasses.replace(s, offset=s.offset + 1) for s in info.segments]
    with pytest.raises(DeltaMismatch):
        indexed(base, new, SegmentIndex(1, tuple(shifted)))
    assert indexed(base, new, SegmentIndex(6, info.segments)) == new  # another level: not used, the base is scanned


def deployed(root: Path) -> tuple[bytes, segment_cache.LastBundle | None]:
    """Bundle root as `dagcast deploy` does (its last bundle, if any, reused), then keep it as the last."""
    from dagcast import bundler

    found = bundler.collect(root)
    last = segment_cache.load(root, bundler.COMPRESSLEVEL)
    scratch, written_at = segment_cache.scratch()
    assert written_at is not None
    with scratch as tmp:
        info = bundler.build(root, tmp, found, None, last)
        tmp.flush()
        tmp.seek(0)
        data = tmp.read()
        report = validate_stream(io.BytesIO(data), check_python=False)
        hashed = {e.path: (e.sha256, found.stats[e.path]) for e in report.manifest}
        segment_cache.save(root, bundler.COMPRESSLEVEL, written_at, info, hashed, found.walked_ns)
    if last is not None:
        last.close()
    return data, last


def test_a_file_the_walk_sees_as_when_it_was_hashed_is_not_read_and_any_write_since_is_seen(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagcast import bundler

    paths = folder(root)
    later = time.time_ns() + 10 * segment_cache.RACY_NS  # as if the walk ran well after the files were written
    real_collect = bundler.collect
    monkeypatch.setattr(bundler, "collect", lambda *a: dataclasses.replace(real_collect(*a), walked_ns=later))
    deployed(root)
    opened: list[str] = []
    real_open = bundle_format.os.open
    monkeypatch.setattr(bundle_format.os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    data, last = deployed(root)
    assert last is not None and last.vouched == len(paths)
    assert [p for p in opened if p.startswith(str(root))] == []  # nothing of the folder read: every segment reused
    assert data == bundled(root, paths)[0]
    # the same size, the same mtime, other bytes: the ctime is another, so the file is read
    target = root / paths[7]
    st = target.stat()
    target.write_bytes(target.read_bytes().replace(b"x = 1", b"x = 2", 1))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    data, last = deployed(root)
    assert last is not None and last.vouched == len(paths) - 1
    assert data == bundled(root, paths)[0]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert b"x = 2" in tar.extractfile(paths[7]).read()  # type: ignore[union-attr]


def test_a_file_written_just_before_the_walk_is_hashed_again_next_time(root: Path) -> None:
    folder(root, 50)
    deployed(root)  # every file was written this instant: within RACY_NS of the walk
    _, last = deployed(root)
    assert last is not None and last.vouched == 0 and last.hits > 0  # segments are reused all the same


def test_a_vouched_file_whose_bytes_are_not_the_ones_hashed_fails_the_bundle_when_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "dags"
    paths = folder(root, 100)
    (root / paths[1]).write_text("# changed\n")  # its segment is written again: paths[0] is read then
    stale = {paths[0]: ("0" * 64, (root / paths[0]).stat().st_size)}
    with pytest.raises(bundle_format.StaleVouch, match=f"{paths[0]}: not the file its recorded sha256 says"):
        write_bundle(root, paths, io.BytesIO(), compresslevel=1, known=stale.get)


def test_a_vouched_python_file_is_read_only_when_the_compile_cache_does_not_know_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chalicelib.bundle import CompileCache
    from chalicelib.bundle.written import WrittenCheck

    tree = {"dags/a.py": b"from airflow import DAG\nwith DAG('a'):\n    pass\n", "dags/b.py": b"X = 1\n", "q.sql": b"select 1;\n"}
    paths = write(tmp_path, tree)
    data, first = bundled(tmp_path, paths)
    cache = CompileCache({}, max_entries=100)
    read = validate_stream(io.BytesIO(data), cache=cache)
    vouched = {e.path: (e.sha256, e.size) for e in read.manifest}
    opened: list[str] = []
    real_open = bundle_format.os.open
    monkeypatch.setattr(bundle_format.os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    for known_cache, reads in ((cache, []), (CompileCache({}, max_entries=100), ["dags/a.py", "dags/b.py"])):
        opened.clear()
        check = WrittenCheck(Limits(), cache=known_cache)
        info = write_bundle(tmp_path, paths, io.BytesIO(), compresslevel=1, check=check, known=vouched.get,
                            reuse=Kept(data, first))  # its segment reused: nothing to read for the bundle
        report = check.report(info)
        check.close()
        assert sorted(os.path.relpath(p, tmp_path) for p in opened) == reads
        assert report.valid and report.manifest == read.manifest  # the same DAG ids, from the cache or compiled


def test_a_large_file_next_to_a_change_is_rebuilt_from_the_index_into_the_bytes_the_cli_streams(tmp_path: Path) -> None:
    names = [n for n in (f"a{i}.py" for i in range(50)) if not segment_ends(n, 0)][:2]  # no cut between them
    tree = {names[0]: b"x = 1\n", names[1] + ".bin": os.urandom(3 * 1024 * 1024), "z.py": b"y = 2\n"}
    base, info = bundled(tmp_path / "old", write(tmp_path / "old", tree))
    new_tree = {**tree, names[0]: b"x = 2\n"}
    new, new_info = bundled(tmp_path / "new", write(tmp_path / "new", new_tree))
    assert "" in [s.key for s in new_info.segments[:-1]]  # the large file's segment is streamed
    assert indexed(base, new, SegmentIndex(1, info.segments)) == new
