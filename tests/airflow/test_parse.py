"""dagcast.parse against the real apache-airflow: its warm parser versus Airflow's own DagBag.

Airflow's reference answers come from a separate process (the approach of driver.py, with the
per-file fields these tests need): `BundleDagBag` on the folder, which is what Airflow's CLI and
DAG processor use (folder on sys.path, `[core] dag_discovery_safe_mode`, `.airflowignore`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagcast.parse import ParseError, Parser, ParseResult, airflow_importable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not airflow_importable(), reason="needs apache-airflow (the `airflow` extra)"),
]

MARK = "@@dagcast-test "
REPO = Path(__file__).resolve().parents[2]

DAGBAG = """
import json, sys
from pathlib import Path
from airflow.dag_processing.dagbag import BundleDagBag

folder = Path(sys.argv[1])
bag = BundleDagBag(dag_folder=folder, bundle_path=folder)
by_file = {}
for stat in bag.dagbag_stats:
    by_file.setdefault(stat.file, [])
for dag in bag.dags.values():
    by_file.setdefault(dag.relative_fileloc, []).append(dag.dag_id)
errors = {str(k): v.strip().splitlines()[-1] for k, v in bag.import_errors.items()}
print("@@dagcast-test " + json.dumps({"files": {k: sorted(v) for k, v in by_file.items()},
                                     "dag_ids": sorted(bag.dag_ids), "import_errors": errors}), flush=True)
