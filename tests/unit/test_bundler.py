"""What `dagcast deploy` collects from a dags folder: sizes checked before anything is written,
symlinks judged one by one, and DAG diffs that never claim more than the scan can see."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from chalicelib.bundle import FileEntry, Limits, extract_bundle
from chalicelib.manifest import diff_manifests, summary
from dagcast import bundler
from dagcast.exceptions import BundleInvalid, UsageProblem


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_human_sizes() -> None:
    assert [bundler.human_size(n) for n in (512, 1536, 300 * 2**20, 5 * 2**30)] == ["512 B", "1.5 KiB", "300.0 MiB", "5.0 GiB"]


def test_files_over_the_limits_are_named_with_human_sizes_before_anything_is_bundled(tmp_path: Path) -> None:
    root = tree(tmp_path / "dags", {"a.py": "x = 1\n"})
    with (root / "big.bin").open("wb") as f:
        f.truncate(300 * 2**20)
    with (root / "gen.py").open("wb") as f:
        f.truncate(11 * 2**20)
    found = bundler.collect(root, Limits())
    assert [(p["code"], p["path"], p["message"]) for p in found.problems] == [
        ("member_too_large", "big.bin", "big.bin: 300.0 MiB, over the 100.0 MiB per-file limit"),
        ("python_file_too_large", "gen.py", "gen.py: 11.0 MiB, over the 10.0 MiB limit for a Python file"),
    ]
    with pytest.raises(BundleInvalid) as info:
        bundler.build(root, io.BytesIO(), found)
    assert len(info.value.errors) == 2
    total = bundler.collect(root, Limits(max_total_bytes=2**20, max_member_bytes=400 * 2**20, max_py_bytes=16 * 2**20))
    assert [p["code"] for p in total.problems] == ["total_too_large"] and total.problems[0]["path"] is None


@pytest.mark.parametrize(("target", "why"), [
    ("/etc/passwd", "a symlink to the absolute path /etc/passwd"),
    ("../outside.py", "a symlink to ../outside.py, outside the dags folder"),
    ("missing.py", "a symlink to missing.py, which does not exist"),
    ("ignored.log", "which does not ship"),
    (".", "its own parent folder (a loop)"),
])
def test_a_symlink_that_cannot_ship_is_one_problem_naming_it_and_its_target(tmp_path: Path, target: str, why: str) -> None:
    root = tree(tmp_path / "dags", {"a.py": "x = 1\n", ".dagcastignore": "*.log\n", "ignored.log": "x\n"})
    (tmp_path / "outside.py").write_text("y = 1\n")
    os.symlink(target, root / "link")
    found = bundler.collect(root)
    assert [(p["code"], p["path"]) for p in found.problems] == [("unsafe_symlink", "link")]
    assert why in found.problems[0]["message"] and "link" not in found.paths


def test_symlinks_inside_ship_as_links_folders_too_and_the_sidecar_gets_them(tmp_path: Path) -> None:
    root = tree(tmp_path / "dags", {"a.py": "x = 1\n", "lib/helpers.py": "H = 1\n"})
    os.symlink("lib", root / "shared")
    os.symlink("a.py", root / "alias.py")
    found = bundler.collect(root, Limits())
    assert found.problems == [] and found.links == {"shared": "lib", "alias.py": "a.py"}
    assert found.paths == ["a.py", "alias.py", "lib/helpers.py", "shared"]
    out = io.BytesIO()
    bundler.build(root, out, found)
    out.seek(0)
    extract_bundle(out, tmp_path / "extracted")
    assert os.readlink(tmp_path / "extracted" / "shared") == "lib"
    assert (tmp_path / "extracted" / "shared" / "helpers.py").read_text() == "H = 1\n"


def test_a_missing_or_empty_folder_is_a_usage_problem(tmp_path: Path) -> None:
    with pytest.raises(UsageProblem, match="does not exist"):
        bundler.collect(tmp_path / "nope")
    (tmp_path / "empty" / "__pycache__").mkdir(parents=True)
    with pytest.raises(UsageProblem, match="no files to deploy"):
        bundler.collect(tmp_path / "empty")


def entry(path: str, ids: list[str], dynamic: int = 0, sha: str = "a") -> FileEntry:
    return FileEntry(path=path, size=1, sha256=sha * 64, dag_ids=ids, dynamic_dags=dynamic)


def test_the_diff_names_removals_only_when_no_dag_id_is_computed() -> None:
    old = [entry("etl.py", ["etl"]), entry("gone.py", ["gone"])]
    plain = diff_manifests(old, [entry("etl.py", ["etl"])])
    assert (plain.dags_removed, plain.dags_maybe_removed, plain.removes_dags) == (["gone"], [], True)
    computed = diff_manifests(old, [entry("etl.py", ["etl"]), entry("factory.py", [], dynamic=3, sha="b")])
    assert computed.dags_removed == [] and computed.dags_removed_count == 0, "never a removal the scan cannot see"
    assert computed.dags_maybe_removed == ["gone"] and computed.removes_dags
    assert (computed.dynamic_dags, computed.dynamic_files) == (3, ["factory.py"])
    assert "3 DAGs in 1 file whose ids are computed at parse time" in summary(computed)
    factory_gone = diff_manifests([entry("factory.py", [], dynamic=2)], [entry("etl.py", ["etl"], sha="c")])
    assert factory_gone.dynamic_files_removed == ["factory.py"] and factory_gone.removes_dags
    assert "removes 1 file with DAGs computed at parse time: factory.py" in summary(factory_gone)
    assert not diff_manifests(old, old).removes_dags
