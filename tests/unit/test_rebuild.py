"""Rebuilding a bundle from its base version's bundle and an uploaded delta gives the bytes bundling
the new folder gives, or refuses: the property ingest relies on before it writes a version's bundle."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.bundle import (
    BundleRejected,
    CompileCache,
    DeltaCollector,
    DeltaMismatch,
    Limits,
    Report,
    files_digest,
    validate_stream,
)
from chalicelib.bundle.format import write_bundle
from chalicelib.bundle.rebuild import read_delta, rebuild_bundle
from chalicelib.bundle.written import WrittenCheck

NAMES = st.sampled_from(["a.py", "b.py", "lib/c.py", "lib/d.txt", "lib/deep/e.py", "z.sql", "m/n.py"])
CONTENT = st.binary(max_size=300)
TREE = st.dictionaries(NAMES, CONTENT, min_size=1, max_size=7)


def write(root: Path, tree: dict[str, bytes], links: dict[str, str] | None = None) -> list[str]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for rel, data in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel, target in (links or {}).items():
        os.symlink(target, root / rel)
    return [*tree, *(links or {})]


def bundle(root: Path, paths: list[str], level: int = 1) -> bytes:
    out = io.BytesIO()
    write_bundle(root, paths, out, compresslevel=level)
    return out.getvalue()


def delta_of(new: bytes, base: bytes) -> tuple[bytes, list[str], str]:
    base_report = validate_stream(io.BytesIO(base), check_python=False)
    collect = DeltaCollector({f.path: f.sha256 for f in base_report.manifest})
    report = validate_stream(io.BytesIO(new), check_python=False, collect=collect)
    built = collect.build(report.manifest, 10**9)  # never "most of it changed": the property covers any change
    assert built is not None
    return built.data, built.removed, files_digest(report.manifest)


def rebuilt(base: bytes, delta: bytes, removed: list[str], digest: str, level: int = 1,
            base_files: dict[str, tuple[str, int]] | None = None) -> bytes:
    base_paths = [f.path for f in validate_stream(io.BytesIO(base), check_python=False).manifest]
    uploaded = read_delta(io.BytesIO(delta), Limits(), base_paths, removed)
    out = io.BytesIO()
    rebuild_bundle(io.BytesIO(base), Limits(), uploaded, removed, digest, out,
                   file_list(base) if base_files is None else base_files, level)
    return out.getvalue()


def file_list(bundle_bytes: bytes) -> dict[str, tuple[str, int]]:
    """A bundle's file list as ingest records it (path -> (sha256, size))."""
    return {f.path: (f.sha256, f.size) for f in validate_stream(io.BytesIO(bundle_bytes), check_python=False).manifest}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=TREE, new=TREE, link=st.booleans())
