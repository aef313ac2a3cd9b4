"""Deltas: built during validation, applied over the base version's folder, equal to the bundle or refused."""
from __future__ import annotations

import io
import os
import random
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.bundle import (
    BundleRejected,
    DeltaCollector,
    DeltaMismatch,
    Report,
    Reuse,
    extract_bundle,
    extract_delta,
    files_digest,
    validate_stream,
)

EXEC = "exec"
LINK = "link"
DIR = "dir"

Tree = dict[str, bytes | tuple[str, bytes] | tuple[str, str] | str]


def tar_of(tree: Tree) -> bytes:
    """A gzip PAX tar of `tree`: path -> bytes (0644 file), (EXEC, bytes), (LINK, target as written), or DIR."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path, spec in sorted(tree.items()):
            info = tarfile.TarInfo(path)
            if spec == DIR:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(spec, tuple) and spec[0] == LINK:
                info.type, info.linkname = tarfile.SYMTYPE, str(spec[1])
                tar.addfile(info)
            else:
                data = spec[1] if isinstance(spec, tuple) else spec
                assert isinstance(data, bytes)
                info.size, info.mode = len(data), 0o755 if isinstance(spec, tuple) else 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def snapshot(folder: Path) -> dict[str, tuple[str, object]]:
    """Everything a reader sees in a folder: files with bytes and exec bit, symlinks, directories."""
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(folder).as_posix()
            st_ = full.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", (full.read_bytes(), bool(st_.st_mode & 0o111)))
    return out


def extracted(tmp: Path, name: str, data: bytes) -> tuple[Path, Report]:
    dest = tmp / name
    return dest, extract_bundle(io.BytesIO(data), dest)


def make_delta(base: Report, new: bytes, **kw: int) -> tuple[Report, object]:
    collector = DeltaCollector({f.path: f.sha256 for f in base.manifest}, **kw)
    report = validate_stream(io.BytesIO(new), collect=collector)
    assert report.valid, report.errors
    return report, collector.build(report.manifest, report.bytes)


def apply(tmp: Path, base_dir: Path, base: Report, new: bytes, name: str = "applied") -> tuple[Path, Report]:
    report, built = make_delta(base, new)
    assert built is not None
    dest = tmp / name
    got = extract_delta(
        io.BytesIO(built.data), dest, Reuse.from_manifest(base_dir, base.manifest), built.removed, built.files_sha256
    )
    assert files_digest(got.manifest) == files_digest(report.manifest)
    return dest, got


def filler(seed: int) -> bytes:
    """Bytes that do not compress away, so archive sizes mean something."""
    return b"# " + random.Random(seed).randbytes(6000).hex().encode() + b"\n"


BASE: Tree = {
    "dags/a.py": b"a = 1\n" + filler(1),
    "dags/b.py": b"b = 1\n" + filler(2),
    "dags/sub/c.py": b"c = 1\n" + filler(3),
    "sql/q.sql": b"select 1;\n" + filler(4),
    "bin/run.sh": (EXEC, b"#!/bin/sh\necho hi\n" + filler(5)),
    "shared": ("link", "dags/sub"),
    "empty": DIR,
}


def test_one_changed_file_is_all_the_delta_carries_and_the_result_equals_the_bundle(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    new_tree = {**BASE, "dags/b.py": b"b = 2\n" + filler(6)}
    new = tar_of(new_tree)
    report, built = make_delta(base, new)
    assert built is not None
    assert built.files == 2  # the changed file and the executable (its mode cannot be linked)
    assert built.removed == []
    assert len(built.data) < len(new) / 2
    applied, got = apply(tmp_path, base_dir, base, new)
    full, _ = extracted(tmp_path, "full", new)
    assert snapshot(applied) == snapshot(full)
    assert [e.path for e in got.manifest] == sorted(e.path for e in report.manifest)
    # unchanged files share the base's inodes; the changed one does not
    assert (applied / "dags/a.py").stat().st_ino == (base_dir / "dags/a.py").stat().st_ino
    assert (applied / "dags/b.py").stat().st_ino != (base_dir / "dags/b.py").stat().st_ino


def test_removals_additions_type_changes_and_mode_changes(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    new_tree: Tree = {
        "dags/a.py": (EXEC, BASE["dags/a.py"]),  # same bytes, now executable
        "dags/sub": b"a file where a directory was\n",  # dags/sub/c.py goes
        "sql/q.sql": BASE["sql/q.sql"],
        "bin/run.sh": BASE["bin/run.sh"][1],  # same bytes, no longer executable
        "shared": ("link", "sql/q.sql"),  # a symlink to an unchanged file
        "new/d.py": b"d = 1\n",
        "empty2": DIR,
    }
    new = tar_of(new_tree)
    _, built = make_delta(base, new)
    assert built is not None
    assert built.removed == ["dags/b.py", "dags/sub/c.py"]
    applied, _ = apply(tmp_path, base_dir, base, new)
    full, _ = extracted(tmp_path, "full", new)
    assert snapshot(applied) == snapshot(full)


def test_only_removals_give_an_archive_with_no_files(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    new_tree = {k: v for k, v in BASE.items() if k not in ("dags/b.py", "bin/run.sh")}
    new = tar_of(new_tree)
    applied, _ = apply(tmp_path, base_dir, base, new)
    full, _ = extracted(tmp_path, "full", new)
    assert snapshot(applied) == snapshot(full)


def test_a_digest_that_does_not_match_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    _, built = make_delta(base, tar_of({**BASE, "dags/b.py": b"b = 2\n"}))
    assert built is not None
    dest = tmp_path / "applied"
    with pytest.raises(DeltaMismatch, match="differ"):
        extract_delta(io.BytesIO(built.data), dest, Reuse.from_manifest(base_dir, base.manifest), built.removed, "0" * 64)
    assert not dest.exists()


def test_a_removed_list_that_keeps_a_deleted_file_is_caught_by_the_digest(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    _, built = make_delta(base, tar_of({k: v for k, v in BASE.items() if k != "dags/b.py"}))
    assert built is not None and built.removed == ["dags/b.py"]
    with pytest.raises(DeltaMismatch):
        extract_delta(io.BytesIO(built.data), tmp_path / "x", Reuse.from_manifest(base_dir, base.manifest), [],
                      built.files_sha256)
    assert not (tmp_path / "x").exists()


def test_a_base_copy_that_cannot_be_linked_is_copied_and_checked_or_refused(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    new = tar_of({**BASE, "dags/b.py": b"b = 2\n"})
    _, built = make_delta(base, new)
    assert built is not None
    reuse = Reuse.from_manifest(base_dir, base.manifest)
    full, _ = extracted(tmp_path, "full", new)
    (base_dir / "dags/a.py").chmod(0o755)  # an executable copy would lend its mode: copied instead
    extract_delta(io.BytesIO(built.data), tmp_path / "w", reuse, built.removed, built.files_sha256)
    assert snapshot(tmp_path / "w") == snapshot(full)
    (base_dir / "dags/a.py").write_bytes(b"tampered")
    with pytest.raises(DeltaMismatch, match="dags/a.py: .*changed on disk"):
        extract_delta(io.BytesIO(built.data), tmp_path / "x", reuse, built.removed, built.files_sha256)
    (base_dir / "dags/a.py").unlink()
    with pytest.raises(DeltaMismatch, match="dags/a.py: .*cannot be read"):
        extract_delta(io.BytesIO(built.data), tmp_path / "y", reuse, built.removed, built.files_sha256)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_hostile_delta_archive_is_refused_by_the_bundle_rules(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    reuse = Reuse.from_manifest(base_dir, base.manifest)
    for evil in ({"../escape.py": b"x"}, {"link": ("link", "../../etc/passwd")}, {"dangling": ("link", "nope/x.py")}):
        with pytest.raises(BundleRejected):
            extract_delta(io.BytesIO(tar_of(evil)), tmp_path / "x", reuse, [], "0" * 64)
        assert not (tmp_path / "x").exists()
    assert not (tmp_path.parent / "escape.py").exists()


def test_a_symlink_in_the_delta_may_point_at_a_kept_file_but_not_at_a_removed_one(tmp_path: Path) -> None:
    base_dir, base = extracted(tmp_path, "v1", tar_of(BASE))
    reuse = Reuse.from_manifest(base_dir, base.manifest)
    archive = tar_of({"l": ("link", "dags/a.py")})
    with pytest.raises(BundleRejected, match="does not exist"):
        extract_delta(io.BytesIO(archive), tmp_path / "x", reuse, ["dags/a.py"], "0" * 64)


def test_no_delta_when_most_of_the_bundle_changed_or_the_changes_are_too_large(tmp_path: Path) -> None:
    _, base = extracted(tmp_path, "v1", tar_of(BASE))
    everything = {k: (v + b"#\n" if isinstance(v, bytes) else v) for k, v in BASE.items()}
    _, built = make_delta(base, tar_of(everything))
    assert built is None
    collector = DeltaCollector({f.path: f.sha256 for f in base.manifest}, max_bytes=1000)
    report = validate_stream(io.BytesIO(tar_of({**BASE, "dags/b.py": b"b = 2\n" + filler(6)})), collect=collector)
    assert report.valid and collector.build(report.manifest, report.bytes) is None
    assert collector.abandoned and "changed bytes" in collector.abandoned


def test_no_delta_when_the_removed_list_would_be_too_long(tmp_path: Path) -> None:
    many: Tree = {f"dags/{'x' * 90}_{i}.py": b"x = 1\n" for i in range(800)}
    _, base = extracted(tmp_path, "v1", tar_of({**many, "keep.py": b"k = 1\n" * 5000}))
    _, built = make_delta(base, tar_of({"keep.py": b"k = 1\n" * 5000}))
    assert built is None


FILES = st.sampled_from(["a.py", "b.py", "d/c.py", "d/e/f.sql", "g.yaml", "d/h.py"])
CONTENTS = st.sampled_from([b"1\n", b"2\n", b"x = 3\n", b""])


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    tree: Tree = {}
    for path in draw(st.sets(FILES, min_size=1)):
        data = draw(CONTENTS)
        tree[path] = (EXEC, data) if draw(st.booleans()) and path.endswith(".py") else data
    if draw(st.booleans()):
        target = draw(st.sampled_from(sorted(tree)))
        tree["z-link"] = ("link", target)
    return tree


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=trees(), new=trees())
def test_applying_a_delta_always_gives_the_bundle_itself(tmp_path_factory: pytest.TempPathFactory, old: Tree,
                                                         new: Tree) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    base_dir, base = extracted(tmp, "v1", tar_of(old))
    collector = DeltaCollector({f.path: f.sha256 for f in base.manifest})
    report = validate_stream(io.BytesIO(tar_of(new)), collect=collector)
    built = collector.build(report.manifest, report.bytes * 4)  # small trees: always try the delta
    assert built is not None
    full, _ = extracted(tmp, "full", tar_of(new))
    dest = tmp / "applied"
    extract_delta(io.BytesIO(built.data), dest, Reuse.from_manifest(base_dir, base.manifest), built.removed,
                  built.files_sha256)
    assert snapshot(dest) == snapshot(full)


def test_long_and_non_ascii_paths_travel_in_the_delta(tmp_path: Path) -> None:
    long = "dags/" + "très_long_dossier_" * 8 + "/données.py"
    base_dir, base = extracted(tmp_path, "v1", tar_of({**BASE, long: b"x = 1\n"}))
    new = tar_of({**BASE, long: b"x = 2\n"})
    applied, _ = apply(tmp_path, base_dir, base, new)
    full, _ = extracted(tmp_path, "full", new)
    assert snapshot(applied) == snapshot(full)
    assert (applied / long).read_bytes() == b"x = 2\n"
