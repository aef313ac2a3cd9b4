"""`dagcast deploy` against a fake API: the stage timings it reports, the long poll of --wait, the
look-ahead that fetches the live version while the bundle is built, and compiling in parallel."""
from __future__ import annotations

import io
import os
import time
import types
from pathlib import Path
from typing import Any

import pytest

import chalicelib.bundle.validate as validation
from chalicelib.bundle import CompileCache, validate_stream
from dagcast import bundler, compile_cache, deploy
from dagcast.exceptions import ApiError, BundleInvalid


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


class FakeApi:
    """Answers like the control API; `views` are the successive answers to GET deploy."""

    def __init__(self, views: list[dict[str, Any]] | None = None, live_error: ApiError | None = None) -> None:
        self.views = views or []
        self.live_error = live_error
        self.waits: list[int] = []
        self.created: list[dict[str, Any]] = []

    def get_deployment(self, deployment: str) -> dict[str, Any]:
        return {"name": deployment, "limits": {}}

    def get_version(self, deployment: str, version: int | None) -> dict[str, Any]:
        raise self.live_error or ApiError(404, "not_found", "no version yet")

    def create_deploy(self, deployment: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(body)
        return {"deploy": {"deploy_id": "0123456789a-abcdef"}, "upload": {"url": "http://s3.test/", "fields": {}}}

    def get_deploy(self, deployment: str, deploy_id: str, wait: int = 0, dag_ids: bool = True,
                   until_settled: bool = False) -> dict[str, Any]:
        assert not dag_ids, "the wait asks for the deploy without its DAG ids"
        assert until_settled, "the wait asks to be answered at a change of state or at the end"
        self.waits.append(wait)
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]


def view(state: str, on: int = 0, live: int = 2) -> dict[str, Any]:
    return {
        "deploy": {"state": state, "version": 1 if state == "ACTIVE" else None, "errors": []},
        "sidecars": [{"name": f"s{i}", "version": 1 if i < on else 0, "live": True} for i in range(live)],
        "sidecars_on_version": on, "live_sidecars": live, "converged": state == "ACTIVE" and on == live,
    }


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """deploy's pauses, recorded instead of slept (its clocks stay real)."""
    sleeps: list[float] = []
    clock = types.SimpleNamespace(monotonic=time.monotonic, perf_counter=time.perf_counter, time=time.time,
                                  sleep=sleeps.append)
    monkeypatch.setattr(deploy, "time", clock)
    return sleeps


@pytest.fixture
def no_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deploy, "upload", lambda *args, **kwargs: None)


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_json_result_says_how_long_each_stage_took(tmp_path: Path, no_upload: None) -> None:
    dags = write(tmp_path / "dags", {"a.py": "x = 1\n", "q.sql": "select 1;\n"})
    api = FakeApi([view("VALIDATING"), view("ACTIVE", on=2)])
    said: list[str] = []
    result = deploy.run(api, deploy.DeployOptions(dags_path=dags, deployment="d"), said.append)  # type: ignore[arg-type]
    assert any(line.startswith("Bundled 2 files") for line in said), said
    timings = result.to_json()["timings"]
    noticed = timings.pop("noticed_at")
    assert set(timings) == {"bundle_s", "validate_s", "diff_s", "presign_s", "upload_s", "wait_s", "total_s"}
    assert all(isinstance(v, float) and v >= 0 for v in timings.values()), timings
    assert timings["total_s"] >= max(v for k, v in timings.items() if k != "total_s")
    assert isinstance(noticed, float)


class TimedApi(FakeApi):
    """A FakeApi that notes (epoch seconds) when it handed out each answer."""

    def __init__(self, views: list[dict[str, Any]]) -> None:
        super().__init__(views)
        self.answered: list[float] = []

    def get_deploy(self, deployment: str, deploy_id: str, wait: int = 0, dag_ids: bool = True,
                   until_settled: bool = False) -> dict[str, Any]:
        answer = super().get_deploy(deployment, deploy_id, wait, dag_ids, until_settled)
        self.answered.append(time.time())
        return answer


