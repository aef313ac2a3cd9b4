"""Sidecar processes against the embedded stack: crash safety, self-healing, observability."""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
from helpers import DAGCAST, Api, dag_source, files_of, parse_json_stdout, run_dagcast, stack_env, version_of_link, write_dags


def sidecar_env(info: dict[str, Any]) -> dict[str, str]:
    return stack_env(
        info,
        AWS_ENDPOINT_URL=info["aws_endpoint_url"],
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )


def deploy(info: dict[str, Any], dags: Path) -> dict[str, Any]:
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--wait", "--json"], stack_env(info))
    assert proc.returncode == 0, proc.stderr
    return parse_json_stdout(proc)


def big_dags(root: Path, tag: str, files: int = 300) -> Path:
    """DAG files plus three incompressible assets first in the bundle's (sorted) order: the archive is
    well over the extractor's 1 MiB read, so a kill at its second read lands with some files written."""
    rng = random.Random(tag)
    content: dict[str, str | bytes] = {f"team_{i % 20}/dag_{i}.py": dag_source(f"dag_{i}_{tag}") for i in range(files)}
    for k in range(3):
        content[f"assets/blob_{k}.txt"] = base64.b64encode(rng.randbytes(600_000))
    return write_dags(root, content)


def once(env: dict[str, str], root: Path, link: Path, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """`dagcast sidecar --once`, killed by itself at the crash point `crash_at` (see dagcast.sidecar._crash_point)."""
    cmd = [*DAGCAST, "sidecar", "--name", "crash", "--root", str(root), "--link", str(link), "--once", "--log-level", "DEBUG"]
    extra = {"DAGCAST_TEST_CRASH_AT": crash_at} if crash_at else {}
    return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=120)


def crashed_at(proc: subprocess.CompletedProcess[str], point: str) -> bool:
    """It died of SIGKILL right after logging that it reached the crash point."""
    logged = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    last = logged[-1] if logged else {}
    return proc.returncode == -signal.SIGKILL and (last.get("msg"), last.get("point")) == ("test crash point reached", point)


def test_a_sigkill_mid_extraction_leaves_no_partial_version_behind_the_link(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = big_dags(tmp_path / "dags", "crash")
    deploy(stack, dags)
    expected = files_of(dags)
    env = sidecar_env(stack)
    root, link = tmp_path / "root", tmp_path / "root-dags"

    killed = once(env, root, link, crash_at="mid-extract")
    assert crashed_at(killed, "mid-extract"), killed.stderr
    [partial] = (root / "versions").iterdir()
    assert partial.name.startswith(".tmp-"), "nothing was renamed into versions/"
    written = files_of(partial)
    assert 0 < len(written) < len(expected), f"the kill landed mid-extraction: {len(written)} of {len(expected)} files"
    assert "team_0/dag_0.py" not in written and written["assets/blob_0.txt"] == expected["assets/blob_0.txt"]
    assert not os.path.lexists(link), "the link never points at a half-written folder"
    assert [p.suffix for p in (root / "downloads").iterdir()] == [".part"]

    write_dags(dags, {"team_0/dag_0.py": dag_source("dag_0_crash", "# the next version\n")})
    deploy(stack, dags)  # the restart installs a newer version: only the start-up clean-up removes the old leftovers
    restart = once(env, root, link)
    assert restart.returncode == 0, restart.stderr
    assert files_of(link.resolve()) == files_of(dags) != expected
    assert [p.name for p in (root / "versions").iterdir()] == [link.resolve().name], "the killed extraction was removed"
    assert list((root / "downloads").iterdir()) == []


def test_a_sidecar_with_its_sns_delivery_cut_converges_by_reconcile(stack: dict[str, Any], tmp_path: Path) -> None:
    env = sidecar_env(stack)
    root, link = tmp_path / "root", tmp_path / "dags-link"
    port = _free_port()
    cmd = [*DAGCAST, "sidecar", "--name", "healer", "--root", str(root), "--link", str(link),
           "--resync-interval", "3", "--metrics-addr", f"127.0.0.1:{port}", "--component", "scheduler"]
    log = open(tmp_path / "healer.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = Api(stack)
    try:
        sidecars_path = f"/deployments/{stack['deployment']}/sidecars"
        _until(lambda: any(s["name"] == "healer" for s in api.json("GET", sidecars_path)["items"]), 30)
        sns = boto3.client("sns", endpoint_url=stack["aws_endpoint_url"], region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        subs = [s for t in sns.list_topics()["Topics"] for s in sns.list_subscriptions_by_topic(TopicArn=t["TopicArn"])["Subscriptions"]
                if "healer" in s["Endpoint"]]
        assert len(subs) == 1, subs
        sns.unsubscribe(SubscriptionArn=subs[0]["SubscriptionArn"])

        dags = write_dags(tmp_path / "dags", {"heal.py": dag_source("heal")})
        version = deploy(stack, dags)["version"]
        _until(lambda: link.is_symlink() and version_of_link(link) == version, 30)
        assert files_of(link.resolve()) == files_of(dags)

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/healthz").status_code == 200
        metrics = httpx.get(base + "/metrics").text
        assert f"dagcast_sidecar_current_version {float(version)}" in metrics
        assert 'dagcast_sidecar_syncs_total{result="published"}' in metrics
        _until(lambda: _sidecar(api, sidecars_path, "healer")["version"] == version, 30)
        assert _sidecar(api, sidecars_path, "healer")["component"] == "scheduler"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    assert code == 0
    assert _sidecar(api, sidecars_path, "healer") is None, "SIGTERM deregisters the sidecar"


def _sidecar(api: Api, path: str, name: str) -> Any:
    return next((s for s in api.json("GET", path)["items"] if s["name"] == name), None)


def _until(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
