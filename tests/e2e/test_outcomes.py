"""Every exit of `dagcast deploy` and `dagcast validate`, as a CI pipeline reads them: the exit code,
one JSON object on stdout with --json, and a clear line on stderr, never a traceback."""
from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    DAGCAST,
    Api,
    PlayedSidecar,
    aws,
    dag_source,
    files_of,
    parse_json_stdout,
    run_dagcast,
    sidecar_pid,
    stack_env,
    until,
    write_dags,
)
from relay import HoldingProxy, relay_to
from stack import local_stack

pytestmark = pytest.mark.integration


def deploy_json(env: dict[str, str], *args: str, timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    proc = run_dagcast(["deploy", "--dags", "--json", *args], env, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["exit_code"] == proc.returncode and doc["ok"] is (proc.returncode == 0), doc
    assert ("error" in doc) is (proc.returncode != 0), doc
    for key in ("deploy_id", "version", "state", "errors", "sidecars", "stale_sidecars"):
        assert key in doc, (key, doc)
    return proc.returncode, doc, proc.stderr


def validate_json(*args: str) -> tuple[int, dict[str, Any], str]:
    proc = run_dagcast(["validate", "--json", *args])
    assert "Traceback" not in proc.stderr, proc.stderr
    doc = parse_json_stdout(proc)
    assert {"valid", "files", "bytes", "errors", "ok", "exit_code"} <= set(doc) and doc["exit_code"] == proc.returncode
    return proc.returncode, doc, proc.stderr


# --- deploy: every exit code ------------------------------------------------------------------


def test_deploy_json_success_no_changes_and_dry_run_exit_0(stack: dict[str, Any], tmp_path: Path) -> None:
    env = stack_env(stack)
    dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("outcome_ok")})
    code, doc, _ = deploy_json(env, "--dags-path", str(dags), "--wait", "--force")
    assert (code, doc["state"], doc["converged"]) == (0, "ACTIVE", True)
    code, doc, err = deploy_json(env, "--dags-path", str(dags), "--wait")
    assert (code, doc["state"]) == (0, "UNCHANGED") and "No changes to deploy" in err
    code, doc, _ = deploy_json(env, "--dags-path", str(dags), "--dry-run")
    assert (code, doc["state"], [f["path"] for f in doc["files_list"]]) == (0, "DRY_RUN", ["ok.py"])


def test_deploy_json_api_errors_exit_1_with_the_apis_code(stack: dict[str, Any], tmp_path: Path) -> None:
    admin = Api(stack)
    admin.json("POST", "/deployments", {"name": "image-only-json", "mechanism": "IMAGE"})
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("refused")})
    code, doc, err = deploy_json(stack_env(stack, DAGCAST_DEPLOYMENT="image-only-json"), "--dags-path", str(dags), "--wait")
    assert code == 1 and doc["error"]["code"] == "conflict" and "DAG-only deploys are disabled" in doc["error"]["message"]
    hint = next(line for line in err.splitlines() if "dagcast deployment update" in line)
    command = hint[hint.index("`") + 1: hint.rindex("`")].split()[1:]  # the hint's command, exactly as printed
    enabled = run_dagcast(command, stack_env(stack))
    assert enabled.returncode == 0, enabled.stderr
    code, doc, _ = deploy_json(stack_env(stack, DAGCAST_DEPLOYMENT="image-only-json"), "--dags-path", str(dags), "--no-wait")
    assert (code, doc["state"]) == (0, "PENDING") or (code, doc["state"]) == (0, "VALIDATING")


def test_deploy_json_network_errors_exit_1(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("unreachable")})
    with relay_to(1) as dead:  # a port nothing listens on behind it
        dead.down()
        code, doc, err = deploy_json(stack_env(stack, DAGCAST_API_URL=dead.url), "--dags-path", str(dags))
    assert code == 1 and doc["error"]["code"] == "api_unavailable" and "hint: check DAGCAST_API_URL" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "soon"], "Invalid value for '--timeout'"),
    (["--no-such-flag"], "No such option"),
])
def test_deploy_json_usage_errors_exit_2(stack: dict[str, Any], args: list[str], message: str) -> None:
    code, doc, _ = deploy_json(stack_env(stack), *args)
    assert code == 2 and doc["error"]["code"] == "usage" and message in doc["error"]["message"]


