"""What Airflow made of a deploy, reported back: the sidecars of `dagcast local up` load each version
with Airflow's own loader (the test venv has Airflow), and `dagcast deploy --wait` says so, with exit
5 on new import errors; `gate` holds such a version back until a fixed one comes."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import Api, dag_source, deploy_waiting, parse_json_stdout, run_dagcast, version_of_link, write_dags
from stack import local_stack

pytestmark = pytest.mark.integration

MISSING = "from airflow import DAG\nimport pandas_not_installed  # not in this image\n"
BOOM = "from airflow import DAG\nraise ValueError('boom at import')\n"
LOOP = ("from datetime import datetime\nfrom airflow import DAG\n\n"
        "for team in ('red', 'blue', 'green'):\n"
        "    with DAG(f'loop_{team}', start_date=datetime(2024, 1, 1), schedule=None):\n        pass\n")


deploy = deploy_waiting


@pytest.fixture(scope="module")
def parsing_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with local_stack(tmp_path_factory.mktemp("parse") / "state", sidecars=2) as info:
        yield info


def test_report_mode_names_exactly_the_files_airflow_could_not_load_and_exits_5(
    parsing_stack: dict[str, Any], tmp_path: Path
) -> None:
    info = parsing_stack
    good = write_dags(tmp_path / "v1", {"etl.py": dag_source("etl"), "shared.py": dag_source("shared_id")})
    code, doc, _ = deploy(info, good)
    assert code == 0, doc
    parse = doc["parse"]
    assert parse["status"] == "parsed" and parse["files"] == 2 and parse["dags"] == 2 and parse["import_errors"] == []
    assert sorted(parse["pending"]) == [] and parse["held"] == []

    broken = write_dags(tmp_path / "v2", {
        "etl.py": dag_source("etl"), "shared.py": dag_source("shared_id"), "missing.py": MISSING, "boom.py": BOOM,
        "loop.py": LOOP, "again.py": dag_source("shared_id"),
    })
    code, doc, stderr = deploy(info, broken)
    assert code == 5, stderr
    assert doc["error"]["code"] == "import_errors" and doc["state"] == "ACTIVE" and doc["converged"]
    parse = doc["parse"]
    errors = {e["path"]: e for e in parse["import_errors"]}
    assert set(errors) == {"missing.py", "boom.py"}
    assert errors["missing.py"]["type"] == "ModuleNotFoundError" and "pandas_not_installed" in errors["missing.py"]["message"]
    assert errors["missing.py"]["line"] == 2 and errors["boom.py"]["type"] == "ValueError"
    sidecars = sorted(s["name"] for s in info["sidecars"])
    assert all(sorted(e["sidecars"]) == sidecars and e["new"] for e in errors.values()), "each sidecar saw each"
    assert parse["new_import_errors"] == 2
    assert parse["duplicates"] == [{"dag_id": "shared_id", "paths": ["again.py", "shared.py"]}]
    assert parse["dags"] == 5, "etl, shared_id and the three DAGs the loop builds"
    assert sorted(parse["dags_added"]) == ["loop_blue", "loop_green", "loop_red"]
    assert "missing.py: ModuleNotFoundError" in stderr and "live with 2 new import errors" in stderr

    # the same errors again are not new: exit 0; and --allow-import-errors accepts new ones
    (broken / "etl.py").write_text(dag_source("etl", "# touched\n"))
    code, doc, _ = deploy(info, broken)
    assert code == 0 and doc["parse"]["new_import_errors"] == 0 and len(doc["parse"]["import_errors"]) == 2
    (broken / "worse.py").write_text(MISSING)
    code, doc, _ = deploy(info, broken, "--allow-import-errors")
    assert code == 0 and doc["parse"]["new_import_errors"] == 1


def test_gate_holds_back_a_version_with_new_import_errors_and_installs_the_fixed_one(
    parsing_stack: dict[str, Any], tmp_path: Path
) -> None:
    info = parsing_stack
    api = Api(info)
    dep = info["deployment"]
    clean = write_dags(tmp_path / "clean", {"etl.py": dag_source("etl"), "report.py": dag_source("report")})
    code, doc, _ = deploy(info, clean)
    assert code == 0
    live = doc["version"]
    api.json("PATCH", f"/deployments/{dep}", {"parse_mode": "gate"})
    try:
        held = write_dags(tmp_path / "held", {"etl.py": dag_source("etl"), "report.py": MISSING})
        code, doc, stderr = deploy(info, held)
        assert code == 5 and "held: 1 new import errors" in stderr, stderr
        assert sorted(doc["parse"]["held"]) == sorted(s["name"] for s in info["sidecars"]) and not doc["converged"]
        assert [e["path"] for e in doc["parse"]["import_errors"]] == ["report.py"]
        for s in info["sidecars"]:
            assert version_of_link(s["dags_path"]) == live, "the gate kept the version Airflow could load"
        assert {s["version"] for s in api.json("GET", f"/deployments/{dep}/sidecars")["items"]} == {live}

        shutil.rmtree(held)
        fixed = write_dags(tmp_path / "fixed", {"etl.py": dag_source("etl"), "report.py": dag_source("report", "# fixed\n")})
        code, doc, _ = deploy(info, fixed)
        assert code == 0 and doc["converged"] and doc["parse"]["held"] == [] and doc["parse"]["import_errors"] == []
        for s in info["sidecars"]:
            assert version_of_link(s["dags_path"]) == doc["version"]
    finally:
        api.json("PATCH", f"/deployments/{dep}", {"parse_mode": "report"})


def test_validate_and_deploy_parse_here_before_anything_is_uploaded(parsing_stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("here_ok"), "missing.py": MISSING})
    proc = run_dagcast(["validate", "--parse", "--json", str(dags)])
    doc = parse_json_stdout(proc)
    assert proc.returncode == 1 and not doc["valid"]
    assert [(e["code"], e["path"], e["line"]) for e in doc["errors"]] == [("import_error", "missing.py", 2)]
    assert doc["parse"]["files"] == 2 and doc["parse"]["dags"] == 1
    before = Api(parsing_stack).json("GET", f"/deployments/{parsing_stack['deployment']}")["last_version"]
    code, doc, stderr = deploy(parsing_stack, dags, "--parse")
    assert code == 3 and doc["state"] == "INVALID" and doc["errors"][0]["path"] == "missing.py", stderr
    assert Api(parsing_stack).json("GET", f"/deployments/{parsing_stack['deployment']}")["last_version"] == before


def test_sidecars_without_a_parser_say_so_and_change_nothing(tmp_path: Path) -> None:
    with local_stack(tmp_path / "state", sidecars=1, extra=["--parse", "off"]) as info:
        dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("plain"), "missing.py": MISSING})
        code, doc, stderr = deploy(info, dags)
        assert code == 0 and doc["converged"], stderr
        assert doc["parse"]["status"] == "unavailable" and doc["parse"]["unavailable"] == ["sidecar-1"]
        assert "parse: not available" in stderr
