"""Property tests: any input gives a Report, and extraction never writes outside dest."""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chalicelib.bundle import BundleRejected, Limits, Report, extract_bundle, validate_stream

SEGMENTS = [
    "a",
    "b",
    "dags",
    "x.py",
    "..",
    ".",
    "",
    "é",
    "\udcff",
    "\x00",
    "\\",
    "..\\..",
    "~",
    " ",
    "a" * 120,
]
KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
    "odd": b"Z",
}
PYTHON = [b"x = 1\n", b"def f(:\n", b"return 1\n", b'DAG("d")\n', b"\xff\xfe", b"x = (" * 300]
LIMITS = Limits(
    max_members=40, max_total_bytes=20_000, max_member_bytes=5_000, max_py_bytes=2_000, max_path_bytes=200
)


@dataclass
class Spec:
    name: str
    kind: str
    data: bytes
    mode: int
    link: str
    pax_path: str | None


def paths(segments: list[str], leads: list[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda parts, lead: lead + "/".join(parts),
        st.lists(st.sampled_from(segments), min_size=1, max_size=4),
        st.sampled_from(leads),
    )


# Hostile specs use every kind of name, type and mode; tame ones stay close to real bundles
# (but still produce duplicates, dangling or escaping symlinks and files under symlinks).
hostile_specs = st.builds(
    Spec,
    name=paths(SEGMENTS, ["", "", "", "/", "./", "../"]),
    kind=st.sampled_from(list(KINDS)),
    data=st.one_of(st.sampled_from(PYTHON), st.binary(max_size=700)),
    mode=st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2644, 0o1777]),
    link=paths(SEGMENTS, ["", "", "/", "../"]),
    pax_path=st.one_of(st.none(), paths(SEGMENTS, ["", "/", "../"])),
)
TAME = ["a", "b", "dags", "x.py", "c.txt"]
tame_specs = st.builds(
    Spec,
    name=paths(TAME, ["", "", "./"]),
    kind=st.sampled_from(["file", "file", "file", "dir", "symlink"]),
    data=st.one_of(st.sampled_from(PYTHON[:4]), st.binary(max_size=300)),
    mode=st.sampled_from([0o644, 0o755]),
    link=paths([*TAME, "..", "."], ["", "", "../"]),
    pax_path=st.none(),
)


def build(members: list[Spec], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for spec in members:
            info = tarfile.TarInfo(spec.name)
            info.type = KINDS[spec.kind]
            info.mode = spec.mode
            info.linkname = spec.link
            if spec.pax_path is not None and fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"path": spec.pax_path}
            if info.type in (tarfile.REGTYPE, b"Z"):
                info.size = len(spec.data)
                tf.addfile(info, io.BytesIO(spec.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    members = draw(
        st.lists(st.one_of(hostile_specs, tame_specs) if draw(st.booleans()) else tame_specs, max_size=12)
    )
    names = [m.name for m in members]
    for m in members:
        if m.kind == "symlink" and names and draw(st.booleans()):
            # Point at another member, as a real bundle would.
            target = draw(st.sampled_from(names))
            m.link = posixpath.relpath(target or ".", posixpath.dirname(m.name) or ".")
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    try:
        raw = build(members, fmt)
    except (ValueError, UnicodeError):  # names the chosen tar format cannot store
        assume(False)
    data = gzip.compress(raw, compresslevel=1, mtime=0)
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "append", "truncate-tar"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    elif damage == "truncate-tar":
        data = gzip.compress(raw[: draw(st.integers(0, len(raw)))], mtime=0)
    return data


@st.composite
def linked_archives(draw: st.DrawFn) -> bytes:
    """Mostly valid bundles: distinct files plus symlinks to them (and sometimes elsewhere)."""
    files = draw(st.lists(paths(TAME, [""]), min_size=1, max_size=6, unique=True))
    files = [f for f in files if not any(o.startswith(f + "/") for o in files)]
    members = [Spec(f, "file", b"x = 1\n", 0o644, "", None) for f in files]
    for i in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["", "links/", "links/deep/"]))
        target = draw(st.one_of(st.sampled_from(files), st.sampled_from(["..", "../..", "/etc", "links"])))
        link = posixpath.relpath(target, where.rstrip("/") or ".") if not target.startswith("/") else target
        members.append(Spec(f"{where}l{i}", "symlink", b"", 0o777, link, None))
    return gzip.compress(build(members, tarfile.PAX_FORMAT), mtime=0)


def assert_consistent(report: Report) -> None:
    assert isinstance(report, Report)
    assert report.valid == (not report.errors)
    assert len(report.errors) <= 100
    if report.valid:
        assert len(report.manifest) == report.files
        assert sum(f.size for f in report.manifest) == report.bytes
    else:
        assert report.manifest == []
    report.model_dump_json()  # always serialisable


@settings(max_examples=250, deadline=None)
@given(archives(), st.booleans())
def test_validate_stream_always_returns_a_report_for_generated_archives(data: bytes, small: bool) -> None:
    assert_consistent(validate_stream(io.BytesIO(data), LIMITS if small else None))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=2000),
        st.binary(max_size=2000).map(lambda b: b"\x1f\x8b" + b),
        st.binary(max_size=2000).map(gzip.compress),
    )
)
def test_validate_stream_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    report = validate_stream(io.BytesIO(data))
    assert_consistent(report)
    if not data.startswith(b"\x1f\x8b"):
        assert not report.valid


def listing(top: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), top))
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(archives(), linked_archives()))
def test_extract_bundle_never_writes_outside_dest(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "box" / "sibling").mkdir(parents=True)
        (top / "box" / "sibling" / "keep").write_text("k")
        dest = top / "box" / "dest"
        try:
            report = extract_bundle(io.BytesIO(data), dest, LIMITS)
        except BundleRejected as exc:
            assert not exc.report.valid
            assert not dest.exists() and not dest.is_symlink()
            assert listing(top) == {"box", "box/sibling", "box/sibling/keep"}
            return
        assert report.valid
        outside = {p for p in listing(top) if not p.startswith("box/dest/") and p != "box/dest"}
        assert outside == {"box", "box/sibling", "box/sibling/keep"}
        real_dest = os.path.realpath(dest)
        for rel in listing(dest):
            resolved = os.path.realpath(dest / rel)
            assert resolved == real_dest or resolved.startswith(real_dest + os.sep), rel