"""

DAG_HEAD = ("from datetime import datetime\n\nfrom airflow.sdk import DAG\n"
            "from airflow.providers.standard.operators.empty import EmptyOperator\n")


def dag_text(dag_id: str, extra: str = "") -> str:
    return DAG_HEAD + extra + textwrap.dedent(f"""
        with DAG({dag_id}, start_date=datetime(2024, 1, 1), schedule=None, catchup=False):
            EmptyOperator(task_id="start") >> EmptyOperator(task_id="end")
        """)


def write(folder: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(textwrap.dedent(text) if not text.startswith("from datetime") else text)
    return folder


def airflow_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    home = tmp / "reference-home"
    home.mkdir(exist_ok=True)
    return {**env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}


def airflow_dagbag(folder: Path, tmp: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", DAGBAG, str(folder)], env=airflow_env(tmp), capture_output=True,
                          text=True, timeout=180)
    answers = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert answers, f"Airflow answered nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc: dict[str, Any] = json.loads(answers[-1])
    return doc


def errors_of(result: ParseResult) -> dict[str, str]:
    return {e.path: f"{e.type}: {e.message}" for e in result.import_errors}


@pytest.fixture(scope="module")
def parser() -> Iterator[Parser]:
    with Parser(workers=2, file_timeout=20) as p:
        p.start()
        yield p


MIXED = {
    "plain.py": dag_text('"plain"', extra='import os\nprint("chatter on stdout", flush=True)\nos.write(1, b"no newline")\n'),
    "missing.py": """\
        import pandas_not_installed
        from airflow.sdk import DAG
        """,
    "boom.py": """\
        import os
        from airflow.sdk import DAG

        raise ValueError("boom")
        """,
    "loop.py": DAG_HEAD + textwrap.dedent("""
        for i in range(3):
            with DAG(f"loop_{i}", start_date=datetime(2024, 1, 1), schedule=None):
                EmptyOperator(task_id="only")
        """),
    "dup_a.py": dag_text('"shared_id"'),
    "dup_b.py": dag_text('"shared_id"'),
    "common/__init__.py": "",
    "common/util.py": 'PREFIX = "helper"\n',
    "common/names.py": "from .util import PREFIX\n\n\ndef name(x):\n    return f'{PREFIX}_{x}'\n",
    "uses_helper.py": dag_text('f"{PREFIX}_direct"', extra="from common.util import PREFIX\n"),
    "uses_names.py": dag_text('name("transitive")', extra="from common.names import name\n"),
    "ignored/hidden.py": dag_text('"hidden"'),
    ".airflowignore": "ignored/\n",
}


def test_a_whole_parse_names_exactly_what_airflows_own_dagbag_finds(parser: Parser, tmp_path: Path) -> None:
    folder = write(tmp_path / "dags", MIXED)
    workers, parser.workers = parser.workers, 1  # one fork parses every file: results still per file
    try:
        result = parser.parse(folder)
    finally:
        parser.workers = workers
    parallel = parser.parse(folder)
    assert {k: v.model_copy(update={"seconds": 0}) for k, v in parallel.files.items()} == \
        {k: v.model_copy(update={"seconds": 0}) for k, v in result.files.items()}
    airflow = airflow_dagbag(folder, tmp_path)

    expected_files = {"plain.py", "missing.py", "boom.py", "loop.py", "dup_a.py", "dup_b.py", "uses_helper.py",
                      "uses_names.py"}  # not the helpers (safe mode: no "dag"/"airflow"), not ignored/
    assert set(result.files) == expected_files == set(airflow["files"])
    assert result.dag_ids == airflow["dag_ids"] == sorted(
        ["plain", "loop_0", "loop_1", "loop_2", "shared_id", "helper_direct", "helper_transitive"])
    assert result.parsed == len(expected_files) and result.reused == 0

    # Airflow's one DagBag turns the second definition of an id into an import error of that file;
    # parsed per file (as the DAG processor does), both files define it and it is a duplicate
    assert result.duplicates == {"shared_id": ["dup_a.py", "dup_b.py"]}
    airflow_errors = dict(airflow["import_errors"])
    loser = next(k for k, v in airflow_errors.items() if v.startswith("AirflowDagDuplicatedIdException"))
    assert loser in result.duplicates["shared_id"]
    del airflow_errors[loser]
    assert errors_of(result) == airflow_errors == {
        "missing.py": "ModuleNotFoundError: No module named 'pandas_not_installed'",
        "boom.py": "ValueError: boom",
    }
    for rel, ids in airflow["files"].items():
        if rel != loser:
            assert result.files[rel].dag_ids == ids, rel
    assert result.files["loop.py"].dag_ids == ["loop_0", "loop_1", "loop_2"]

    boom = result.files["boom.py"].error
    assert boom is not None and boom.line == 4 and boom.frames == ["boom.py:4 in <module>"]
    missing = result.files["missing.py"].error
    assert missing is not None and missing.line == 1 and missing.frames == ["missing.py:1 in <module>"]
    assert all(f.seconds > 0 for f in result.files.values())
    assert ParseResult.model_validate_json(result.model_dump_json()) == result  # JSON all the way


def test_changing_a_helper_module_parses_again_exactly_the_files_importing_it(parser: Parser, tmp_path: Path) -> None:
    folder = write(tmp_path / "dags", MIXED)
    first = parser.parse(folder)
    (folder / "common" / "util.py").write_text('PREFIX = "changed"\n')

    second = parser.parse(folder, previous=first, changed={"common/util.py"})

    # uses_helper imports it directly, uses_names through common.names (`from .util import PREFIX`)
    assert second.parsed_files == ["uses_helper.py", "uses_names.py"]
    assert (second.parsed, second.reused) == (2, len(first.files) - 2)
    assert second.files["uses_helper.py"].dag_ids == ["changed_direct"]
    assert second.files["uses_names.py"].dag_ids == ["changed_transitive"]
    for rel in set(first.files) - {"uses_helper.py", "uses_names.py"}:
        assert second.files[rel] is first.files[rel], rel
    assert second.duplicates == first.duplicates


def test_one_changed_dag_file_of_many_is_the_only_one_parsed_and_removed_files_disappear(
    parser: Parser, tmp_path: Path
) -> None:
    folder = write(tmp_path / "dags", {f"team_{i % 4}/gen_{i}.py": dag_text(f'"gen_{i}"') for i in range(40)})
    first = parser.parse(folder)
    assert len(first.files) == 40 and first.parsed == 40

    (folder / "team_3/gen_7.py").write_text(dag_text('"gen_7_renamed"'))
    changed = parser.parse(folder, previous=first, changed={"team_3/gen_7.py"})
    assert (changed.parsed, changed.reused, changed.parsed_files) == (1, 39, ["team_3/gen_7.py"])
    assert "gen_7_renamed" in changed.dag_ids and "gen_7" not in changed.dag_ids

    (folder / "team_1/gen_5.py").unlink()
    removed = parser.parse(folder, previous=changed, changed={"team_1/gen_5.py"})
    assert "team_1/gen_5.py" not in removed.files and "gen_5" not in removed.dag_ids
    assert (removed.parsed, removed.reused, len(removed.files)) == (0, 39, 39)

    (folder / "team_0/new.py").write_text(dag_text('"brand_new"'))  # added: parsed even if not named
    added = parser.parse(folder, previous=removed, changed=set())
    assert added.parsed_files == ["team_0/new.py"] and "brand_new" in added.dag_ids


def test_module_state_set_by_dag_files_in_one_parse_does_not_reach_the_next(parser: Parser, tmp_path: Path) -> None:
    folder = write(tmp_path / "dags", {
        "patcher.py": DAG_HEAD + textwrap.dedent("""
            import json, os, string
            json.dumps = lambda *a, **k: "patched"
            string.LEAKED = True
            os.environ["DAGCAST_LEAK"] = "leaked"
            with DAG("patcher", start_date=datetime(2024, 1, 1), schedule=None):
                EmptyOperator(task_id="t")
            """),
        "state_mod.py": "COUNT = 0\n",
        "counter.py": DAG_HEAD + textwrap.dedent("""
            import state_mod
            state_mod.COUNT += 1
            with DAG(f"count_{state_mod.COUNT}", start_date=datetime(2024, 1, 1), schedule=None):
                EmptyOperator(task_id="t")
            """),
    })
    first = parser.parse(folder)
    assert first.files["counter.py"].dag_ids == ["count_1"] and first.files["patcher.py"].dag_ids == ["patcher"]

    (folder / "reader.py").write_text(DAG_HEAD + textwrap.dedent("""
        import json, os, string
        seen = f"{json.dumps(1)}_{hasattr(string, 'LEAKED')}_{os.environ.get('DAGCAST_LEAK', 'clean')}"
        with DAG(f"reader_{seen}", start_date=datetime(2024, 1, 1), schedule=None):
            EmptyOperator(task_id="t")
        """))
    second = parser.parse(folder, previous=first, changed={"reader.py", "counter.py"})
    assert second.parsed_files == ["counter.py", "reader.py"]  # patcher.py is reused, not run again
    assert second.files["reader.py"].dag_ids == ["reader_1_False_clean"]
    assert second.files["counter.py"].dag_ids == ["count_1"]  # not count_2: the module is fresh
    # and none of it ran in this process
    assert json.dumps(1) == "1" and "DAGCAST_LEAK" not in os.environ


def test_within_a_parse_each_file_gets_the_folders_modules_afresh(parser: Parser, tmp_path: Path) -> None:
    counter = DAG_HEAD + textwrap.dedent("""
        import state_mod
        state_mod.COUNT += 1
        with DAG(f"{NAME}_{state_mod.COUNT}", start_date=datetime(2024, 1, 1), schedule=None):
            EmptyOperator(task_id="t")
        """)
    folder = write(tmp_path / "dags", {"state_mod.py": "COUNT = 0\n",
                                       **{f"counter_{n}.py": f"NAME = {n!r}\n" + counter for n in "abc"}})
    workers, parser.workers = parser.workers, 1  # one fork parses all three, one after the other
    try:
        result = parser.parse(folder)
    finally:
        parser.workers = workers
    assert result.dag_ids == ["a_1", "b_1", "c_1"]  # as in the DAG processor's process per file


def test_a_whole_parse_is_split_over_worker_forks(tmp_path: Path) -> None:
    nap = DAG_HEAD + "import time\ntime.sleep(0.8)\n"
    folder = write(tmp_path / "dags", {f"slow_{i}.py": nap + dag_text(f'"slow_{i}"')[len(DAG_HEAD):] for i in range(4)})
    with Parser(workers=4) as p:
        p.start()
        started = time.monotonic()
        parallel = p.parse(folder)
        parallel_seconds = time.monotonic() - started
        p.workers = 1
        started = time.monotonic()
        serial = p.parse(folder)
        serial_seconds = time.monotonic() - started
    assert parallel.files == {k: v.model_copy(update={"seconds": parallel.files[k].seconds})
                              for k, v in serial.files.items()}
    assert parallel.dag_ids == [f"slow_{i}" for i in range(4)]
    assert serial_seconds >= 3.2 and parallel_seconds < 2.4, (serial_seconds, parallel_seconds)


def test_a_file_that_sleeps_forever_hits_the_file_timeout_and_one_that_dodges_it_is_killed(tmp_path: Path) -> None:
    folder = write(tmp_path / "dags", {
        "sleeper.py": """\
            import time
            from airflow.sdk import DAG
            time.sleep(10**6)
            """,
        "stubborn.py": """\
            import signal, time
            from airflow.sdk import DAG
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            time.sleep(10**6)
            """,
        "plain.py": dag_text('"plain"'),
    })
    with Parser(workers=3, file_timeout=1, timeout=30) as p:
        p.start()
        started = time.monotonic()
        result = p.parse(folder)
        elapsed = time.monotonic() - started
    sleeper = result.files["sleeper.py"].error
    assert sleeper is not None and sleeper.type == "AirflowTaskTimeout" and "timeout" in sleeper.message.lower()
    assert sleeper.line == 3 and sleeper.frames[0] == "sleeper.py:3 in <module>"
    stubborn = result.files["stubborn.py"].error  # Airflow's SIGALRM ignored: killed at 1.5 x 1 s + 2 s
    assert stubborn is not None and stubborn.type == "ParseTimeout" and "killed" in stubborn.message
    assert result.files["plain.py"].dag_ids == ["plain"] and result.files["plain.py"].error is None
    assert elapsed < 10, elapsed


def test_the_whole_parse_deadline_is_a_parse_error_and_the_parser_carries_on(tmp_path: Path) -> None:
    folder = write(tmp_path / "dags", {"sleeper.py": "import time\nfrom airflow.sdk import DAG\ntime.sleep(10**6)\n"})
    good = write(tmp_path / "good", {"plain.py": dag_text('"plain"')})
    with Parser(workers=1, file_timeout=0, timeout=2) as p:  # 0: Airflow's per-file timeout off
        started = time.monotonic()
        with pytest.raises(ParseError, match=r"did not finish within 2s.*sleeper\.py"):
            p.parse(folder)
        assert time.monotonic() - started < 12
        pid = p.pid
        assert p.parse(good).dag_ids == ["plain"] and p.pid == pid  # the warm child survived


def test_a_worker_that_dies_costs_only_the_file_it_was_on(tmp_path: Path) -> None:
    deep = "def level(n):\n    if n == 0:\n        raise ValueError('x' * 5000)\n    level(n - 1)\n"
    folder = write(tmp_path / "dags", {
        "exits.py": "import os\nfrom airflow.sdk import DAG\nos._exit(3)\n",
        "segfault.py": "import ctypes\nfrom airflow.sdk import DAG\nctypes.string_at(0)\n",
        "deep.py": "from airflow.sdk import DAG\nfrom helpers.deep import level\nlevel(8)\n",
        "helpers/deep.py": deep,
        **{f"ok_{i}.py": dag_text(f'"ok_{i}"') for i in range(5)},
    })
    with Parser(workers=1) as p:
        result = p.parse(folder)
    exits, segfault = result.files["exits.py"].error, result.files["segfault.py"].error
    assert exits is not None and exits.type == "ParseProcessDied" and "status 3" in exits.message
    assert segfault is not None and segfault.type == "ParseProcessDied" and "SIGSEGV" in segfault.message
    assert result.dag_ids == [f"ok_{i}" for i in range(5)]
    error = result.files["deep.py"].error
    assert error is not None and error.type == "ValueError" and len(error.message) == 2000
    assert error.line == 3 and len(error.frames) == 5
    assert all(f.startswith("helpers/deep.py:") for f in error.frames)  # relative to the folder


def test_killing_the_warm_child_restarts_it_at_the_next_parse(tmp_path: Path) -> None:
    folder = write(tmp_path / "dags", {"plain.py": dag_text('"plain"')})
    with Parser(workers=1) as p:
        assert p.parse(folder).dag_ids == ["plain"]
        first = p.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert p.parse(folder).dag_ids == ["plain"]
        assert p.pid not in (None, first) and p.starts == 2


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_the_warm_child_and_its_forks_die_with_the_parent_even_mid_parse(tmp_path: Path) -> None:
    # killed mid-parse: the warm child is not reading its stdin, so only the death signal stops it
    folder = write(tmp_path / "dags", {"sleeper.py": f"""\
        import os, time
        from airflow.sdk import DAG
        open({str(tmp_path / "worker.pid")!r}, "w").write(str(os.getpid()))
        time.sleep(10**6)
        """})
    script = ("import sys\nfrom pathlib import Path\nfrom dagcast.parse import Parser\n"
              "p = Parser(file_timeout=0)\np.start()\nprint(p.pid, flush=True)\np.parse(Path(sys.argv[1]))\n")
    owner = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert owner.stdout is not None
        warm = int(owner.stdout.readline())
        deadline = time.monotonic() + 30
        while not (tmp_path / "worker.pid").is_file() or not (tmp_path / "worker.pid").read_text():
            assert time.monotonic() < deadline and owner.poll() is None, "the worker never started the file"
            time.sleep(0.05)
        worker = int((tmp_path / "worker.pid").read_text())
        assert not _gone(warm) and not _gone(worker)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    try:
        while not (_gone(warm) and _gone(worker)):
            assert time.monotonic() < deadline, f"warm child {warm} / worker {worker} outlived their parent"
            time.sleep(0.05)
    finally:
        for pid in (worker, warm):  # if they did outlive it: no orphans left behind by a failure
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_importing_dagcast_parse_does_not_import_airflow() -> None:
    code = "import sys, dagcast.parse as p\nassert p.airflow_importable()\nassert 'airflow' not in sys.modules, 'imported'\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_an_airflow_that_fails_to_import_is_a_parse_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "airflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('broken airflow install')\n")
    with Parser(env={"PYTHONPATH": str(fake.parent)}) as p, pytest.raises(ParseError, match="broken airflow install"):
        p.parse(tmp_path)


def test_for_immutable_version_folders_the_listing_remembers_unchanged_files_and_only_those(tmp_path: Path) -> None:
    """A sidecar's parser (`immutable=True`) remembers Airflow's safe-mode answer per file identity: a
    version folder of hard links to the last one lists exactly what a fresh listing does, and a file
    whose words changed (a new file, as in every new version) is read again. Any other parser never
    remembers: a file rewritten in place with its size and mtime kept is seen as it is now."""
    first = tmp_path / "v1"
    first.mkdir()
    (first / "a.py").write_text(dag_text('"a"'))
    (first / "b.py").write_text(dag_text('"b"'))
    (first / "plain.py").write_text("X = 1\n")
    second = tmp_path / "v2"
    second.mkdir()
    for name in ("a.py", "plain.py"):
        os.link(first / name, second / name)  # unchanged: the same file
    (second / "b.py").write_text("X = 2  # no longer a DAG file: it mentions neither word\n")
    (second / "c.py").write_text(dag_text('"c"'))
    with Parser(workers=1, immutable=True) as p:
        assert sorted(p.parse(first).files) == ["a.py", "b.py"]
        assert sorted(p.parse(second).files) == ["a.py", "c.py"]

    edited = tmp_path / "edited"
    edited.mkdir()
    path = edited / "d.py"
    path.write_text(dag_text('"d"'))
    with Parser(workers=1) as p:
        assert sorted(p.parse(edited).files) == ["d.py"]
        before = path.stat()
        path.write_text("#" * before.st_size)  # same size, no DAG words
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert sorted(p.parse(edited).files) == [], "a folder that is not immutable is listed as it is now"


def test_a_parser_with_nice_parses_many_files_at_a_lower_cpu_priority_and_a_small_change_at_its_callers(
    tmp_path: Path,
) -> None:
    """The sidecar's parse check (`nice=10`) never competes with the Airflow component beside it on a
    parse of many files; an everyday change of a file or two (which `deploy --wait` waits on) is parsed
    at the caller's priority. Each DAG file writes down the priority of the process that imports it."""
    from dagcast.parse import NICE_FROM_FILES

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    seen = tmp_path / "seen"
    seen.mkdir()

    def recording(name: str, rev: int = 0) -> str:
        return dag_text(repr(name), extra=(
            "import os\n"
            f"open({str(seen / name)!r}, 'w').write(str(os.getpriority(os.PRIO_PROCESS, 0)))\n# {rev}\n"))

    many = write(tmp_path / "many", {f"d{i}.py": recording(f"d{i}") for i in range(NICE_FROM_FILES)})
    with Parser(workers=2, nice=5) as p:
        first = p.parse(many)
        assert len(first.dag_ids) == NICE_FROM_FILES
        assert {(seen / f"d{i}").read_text() for i in range(NICE_FROM_FILES)} == {str(min(19, mine + 5))}
        assert p.pid is not None and os.getpriority(os.PRIO_PROCESS, p.pid) == mine, "the warm child keeps it"
        (many / "d0.py").write_text(recording("d0", rev=1))
        again = p.parse(many, previous=first, changed={"d0.py"})
        assert again.parsed_files == ["d0.py"]
        assert (seen / "d0").read_text() == str(mine), "a small change is parsed at the caller's priority"
    with Parser(workers=2) as p:
        p.parse(many)
        assert {(seen / f"d{i}").read_text() for i in range(NICE_FROM_FILES)} == {str(mine)}
