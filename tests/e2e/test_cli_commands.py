"""Everything the API does, from the command line: deployments, tokens, sidecars, rollback by version,
deploy history and the live deploy, in tables with a header row or as JSON (--json / --output json)."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DAGCAST, Api, dag_source, deploy_waiting, parse_json_stdout, run_dagcast, stack_env, write_dags
from stack import local_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cli_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with local_stack(tmp_path_factory.mktemp("cli") / "state", sidecars=1, extra=["--parse", "off"]) as info:
        yield info


def cli(info: dict[str, Any], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    proc = run_dagcast(list(args), stack_env(info, **env))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "\x1b[" not in proc.stdout, "no colours when stdout is not a terminal"
    return proc


def json_of(info: dict[str, Any], *args: str) -> dict[str, Any]:
    proc = cli(info, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["ok"] is True and doc["exit_code"] == 0
    return doc


def test_deployments_are_listed_and_created(cli_stack: dict[str, Any]) -> None:
    info = cli_stack
    created = json_of(info, "deployments", "create", "analytics")
    assert created["name"] == "analytics" and created["mechanism"] == "DAG_ONLY"
    table = cli(info, "deployments", "list")
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["DEPLOYMENT", "DAG"]
    assert {r.split()[0] for r in rows} >= {"demo", "analytics"}
    assert {d["name"] for d in json_of(info, "deployments", "list")["items"]} >= {"demo", "analytics"}
    again = cli(info, "deployments", "create", "analytics", "--json")
    assert again.returncode == 1 and parse_json_stdout(again)["error"]["code"] == "conflict"


def test_tokens_are_created_once_listed_without_secrets_and_revoked(cli_stack: dict[str, Any]) -> None:
    info = cli_stack
    proc = cli(info, "tokens", "create", "ci-reader", "--role", "viewer", "--scope", "demo")
    assert proc.returncode == 0, proc.stderr
    secret = proc.stdout.strip()
    assert secret.startswith("dgc_") and "shown once" in proc.stderr
    assert Api(info, token=secret).call("GET", "/deployments/demo").status_code == 200
    listed = json_of(info, "tokens", "list")["items"]
    mine = next(t for t in listed if t["name"] == "ci-reader")
    assert mine["role"] == "viewer" and mine["deployments"] == ["demo"] and secret not in str(listed)
    table = cli(info, "tokens", "list").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "ROLE", "DEPLOYMENTS"] and "ci-reader" in table
    assert json_of(info, "tokens", "revoke", "ci-reader")["revoked"] is True
    assert Api(info, token=secret).call("GET", "/deployments/demo").status_code == 401
    denied = run_dagcast(["tokens", "list", "--json"], stack_env(info, DAGCAST_TOKEN=secret))
    assert denied.returncode == 1 and parse_json_stdout(denied)["error"]["code"] == "unauthorized"


def test_sidecars_are_listed_with_their_version_and_state(cli_stack: dict[str, Any], tmp_path: Path) -> None:
    info = cli_stack
    code, doc, _ = deploy_waiting(info, write_dags(tmp_path / "d", {"etl.py": dag_source("etl")}))
    assert code == 0
    [s] = json_of(info, "sidecars", "list")["items"]
    assert s["name"] == "sidecar-1" and s["live"] and s["version"] == doc["version"]
    out = cli(info, "sidecars", "list").stdout.splitlines()
    assert out[0].split()[:4] == ["SIDECAR", "COMPONENT", "VERSION", "STATE"]
    assert out[1].split()[0] == "sidecar-1" and f"v{doc['version']}" in out[1] and "live" in out[1]


def test_rollback_takes_a_version_waits_and_leaves_a_live_version_alone(cli_stack: dict[str, Any], tmp_path: Path) -> None:
    info = cli_stack
    code, one, _ = deploy_waiting(info, write_dags(tmp_path / "one", {"etl.py": dag_source("etl", "# one\n")}))
    assert code == 0
    code, two, _ = deploy_waiting(info, write_dags(tmp_path / "two", {"etl.py": dag_source("etl", "# two\n")}))
    assert code == 0
    back = json_of(info, "rollback", f"v{one['version']}", "--yes", "--wait")
    assert back["state"] == "ACTIVE" and back["version"] == two["version"] + 1 and back["converged"]
    assert back["sha256"] == one["sha256"]
    link = Path(info["sidecars"][0]["dags_path"])
    assert (link / "etl.py").read_text() == dag_source("etl", "# one\n")

    same = json_of(info, "rollback", str(one["version"]), "--yes")
    assert same["state"] == "UNCHANGED" and same["version"] == back["version"], "its bundle is the live one"
    proc = cli(info, "rollback", str(back["version"]))
    assert proc.returncode == 0 and "already live" in proc.stdout
    by_id = json_of(info, "rollback", two["deploy_id"], "--yes", "--wait")
    assert by_id["sha256"] == two["sha256"] and by_id["converged"]
    bad = cli(info, "rollback", "vx", "--json")
    assert bad.returncode == 2 and "is not a version" in parse_json_stdout(bad)["error"]["message"]


def test_deploy_history_has_a_header_and_says_why_rejected_and_show_defaults_to_the_live_deploy(
    cli_stack: dict[str, Any], tmp_path: Path
) -> None:
    info = cli_stack
    code, live, _ = deploy_waiting(info, write_dags(tmp_path / "ok", {"etl.py": dag_source("etl", "# live\n")}))
    assert code == 0
    code, rejected, _ = deploy_waiting(info, write_dags(tmp_path / "bad", {"broken.py": "def f(:\n"}), "--skip-validation")
    assert code == 3
    table = cli(info, "deploys", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["DEPLOY", "VERSION", "STATE"]
    row = next(r for r in table if r.startswith(rejected["deploy_id"]))
    assert "REJECTED" in row and "broken.py:1:" in row
    shown = json_of(info, "deploys", "show")
    assert shown["deploy"]["deploy_id"] == live["deploy_id"] and shown["deploy"]["state"] == "ACTIVE"
    assert json_of(info, "deploys", "show", rejected["deploy_id"])["deploy"]["state"] == "REJECTED"
    text = cli(info, "deploys", "show").stdout
    assert text.startswith(f"deploy {live['deploy_id']}: ACTIVE v{live['version']}")
    as_output = cli(info, "deploys", "list", "--output", "json")
    assert parse_json_stdout(as_output)["items"][0]["deploy_id"] == rejected["deploy_id"]


def test_shell_completion_completes_commands(cli_stack: dict[str, Any]) -> None:
    script = cli(cli_stack, "completion", "bash")
    assert script.returncode == 0 and "_DAGCAST_COMPLETE" in script.stdout
    env = {**os.environ, "_DAGCAST_COMPLETE": "bash_complete", "COMP_WORDS": "dagcast tok", "COMP_CWORD": "1"}
    out = subprocess.run(DAGCAST, env=env, capture_output=True, text=True, timeout=60)
    assert "tokens" in out.stdout, out.stderr


def test_init_takes_the_api_url_from_the_environment_and_login_reads_a_pipe(cli_stack: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    info = cli_stack
    help_text = run_dagcast(["init", "--help"]).stdout
    assert "[required]" not in help_text
    env = {k: v for k, v in stack_env(info).items() if k != "DAGCAST_TOKEN"}
    init = subprocess.run([*DAGCAST, "init"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    login = subprocess.run([*DAGCAST, "login"], env=env, cwd=tmp_path, input=info["token"] + "\n",
                           capture_output=True, text=True, timeout=60)
    assert login.returncode == 0, login.stderr
    assert "Warning" not in login.stderr and "token verified" in login.stdout
    assert info["token"] in (tmp_path / ".dagcast" / "credentials.toml").read_text()
    missing = subprocess.run([*DAGCAST, "init"], env={k: v for k, v in env.items() if k != "DAGCAST_API_URL"},
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--api-url" in missing.stderr
