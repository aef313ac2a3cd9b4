"""`dagcast deploy` as people and CI pipelines use it, against the embedded stack."""
from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Api, PlayedSidecar, dag_source, parse_json_stdout, run_dagcast, stack_env, write_dags


def deploy(env: dict[str, str], dags: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--json", *args], env)


def test_an_unchanged_folder_is_not_deployed_again_unless_forced(stack: dict[str, Any], tmp_path: Path) -> None:
    env = stack_env(stack)
    dags = write_dags(tmp_path / "dags", {"same.py": dag_source("same")})
    first = parse_json_stdout(deploy(env, dags, "--wait"))
    again = deploy(env, dags, "--wait")
    assert again.returncode == 0
    doc = parse_json_stdout(again)
    assert doc["state"] == "UNCHANGED" and doc["version"] == first["version"]
    assert "No changes to deploy" in again.stderr
    forced = parse_json_stdout(deploy(env, dags, "--wait", "--force"))
    assert forced["state"] == "ACTIVE" and forced["version"] == first["version"] + 1


def test_ignored_files_never_ship(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {
        "keep.py": dag_source("keep"),
        ".dagcastignore": "scratch/\n*.log\n",
        "debug.log": "noise\n",
        "__pycache__/keep.cpython-311.pyc": b"\0" * 100,
        ".git/HEAD": "ref: refs/heads/main\n",
    })
    junk = dags / "scratch" / "dump.bin"
    junk.parent.mkdir()
    with junk.open("wb") as f:
        f.truncate(50 * 1024 * 1024)
    proc = deploy(stack_env(stack), dags, "--wait")
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["files"] == 1 and doc["bytes"] == len(dag_source("keep"))
    dry = parse_json_stdout(deploy(stack_env(stack), dags, "--dry-run", "--force"))
    assert [f["path"] for f in dry["files_list"]] == ["keep.py"]


def test_dry_run_lists_files_and_the_dag_diff_and_uploads_nothing(stack: dict[str, Any], tmp_path: Path) -> None:
    env = stack_env(stack)
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("alpha"), "b.py": dag_source("beta")})
    assert deploy(env, dags, "--wait").returncode == 0
    (dags / "b.py").unlink()
    (dags / "c.py").write_text(dag_source("gamma"))
    api = Api(stack)
    before = len(api.json("GET", f"/deployments/{stack['deployment']}/deploys?limit=100")["items"])
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--dry-run"], env)
    assert proc.returncode == 0, proc.stderr
    assert "+1 DAG, -1 DAG: beta, 2 files changed" in proc.stdout
    assert "warning: this deploy removes 1 DAG(s): beta" in proc.stdout
    assert "c.py" in proc.stdout and "dry run: nothing uploaded" in proc.stdout
    assert len(api.json("GET", f"/deployments/{stack['deployment']}/deploys?limit=100")["items"]) == before


def test_wait_times_out_with_exit_4_when_a_live_sidecar_never_catches_up(stack: dict[str, Any], tmp_path: Path) -> None:
    api = Api(stack)
    api.json("POST", "/deployments", {"name": "laggard", "mechanism": "DAG_ONLY"})
    PlayedSidecar(api, "laggard", "stuck").report({"version": 0})
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("a")})
    proc = deploy(stack_env(stack, DAGCAST_DEPLOYMENT="laggard"), dags, "--wait", "--timeout", "3")
    assert proc.returncode == 4, proc.stderr
    assert "timed out after 3s" in proc.stderr and "live on 0/1 current sidecars; waiting on stuck (on v0)" in proc.stderr


def test_the_token_is_never_printed(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"t.py": dag_source("t")})
    proc = deploy(stack_env(stack), dags, "--wait", "--debug")
    bad = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--debug"],
                      stack_env(stack, DAGCAST_TOKEN="dgc_" + "y" * 43))
    assert bad.returncode == 1 and "unknown token" in bad.stderr
    for out in (proc.stdout, proc.stderr, bad.stdout, bad.stderr):
        assert stack["token"] not in out and "y" * 43 not in out


