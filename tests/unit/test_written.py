"""Validating a bundle as it is written (WrittenCheck) says what reading the written bundle again
says: the property the CLI relies on when it checks the bundle it writes in the same pass, and the
delta it then makes from the folder is the one reading the bundle would make."""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rebuild import write

from chalicelib.bundle import CompileCache, DeltaCollector, Limits, Report, validate_stream
from chalicelib.bundle.format import write_bundle
from chalicelib.bundle.written import WrittenCheck
from dagcast import deploy

NAMES = st.sampled_from(["a.py", "b.py", "lib/c.py", "lib/d.txt", "lib/deep/e.py", "z.sql", "m/n.py", "bin.dat"])
SNIPPETS = st.sampled_from([
    b"X = 1\n",
    b"from airflow import DAG\nwith DAG('etl') as dag:\n    pass\n",
    b"from airflow import DAG\nfor t in ['a', 'b']:\n    DAG(f'team_{t}')\n",
    b"def broken(:\n",  # does not compile
    b"\x00\xff binary \x80\n",
    b"# " + b"long line " * 40 + b"\n",
])
LIMITS = st.sampled_from([Limits(), Limits(max_py_bytes=100), Limits(max_members=3), Limits(max_total_bytes=120),
                          Limits(max_member_bytes=200), Limits(max_path_bytes=8)])


def written(root: Path, paths: list[str], limits: Limits) -> tuple[bytes, WrittenCheck, Report]:
    """The bundle's bytes, the check fed while writing it, and the check's report."""
    out = io.BytesIO()
    check = WrittenCheck(limits, cache=CompileCache())
    info = write_bundle(root, paths, out, compresslevel=1, check=check)
    return out.getvalue(), check, check.report(info)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(NAMES, SNIPPETS, min_size=1, max_size=8), link=st.booleans(), limits=LIMITS)
def test_a_bundle_checked_as_it_is_written_gets_the_report_reading_it_again_gives(
    tree: dict[str, bytes], link: bool, limits: Limits
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dags"
        target = sorted(tree)[0]
        links = {"alias": target} if link and "/" not in target else {}
        data, check, report = written(root, write(root, tree, links), limits)
        assert report == validate_stream(io.BytesIO(data), limits, cache=CompileCache())
        if links and report.valid:
            assert check.symlinks == {"alias": target}


def test_only_the_bytes_the_check_needs_are_kept_while_a_file_is_written(tmp_path: Path) -> None:
    """Python (to compile) and files the delta collector may carry; a large data file is only hashed."""
    check = WrittenCheck(Limits())
    assert check.wants("a.py", 10**9) and not check.wants("data.csv", 10)
    collecting = WrittenCheck(Limits(), collect=DeltaCollector({}))
    assert collecting.wants("data.csv", 10) and not collecting.wants("data.csv", 17 * 1024 * 1024)


def bundle_and_report(root: Path) -> tuple[bytes, WrittenCheck, Report]:
    return written(root, sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()), Limits())


def test_the_delta_made_from_the_folder_is_the_one_reading_the_bundle_makes(tmp_path: Path) -> None:
    root = tmp_path / "dags"
    base_files = {"a.py": b"A = 1\n", "b.py": b"B = 1\n", "lib/c.sql": b"select 1;\n", "gone.py": b"G = 1\n"}
    write(root, base_files)
    base_bytes, _, _ = bundle_and_report(root)
    base = {f.path: f.sha256 for f in validate_stream(io.BytesIO(base_bytes)).manifest}
    write(root, {**{k: v for k, v in base_files.items() if k != "gone.py"}, "a.py": b"A = 2\n", "new.py": b"N = 1\n"},
          {"alias.py": "b.py"})
    data, check, report = bundle_and_report(root)
    made = deploy._collect_written(root, report, check.symlinks, DeltaCollector(base), io.BytesIO(data), Limits())
    reference = DeltaCollector(base)
    validate_stream(io.BytesIO(data), check_python=False, collect=reference)
    assert made.build(report.manifest, report.bytes) == reference.build(report.manifest, report.bytes)
    built = made.build(report.manifest, report.bytes)
    assert built is not None and built.files == 2 and built.removed == ["gone.py"]


def test_a_file_edited_after_it_was_bundled_makes_the_delta_from_the_bundle_not_the_folder(tmp_path: Path,
                                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "dags"
    write(root, {"a.py": b"A = 1\n", "b.py": b"B = 1\n"})
    base_bytes, _, _ = bundle_and_report(root)
    base = {f.path: f.sha256 for f in validate_stream(io.BytesIO(base_bytes)).manifest}
    write(root, {"a.py": b"A = 2\n", "b.py": b"B = 1\n"})
    data, check, report = bundle_and_report(root)
    (root / "a.py").write_bytes(b"A = 3\n")  # edited while the deploy ran: the upload is the bundle's bytes
    made = deploy._collect_written(root, report, check.symlinks, DeltaCollector(base), io.BytesIO(data), Limits())
    built = made.build(report.manifest, report.bytes)
    reference = DeltaCollector(base)
    validate_stream(io.BytesIO(data), check_python=False, collect=reference)
    assert built == reference.build(report.manifest, report.bytes)
    assert built is not None and b"A = 2" in __import__("gzip").decompress(built.data)
