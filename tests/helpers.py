"""Shared helpers for the integration and e2e tests: run the real `dagcast` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

DAGCAST = [sys.executable, "-m", "dagcast"]


def run_dagcast(args: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAGCAST, *args], env=env, capture_output=True, text=True, timeout=timeout)


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

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.request(method, self.base + path, json=body, headers=headers, timeout=30)

    def json(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.call(method, path, body)
        assert resp.status_code < 400, resp.text
        return resp.json()


def stack_env(info: dict[str, Any], **extra: str) -> dict[str, str]:
    base = {"DAGCAST_API_URL": info["api_url"], "DAGCAST_TOKEN": info["token"], "DAGCAST_DEPLOYMENT": info["deployment"]}
    return {**os.environ, **base, **extra}


def parse_json_stdout(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not one JSON object: {proc.stdout!r}\nstderr: {proc.stderr}") from exc
    return doc
