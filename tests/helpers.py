"""Shared helpers for the integration and e2e tests: run the real `dagcast` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DAGCAST = [sys.executable, "-m", "dagcast"]


def run_dagcast(args: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAGCAST, *args], env=env, capture_output=True, text=True, timeout=timeout)


def deploy_waiting(info: dict[str, Any], dags: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """`dagcast deploy --dags --wait --json --allow-dag-removal` on the stack: (exit code, the JSON, stderr),
    having checked that stdout is one JSON object that agrees with the exit code, and no traceback."""
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", "--allow-dag-removal", *args],
                       stack_env(info), timeout=240)
    assert "Traceback" not in proc.stderr, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["exit_code"] == proc.returncode
    return proc.returncode, doc, proc.stderr


def write_dags(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def dag_source(dag_id: str, extra: str = "") -> str:
    return (
        "from datetime import datetime\nfrom airflow import DAG\n\n"
        f"with DAG('{dag_id}', start_date=datetime(2024, 1, 1), schedule=None):\n    pass\n{extra}"
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


class Api:
    """A tiny HTTP client for assertions against the running API."""

    def __init__(self, info: dict[str, Any], token: str | None = None) -> None:
        self.base = info["api_url"].rstrip("/")
        self.token = token or info["token"]

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}", **(headers or {})}
        return httpx.request(method, self.base + path, json=body, headers=headers, timeout=30)

    def json(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        resp = self.call(method, path, body, headers=headers)
        assert resp.status_code < 400, resp.text
        return resp.json()


class PlayedSidecar:
    """A sidecar played over HTTP: registered with the API client's token, acting with its own secret."""

    def __init__(self, api: Api, deployment: str, name: str, component: str = "worker") -> None:
        self.api, self.deployment, self.name = api, deployment, name
        self.registration = api.json("POST", f"/deployments/{deployment}/sidecars", {"name": name, "component": component})
        self.secret: str = self.registration["secret"]
        self.deployment_id: str = self.registration["deployment_id"]

    @property
    def path(self) -> str:
        return f"/deployments/{self.deployment}/sidecars/{self.name}"

    def report(self, body: dict[str, Any]) -> Any:
        return self.api.json("PUT", self.path, body, headers={"X-Dagcast-Sidecar-Secret": self.secret})

    def deregister(self) -> httpx.Response:
        return self.api.call("DELETE", self.path, headers={"X-Dagcast-Sidecar-Secret": self.secret})


def version_of_link(link: str | Path) -> int:
    """The version number a sidecar's dags link points at (its folder is <n>-<sha16>)."""
    return int(Path(os.readlink(link)).name.split("-")[0])


def stack_env(info: dict[str, Any], **extra: str) -> dict[str, str]:
    base = {"DAGCAST_API_URL": info["api_url"], "DAGCAST_TOKEN": info["token"], "DAGCAST_DEPLOYMENT": info["deployment"]}
    return {**os.environ, **base, **extra}


def parse_json_stdout(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not one JSON object: {proc.stdout!r}\nstderr: {proc.stderr}") from exc
    return doc


def until(cond: Any, timeout: float = 30, what: str = "condition") -> None:
    """Wait for `cond()` to become true (each look is an event: a file, a metric, an API answer)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g}s"
        time.sleep(0.05)


def aws(info: dict[str, Any], service: str) -> Any:
    """A boto3 client of the embedded stack's AWS (moto server), as anyone with its endpoint has."""
    import boto3

    return boto3.client(service, endpoint_url=info["aws_endpoint_url"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def metric(metrics_url: str, name: str, labels: str = "") -> float:
    """One sample of a sidecar's Prometheus metrics (0 when it is not there yet)."""
    want = f"{name}{{{labels}}}" if labels else name
    text = httpx.get(metrics_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def sidecar_pid(sidecar: dict[str, Any]) -> int:
    """The process of one of a stack's sidecars (found by its --root, the parent of its dags link)."""
    root = str(Path(sidecar["dags_path"]).parent)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sidecar" in args and root.encode() in args:
            return int(proc.name)
    raise AssertionError(f"no process for the sidecar at {root}")
