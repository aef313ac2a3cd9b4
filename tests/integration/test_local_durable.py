"""`dagcast local up` as a durable single-machine server: restarts keep everything, children are
supervised and die with it, and it can be driven by scripts (status, down, env)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import DAGCAST, Api, dag_source, files_of, parse_json_stdout, run_dagcast, stack_env, until, version_of_link, write_dags
from stack import local_stack

pytestmark = pytest.mark.integration
LOSS_BOUND_SECONDS = 2.0  # documented: after a kill -9, at most this much of the latest changes is lost


def deployed(info: dict[str, Any], dags: Path) -> dict[str, Any]:
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", "--allow-dag-removal"],
                       stack_env(info))
    assert proc.returncode == 0, proc.stderr
    return parse_json_stdout(proc)


def processes_of(state: Path) -> list[int]:
    """Processes whose command line names the state folder: the stack and all of its children."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(state).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def snapshot(info: dict[str, Any]) -> dict[str, Any]:
    """What the stack holds, as the API shows it."""
    api, d = Api(info), info["deployment"]
    sidecars = api.json("GET", f"/deployments/{d}/sidecars")["items"]
    return {
        "deployment": {k: v for k, v in api.json("GET", f"/deployments/{d}").items()},
        "history": [(x["deploy_id"], x["version"], x["state"]) for x in api.json("GET", f"/deployments/{d}/deploys")["items"]],
        "tokens": sorted(t["name"] for t in api.json("GET", "/tokens")["items"]),
        "sidecars": sorted((s["name"], s["version"], s["sha256"]) for s in sidecars),
        "versions": [api.json("GET", f"/deployments/{d}/versions/{v}")["version"]["sha256"]
                     for v in range(1, api.json("GET", f"/deployments/{d}")["current_version"] + 1)],
    }