def test_deploy_json_missing_settings_and_folders_exit_2(stack: dict[str, Any], tmp_path: Path) -> None:
    bare = {k: v for k, v in os.environ.items() if not k.startswith("DAGCAST_")}
    code, doc, _ = deploy_json(bare, "--dags-path", str(tmp_path))
    assert code == 2 and "missing --api-url" in doc["error"]["message"]
    code, doc, _ = deploy_json(stack_env(stack), "--dags-path", str(tmp_path / "nope"))
    assert code == 2 and doc["error"]["code"] == "usage" and "does not exist" in doc["error"]["message"]
    (tmp_path / "empty" / "__pycache__").mkdir(parents=True)
    code, doc, _ = deploy_json(stack_env(stack), "--dags-path", str(tmp_path / "empty"))
    assert code == 2 and "no files to deploy" in doc["error"]["message"]


def test_deploy_json_rejections_exit_3_locally_by_the_server_and_for_size(stack: dict[str, Any], tmp_path: Path) -> None:
    env = stack_env(stack)
    broken = write_dags(tmp_path / "broken", {"bad.py": "def f(:\n"})
    code, doc, err = deploy_json(env, "--dags-path", str(broken))
    assert (code, doc["state"], doc["deploy_id"]) == (3, "INVALID", None) and doc["errors"][0]["path"] == "bad.py"
    assert f"{broken}/bad.py:1: syntax_error" in err
    code, doc, _ = deploy_json(env, "--dags-path", str(broken), "--skip-validation", "--wait")
    assert (code, doc["state"]) == (3, "REJECTED") and doc["deploy_id"] and doc["errors"][0]["code"] == "syntax_error"

    admin = Api(stack)
    admin.json("POST", "/deployments", {"name": "tiny", "mechanism": "DAG_ONLY"})
    admin.json("PATCH", "/deployments/tiny", {"limits": {"max_bundle_bytes": 1024}})
    big = write_dags(tmp_path / "big", {"a.py": dag_source("big"), "data.bin": os.urandom(4096)})
    code, doc, _ = deploy_json(stack_env(stack, DAGCAST_DEPLOYMENT="tiny"), "--dags-path", str(big), "--skip-validation")
    assert (code, doc["state"]) == (3, "REJECTED") and doc["errors"][0]["code"] == "bundle_too_large"
    assert "over the deployment's limit of 0.0 MiB" in doc["errors"][0]["message"]


