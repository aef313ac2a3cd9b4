"""Sidecar processes against the embedded stack: crash safety, self-healing, observability."""
from __future__ import annotations

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


def big_dags(root: Path, tag: str, files: int = 1500) -> Path:
    padding = "# " + "x" * 4900 + "\n"
    content = {f"team_{i % 20}/dag_{i}.py": dag_source(f"dag_{i}_{tag}", padding) for i in range(files)}
    content["assets/big.sql"] = ("select 1;\n" * 300_000)
    return write_dags(root, content)


def assert_link_consistent(link: Path, expected: dict[str, bytes]) -> bool:
    """The link does not exist yet, or points to a complete version. Returns whether it exists."""
    if not os.path.lexists(link):
        return False
    assert files_of(link.resolve()) == expected
    return True


def test_sigkill_at_random_moments_never_leaves_a_partial_version(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = big_dags(tmp_path / "dags", "crash")
    deploy(stack, dags)
    expected = files_of(dags)
    env = sidecar_env(stack)
    rng = random.Random(4242)

    def once(root: Path, link: Path) -> subprocess.Popen[bytes]:
        cmd = [*DAGCAST, "sidecar", "--name", "crash", "--root", str(root), "--link", str(link), "--once"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    started = time.monotonic()
    assert once(tmp_path / "probe", tmp_path / "probe-link").wait(timeout=120) == 0
    full = time.monotonic() - started

    seen_published = seen_absent = 0
    for i in range(10):
        root, link = tmp_path / f"r{i}", tmp_path / f"r{i}-dags"
        proc = once(root, link)
        time.sleep(rng.uniform(0.2, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if assert_link_consistent(link, expected):
            seen_published += 1
        else:
            seen_absent += 1
        restart = once(root, link)
        assert restart.wait(timeout=120) == 0
        assert assert_link_consistent(link, expected)
        assert not list((root / "versions").glob(".tmp-*")), "leftovers of the killed sync must be cleaned up"
        assert list((root / "downloads").iterdir()) == []
    assert seen_published + seen_absent == 10


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