def test_a_restart_on_the_same_state_folder_keeps_everything_and_carries_on(tmp_path: Path) -> None:
    state = tmp_path / "state"
    project = tmp_path / "project"
    project.mkdir()
    with local_stack(state) as first:
        for i in range(3):
            deployed(first, write_dags(tmp_path / f"v{i}", {"etl.py": dag_source(f"durable_{i}")}))
        admin = Api(first)
        admin.json("POST", "/tokens", {"name": "ci-deployer", "role": "deployer", "deployments": [first["deployment"]]})
        admin.json("PATCH", f"/deployments/{first['deployment']}", {"keep_versions": 7})
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAGCAST_")}
        init = subprocess.run([*DAGCAST, "init", "--api-url", first["api_url"], "--deployment", first["deployment"]],
                              cwd=project, env=env, capture_output=True, text=True)
        login = subprocess.run([*DAGCAST, "login"], cwd=project, env=env, input=first["token"] + "\n",
                               capture_output=True, text=True)
        assert init.returncode == 0 and login.returncode == 0, login.stderr
        before = snapshot(first)
    log = (state / "local-up.log").read_text()
    assert "dagcast local stack stopped in" in log and "its state is kept" in log, "a final line"
    assert stat.S_IMODE((state / "local.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "signing-key.pem").stat().st_mode) == 0o600

    with local_stack(state) as second:
        assert (second["api_url"], second["token"]) == (first["api_url"], first["token"]), "same port, same tokens"
        until(lambda: all(s["live"] for s in Api(second).json("GET", f"/deployments/{second['deployment']}/sidecars")["items"]),
              what="the sidecars back")
        after = snapshot(second)
        assert after == before
        assert after["deployment"]["current_version"] == 3 and after["deployment"]["keep_versions"] == 7
        for s in second["sidecars"]:
            assert version_of_link(s["dags_path"]) == 3
        fourth = write_dags(tmp_path / "v3", {"etl.py": dag_source("after_the_restart")})
        listed = subprocess.run([*DAGCAST, "deploy", "--dags", "--dags-path", str(fourth), "--wait", "--json",
                                 "--allow-dag-removal"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr  # the project files from before still point at the stack
        doc = parse_json_stdout(listed)
        assert doc["version"] == 4 and doc["converged"]
        assert sorted(s["name"] for s in doc["sidecars"]) == sorted(s["name"] for s in second["sidecars"])
        assert all(files_of(Path(s["dags_path"]).resolve()) == files_of(fourth) for s in second["sidecars"])


def test_after_a_kill_9_no_process_is_left_and_flushed_changes_survive(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen([*DAGCAST, "local", "up", "--state-dir", str(state), "--sidecars", "2"],
                            stdout=(tmp_path / "up.log").open("w"), stderr=subprocess.STDOUT)
    try:
        until(lambda: (state / "local.json").exists(), timeout=120, what="the stack up")
        info = json.loads((state / "local.json").read_text())
        for i in range(3):
            deployed(info, write_dags(tmp_path / f"v{i}", {"etl.py": dag_source(f"before_the_kill_{i}")}))
        changed_at = time.time()
        Api(info).json("PATCH", f"/deployments/{info['deployment']}", {"retention_days": 9})
        state_url = info["aws_endpoint_url"] + "/_dagcast/state"
        until(lambda: httpx.get(state_url).json()["flushed_at"] > changed_at, timeout=LOSS_BOUND_SECONDS,
              what="the change written to disk within the documented bound")
        before = snapshot(info)
        assert len(processes_of(state)) == 4, "local up, moto server and two sidecars"
    finally:
        proc.kill()
        proc.wait()
    until(lambda: not processes_of(state), timeout=15, what="every child of the killed stack gone")
    with local_stack(state) as again:
        assert (again["api_url"], again["token"]) == (info["api_url"], info["token"])
        until(lambda: all(s["live"] for s in Api(again).json("GET", f"/deployments/{again['deployment']}/sidecars")["items"]),
              what="the sidecars back")
        assert snapshot(again) == before and before["deployment"]["retention_days"] == 9
        dags = write_dags(tmp_path / "v4", {"etl.py": dag_source("after_the_kill")})
        doc = deployed(again, dags)
        assert doc["version"] == 4 and doc["converged"]
        assert sorted(s["name"] for s in doc["sidecars"]) == sorted(s["name"] for s in info["sidecars"])


def test_a_moto_server_killed_under_a_running_stack_is_started_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with local_stack(state) as info:
        deployed(info, write_dags(tmp_path / "v1", {"etl.py": dag_source("before_moto_died")}))
        [moto] = [p for p in processes_of(state) if b"dagcast.moto_server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(moto, signal.SIGKILL)
        until(lambda: "moto server is running again" in (state / "local-up.log").read_text(), what="moto restarted")
        dags = write_dags(tmp_path / "v2", {"etl.py": dag_source("after_moto_died")})
        doc = deployed(info, dags)
        assert doc["version"] == 2 and all(files_of(Path(s["dags_path"]).resolve()) == files_of(dags) for s in info["sidecars"])
        log = (state / "local-up.log").read_text()
        # one line when it went per queue consumer (two ingest workers, one webhooks worker), not one per poll
        assert log.count("does not answer") <= 3, log
        assert "Traceback" not in log


def test_status_env_and_down_drive_the_stack_of_a_state_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    down = run_dagcast(["local", "status", "--state-dir", str(state), "--json"])
    assert down.returncode == 2 and "no embedded stack" in parse_json_stdout(down)["error"]["message"]
    with local_stack(state, sidecars=1) as info:
        status = run_dagcast(["local", "status", "--state-dir", str(state), "--json"])
        doc = parse_json_stdout(status)
        assert status.returncode == 0 and doc["up"] and doc["api_url"] == info["api_url"]
        assert [s["name"] for s in doc["sidecars"]] == ["sidecar-1"]
        env = run_dagcast(["local", "env", "--state-dir", str(state)]).stdout
        assert f"export DAGCAST_API_URL={info['api_url']}" in env and f"export DAGCAST_TOKEN={info['token']}" in env
        shell = subprocess.run(["bash", "-c", f'eval "$({" ".join(DAGCAST)} local env --state-dir {state})"; '
                                f'{" ".join(DAGCAST)} deployment show --json'], capture_output=True, text=True)
        assert json.loads(shell.stdout)["name"] == info["deployment"]
        again = subprocess.run([*DAGCAST, "local", "up", "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "another `dagcast local up` runs on" in again.stderr
        stopped = run_dagcast(["local", "down", "--state-dir", str(state)])
        assert stopped.returncode == 0 and "stopped the stack" in stopped.stdout
        assert not processes_of(state)
    after = run_dagcast(["local", "status", "--state-dir", str(state)])
    assert after.returncode == 1 and "down: no stack runs on" in after.stdout
    assert run_dagcast(["local", "down", "--state-dir", str(state)]).returncode == 0


def test_a_sidecar_stops_at_once_on_sigterm_even_in_a_long_poll_and_deregisters(stack: dict[str, Any], tmp_path: Path) -> None:
    env = stack_env(stack, AWS_ENDPOINT_URL=stack["aws_endpoint_url"], AWS_ACCESS_KEY_ID="testing",
                    AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    log = tmp_path / "sidecar.log"
    proc = subprocess.Popen([*DAGCAST, "sidecar", "--name", "quick-exit", "--root", str(tmp_path / "root"), "--link",
                             str(tmp_path / "dags"), "--metrics-addr", ""], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    listed = f"/deployments/{stack['deployment']}/sidecars"
    until(lambda: any(s["name"] == "quick-exit" for s in Api(stack).json("GET", listed)["items"]), what="registered")
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait(timeout=30) == 0
    elapsed = time.monotonic() - started
    assert not any(s["name"] == "quick-exit" for s in Api(stack).json("GET", listed)["items"]), "deregistered"
    assert "Traceback" not in log.read_text()
    print(f"sidecar exit after SIGTERM: {elapsed:.2f}s")  # measured here, bounded in the README (2 s)


def test_a_client_that_goes_away_leaves_no_traceback_in_the_log(stack: dict[str, Any]) -> None:
    import socket

    host, port = httpx.URL(stack["api_url"]).host, httpx.URL(stack["api_url"]).port
    for _ in range(3):
        s = socket.create_connection((host, port))
        s.sendall(f"GET /deployments/demo/deploys/0123456789a-abcdef?wait=5 HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {stack['token']}\r\n\r\n".encode())
        s.close()  # a --wait given up mid long poll
    Api(stack).json("GET", "/deployments/demo")  # the server goes on
    assert "Traceback" not in Path(stack["state_dir"], "local-up.log").read_text()


def test_a_state_folder_that_cannot_be_read_is_refused_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "aws").mkdir(parents=True)
    (state / "aws" / "sqs.pickle").write_bytes(b"not what dagcast wrote")
    proc = subprocess.run([*DAGCAST, "local", "up", "--state-dir", str(state)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"cannot read {state / 'aws' / 'sqs.pickle'}" in proc.stderr and "Traceback" not in proc.stderr
    assert not processes_of(state)