def test_base_plus_delta_is_byte_for_byte_the_bundle_of_the_new_folder(old: dict[str, bytes], new: dict[str, bytes],
                                                                        link: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = bundle(root / "old", write(root / "old", old))
        target = sorted(new)[0]
        links = {"alias": target} if link and "/" not in target else {}
        expected = bundle(root / "new", write(root / "new", new, links))
        delta, removed, digest = delta_of(expected, base)
        assert rebuilt(base, delta, removed, digest) == expected
        assert rebuilt(base, delta, removed, digest, base_files=file_list(base)) == expected  # as ingest does


def test_a_base_bundle_that_is_not_its_recorded_file_list_never_gives_the_new_folders_bundle(tmp_path: Path) -> None:
    old = {"a.py": b"A = 1\n", "b.py": b"B = 1\n", "c.sql": b"select 1;\n"}
    base = bundle(tmp_path / "old", write(tmp_path / "old", old))
    new = bundle(tmp_path / "new", write(tmp_path / "new", {**old, "a.py": b"A = 2\n"}))
    delta, removed, digest = delta_of(new, base)
    recorded = file_list(base)
    # the stored base was swapped for other bytes of the same sizes (an S3 write the record does not know):
    # the result is another bundle, which the caller refuses by its sha256
    other = bundle(tmp_path / "other", write(tmp_path / "other", {**old, "b.py": b"B = 2\n"}))
    assert rebuilt(other, delta, removed, digest, base_files=recorded) != new
    # a member the record does not list, or at another size, is refused here
    grown = bundle(tmp_path / "grown", write(tmp_path / "grown", {**old, "b.py": b"B = 22\n"}))
    with pytest.raises(DeltaMismatch, match="does not match its file list at b.py"):
        rebuilt(grown, delta, removed, digest, base_files=recorded)
    extra = bundle(tmp_path / "extra", write(tmp_path / "extra", {**old, "d.py": b"D = 1\n"}))
    with pytest.raises(DeltaMismatch, match="does not match its file list at d.py"):
        rebuilt(extra, delta, removed, digest, base_files=recorded)


def test_a_delta_that_does_not_give_the_announced_files_is_refused(tmp_path: Path) -> None:
    base = bundle(tmp_path / "old", write(tmp_path / "old", {"a.py": b"A = 1\n", "b.py": b"B = 1\n"}))
    new = bundle(tmp_path / "new", write(tmp_path / "new", {"a.py": b"A = 2\n", "b.py": b"B = 1\n"}))
    delta, removed, digest = delta_of(new, base)
    with pytest.raises(DeltaMismatch, match="not the files the deploy announced"):
        rebuilt(base, delta, removed, "0" * 64)
    with pytest.raises(DeltaMismatch):  # a file the delta "removes" that the new version still has
        rebuilt(base, delta, ["b.py"], digest)
    # The same files written at another gzip level are another bundle: ingest compares the sha256 too.
    assert rebuilt(base, delta, removed, digest, level=6) != new
    assert rebuilt(base, delta, removed, digest, level=1) == new


def test_a_hostile_delta_is_refused_with_the_bundle_rules() -> None:
    import tarfile

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.py")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"x=1"))
    with pytest.raises(BundleRejected) as caught:
        read_delta(io.BytesIO(evil.getvalue()), Limits(), ["a.py"], [])
    assert "escape.py" in caught.value.report.errors[0].message
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
        info = tarfile.TarInfo("big.py")
        info.size = 17 * 1024 * 1024
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    with pytest.raises(BundleRejected) as caught:  # more than a delta may hold in memory
        read_delta(io.BytesIO(bomb.getvalue()), Limits(), ["a.py"], [])
    assert caught.value.report.errors[0].code


# --- validating the rebuilt bundle as it is written (WrittenCheck) ---------------------------------

SNIPPETS = st.sampled_from([
    b"X = 1\n",
    b"from airflow import DAG\nwith DAG('etl') as dag:\n    pass\n",
    b"from airflow import DAG\nfor t in ['a', 'b']:\n    DAG(f'team_{t}')\n",
    b"def broken(:\n",  # does not compile
    b"plain text, not Python\n",
])
VALID_SNIPPETS = st.sampled_from([b"X = 1\n", b"from airflow import DAG\nwith DAG('etl') as dag:\n    pass\n",
                                  b"from airflow import DAG\nfor t in ['a', 'b']:\n    DAG(f'team_{t}')\n"])


def checked(base: bytes, delta: bytes, removed: list[str], digest: str, limits: Limits | None = None,
            level: int = 1) -> tuple[bytes, Report]:
    """Rebuild with a WrittenCheck fed the base's verdicts, as ingest does for a base of this validator."""
    limits = limits or Limits()
    base_report = validate_stream(io.BytesIO(base))
    assert base_report.valid, "a base version is a valid bundle"
    uploaded = read_delta(io.BytesIO(delta), limits, [f.path for f in base_report.manifest], removed)
    check = WrittenCheck(limits, {f.path: f for f in base_report.manifest}, cache=CompileCache())
    out = io.BytesIO()
    info = rebuild_bundle(io.BytesIO(base), Limits(), uploaded, removed, digest, out,
                          {f.path: (f.sha256, f.size) for f in base_report.manifest}, level, check)
    return out.getvalue(), check.report(info)


def read_again(data: bytes, limits: Limits | None = None) -> Report:
    """The rebuilt bundle validated by reading it, as any upload (a fresh compile cache: nothing reused)."""
    return validate_stream(io.BytesIO(data), limits, cache=CompileCache())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.dictionaries(NAMES, VALID_SNIPPETS, min_size=1, max_size=7),
       new=st.dictionaries(NAMES, SNIPPETS, min_size=1, max_size=7), link=st.booleans())