def test_git_metadata_and_the_commit_subject_are_recorded(stack: dict[str, Any], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    dags = write_dags(repo / "dags", {"g.py": dag_source("git_dag")})
    git = ["git", "-C", str(repo), "-c", "user.name=Ada", "-c", "user.email=ada@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "Add the git DAG"], check=True)
    doc = parse_json_stdout(deploy(stack_env(stack), dags, "--wait"))
    record = Api(stack).json("GET", f"/deployments/{stack['deployment']}/deploys/{doc['deploy_id']}")["deploy"]
    assert record["description"] == "Add the git DAG"
    assert record["git"]["branch"] == "main" and record["git"]["author"] == "Ada <ada@example.com>"
    assert len(record["git"]["sha"]) == 40 and record["git"]["dirty"] is False


def test_project_files_from_init_and_login_configure_the_cli(stack: dict[str, Any], tmp_path: Path) -> None:
    project = tmp_path / "project"
    write_dags(project / "dags", {"p.py": dag_source("project_dag")})
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    init = subprocess.run([*run_args(), "init", "--api-url", stack["api_url"], "--deployment", stack["deployment"]],
                          cwd=project, env=bare, capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    login = subprocess.run([*run_args(), "login"], cwd=project, env=bare, input=stack["token"] + "\n",
                           capture_output=True, text=True)
    assert login.returncode == 0, login.stderr
    creds = project / ".dagcast" / "credentials.toml"
    assert creds.stat().st_mode & 0o777 == 0o600
    assert (project / ".dagcast" / ".gitignore").read_text() == "credentials.toml\n"
    proc = subprocess.run([*run_args(), "deploy", "--dags", "--wait", "--json"], cwd=project, env=bare,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert parse_json_stdout(proc)["state"] == "ACTIVE"
    assert stack["token"] not in login.stdout + login.stderr
    overridden = subprocess.run([*run_args(), "deploy", "--dags", "--deployment", "no-such-deployment"], cwd=project,
                                env=bare, capture_output=True, text=True, timeout=120)
    assert overridden.returncode == 1 and "no-such-deployment" in overridden.stderr


def run_args() -> list[str]:
    from helpers import DAGCAST

    return DAGCAST


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A forward HTTP proxy that answers 503 to the first N bundle uploads, then forwards everything."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.upload_attempts = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        is_upload = self.command == "POST" and "/deployments/" not in self.path
        if is_upload:
            self.server.upload_attempts += 1
            if self.server.upload_attempts <= self.server.failures:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "proxy-connection", "connection")}
        resp = httpx.request(self.command, self.path, headers=headers, content=body, timeout=30)
        self.send_response(resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-encoding", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


@pytest.fixture
def flaky_proxy() -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(failures=2)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()


def test_upload_is_retried_after_server_errors_and_rewinds_the_stream(
    stack: dict[str, Any], tmp_path: Path, flaky_proxy: FlakyProxy
) -> None:
    proxy_url = f"http://127.0.0.1:{flaky_proxy.server_address[1]}"
    env = stack_env(stack, HTTP_PROXY=proxy_url, http_proxy=proxy_url, NO_PROXY="", no_proxy="")
    dags = write_dags(tmp_path / "dags", {"retry.py": dag_source("retry", "# " + "r" * 20000 + "\n")})
    proc = deploy(env, dags, "--wait")
    assert proc.returncode == 0, proc.stderr
    assert flaky_proxy.upload_attempts == 3
    assert proc.stderr.count("upload answered 503; retrying") == 2
    assert parse_json_stdout(proc)["state"] == "ACTIVE"


def test_admin_create_token_writes_a_working_token_straight_to_the_table(stack: dict[str, Any]) -> None:
    aws = {"AWS_ENDPOINT_URL": stack["aws_endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = run_dagcast(["admin", "create-token", "--table", "dagcast-local-state", "--name", "first-admin"],
                       stack_env(stack, **aws))
    assert proc.returncode == 0, proc.stderr
    secret = proc.stdout.strip()
    assert secret.startswith("dgc_") and "shown only this once" in proc.stderr
    assert Api(stack, token=secret).call("GET", "/tokens").status_code == 200
    listed = Api(stack).json("GET", "/tokens")["items"]
    assert any(t["name"] == "first-admin" and t["role"] == "admin" for t in listed)
    assert secret not in str(listed)


def test_a_poisoned_local_compile_cache_cannot_get_broken_code_live(stack: dict[str, Any], tmp_path: Path) -> None:
    """The CLI's cache only spares work: the server validates with its own, filled by its own compiles."""
    import hashlib
    import json

    broken_source = "def oops(:\n    pass\n"
    dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("ok_poison"), "broken.py": broken_source})
    cache_home = tmp_path / "cache"
    from chalicelib.bundle import CompileCache

    path = cache_home / "dagcast" / f"compiled-{CompileCache.TAG.replace(':', '-')}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({hashlib.sha256(broken_source.encode()).hexdigest(): []}))
    proc = deploy(stack_env(stack, XDG_CACHE_HOME=str(cache_home)), dags, "--wait")
    assert proc.returncode == 3, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["state"] == "REJECTED", "the local check was fooled; the server was not"
    assert [(e["path"], e["code"]) for e in doc["errors"]] == [("broken.py", "syntax_error")]


def test_every_stage_of_a_deploy_is_on_record_from_the_cli_to_each_sidecar(stack: dict[str, Any], tmp_path: Path) -> None:
    """The CLI's --json says how long it spent bundling, validating, presigning, uploading and waiting; the
    deploy record holds when S3 stored the upload, ingest started, it went ACTIVE, and when each sidecar
    got the announcement and ran the version; the API serves the stages computed from them."""
    dags = write_dags(tmp_path / "dags", {"staged.py": dag_source("staged"), "sql/q.sql": "select 1;\n"})
    proc = deploy(stack_env(stack), dags, "--wait")
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    timings = doc["timings"]
    assert all(timings[k] is not None and timings[k] >= 0 for k in
               ("bundle_s", "validate_s", "diff_s", "presign_s", "upload_s", "wait_s", "total_s")), timings
    assert isinstance(timings["noticed_at"], float), timings  # epoch seconds: when the answer that ended the wait came

    view = Api(stack).json("GET", f"/deployments/{stack['deployment']}/deploys/{doc['deploy_id']}")
    d, stages = view["deploy"], view["stages"]
    assert d["created_at"] <= d["stored_at"] <= d["uploaded_at"] <= d["activated_at"], d
    names = {s["name"] for s in view["sidecars"] if s["live"]}
    assert names >= {s["name"] for s in stack["sidecars"]}
    assert set(d["notified"]) >= names and set(d["activations"]) >= names
    assert all(d["activated_at"] <= d["notified"][n] <= d["activations"][n] for n in names), d
    assert d["converged_at"] == max(d["activations"][n] for n in names)
    by_name = {s["name"]: s for s in stages["sidecars"]}
    assert all(by_name[n]["notified_s"] is not None and by_name[n]["sync_s"] is not None for n in names), stages
    assert stages["active_to_all_live_s"] is not None and stages["upload_to_ingest_s"] is not None