def test_noticed_at_is_when_the_answer_that_ended_the_wait_arrived(tmp_path: Path, no_upload: None) -> None:
    dags = write(tmp_path / "dags", {"a.py": "x = 1\n"})
    api = TimedApi([view("VALIDATING"), view("ACTIVE", on=1), view("ACTIVE", on=2)])
    result = deploy.run(api, deploy.DeployOptions(dags_path=dags, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    noticed = result.to_json()["timings"]["noticed_at"]
    assert len(api.answered) == 3
    # the last answer's arrival, to the millisecond (epoch seconds, 3 decimals): not an earlier answer's, not the exit
    assert api.answered[-1] - 0.0005 <= noticed <= api.answered[-1] + 0.002
    assert round(noticed, 3) == noticed


def test_noticed_at_is_null_without_a_wait(tmp_path: Path, no_upload: None) -> None:
    dags = write(tmp_path / "dags", {"a.py": "x = 1\n"})
    opts = deploy.DeployOptions(dags_path=dags, deployment="d", wait=False)
    assert deploy.run(FakeApi(), opts, lambda _: None).to_json()["timings"]["noticed_at"] is None  # type: ignore[arg-type]


def test_stages_that_did_not_run_are_null(tmp_path: Path, no_upload: None) -> None:
    dags = write(tmp_path / "dags", {"a.py": "x = 1\n"})
    opts = deploy.DeployOptions(dags_path=dags, deployment="d", wait=False, skip_validation=True)
    timings = deploy.run(FakeApi(), opts, lambda _: None).to_json()["timings"]  # type: ignore[arg-type]
    assert timings["validate_s"] is None and timings["wait_s"] is None
    assert timings["upload_s"] is not None and timings["total_s"] is not None


def test_wait_long_polls_and_asks_again_at_once_after_each_change(
    tmp_path: Path, no_upload: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = record_sleeps(monkeypatch)
    dags = write(tmp_path / "dags", {"a.py": "x = 1\n"})
    api = FakeApi([view("PENDING"), view("VALIDATING"), view("ACTIVE"), view("ACTIVE", on=1), view("ACTIVE", on=2)])
    result = deploy.run(api, deploy.DeployOptions(dags_path=dags, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    assert result.converged and result.state == "ACTIVE"
    assert api.waits == [deploy.LONG_POLL_SECONDS] * 5, "every request lets the API hold the answer"
    assert sleeps == [], "each answer brought news: no pause between requests"


def test_wait_asks_again_at_once_when_the_answer_is_the_noted_convergence(
    tmp_path: Path, no_upload: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sidecar runs it, a parse report is due: the API answers the moment convergence is noted,
    and the CLI asks again at once (a pause would delay noticing the parse report that follows)."""
    sleeps = record_sleeps(monkeypatch)
    dags = write(tmp_path / "dags", {"a.py": "x = 1\n"})
    pending = {"status": "pending", "pending": ["s0"], "reported": []}
    converged, noted = view("ACTIVE", on=2) | {"parse": pending}, view("ACTIVE", on=2) | {"parse": pending}
    noted["deploy"] = {**noted["deploy"], "converged_at": 5}
    parsed = view("ACTIVE", on=2) | {"parse": {"status": "parsed", "reported": ["s0"]}}
    api = FakeApi([converged, noted, parsed])
    result = deploy.run(api, deploy.DeployOptions(dags_path=dags, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    assert result.converged and len(api.waits) == 3
    assert sleeps == [], "the noted convergence was news: no pause before asking again"


def test_wait_still_paces_itself_against_an_api_that_answers_at_once(
    tmp_path: Path, no_upload: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = record_sleeps(monkeypatch)
    dags = write(tmp_path / "dags", {"a.py": "x = 1\n"})
    api = FakeApi([view("ACTIVE")] * 4 + [view("ACTIVE", on=2)])
    deploy.run(api, deploy.DeployOptions(dags_path=dags, deployment="d", poll_interval=0.2), lambda _: None)  # type: ignore[arg-type]
    assert len(sleeps) == 3 and all(0 < s <= 0.2 for s in sleeps), sleeps


def test_local_validation_errors_come_before_an_api_error_and_nothing_is_created(tmp_path: Path, no_upload: None) -> None:
    api = FakeApi(live_error=ApiError(401, "unauthorized", "bad token"))
    broken = write(tmp_path / "broken", {"bad.py": "def f(:\n"})
    with pytest.raises(BundleInvalid):
        deploy.run(api, deploy.DeployOptions(dags_path=broken, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    good = write(tmp_path / "good", {"ok.py": "x = 1\n"})
    with pytest.raises(ApiError, match="bad token"):
        deploy.run(api, deploy.DeployOptions(dags_path=good, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    assert api.created == []


# --- compiling new files in worker processes -------------------------------------------------


def many_files(root: Path, n: int, broken: int | None = None) -> list[str]:
    files = {f"pkg_{i % 7}/m_{i}.py": f"from airflow import DAG\nDAG('dag_{i}')\nX = {i}\n" for i in range(n)}
    if broken is not None:
        files[f"pkg_{broken % 7}/m_{broken}.py"] = "def f(:\n"
    write(root, {**files, "q.sql": "select 1;\n"})
    return sorted([*files, "q.sql"])


def test_new_files_are_compiled_by_workers_with_the_validators_own_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compile_cache, "PARALLEL_MIN", 10)
    root = tmp_path / "dags"
    paths = many_files(root, 40, broken=3)
    cache = CompileCache()
    assert compile_cache.Prewarm(root, paths, cache, workers=2).join() == 39
    reference = CompileCache()
    bundler.build(root, (tmp_path / "b.tgz").open("wb"))
    with (tmp_path / "b.tgz").open("rb") as f:
        report = validate_stream(f, cache=reference)
    assert cache.entries == reference.entries, "the same entries the validator makes, and none for the broken file"
    assert not report.valid and [e.path for e in report.errors] == ["pkg_3/m_3.py"]


def test_an_everyday_change_starts_no_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compile_cache, "PARALLEL_MIN", 10)
    root = tmp_path / "dags"
    paths = many_files(root, 40)
    cache = CompileCache()
    compile_cache.Prewarm(root, paths, cache, workers=2).join()
    (root / "pkg_0" / "m_0.py").write_text("X = 'changed'\n")
    started: list[Any] = []
    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", lambda *a, **k: started.append(a))
    assert compile_cache.Prewarm(root, paths, cache, workers=2).join() == 0
    assert started == []


def test_with_workers_the_cli_reports_what_the_serial_validator_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_upload: None
) -> None:
    monkeypatch.setattr(compile_cache, "PARALLEL_MIN", 10)
    compiled: list[str] = []
    real = validation._check_python
    monkeypatch.setattr(validation, "_check_python", lambda source, path: (compiled.append(path), real(source, path))[1])
    root = tmp_path / "dags"
    many_files(root, 30, broken=5)
    with pytest.raises(BundleInvalid) as caught:
        deploy.run(FakeApi(), deploy.DeployOptions(dags_path=root, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    assert [e["path"] for e in caught.value.errors] == ["pkg_5/m_5.py"]
    assert compiled == ["pkg_5/m_5.py"], "workers compiled the rest; only the file that failed is compiled again here"
    assert os.path.exists(compile_cache._path())


def test_the_deploy_command_starts_without_the_terminal_ui_libraries() -> None:
    """Start-up is on the path of every deploy: rich (progress bars, and httpx's own command line)
    is imported only when a progress bar is shown."""
    import subprocess
    import sys

    code = ("import sys, dagcast.cli, dagcast.deploy, dagcast.client, httpx\n"
            "print(sorted(m for m in sys.modules if m.startswith(('rich', 'pygments'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_everyday_deploy_is_checked_as_it_is_written_and_a_first_one_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_upload: None
) -> None:
    """A bundle whose Python the compile cache knows (but for a file or two) is validated in the pass
    that writes it; one whose new files worker processes compile is read again once they are done."""
    import chalicelib.bundle

    monkeypatch.setattr(compile_cache, "PARALLEL_MIN", 10)
    root = tmp_path / "dags"
    many_files(root, 30)
    reads: list[bool] = []
    real = chalicelib.bundle.validate_stream
    monkeypatch.setattr(chalicelib.bundle, "validate_stream", lambda *a, **k: (reads.append(True), real(*a, **k))[1])
    api = FakeApi([view("ACTIVE", on=2)])
    first = deploy.run(api, deploy.DeployOptions(dags_path=root, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    assert reads == [True], "30 new files: compiled by the workers, then the bundle is read again"
    (root / "pkg_0" / "m_0.py").write_text("X = 'changed'\n")
    second = deploy.run(api, deploy.DeployOptions(dags_path=root, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    assert reads == [True], "one file changed: checked as it was written"
    assert (first.files, second.files) == (31, 31) and first.sha256 != second.sha256
    broken = write(tmp_path / "broken", {"ok.py": "x = 1\n", "bad.py": "def f(:\n"})
    with pytest.raises(BundleInvalid) as caught:
        deploy.run(api, deploy.DeployOptions(dags_path=broken, deployment="d"), lambda _: None)  # type: ignore[arg-type]
    assert [(e["path"], e["line"]) for e in caught.value.errors] == [("bad.py", 1)]


def test_the_uploaded_bundle_becomes_the_folders_last_by_a_rename_and_nothing_else_is_left_behind(
    tmp_path: Path, no_upload: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from dagcast import segment_cache

    dags = write(tmp_path / "dags", {"a.py": "x = 1\n", "q.sql": "select 1;\n"})
    copies: list[int] = []
    real_pread = segment_cache.os.pread
    monkeypatch.setattr(segment_cache.os, "pread", lambda fd, n, at: copies.append(n) or real_pread(fd, n, at))
    result = deploy.run(FakeApi([view("ACTIVE", on=2)]), deploy.DeployOptions(dags_path=dags, deployment="d"),
                        lambda _: None)  # type: ignore[arg-type]
    folder = tmp_path / "cache" / "dagcast" / "bundles"
    [kept] = folder.glob("*.tgz")
    assert sorted(p.name for p in folder.iterdir()) == sorted([kept.name, kept.with_suffix(".json").name])
    assert copies == []  # renamed into place, not copied
    expected = io.BytesIO()
    bundler.build(dags, expected)
    assert kept.read_bytes() == expected.getvalue() and result.sha256 is not None
    # a deploy that fails before its upload leaves neither a bundle nor its scratch file
    (dags / "b.py").write_text("def oops(:\n")
    with pytest.raises(BundleInvalid):
        deploy.run(FakeApi([view("ACTIVE", on=2)]), deploy.DeployOptions(dags_path=dags, deployment="d"),
                   lambda _: None)  # type: ignore[arg-type]
    assert sorted(p.name for p in folder.iterdir()) == sorted([kept.name, kept.with_suffix(".json").name])


def test_a_stale_record_of_a_file_in_the_cli_cache_costs_a_second_bundling_not_the_deploy(
    tmp_path: Path, no_upload: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import json

    from dagcast import segment_cache

    dags = write(tmp_path / "dags", {"a.sql": "select 1;\n", "b.sql": "select 2;\n", "c.py": "X = 1\n"})
    monkeypatch.setattr(segment_cache, "RACY_NS", -10**12)  # every file counts as settled since it was hashed
    opts = deploy.DeployOptions(dags_path=dags, deployment="d")
    deploy.run(FakeApi([view("ACTIVE", on=2)]), opts, lambda _: None)  # type: ignore[arg-type]
    [index] = (tmp_path / "cache" / "dagcast" / "bundles").glob("*.json")
    doc = json.loads(index.read_text())
    doc["files"]["b.sql"][0] = "0" * 64  # a record that no longer says what the file holds
    index.write_text(json.dumps(doc))
    (dags / "a.sql").write_text("select 10;\n")  # b.sql's segment is written again: b.sql is read
    said: list[str] = []
    result = deploy.run(FakeApi([view("ACTIVE", on=2)]), opts, said.append)  # type: ignore[arg-type]
    assert any("b.sql: not the file its recorded sha256 says; bundling again" in line for line in said), said
    expected = io.BytesIO()
    assert result.sha256 == bundler.build(dags, expected).sha256


def test_a_file_that_cannot_be_bundled_after_the_walk_is_a_rejection_naming_it(tmp_path: Path) -> None:
    dags = write(tmp_path / "dags", {"a.py": "X = 1\n", "b.py": "Y = 2\n"})
    found = bundler.collect(dags)
    (dags / "b.py").unlink()  # gone between the walk and the bundling
    with pytest.raises(BundleInvalid) as refused:
        bundler.build(dags, io.BytesIO(), found)
    [error] = refused.value.errors
    assert error["code"] == "bundle_error" and error["path"] == "b.py" and "cannot read file" in error["message"]