def test_checking_a_rebuilt_bundle_as_it_is_written_reports_what_reading_it_again_reports(
    old: dict[str, bytes], new: dict[str, bytes], link: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = bundle(root / "old", write(root / "old", old))
        target = sorted(new)[0]
        links = {"alias": target} if link and "/" not in target else {}
        expected = bundle(root / "new", write(root / "new", new, links))
        delta, removed, digest = delta_of(expected, base)
        data, report = checked(base, delta, removed, digest)
        assert data == expected
        assert report == read_again(data)  # verdict, every issue, the manifest with its DAG ids, sha256


def hostile_delta(members: dict[str, bytes]) -> bytes:
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_delta_whose_files_clash_with_the_base_files_it_keeps_is_rejected_as_the_whole_bundle_would_be(
    tmp_path: Path,
) -> None:
    """Alone, the delta is a fine archive: only beside the base's files is `a.py` both a file and a folder."""
    from chalicelib.bundle.report import triples_digest

    old = {"a.py": b"A = 1\n", "b.py": b"B = 1\n"}
    base = bundle(tmp_path / "old", write(tmp_path / "old", old))
    clash = {"a.py/inner.py": b"C = 1\n"}
    delta = hostile_delta(clash)
    recorded = file_list(base)
    digest = triples_digest([(p, s, h) for p, (h, s) in recorded.items()]
                            + [("a.py/inner.py", 6, hashlib.sha256(b"C = 1\n").hexdigest())])
    data, report = checked(base, delta, [], digest)
    assert not report.valid
    assert [(e.code, e.path) for e in report.errors] == [("duplicate_path", "a.py/inner.py")]
    assert "its parent a.py is a file" in report.errors[0].message
    assert report == read_again(data)


def test_the_files_a_delta_keeps_meet_the_deployments_limits_as_they_are_now(tmp_path: Path) -> None:
    """Verdicts are reused, rules are not: a limit lowered since the base was validated applies to its files."""
    old = {"big.py": b"X = 1\n" + b"# padding\n" * 40, "b.py": b"B = 1\n"}
    base = bundle(tmp_path / "old", write(tmp_path / "old", old))
    new = bundle(tmp_path / "new", write(tmp_path / "new", {**old, "b.py": b"B = 2\n"}))
    delta, removed, digest = delta_of(new, base)
    tight = Limits(max_py_bytes=100)
    data, report = checked(base, delta, removed, digest, tight)
    assert [(e.code, e.path) for e in report.errors] == [("python_file_too_large", "big.py")]
    assert report == read_again(data, tight)
    few = Limits(max_members=1)
    data, report = checked(base, delta, removed, digest, few)
    assert [e.code for e in report.errors] == ["too_many_members"]
    assert report == read_again(data, few)
    small = Limits(max_bundle_bytes=len(new) - 1)
    data, report = checked(base, delta, removed, digest, small)
    assert [e.code for e in report.errors] == ["bundle_too_large"]
    assert report.valid is read_again(data, small).valid is False


def test_a_python_file_of_the_delta_that_does_not_compile_is_named_with_its_line(tmp_path: Path) -> None:
    old = {"a.py": b"A = 1\n", "b.py": b"B = 1\n"}
    base = bundle(tmp_path / "old", write(tmp_path / "old", old))
    new = bundle(tmp_path / "new", write(tmp_path / "new", {**old, "b.py": b"B = 1\ndef broken(:\n"}))
    delta, removed, digest = delta_of(new, base)
    data, report = checked(base, delta, removed, digest)
    assert not report.valid and report.manifest == []
    assert [(e.code, e.path, e.line) for e in report.errors] == [("syntax_error", "b.py", 2)]
    assert report == read_again(data)


def test_an_unchanged_file_keeps_the_verdict_of_the_base_and_is_not_compiled_again(tmp_path: Path) -> None:
    old = {"a.py": b"from airflow import DAG\nwith DAG('etl') as dag:\n    pass\n", "b.py": b"B = 1\n"}
    base = bundle(tmp_path / "old", write(tmp_path / "old", old))
    new = bundle(tmp_path / "new", write(tmp_path / "new", {**old, "b.py": b"B = 2\n"}))
    delta, removed, digest = delta_of(new, base)
    base_report = validate_stream(io.BytesIO(base))
    uploaded = read_delta(io.BytesIO(delta), Limits(), [f.path for f in base_report.manifest], removed)
    cache = CompileCache()
    check = WrittenCheck(Limits(), {f.path: f for f in base_report.manifest}, cache=cache)
    info = rebuild_bundle(io.BytesIO(base), Limits(), uploaded, removed, digest, io.BytesIO(),
                          {f.path: (f.sha256, f.size) for f in base_report.manifest}, 1, check)
    report = check.report(info)
    assert report.valid and check.reused == 1
    assert cache.added == 1, "only the delta's file was compiled"
    assert [f.dag_ids for f in report.manifest] == [["etl"], []]
