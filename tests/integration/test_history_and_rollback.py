"""Deploy history, rollback and deployment settings through the real `dagcast` commands."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from helpers import Api, dag_source, files_of, parse_json_stdout, run_dagcast, stack_env, version_of_link, write_dags


def deploy(info: dict[str, Any], dags: Path, *args: str) -> dict[str, Any]:
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", *args], stack_env(info))
    assert proc.returncode == 0, proc.stderr
    return parse_json_stdout(proc)


def wait_sidecars_on(info: dict[str, Any], version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(version_of_link(s["dags_path"]) != version for s in info["sidecars"]):
        assert time.monotonic() < deadline, f"sidecars not on v{version}"
        time.sleep(0.1)


def test_rollback_serves_an_earlier_bundle_as_a_new_version_on_every_sidecar(stack: dict[str, Any], tmp_path: Path) -> None:
    old = write_dags(tmp_path / "old", {"etl.py": dag_source("etl_v1"), "legacy.py": dag_source("legacy")})
    first = deploy(stack, old)
    new = write_dags(tmp_path / "new", {"etl.py": dag_source("etl_v2"), "fresh.py": dag_source("fresh")})
    second = deploy(stack, new)
    proc = run_dagcast(["rollback", first["deploy_id"], "--json"], stack_env(stack))
    assert proc.returncode == 0, proc.stderr
    back = parse_json_stdout(proc)
    assert back["state"] == "ACTIVE"
    assert back["version"] == second["version"] + 1
    assert back["rollback_of"] == first["deploy_id"]
    assert back["sha256"] == first["sha256"]
    assert back["diff"]["dags_added"] == ["etl_v1", "legacy"] and back["diff"]["dags_removed"] == ["etl_v2", "fresh"]
    wait_sidecars_on(stack, back["version"])
    for s in stack["sidecars"]:
        assert files_of(Path(s["dags_path"]).resolve()) == files_of(old)

    api = Api(stack)
    superseded = api.json("GET", f"/deployments/{stack['deployment']}/deploys/{second['deploy_id']}")["deploy"]
    assert superseded["state"] == "SUPERSEDED"
    history = run_dagcast(["deploys", "list", "--limit", "3"], stack_env(stack))
    header, *lines = history.stdout.splitlines()
    assert header.split()[:3] == ["DEPLOY", "VERSION", "STATE"]
    assert lines[0].startswith(back["deploy_id"]) and "ACTIVE" in lines[0] and "rollback to" in lines[0]
    assert lines[1].startswith(second["deploy_id"]) and "SUPERSEDED" in lines[1]


def test_rollback_of_a_rejected_deploy_is_refused(stack: dict[str, Any], tmp_path: Path) -> None:
    broken = write_dags(tmp_path / "dags", {"bad.py": "def f(:\n"})
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(broken), "--wait", "--json", "--skip-validation"],
                       stack_env(stack))
    assert proc.returncode == 3
    rejected = parse_json_stdout(proc)["deploy_id"]
    refused = run_dagcast(["rollback", rejected], stack_env(stack))
    assert refused.returncode == 1
    assert "only a deploy that went live can be rolled back to" in refused.stderr and "Traceback" not in refused.stderr


def test_deploys_show_prints_errors_like_a_compiler_and_the_sidecars(stack: dict[str, Any], tmp_path: Path) -> None:
    broken = write_dags(tmp_path / "dags", {"ok.py": "x = 1\n", "etl.py": "x = (\n"})
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(broken), "--wait", "--json", "--skip-validation"],
                       stack_env(stack))
    deploy_id = parse_json_stdout(proc)["deploy_id"]
    shown = run_dagcast(["deploys", "show", deploy_id], stack_env(stack))
    assert shown.returncode == 0
    assert f"deploy {deploy_id}: REJECTED" in shown.stdout
    assert "dags/etl.py:1: syntax_error:" in shown.stderr
    rows = shown.stdout.splitlines()
    header = next(i for i, line in enumerate(rows) if line.startswith("SIDECAR"))
    assert any(r.split()[0] == "sidecar-1" and "live" in r for r in rows[header + 1:]), shown.stdout


def test_a_viewer_cannot_roll_back_or_change_settings(stack: dict[str, Any]) -> None:
    api = Api(stack)
    viewer = api.json("POST", "/tokens", {"name": "viewer-rb", "role": "viewer", "deployments": [stack["deployment"]]})
    env = stack_env(stack, DAGCAST_TOKEN=viewer["token"])
    update = run_dagcast(["deployment", "update", "--dag-deploy", "disabled"], env)
    assert update.returncode == 1 and "HTTP 403" in update.stderr
    shown = run_dagcast(["deployment", "show", "--json"], env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["mechanism"] == "DAG_ONLY"


def test_switching_the_mechanism_keeps_the_dags_sidecars_serve(stack: dict[str, Any], tmp_path: Path) -> None:
    api = Api(stack)
    api.json("POST", "/deployments", {"name": "switcher", "mechanism": "DAG_ONLY"})
    env = stack_env(stack, DAGCAST_DEPLOYMENT="switcher")
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("a")})
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--no-wait", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    deploy_id = parse_json_stdout(proc)["deploy_id"]
    deadline = time.monotonic() + 30
    while api.json("GET", f"/deployments/switcher/deploys/{deploy_id}")["deploy"]["state"] != "ACTIVE":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert run_dagcast(["deployment", "update", "--dag-deploy", "disabled"], env).returncode == 0
    after = api.json("GET", "/deployments/switcher")
    assert after["mechanism"] == "IMAGE" and after["current_version"] == 1
    assert api.json("GET", "/deployments/switcher/versions/current")["version"]["deploy_id"] == deploy_id
    (dags / "b.py").write_text(dag_source("b"))
    refused = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--no-wait"], env)
    assert refused.returncode == 1 and "dagcast deployment update --deployment switcher --dag-deploy enabled" in refused.stderr