def test_deploy_json_a_file_over_the_limit_is_refused_before_bundling_in_mib(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("huge")})
    with (dags / "huge.parquet").open("wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: nothing is written to disk
    code, doc, err = deploy_json(stack_env(stack), "--dags-path", str(dags))
    assert code == 3 and doc["errors"][0]["code"] == "member_too_large"
    assert "huge.parquet: 300.0 MiB, over the 100.0 MiB per-file limit" in doc["errors"][0]["message"]
    assert "Bundled" not in err, "refused before the bundle was written"


def test_deploy_json_a_dag_removal_nobody_confirmed_exits_2_naming_the_dags(stack: dict[str, Any], tmp_path: Path) -> None:
    admin = Api(stack)
    admin.json("POST", "/deployments", {"name": "careful", "mechanism": "DAG_ONLY"})
    admin.json("PATCH", "/deployments/careful", {"dag_removal": "confirm"})
    env = stack_env(stack, DAGCAST_DEPLOYMENT="careful")
    dags = write_dags(tmp_path / "dags", {"keep.py": dag_source("kept"), "gone.py": dag_source("going_away")})
    assert deploy_json(env, "--dags-path", str(dags))[0] == 0
    (dags / "gone.py").unlink()
    code, doc, err = deploy_json(env, "--dags-path", str(dags))
    assert code == 2 and doc["error"]["code"] == "dag_removal_not_confirmed" and "going_away" in doc["error"]["message"]
    assert "--allow-dag-removal" in err
    code, doc, err = deploy_json(env, "--dags-path", str(dags), "--allow-dag-removal")
    assert code == 0 and "warning: this deploy removes 1 DAG(s): going_away" in err


def test_deploy_asks_on_a_terminal_before_removing_dags(stack: dict[str, Any], tmp_path: Path) -> None:
    env = stack_env(stack)
    dags = write_dags(tmp_path / "dags", {"keep.py": dag_source("tty_kept"), "gone.py": dag_source("tty_going")})
    assert deploy_json(env, "--dags-path", str(dags), "--wait")[0] == 0
    (dags / "gone.py").unlink()
    for answer, want in ((b"n\n", 2), (b"y\n", 0)):
        main, other = pty.openpty()
        proc = subprocess.Popen([*DAGCAST, "deploy", "--dags", "--dags-path", str(dags), "--no-wait"], env=env,
                                stdin=other, stdout=subprocess.PIPE, stderr=other)
        os.close(other)
        seen = b""
        while b"Deploy anyway?" not in seen:
            seen += os.read(main, 4096)
        os.write(main, answer)
        assert proc.wait(timeout=60) == want, seen
        os.close(main)
        assert b"tty_going" in seen


def test_deploy_json_wait_timeout_exits_4_naming_the_sidecars_it_waits_on(stack: dict[str, Any], tmp_path: Path) -> None:
    admin = Api(stack)
    admin.json("POST", "/deployments", {"name": "slowpoke", "mechanism": "DAG_ONLY"})
    PlayedSidecar(admin, "slowpoke", "never-there").report({"version": 0})
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("slow")})
    code, doc, err = deploy_json(stack_env(stack, DAGCAST_DEPLOYMENT="slowpoke"), "--dags-path", str(dags), "--wait",
                                 "--timeout", "2")
    assert (code, doc["state"], doc["converged"]) == (4, "ACTIVE", False)
    assert doc["error"]["code"] == "wait_timeout" and "waiting on never-there (on v0)" in doc["error"]["message"]
    assert [s["name"] for s in doc["sidecars"]] == ["never-there"]


