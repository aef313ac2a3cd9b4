"""Tests of the streaming bundle validator and the safe extractor."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chalicelib.bundle import (
    BundleRejected,
    FileEntry,
    Issue,
    Limits,
    Report,
    extract_bundle,
    validate_file,
    validate_stream,
)
from chalicelib.exceptions import DagcastError

# --------------------------------------------------------------------------- helpers


@dataclass
class M:
    """A tar member to build: name, data and header fields."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)
    size: int | None = None  # header size override (no data written)


def F(name: str, data: bytes | str = b"x = 1\n", mode: int = 0o644) -> M:
    return M(name, data.encode() if isinstance(data, str) else data, mode=mode)


def D(name: str, mode: int = 0o755) -> M:
    return M(name, type=tarfile.DIRTYPE, mode=mode)


def L(name: str, target: str) -> M:
    return M(name, type=tarfile.SYMTYPE, mode=0o777, linkname=target)


def tar_bytes(members: list[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.mode = m.mode
            info.linkname = m.linkname
            info.pax_headers = dict(m.pax)
            if m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
            if m.size is not None:
                info.size = m.size
                tf.fileobj.write(info.tobuf(fmt, "utf-8", "surrogateescape"))  # type: ignore[union-attr]
                tf.offset += tarfile.BLOCKSIZE
                continue
            if m.type in tarfile.REGULAR_TYPES:
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def tgz(members: list[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return gzip.compress(tar_bytes(members, fmt), mtime=0)


def check(data: bytes, limits: Limits | None = None, **kw: Any) -> Report:
    return validate_stream(io.BytesIO(data), limits, **kw)


def codes(report: Report) -> list[str]:
    return [e.code for e in report.errors]


def assert_rejected(report: Report, code: str, path: str | None = None) -> Issue:
    assert not report.valid
    assert code in codes(report), report.errors
    issue = next(e for e in report.errors if e.code == code)
    if path is not None:
        assert issue.path == path
        assert path in issue.message
    assert report.manifest == []
    return issue


def header_block(
    name: bytes, *, kind: bytes = b"0", size: int = 0, mode: int = 0o644, link: bytes = b""
) -> bytes:
    """A hand-made ustar header (for names tarfile will not write)."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157 : 157 + len(link)] = link
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def raw_tgz(*parts: bytes) -> bytes:
    return gzip.compress(b"".join(parts) + b"\x00" * 1024, mtime=0)


def padded(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 512)


GOOD = [F("dags/a.py", "x = 1\n"), F("data/b.csv", "a,b\n1,2\n")]


# --------------------------------------------------------------------------- container


def test_well_formed_bundle_is_valid_with_counts_and_hash() -> None:
    data = tgz(GOOD)
    report = check(data)
    assert report.valid, report.errors
    assert (report.files, report.bytes) == (2, len(b"x = 1\n") + len(b"a,b\n1,2\n"))
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.compressed_bytes == len(data)
    assert report.errors == [] and report.errors_truncated == 0


def test_empty_input_is_corrupt_archive() -> None:
    assert_rejected(check(b""), "corrupt_archive")


@pytest.mark.parametrize("keep", [1, 10, 30, -30, -8, -1])
def test_truncated_gzip_is_corrupt_archive(keep: int) -> None:
    data = tgz([F("a.py", f"x = '{os.urandom(3000).hex()}'\n")])
    report = check(data[:keep])
    assert codes(report) == ["corrupt_archive"]
    assert report.compressed_bytes == len(data[:keep])


def test_corrupt_deflate_data_is_corrupt_archive() -> None:
    data = bytearray(tgz([F("a.py", "x = 1\n" * 2000)]))
    for i in range(20, 60):
        data[i] ^= 0x5A
    assert codes(check(bytes(data))) == ["corrupt_archive"]


def test_gzip_crc_mismatch_is_corrupt_archive() -> None:
    data = bytearray(tgz(GOOD))
    data[-8] ^= 0xFF
    issue = assert_rejected(check(bytes(data)), "corrupt_archive")
    assert "gzip" in issue.message


def test_zip_file_is_unsupported_format() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.py", "x = 1\n")
    issue = assert_rejected(check(buf.getvalue()), "unsupported_format")
    assert "zip" in issue.message


def test_plain_tar_is_unsupported_format() -> None:
    issue = assert_rejected(check(tar_bytes(GOOD)), "unsupported_format")
    assert "uncompressed tar" in issue.message


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress], ids=["bzip2", "xz"])
def test_other_compressions_are_unsupported_format(compress: Any) -> None:
    assert codes(check(compress(tar_bytes(GOOD)))) == ["unsupported_format"]


def test_random_bytes_are_rejected_without_exception() -> None:
    for seed in range(20):
        data = hashlib.sha512(str(seed).encode()).digest() * (seed + 1)
        report = check(data)
        assert codes(report) in (["unsupported_format"], ["corrupt_archive"])


def test_gzip_of_random_bytes_is_corrupt_archive() -> None:
    assert codes(check(gzip.compress(os.urandom(5000)))) == ["corrupt_archive"]


def test_gzip_of_empty_payload_is_corrupt_archive() -> None:
    assert codes(check(gzip.compress(b""))) == ["corrupt_archive"]


def test_tar_without_members_is_empty_bundle() -> None:
    assert codes(check(tgz([]))) == ["empty_bundle"]


def test_bundle_with_only_directories_is_empty_bundle() -> None:
    assert codes(check(tgz([D("dags"), D("dags/sub")]))) == ["empty_bundle"]


def test_garbage_after_gzip_stream_is_corrupt_archive() -> None:
    assert codes(check(tgz(GOOD) + b"garbage")) == ["corrupt_archive"]


def test_zero_padding_after_gzip_stream_is_accepted() -> None:
    assert check(tgz(GOOD) + b"\x00" * 4096).valid


def test_concatenated_gzip_members_are_read_as_one_stream() -> None:
    raw = tar_bytes(GOOD)
    data = gzip.compress(raw[:700], mtime=0) + gzip.compress(raw[700:], mtime=0)
    report = check(data)
    assert report.valid, report.errors
    assert [f.path for f in report.manifest] == ["dags/a.py", "data/b.csv"]


def test_bad_header_checksum_is_corrupt_archive() -> None:
    raw = bytearray(tar_bytes(GOOD))
    raw[0] ^= 0x01
    assert codes(check(gzip.compress(bytes(raw)))) == ["corrupt_archive"]


def test_tar_truncated_inside_member_data_is_corrupt_archive() -> None:
    raw = tar_bytes([F("a.bin", os.urandom(5000))])
    assert codes(check(gzip.compress(raw[:2048]))) == ["corrupt_archive"]


def test_hash_covers_the_whole_input_even_for_corrupt_data() -> None:
    data = b"\x1f\x8b" + os.urandom(200_000)
    report = check(data)
    assert codes(report) == ["corrupt_archive"]
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.compressed_bytes == len(data)


# --------------------------------------------------------------------------- path rules


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("/etc/passwd", "absolute_path"),
        ("/abs.py", "absolute_path"),
        ("../evil.py", "path_traversal"),
        ("..", "path_traversal"),
        ("dags/../../evil.py", "path_traversal"),
        ("a/../b.py", "path_traversal"),
        ("dags/..", "path_traversal"),
        ("dags\\evil.py", "backslash_in_path"),
        ("..\\..\\evil.py", "backslash_in_path"),
        ("", "invalid_name"),
        (".", "invalid_name"),
    ],
)
def test_unsafe_member_path_is_rejected(name: str, code: str) -> None:
    report = check(tgz([*GOOD, F(name)]))
    issue = assert_rejected(report, code)
    assert issue.path == name
    assert len(report.errors) == 1


@pytest.mark.parametrize(
    ("override", "code"),
    [("../x.py", "path_traversal"), ("/etc/x", "absolute_path"), ("a/../../x", "path_traversal")],
)
def test_pax_path_override_is_checked_after_pax_processing(override: str, code: str) -> None:
    member = M("innocent.py", b"x = 1\n", pax={"path": override})
    raw = tar_bytes([*GOOD, member])
    assert b"innocent.py" in raw  # the ustar name is harmless; only PAX makes it hostile
    assert_rejected(check(gzip.compress(raw)), code, override)


def test_gnu_longname_is_checked() -> None:
    name = "../" + "x" * 150 + ".py"
    assert_rejected(check(tgz([*GOOD, F(name)], fmt=tarfile.GNU_FORMAT)), "path_traversal", name)


def test_ustar_prefix_field_is_part_of_the_path() -> None:
    name = "../" + "d" * 120 + "/file.py"
    raw = tar_bytes([F(name)], fmt=tarfile.USTAR_FORMAT)
    assert raw[345:348] == b"../"  # stored in the prefix field
    assert_rejected(check(gzip.compress(raw)), "path_traversal", name)


def test_nul_byte_in_pax_path_is_invalid_name() -> None:
    report = check(tgz([*GOOD, M("ok.py", b"x = 1\n", pax={"path": "evil\x00.py"})]))
    issue = assert_rejected(report, "invalid_name")
    assert issue.path == "evil\\x00.py"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax-binary"])
def test_non_utf8_name_is_invalid_name_with_printable_path(fmt: int) -> None:
    name = b"dags/caf\xe9.py".decode("utf-8", "surrogateescape")
    issue = assert_rejected(check(tgz([*GOOD, F(name)], fmt=fmt)), "invalid_name")
    assert issue.path == "dags/caf\\xe9.py"
    assert "UTF-8" in issue.message
    json.dumps(issue.model_dump())  # the report stays serialisable


def test_regular_file_name_with_trailing_slash_is_invalid_name() -> None:
    raw = header_block(b"dags/a.py/", kind=b"0", size=6) + padded(b"x = 1\n")
    assert_rejected(check(raw_tgz(header_block(b"ok.py", size=0), raw)), "invalid_name")


def test_old_style_directory_entry_with_trailing_slash_is_a_directory() -> None:
    report = check(raw_tgz(header_block(b"dags/", kind=b"\x00"), header_block(b"dags/a.py", size=0)))
    assert report.valid, report.errors
    assert [f.path for f in report.manifest] == ["dags/a.py"]


# --------------------------------------------------------------------------- member types and modes


@pytest.mark.parametrize(
    ("member", "code"),
    [
        (M("dev", type=tarfile.CHRTYPE), "special_file"),
        (M("blk", type=tarfile.BLKTYPE), "special_file"),
        (M("fifo", type=tarfile.FIFOTYPE), "special_file"),
        (M("cont", b"x", type=tarfile.CONTTYPE), "special_file"),
        (M("hard.py", type=tarfile.LNKTYPE, linkname="dags/a.py"), "hard_link"),
        (M("hard2.py", type=tarfile.LNKTYPE, linkname="/etc/passwd"), "hard_link"),
    ],
    ids=["chr", "blk", "fifo", "contiguous", "hardlink", "hardlink-abs"],
)
def test_special_members_are_rejected(member: M, code: str) -> None:
    assert_rejected(check(tgz([*GOOD, member])), code, member.name)


def test_unknown_member_type_is_rejected_and_its_data_skipped() -> None:
    raw = header_block(b"weird", kind=b"Z", size=600) + padded(b"q" * 600)
    report = check(raw_tgz(header_block(b"a.py", size=0), raw, header_block(b"b.py", size=0)))
    assert codes(report) == ["special_file"]
    assert report.files == 2  # parsing resumed after the skipped data


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o1755, 0o6644])
@pytest.mark.parametrize("make", [F, D], ids=["file", "dir"])
def test_setuid_setgid_sticky_bits_are_unsafe_mode(mode: int, make: Any) -> None:
    issue = assert_rejected(check(tgz([*GOOD, make("x", mode=mode)])), "unsafe_mode", "x")
    assert f"{mode:o}" in issue.message


def test_executable_bit_is_allowed() -> None:
    assert check(tgz([F("run.sh", "echo hi\n", mode=0o755)])).valid


# --------------------------------------------------------------------------- symlinks


def test_relative_symlink_inside_bundle_is_accepted() -> None:
    report = check(tgz([F("common/util.py"), D("dags"), L("dags/util.py", "../common/util.py")]))
    assert report.valid, report.errors
    assert [f.path for f in report.manifest] == ["common/util.py"]  # symlinks are not files


def test_symlink_to_directory_inside_bundle_is_accepted() -> None:
    assert check(
        tgz([F("shared/sql/q.sql", "select 1"), L("dags/sql", "../shared/sql"), F("dags/a.py")])
    ).valid


def test_symlink_stored_before_its_target_is_accepted() -> None:
    assert check(tgz([L("link.py", "real.py"), F("real.py")])).valid


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([L("abs", "/etc/passwd")], "relative"),
        ([L("dags/up", "../../etc/passwd")], "outside"),
        ([L("up", "..")], "outside"),
        ([L("dags/root", "..")], "root"),
        ([L("dags/loop", ".")], "loop"),
        ([L("self", "self")], "loop"),
        ([L("dangling", "missing.py")], "does not exist"),
        ([L("empty", "")], "empty"),
        ([L("bs", "a\\b")], "backslash"),
        ([F("t.py"), L("l1", "t.py"), L("l2", "l1")], "points to another symlink"),
        ([F("d/t.py"), L("ld", "d"), L("l2", "ld/t.py")], "goes through another symlink"),
        (
            [M("pl", type=tarfile.SYMTYPE, linkname="ok.py", pax={"linkpath": "/etc/shadow"}), F("ok.py")],
            "relative",
        ),
        (
            [M("pl2", type=tarfile.SYMTYPE, linkname="ok.py", pax={"linkpath": "../../x"}), F("ok.py")],
            "outside",
        ),
    ],
    ids=[
        "absolute",
        "escape-dotdot",
        "escape-parent",
        "bundle-root",
        "own-dir",
        "self",
        "dangling",
        "empty-target",
        "backslash",
        "to-symlink",
        "through-symlink",
        "pax-linkpath-absolute",
        "pax-linkpath-escape",
    ],
)
def test_unsafe_symlink_is_rejected(members: list[M], why: str) -> None:
    issue = assert_rejected(check(tgz([*GOOD, *members])), "unsafe_symlink")
    assert why in issue.message


@pytest.mark.parametrize("link_first", [True, False], ids=["link-first", "file-first"])
def test_member_under_a_symlinked_directory_is_rejected(link_first: bool) -> None:
    link, inner = L("dags/lib", "../shared"), F("dags/lib/evil.py")
    members = [F("shared/x.py"), link, inner] if link_first else [F("shared/x.py"), inner, link]
    issue = assert_rejected(check(tgz(members)), "unsafe_symlink")
    assert "dags/lib" in issue.message


# --------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize(
    "members",
    [
        [F("a.py"), F("a.py")],
        [F("a"), D("a")],
        [D("a"), F("a")],
        [F("a/b.py"), F("a/./b.py")],
        [F("a/b.py"), F("./a//b.py")],
        [F("a"), F("a/b.py")],
        [F("a/b.py"), F("a")],
        [D("a"), D("a/")],
        [F("a.py"), L("a.py", "b.py"), F("b.py")],
    ],
    ids=[
        "file-file",
        "file-dir",
        "dir-file",
        "dot-segment",
        "dot-prefix",
        "file-as-parent",
        "parent-as-file",
        "dir-dir",
        "file-symlink",
    ],
)
def test_duplicate_paths_are_rejected(members: list[M]) -> None:
    assert "duplicate_path" in codes(check(tgz(members)))


def test_root_dot_directory_entry_is_accepted() -> None:
    report = check(tgz([D("."), D("./dags"), F("./dags/a.py")]))
    assert report.valid, report.errors
    assert [f.path for f in report.manifest] == ["dags/a.py"]


def test_symlink_over_existing_directory_is_rejected() -> None:
    assert "unsafe_symlink" in codes(check(tgz([F("d/a.py"), F("t.py"), L("d", "t.py")])))


# --------------------------------------------------------------------------- legitimate edge cases


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_all_tar_formats_are_accepted(fmt: int) -> None:
    long_name = "dags/" + "nested_directory/" * 8 + "x" * 90 + ".py"  # needs the ustar prefix / GNU / PAX
    members = [D("dags"), F(long_name), F("dags/a.py"), L("dags/b.py", "a.py")]
    report = check(tgz(members, fmt=fmt))
    assert report.valid, report.errors
    assert report.files == 2


def test_unicode_file_names_are_accepted() -> None:
    names = ["dags/données.py", "dags/日本語/ジョブ.py", "sql/émoji_🚀.sql"]
    report = check(tgz([F(n) for n in names]))
    assert report.valid, report.errors
    assert sorted(f.path for f in report.manifest) == sorted(names)


def test_thousands_of_small_files_are_accepted() -> None:
    members = [F(f"dags/team{i % 10}/dag_{i}.py", f"x = {i}\n") for i in range(3000)]
    report = check(tgz(members))
    assert report.valid, report.errors
    assert report.files == 3000 and len(report.manifest) == 3000


def test_directory_members_are_accepted_and_not_in_manifest() -> None:
    report = check(tgz([D("dags"), D("dags/empty"), F("dags/a.py")]))
    assert report.valid and [f.path for f in report.manifest] == ["dags/a.py"]


def test_global_pax_header_is_applied_to_following_members() -> None:
    glob = tarfile.TarInfo.create_pax_global_header({"path": "../../escape"})
    raw = glob + tar_bytes([F("ok.py")])
    assert "path_traversal" in codes(check(gzip.compress(raw)))


# --------------------------------------------------------------------------- python


@pytest.mark.parametrize(
    ("source", "code", "line", "words"),
    [
        (b"def f(:\n    pass\n", "syntax_error", 1, "SyntaxError"),
        (b"x = 1\n  y = 2\n", "syntax_error", 2, "IndentationError"),
        (b"def f():\nreturn 1\n", "syntax_error", 2, "IndentationError"),
        (b"x = 1\nreturn x\n", "syntax_error", 2, "'return' outside function"),
        (b"def f():\n    nonlocal q\n", "syntax_error", 2, "nonlocal"),
        (b"x = 1\x00\n", "syntax_error", None, "null bytes"),
        (b"# coding: no-such-codec\nx = 1\n", "syntax_error", None, "unknown encoding"),
        (b"x = '\xff'\n", "syntax_error", 1, "utf-8"),
        (b"\xef\xbb\xbf# coding: latin-1\nx = 1\n", "syntax_error", None, "BOM"),
    ],
    ids=[
        "syntax",
        "indent",
        "indent-block",
        "return-outside",
        "nonlocal",
        "nul",
        "codec",
        "bad-utf8",
        "bom-latin1",
    ],
)
def test_python_compile_errors_are_reported(source: bytes, code: str, line: int | None, words: str) -> None:
    issue = assert_rejected(check(tgz([*GOOD, F("dags/bad.py", source)])), code, "dags/bad.py")
    assert issue.line == line
    assert words in issue.message


def test_python_checks_can_be_disabled() -> None:
    assert check(tgz([F("bad.py", "def (")]), check_python=False).valid


def test_only_py_files_are_compiled() -> None:
    assert check(tgz([F("a.py"), F("notes.txt", "def ("), F("x.pyc", b"\x00\xff")])).valid


@pytest.mark.parametrize(
    ("source", "code"),
    [
        (b"x = " + b"(" * 100_000 + b"1" + b")" * 100_000, "syntax_error"),
        (b"x = " + b"-" * 100_000 + b"1", "python_too_complex"),
        (b"x = " + b"+".join([b"1"] * 100_000), "python_error"),
        (b"x = a" + b".b" * 100_000, "python_error"),
        (b"x = f" + b"()" * 100_000, "python_error"),
        (b"x = " + b"not " * 100_000 + b"1", "python_too_complex"),
    ],
    ids=["parens", "unary-minus", "plus-chain", "attr-chain", "call-chain", "not-chain"],
)
def test_deeply_nested_code_is_an_error_and_interpreter_stays_healthy(source: bytes, code: str) -> None:
    limit = sys.getrecursionlimit()
    report = check(tgz([F("deep.py", source)]))
    assert_rejected(report, code, "deep.py")
    assert sys.getrecursionlimit() == limit
    nested: Any = []
    for _ in range(limit // 2):
        nested = [nested]
    assert json.loads(json.dumps(nested)) == nested  # recursion still works normally
    assert check(tgz([F("dags/ok.py", "def f():\n    return 1\n")])).valid


def test_latin1_coding_declaration_is_accepted() -> None:
    assert check(tgz([F("a.py", b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")])).valid


def test_utf8_bom_is_accepted() -> None:
    assert check(tgz([F("a.py", b"\xef\xbb\xbfname = 'caf\xc3\xa9'\n")])).valid


def test_syntax_warnings_do_not_fail_validation(recwarn: pytest.WarningsRecorder) -> None:
    assert check(tgz([F("a.py", "import re\nx = re.compile('\\d')\ny = 1 is 1\n")])).valid
    assert len(recwarn) == 0


# --------------------------------------------------------------------------- manifest and DAG ids


def test_manifest_lists_size_and_sha256_of_each_file() -> None:
    blobs = {"dags/a.py": b"x = 1\n", "data/big.bin": os.urandom(3 * 1024 * 1024 + 17), "e.txt": b""}
    report = check(tgz([F(p, b) for p, b in blobs.items()]))
    assert report.valid
    assert {f.path: (f.size, f.sha256) for f in report.manifest} == {
        p: (len(b), hashlib.sha256(b).hexdigest()) for p, b in blobs.items()
    }


DAG_SOURCES = {
    "positional": ('from airflow import DAG\nDAG("pos_id", schedule=None)\n', ["pos_id"]),
    "keyword": ('from airflow import DAG\nd = DAG(dag_id="kw_id")\n', ["kw_id"]),
    "with": ('from airflow import DAG\nwith DAG("with_id") as dag:\n    pass\n', ["with_id"]),
    "models": (
        'from airflow import models\nwith models.DAG(\n    "models_id",\n) as d:\n    pass\n',
        ["models_id"],
    ),
    "airflow-attr": ('import airflow\nairflow.DAG(dag_id="attr_id")\n', ["attr_id"]),
    "decorator": (
        "from airflow.decorators import dag\n@dag\ndef bare_dec():\n    pass\nbare_dec()\n",
        ["bare_dec"],
    ),
    "decorator-call": (
        "from airflow.decorators import dag\n@dag()\ndef called_dec():\n    pass\n",
        ["called_dec"],
    ),
    "decorator-id": (
        'from airflow.decorators import dag\n@dag(dag_id="given")\ndef f():\n    pass\n',
        ["given"],
    ),
    "decorator-module": (
        "import airflow\n\n@airflow.decorators.dag(schedule=None)\ndef mod_dec():\n    pass\n",
        ["mod_dec"],
    ),
    "in-function": ('from airflow import DAG\ndef make():\n    return DAG("inner")\n', ["inner"]),
    "several": ('from airflow import DAG\nfor x in []:\n    pass\nDAG("b")\nDAG("a")\n', ["a", "b"]),
    "dynamic": ('from airflow import DAG\nfor i in range(3):\n    DAG(f"d{i}")\nDAG(dag_id=name)\n', []),
    "dynamic-decorator": ("from airflow.decorators import dag\n@dag(dag_id=NAME)\ndef f():\n    pass\n", []),
    "not-a-dag": ('def DAGGER(x):\n    pass\nDAGGER("no")\nprint("DAG")\n', []),
    "latin1": ('# coding: latin-1\nfrom airflow import DAG\nDAG("caf\xe9")\n', ["caf\xe9"]),
    "unicode-name": ('from airflow import DAG\nＤＡＧ("fullwidth")\n', ["fullwidth"]),
}


@pytest.mark.parametrize("case", list(DAG_SOURCES))
def test_dag_ids_are_found_statically(case: str) -> None:
    source, expected = DAG_SOURCES[case]
    data = source.encode("latin-1" if "coding: latin-1" in source else "utf-8")
    report = check(tgz([F("dags/d.py", data)]))
    assert report.valid, report.errors
    assert report.manifest[0].dag_ids == expected


def test_report_dag_ids_are_sorted_across_files() -> None:
    report = check(
        tgz([F("b.py", 'DAG("zeta")\nDAG("alpha")\n'), F("a.py", 'DAG("mid")\n'), F("c.txt", 'DAG("no")')])
    )
    assert report.dag_ids == ["alpha", "mid", "zeta"]


def test_summary_is_the_public_json_contract() -> None:
    report = check(tgz([F("bad.py", "def (")]))
    summary = report.summary()
    assert set(summary) == {"valid", "files", "bytes", "errors"}
    assert summary["valid"] is False and summary["files"] == 1
    assert summary["errors"] == [
        {"code": "syntax_error", "path": "bad.py", "line": 1, "message": summary["errors"][0]["message"]}
    ]
    json.dumps(summary)


def test_first_hundred_errors_are_kept_and_the_rest_counted() -> None:
    report = check(tgz([F(f"/abs{i}.py") for i in range(150)]))
    assert len(report.errors) == 100 and report.errors_truncated == 50
    assert report.errors[0].path == "/abs0.py"


def test_file_entry_defaults_to_no_dag_ids() -> None:
    assert FileEntry(path="a", size=1, sha256="0" * 64).dag_ids == []


def test_validate_file_reads_a_bundle_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    path.write_bytes(tgz(GOOD))
    assert validate_file(path).valid
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path / "missing.tar.gz")


# --------------------------------------------------------------------------- limits


def test_bundle_too_large_stops_reading_at_the_limit() -> None:
    data = tgz([F("big.bin", os.urandom(4 * 1024 * 1024))])
    report = check(data, Limits(max_bundle_bytes=1024 * 1024))
    assert codes(report) == ["bundle_too_large"]
    assert report.compressed_bytes <= 2 * 1024 * 1024 < len(data)


def test_total_too_large_stops_before_reading_data() -> None:
    members = [F(f"f{i}.bin", os.urandom(1024 * 1024)) for i in range(6)]
    data = tgz(members)
    report = check(data, Limits(max_total_bytes=2 * 1024 * 1024 + 1))
    assert codes(report) == ["total_too_large"]
    assert report.errors[0].path == "f2.bin"
    assert report.compressed_bytes < len(data) // 2


def test_too_many_members_stops_reading() -> None:
    report = check(tgz([F(f"f{i}.py") for i in range(50)]), Limits(max_members=10))
    assert codes(report) == ["too_many_members"]
    assert report.files == 10


def test_implied_directories_count_towards_the_member_limit() -> None:
    deep = "/".join(f"d{i}" for i in range(30))
    report = check(tgz([F(f"{deep}/a.py"), F("b.py")]), Limits(max_members=20))
    assert codes(report) == ["too_many_members"]


def test_member_too_large_is_decided_from_the_header() -> None:
    raw = header_block(b"huge.bin", size=50 * 1024 * 1024) + b"\x00" * 512  # data is not even there
    report = check(gzip.compress(raw), Limits(max_member_bytes=1024))
    assert codes(report) == ["member_too_large"]
    assert "huge.bin" in report.errors[0].message


def test_python_file_too_large_is_reported_per_file() -> None:
    report = check(
        tgz([F("big.py", "x = 1\n" * 100), F("small.py"), F("big.sql", "s" * 1000)]), Limits(max_py_bytes=100)
    )
    assert codes(report) == ["python_file_too_large"]
    assert report.errors[0].path == "big.py"


def test_path_too_long_is_rejected() -> None:
    name = "dags/" + "a" * 60 + ".py"
    assert_rejected(check(tgz([F(name), F("ok.py")]), Limits(max_path_bytes=40)), "path_too_long", name)


def test_limits_reject_non_positive_values() -> None:
    with pytest.raises(ValueError):
        Limits(max_members=0)


def test_oversized_pax_header_is_rejected_without_reading_it() -> None:
    header = header_block(b"././@PaxHeader", kind=b"x", size=512 * 1024 * 1024)
    report = check(gzip.compress(header + b"\x00" * 4096))
    assert codes(report) == ["corrupt_archive"]


class CountingDecompressor:
    """Wraps a zlib decompressor and counts every byte it produces."""

    produced = 0

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        out: bytes = self._inner.decompress(data, max_length)
        CountingDecompressor.produced += len(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture(scope="session")
def gzip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle holding one member of 1 GiB of zeros (about 4.5 MB compressed)."""
    size = 1024 * 1024 * 1024
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.gz"
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1024 * 1024)
    with open(path, "wb") as out:
        out.write(comp.compress(header_block(b"dags/zeros.py", size=size)))
        for _ in range(size // len(zeros)):
            out.write(comp.compress(zeros))
        out.write(comp.compress(b"\x00" * 1024))
        out.write(comp.flush())
    return path


def counted_validate(monkeypatch: pytest.MonkeyPatch, path: Path, limits: Limits | None) -> Report:
    real = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *a: CountingDecompressor(real(*a)))
    CountingDecompressor.produced = 0
    with open(path, "rb") as fh:
        return validate_stream(fh, limits)


def test_gzip_bomb_is_stopped_by_the_member_limit_before_inflating(
    gzip_bomb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = counted_validate(monkeypatch, gzip_bomb, None)
    assert codes(report) == ["member_too_large"]
    assert CountingDecompressor.produced <= 2 * 1024 * 1024  # one inflate step, not 1 GiB
    assert report.compressed_bytes < gzip_bomb.stat().st_size


def test_gzip_bomb_is_stopped_by_the_total_limit_before_inflating(
    gzip_bomb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a per-file limit above what deployments may set, so that only the total limit can stop it
    limits = Limits.model_construct(**{**Limits().model_dump(), "max_member_bytes": 2 * 1024**3, "max_total_bytes": 64 * 1024**2})
    report = counted_validate(monkeypatch, gzip_bomb, limits)
    assert codes(report) == ["total_too_large"]
    assert CountingDecompressor.produced <= 2 * 1024 * 1024


def test_many_member_bomb_stops_at_the_member_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "many.tar.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as out:
        for i in range(20_000):
            out.write(comp.compress(header_block(b"f%d" % i, size=0)))
        out.write(comp.flush())
    report = counted_validate(monkeypatch, path, Limits(max_members=1000))
    assert "too_many_members" in codes(report)
    assert CountingDecompressor.produced <= 1001 * 512 + 2 * 1024 * 1024


# --------------------------------------------------------------------------- extraction


def snapshot(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def test_extract_writes_exactly_the_bundle_files(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    members = [
        D("dags"),
        F("dags/a.py", "x = 1\n"),
        F("run.sh", "echo\n", mode=0o750),
        F("d/e/f.csv", "1,2\n"),
        D("empty"),
    ]
    report = extract_bundle(io.BytesIO(tgz(members)), dest)
    assert report.valid and report.files == 3
    assert snapshot(dest) == {"dags", "dags/a.py", "run.sh", "d", "d/e", "d/e/f.csv", "empty"}
    assert (dest / "dags/a.py").read_bytes() == b"x = 1\n"
    assert stat.S_IMODE((dest / "dags/a.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "d/e").stat().st_mode) == 0o755
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert [f.path for f in report.manifest] == ["dags/a.py", "run.sh", "d/e/f.csv"]


def test_extract_creates_permitted_symlinks(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    members = [
        L("dags/util.py", "../lib/./util.py"),
        F("lib/util.py", "u = 1\n"),
        L("dags/sql", "../shared/sql"),
        F("shared/sql/q.sql", "select 1"),
        L("top.py", "lib/util.py"),
    ]
    extract_bundle(io.BytesIO(tgz(members)), dest)
    assert os.readlink(dest / "dags/util.py") == "../lib/util.py"
    assert os.readlink(dest / "top.py") == "lib/util.py"
    assert (dest / "dags/util.py").read_bytes() == b"u = 1\n"
    assert (dest / "dags/sql/q.sql").read_bytes() == b"select 1"


def test_extract_refuses_an_existing_destination(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        extract_bundle(io.BytesIO(tgz(GOOD)), tmp_path)


HOSTILE = {
    "absolute": [F("/tmp/evil.py")],
    "traversal": [F("../evil.py")],
    "deep-traversal": [F("dags/../../evil.py")],
    "pax-path": [M("ok.py", b"x", pax={"path": "../evil.py"})],
    "pax-abs": [M("ok.py", b"x", pax={"path": "/tmp/evil.py"})],
    "abs-symlink": [L("link", "/tmp")],
    "escaping-symlink": [L("link", "../")],
    "file-via-symlink": [L("link", "../outside"), F("link/evil.py")],
    "file-via-symlink-later": [F("a/real.py"), L("link", "a"), F("link/evil.py")],
    "pax-linkpath": [M("l", type=tarfile.SYMTYPE, linkname="dags/a.py", pax={"linkpath": "../../evil"})],
    "hard-link": [M("h", type=tarfile.LNKTYPE, linkname="/etc/passwd")],
    "device": [M("dev", type=tarfile.CHRTYPE)],
    "fifo": [M("fifo", type=tarfile.FIFOTYPE)],
    "setuid": [F("suid", mode=0o4755)],
    "duplicate": [F("dags/a.py", "second")],
    "syntax-ok-but-dangling-link": [L("dangling", "nothing")],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_extract_rejects_hostile_archive_and_leaves_nothing_behind(tmp_path: Path, case: str) -> None:
    box = tmp_path / "box"
    box.mkdir()
    (box / "keep.txt").write_text("unchanged")
    dest = box / "tmp-extract"
    with pytest.raises(BundleRejected) as info:
        extract_bundle(io.BytesIO(tgz([*GOOD, *HOSTILE[case]])), dest)
    assert not info.value.report.valid and info.value.report.errors
    assert snapshot(tmp_path) == {"box", "box/keep.txt"}
    assert (box / "keep.txt").read_text() == "unchanged"
    assert not Path("/tmp/evil.py").exists()


def test_extract_removes_partial_output_when_the_archive_is_truncated(tmp_path: Path) -> None:
    data = tgz([F(f"f{i}.bin", os.urandom(300_000)) for i in range(5)])
    dest = tmp_path / "out"
    with pytest.raises(BundleRejected) as info:
        extract_bundle(io.BytesIO(data[: len(data) * 3 // 4]), dest)
    assert codes(info.value.report) == ["corrupt_archive"]
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_extract_applies_limits(tmp_path: Path) -> None:
    with pytest.raises(BundleRejected) as info:
        extract_bundle(
            io.BytesIO(tgz([F("a.bin", b"x" * 5000)])), tmp_path / "o", Limits(max_member_bytes=100)
        )
    assert codes(info.value.report) == ["member_too_large"]
    assert not (tmp_path / "o").exists()


def test_extract_can_check_python(tmp_path: Path) -> None:
    data = tgz([F("bad.py", "def (")])
    assert extract_bundle(io.BytesIO(data), tmp_path / "a").valid
    with pytest.raises(BundleRejected) as info:
        extract_bundle(io.BytesIO(data), tmp_path / "b", check_python=True)
    assert codes(info.value.report) == ["syntax_error"]
    assert not (tmp_path / "b").exists()


def test_bundle_rejected_is_a_dagcast_error_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DagcastError) as info:
        extract_bundle(io.BytesIO(tgz([F("../x.py"), F("/y.py")])), tmp_path / "o")
    assert isinstance(info.value, BundleRejected)
    assert "../x.py" in str(info.value) and "1 more" in str(info.value)


def test_extract_stops_at_the_first_problem(tmp_path: Path) -> None:
    reads: list[int] = []

    class Tracking(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            out = super().read(n)
            reads.append(len(out))
            return out

    data = tgz([F("../x.py"), *[F(f"f{i}.bin", os.urandom(400_000)) for i in range(10)]])
    with pytest.raises(BundleRejected):
        extract_bundle(Tracking(data), tmp_path / "o")
    assert sum(reads) < len(data)


def test_extract_output_matches_the_manifest(tmp_path: Path) -> None:
    members = [F(f"dags/{i}.py", f"x = {i}\n") for i in range(50)]
    report = extract_bundle(io.BytesIO(tgz(members)), tmp_path / "o")
    for entry in report.manifest:
        assert hashlib.sha256((tmp_path / "o" / entry.path).read_bytes()).hexdigest() == entry.sha256
