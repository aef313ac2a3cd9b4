"""The compile cache spares compiling the same bytes twice and can never let unvalidated code through."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import chalicelib.bundle.validate as validation
from chalicelib.bundle import CompileCache, validate_stream, write_bundle


def bundle(tmp: Path, files: dict[str, str]) -> io.BytesIO:
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    out = io.BytesIO()
    write_bundle(tmp, list(files), out)
    out.seek(0)
    return out


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = validation._check_python

    def counting(source: bytes, path: str) -> Any:
        seen.append(path)
        return real(source, path)

    monkeypatch.setattr(validation, "_check_python", counting)
    return seen


GOOD = {"etl.py": "from airflow import DAG\nDAG('etl')\n", "lib/util.py": "X = 1\n"}


def test_the_same_bytes_are_compiled_once_and_give_the_same_report(tmp_path: Path, compiles: list[str]) -> None:
    cache = CompileCache()
    first = validate_stream(bundle(tmp_path / "a", GOOD), cache=cache)
    assert sorted(compiles) == ["etl.py", "lib/util.py"]
    compiles.clear()
    second = validate_stream(bundle(tmp_path / "b", {**GOOD, "new.py": "Y = 2\n"}), cache=cache)
    assert compiles == ["new.py"]
    assert first.valid and second.valid
    assert [f for f in second.manifest if f.path != "new.py"] == first.manifest
    assert second.dag_ids == ["etl"]


def test_a_file_that_fails_is_never_cached_and_fails_every_time(tmp_path: Path, compiles: list[str]) -> None:
    cache = CompileCache()
    broken = {"bad.py": "def f(:\n"}
    for i in range(2):
        report = validate_stream(bundle(tmp_path / f"r{i}", broken), cache=cache)
        assert not report.valid and report.errors[0].code == "syntax_error"
    assert compiles == ["bad.py", "bad.py"]
    assert cache.entries == {}


def test_changed_bytes_never_hit_an_entry(tmp_path: Path) -> None:
    cache = CompileCache()
    assert validate_stream(bundle(tmp_path / "a", {"x.py": "value = 1\n"}), cache=cache).valid
    report = validate_stream(bundle(tmp_path / "b", {"x.py": "value = (1\n"}), cache=cache)
    assert not report.valid and report.errors[0].path == "x.py"


def test_entries_are_keyed_by_content_hash_for_this_python_only(tmp_path: Path) -> None:
    cache = CompileCache()
    report = validate_stream(bundle(tmp_path / "a", GOOD), cache=cache)
    assert set(cache.entries) == {f.sha256 for f in report.manifest}
    assert CompileCache.TAG.startswith(sys.implementation.cache_tag)


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    cache = CompileCache(max_entries=2)
    validate_stream(bundle(tmp_path / "a", {"a.py": "a = 1\n", "b.py": "b = 1\n", "c.py": "c = 1\n"}), cache=cache)
    assert len(cache.entries) == 2


def test_the_cli_cache_file_round_trips_and_a_corrupt_file_is_an_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagcast import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = compile_cache.load()
    validate_stream(bundle(tmp_path / "a", GOOD), cache=cache)
    compile_cache.save(cache)
    assert compile_cache.load().entries == cache.entries
    compile_cache._path().write_text("{not json")
    assert compile_cache.load().entries == {}


def test_the_cli_cache_appends_what_it_learns_and_rewrites_the_file_only_now_and_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagcast import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(compile_cache, "JOURNAL_MAX", 3)
    cache = compile_cache.load()
    for digest in ("a", "b"):
        cache.put(digest, [digest])
    compile_cache.save(cache)
    path = compile_cache._path()
    journal = path.with_suffix(".log")
    assert json.loads(path.read_text()) == {"a": ["a"], "b": ["b"]} and not journal.exists()

    for digest in ("c", "d"):
        cache = compile_cache.load()
        cache.put(digest, [digest])
        compile_cache.save(cache)
    assert json.loads(path.read_text()) == {"a": ["a"], "b": ["b"]}, "a file or two learned: appended, not rewritten"
    with journal.open("a") as f:
        f.write('["e", ["e"')  # an append cut short
    assert compile_cache.load().entries == {k: [k] for k in "abcd"}

    cache = compile_cache.load()
    cache.put("f", ["f"])
    cache.put("g", ["g"])
    compile_cache.save(cache)
    assert json.loads(path.read_text()) == {k: [k] for k in "abcdfg"} and not journal.exists()