def _interrupt_during_upload(stack: dict[str, Any], tmp_path: Path, sig: int) -> tuple[int, dict[str, Any], str, HoldingProxy]:
    """Start a deploy whose upload a proxy holds; once the proxy has the whole upload, send `sig`."""
    dags = write_dags(tmp_path / "dags", {f"d{i}.py": dag_source(f"held_{sig}_{i}") for i in range(5)})
    proxy = HoldingProxy()
    api_port = httpx.URL(stack["api_url"]).port
    env = stack_env(stack, HTTP_PROXY=proxy.url, NO_PROXY=f"http://127.0.0.1:{api_port}")
    proc = subprocess.Popen([*DAGCAST, "deploy", "--dags", "--dags-path", str(dags), "--json", "--wait"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proxy.received.wait(60), "the upload never reached the proxy"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return proc.returncode, json.loads(out), err, proxy


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_during_the_upload_cancels_the_deploy_and_a_late_upload_never_goes_live(
    stack: dict[str, Any], tmp_path: Path, sig: int, code: int
) -> None:
    exit_code, doc, err, proxy = _interrupt_during_upload(stack, tmp_path, sig)
    try:
        assert (exit_code, doc["exit_code"], doc["state"]) == (code, code, "CANCELLED"), err
        assert doc["error"]["code"] == "interrupted" and doc["deploy_id"] in doc["error"]["message"]
        assert f"Deploy {doc['deploy_id']} cancelled" in err
        proxy.release.set()  # the upload arrives after all, as it can on a slow link
        assert proxy.forwarded.wait(60)
        s3, d = aws(stack, "s3"), stack["deployment"]
        [bucket] = [b["Name"] for b in s3.list_buckets()["Buckets"] if "bundles" in b["Name"]]
        key = f"bundles/{d}/{doc['deploy_id']}.tar.gz"
        until(lambda: not s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions"),
              what="the late upload deleted")
        view = Api(stack).json("GET", f"/deployments/{d}/deploys/{doc['deploy_id']}")
        assert view["deploy"]["state"] == "CANCELLED" and view["deploy"].get("version") is None
    finally:
        proxy.close()


# --- stale sidecars, and an API that goes away during --wait ----------------------------------------


@pytest.fixture(scope="module")
def quick_stale(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A stack of its own where a sidecar is stale after 4 s without a heartbeat (they beat every second)."""
    env = {"DAGCAST_SIDECAR_STALE_SECONDS": "4", "DAGCAST_HEARTBEAT_INTERVAL": "1"}
    with local_stack(tmp_path_factory.mktemp("stale"), sidecars=2, env=env) as info:
        yield info


def test_wait_names_a_stale_sidecar_and_require_all_waits_for_it(quick_stale: dict[str, Any], tmp_path: Path) -> None:
    info, api = quick_stale, Api(quick_stale)
    first = write_dags(tmp_path / "first", {"a.py": dag_source("before_the_stop")})
    assert deploy_json(stack_env(info), "--dags-path", str(first), "--wait")[0] == 0
    stopped = info["sidecars"][1]
    pid = sidecar_pid(stopped)
    os.kill(pid, signal.SIGSTOP)
    try:
        listed = f"/deployments/{info['deployment']}/sidecars"
        until(lambda: not next(s for s in api.json("GET", listed)["items"] if s["name"] == stopped["name"])["live"],
              what="the stopped sidecar seen as stale")
        second = write_dags(tmp_path / "second", {"a.py": dag_source("after_the_stop")})
        proc = run_dagcast(["deploy", "--dags", "--dags-path", str(second), "--wait"], stack_env(info))
        assert proc.returncode == 0, proc.stderr
        assert "live on 1/1 current sidecars; 1 stale (sidecar-2 on v1, last seen" in proc.stdout + proc.stderr
        (second / "b.py").write_text(dag_source("more"))
        code, doc, _ = deploy_json(stack_env(info), "--dags-path", str(second), "--wait")
        assert code == 0 and [s["name"] for s in doc["stale_sidecars"]] == ["sidecar-2"]
        assert doc["stale_sidecars"][0]["version"] == 1 and doc["stale_sidecars"][0]["last_seen_s"] >= 4
        (second / "c.py").write_text(dag_source("even_more"))
        code, doc, _ = deploy_json(stack_env(info), "--dags-path", str(second), "--wait", "--require-all", "--timeout", "3")
        assert code == 4 and "1 stale (sidecar-2 on v1" in doc["error"]["message"]
        assert "--require-all waits for those too" in doc["error"]["message"]
    finally:
        os.kill(pid, signal.SIGCONT)


def test_wait_rides_out_the_api_going_away_and_coming_back(stack: dict[str, Any], tmp_path: Path) -> None:
    info = stack
    paused = info["sidecars"][0]
    pid = sidecar_pid(paused)
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("through_an_outage")})
    with relay_to(httpx.URL(info["api_url"]).port) as relay:
        proc = subprocess.Popen([*DAGCAST, "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", "--timeout", "120"],
                                env=stack_env(info, DAGCAST_API_URL=relay.url), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        os.kill(pid, signal.SIGSTOP)  # the deploy cannot converge until it runs again
        try:
            for line in proc.stderr:
                if line.startswith("State ACTIVE"):
                    break
            relay.down()  # the API "restarts": connections refused
            for line in proc.stderr:
                if "the API did not answer" in line:
                    break
            relay.up()
        finally:
            os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["converged"] and doc["state"] == "ACTIVE", doc
    for s in info["sidecars"]:
        assert files_of(Path(s["dags_path"]).resolve()) == files_of(dags), (s, doc, err)


# --- validate: every exit code ------------------------------------------------------------------


def test_validate_json_exit_codes(tmp_path: Path) -> None:
    good = write_dags(tmp_path / "good", {"a.py": "x = 1\n"})
    assert validate_json(str(good))[:2] == (0, validate_json(str(good))[1])
    code, doc, _ = validate_json(str(write_dags(tmp_path / "bad", {"a.py": "def f(:\n"})))
    assert code == 1 and doc["valid"] is False and doc["errors"][0]["code"] == "syntax_error"
    code, doc, _ = validate_json(str(tmp_path / "nope"))
    assert code == 2 and doc["error"]["code"] == "usage" and "does not exist" in doc["error"]["message"]
    (tmp_path / "empty").mkdir()
    code, doc, _ = validate_json(str(tmp_path / "empty"))
    assert code == 2 and "no files to deploy" in doc["error"]["message"]
    proc = run_dagcast(["validate", "--json", "--bogus", str(good)])
    assert proc.returncode == 2 and parse_json_stdout(proc)["error"]["code"] == "usage"


# --- symlinks ---------------------------------------------------------------------------------------------


def test_symlinks_outside_are_rejected_one_line_each_and_links_inside_ship(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("linked"), "lib/helpers.py": "X = 1\n"})
    os.symlink("/etc/passwd", dags / "passwd_link")
    os.symlink("../../elsewhere", dags / "lib" / "escape")
    code, doc, err = validate_json(str(dags))
    assert code == 1 and sorted(e["path"] for e in doc["errors"]) == ["lib/escape", "passwd_link"]
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--dry-run"], stack_env(stack))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert f"{dags}/passwd_link: unsafe_symlink: passwd_link: a symlink to the absolute path /etc/passwd" in proc.stderr
    assert f"{dags}/lib/escape: unsafe_symlink: lib/escape: a symlink to ../../elsewhere, outside the dags folder" in proc.stderr

    (dags / "passwd_link").unlink()
    (dags / "lib" / "escape").unlink()
    os.symlink("lib", dags / "shared")  # a folder symlink inside: ships as a link, followed by Airflow
    os.symlink("a.py", dags / "alias.py")
    code, doc, _ = deploy_json(stack_env(stack), "--dags-path", str(dags), "--dry-run")
    listed = {f["path"]: f.get("link") for f in doc["files_list"]}
    assert listed == {"a.py": None, "alias.py": "a.py", "lib/helpers.py": None, "shared": "lib"}
    code, doc, _ = deploy_json(stack_env(stack), "--dags-path", str(dags), "--wait")
    assert code == 0
    for s in stack["sidecars"]:
        live = Path(s["dags_path"]).resolve()
        assert os.readlink(live / "shared") == "lib" and (live / "shared" / "helpers.py").read_text() == "X = 1\n"


# --- hints that are right ---------------------------------------------------------------------------------


def test_auth_errors_say_which_and_a_wrong_url_says_it_is_not_dagcast(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("hints")})
    admin = Api(stack)
    revoked = admin.json("POST", "/tokens", {"name": "soon-revoked", "role": "deployer"})["token"]
    admin.call("DELETE", "/tokens/soon-revoked")
    other = admin.json("POST", "/tokens", {"name": "elsewhere", "role": "deployer", "deployments": ["other"]})["token"]
    cases = [
        ({"DAGCAST_TOKEN": "dgc_" + "x" * 43}, "this API does not know the token"),
        ({"DAGCAST_TOKEN": "dgc_short"}, "this API does not know the token"),
        ({"DAGCAST_TOKEN": revoked}, "this token was revoked"),
        ({"DAGCAST_TOKEN": other}, "this token is limited to other deployments"),
        ({"DAGCAST_API_URL": stack["api_url"] + "/wrong/stage"}, "the answer did not come from a dagcast API"),
    ]
    for env, hint in cases:
        code, doc, err = deploy_json(stack_env(stack, **env), "--dags-path", str(dags))
        assert code == 1 and f"hint: {hint}" in err, (env, err)


def test_read_commands_print_one_json_object_on_failure_too(stack: dict[str, Any]) -> None:
    env = stack_env(stack)
    for args in (["deploys", "show", "0123456789a-abcdef"], ["deploys", "cancel", "0123456789a-abcdef"],
                 ["rollback", "0123456789a-abcdef"], ["deployment", "show", "--deployment", "no-such"]):
        proc = run_dagcast([*args, "--json"], env)
        doc = parse_json_stdout(proc)
        assert (proc.returncode, doc["ok"], doc["exit_code"], doc["error"]["code"]) == (1, False, 1, "not_found"), args
    proc = run_dagcast(["deploys", "list", "--json", "--limit", "0"], env)
    assert proc.returncode == 2 and parse_json_stdout(proc)["error"]["code"] == "usage"
