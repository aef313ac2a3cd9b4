"""Tests of the deterministic bundle writer."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from chalicelib.bundle import BundleError, BundleInfo, extract_bundle, validate_stream, write_bundle
from chalicelib.exceptions import DagcastError

FILES = {
    "dags/etl.py": b'from airflow import DAG\nwith DAG("etl") as dag:\n    pass\n',
    "dags/sub/report.py": b"from airflow.decorators import dag\n@dag\ndef report():\n    pass\n",
    "sql/query.sql": b"select 1;\n",
    "data/blob.bin": os.urandom(3 * 1024 * 1024 + 5),  # larger than one read chunk
    "empty.txt": b"",
    "unicodé/файл.py": "x = 'ü'\n".encode(),
}


def make_tree(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def build(root: Path, relpaths: list[str] | None = None, **kw: int) -> tuple[bytes, BundleInfo]:
    out = io.BytesIO()
    info = write_bundle(root, relpaths if relpaths is not None else list(FILES), out, **kw)
    return out.getvalue(), info


def test_bundle_info_describes_the_written_bytes(tmp_path: Path) -> None:
    data, info = build(make_tree(tmp_path))
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.size == len(data)
    assert info.files == len(FILES)
    assert info.bytes == sum(len(b) for b in FILES.values())


def test_same_files_give_the_same_bytes_regardless_of_order_and_mtime(tmp_path: Path) -> None:
    first, info1 = build(make_tree(tmp_path / "a"))
    root_b = make_tree(tmp_path / "b")
    for i, rel in enumerate(FILES):
        os.utime(root_b / rel, (1_000_000 + i, 2_000_000 + i * 7))
    os.chmod(root_b / "sql/query.sql", 0o600)
    second, info2 = build(root_b, list(reversed(FILES)))
    assert first == second and info1 == info2


def test_different_content_gives_a_different_hash(tmp_path: Path) -> None:
    _, info1 = build(make_tree(tmp_path / "a"))
    _, info2 = build(make_tree(tmp_path / "b", {**FILES, "sql/query.sql": b"select 2;\n"}))
    assert info1.sha256 != info2.sha256


def test_gzip_header_has_no_timestamp_or_name(tmp_path: Path) -> None:
    data, _ = build(make_tree(tmp_path))
    assert data[:4] == b"\x1f\x8b\x08\x00"  # deflate, no FNAME/FEXTRA/FCOMMENT flags
    assert data[4:8] == b"\x00\x00\x00\x00"  # mtime 0


def test_members_are_sorted_normalised_pax_entries(tmp_path: Path) -> None:
    data, _ = build(make_tree(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == sorted(FILES)
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            assert m.isfile()
            extracted = tf.extractfile(m)
            assert extracted is not None and extracted.read() == FILES[m.name]
    assert len(gzip.decompress(data)) % (20 * 512) == 0  # padded to full records like tar


def test_round_trip_through_the_validator_gives_the_manifest(tmp_path: Path) -> None:
    data, info = build(make_tree(tmp_path))
    report = validate_stream(io.BytesIO(data))
    assert report.valid, report.errors
    assert report.sha256 == info.sha256 and report.compressed_bytes == info.size
    assert (report.files, report.bytes) == (info.files, info.bytes)
    assert {f.path: (f.size, f.sha256) for f in report.manifest} == {
        rel: (len(b), hashlib.sha256(b).hexdigest()) for rel, b in FILES.items()
    }
    assert report.dag_ids == ["etl", "report"]


def test_round_trip_through_the_extractor(tmp_path: Path) -> None:
    data, _ = build(make_tree(tmp_path / "src"))
    extract_bundle(io.BytesIO(data), tmp_path / "out")
    for rel, blob in FILES.items():
        assert (tmp_path / "out" / rel).read_bytes() == blob


def test_compresslevel_changes_size_but_not_content(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a.txt": b"abc" * 100_000})
    fast, info1 = build(root, ["a.txt"], compresslevel=1)
    best, info9 = build(root, ["a.txt"], compresslevel=9)
    assert gzip.decompress(fast) == gzip.decompress(best)
    assert info9.size < info1.size


def test_symlink_inside_the_folder_is_stored_as_a_symlink(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"lib/util.py": b"u = 1\n", "dags/a.py": b"a = 1\n"})
    (root / "dags/util.py").symlink_to("../lib/./util.py")
    (root / "dags/lib").symlink_to("../lib")
    data, info = build(root, ["dags/a.py", "dags/util.py", "lib/util.py", "dags/lib"])
    assert info.files == 2
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        links = {m.name: m.linkname for m in tf.getmembers() if m.issym()}
    assert links == {"dags/util.py": "../lib/util.py", "dags/lib": "../lib"}
    assert validate_stream(io.BytesIO(data)).valid


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("/etc/passwd", "absolute"),
        ("../../outside.py", "outside"),
        ("..", "outside"),
        ("missing.py", "does not exist"),
        ("excluded.py", "not part of the bundle"),
        ("other_link.py", "another symlink"),
    ],
)
def test_unsafe_symlink_raises_bundle_error_naming_the_file(tmp_path: Path, target: str, words: str) -> None:
    root = make_tree(tmp_path / "root", {"dags/a.py": b"", "dags/excluded.py": b""})
    (tmp_path / "outside.py").write_text("")
    (root / "dags/other_link.py").symlink_to("a.py")
    (root / "dags/link.py").symlink_to(target)
    with pytest.raises(BundleError) as info:
        build(root, ["dags/a.py", "dags/link.py", "dags/other_link.py"])
    assert "dags/link.py" in str(info.value) and words in str(info.value)


def test_file_inside_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "elsewhere", {"secret.py": b"s = 1\n"})
    root = make_tree(tmp_path / "root", {"a.py": b""})
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="linked/secret.py"):
        build(root, ["a.py", "linked/secret.py"])


@pytest.mark.parametrize("rel", ["../x.py", "/etc/passwd", "a/../b.py", "./a.py", "a\\b.py", ""])
def test_unclean_relative_paths_are_refused(tmp_path: Path, rel: str) -> None:
    with pytest.raises(BundleError):
        build(make_tree(tmp_path, {"a.py": b""}), [rel])


def test_missing_file_raises_bundle_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="gone.py"):
        build(make_tree(tmp_path, {"a.py": b""}), ["a.py", "gone.py"])


def test_fifo_is_not_bundled_and_does_not_block(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a.py": b""})
    os.mkfifo(root / "pipe")
    with pytest.raises(BundleError, match="pipe: not a regular file"):
        build(root, ["a.py", "pipe"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_raises_bundle_error(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a.py": b"", "secret.py": b"x"})
    os.chmod(root / "secret.py", 0)
    with pytest.raises(BundleError, match="secret.py"):
        build(root, ["a.py", "secret.py"])


def test_bundle_error_is_a_dagcast_error() -> None:
    assert issubclass(BundleError, DagcastError)


def test_long_and_many_paths_round_trip(tmp_path: Path) -> None:
    files = {f"dags/{'deep/' * 30}f{i}.py": f"x = {i}\n".encode() for i in range(300)}
    data, info = build(make_tree(tmp_path, files), list(files))
    report = validate_stream(io.BytesIO(data))
    assert report.valid and report.files == info.files == 300


@pytest.mark.parametrize(
    ("name", "size", "kind", "link"),
    [
        ("a.py", 0, tarfile.REGTYPE, ""),
        ("team_1/dag_99.py", 4_812, tarfile.REGTYPE, ""),
        ("x" * 100, 10**9, tarfile.REGTYPE, ""),
        ("x" * 101, 5, tarfile.REGTYPE, ""),
        ("dags/ünïcode.py", 7, tarfile.REGTYPE, ""),
        ("link.py", 0, tarfile.SYMTYPE, "lib/real.py"),
        ("big.bin", 0o77777777777 + 1, tarfile.REGTYPE, ""),
    ],
)
def test_fast_headers_are_byte_identical_to_tarfile_pax_headers(name: str, size: int, kind: bytes, link: str) -> None:
    from chalicelib.bundle.format import _header

    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    info.mode = 0o777 if kind == tarfile.SYMTYPE else 0o644
    assert _header(name, size, kind, link) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
