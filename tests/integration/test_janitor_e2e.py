"""The scheduled janitor on a stack of its own with short expiry settings."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import boto3
from helpers import Api
from stack import local_stack


def until(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the janitor did not act in time"
        time.sleep(0.2)


def test_janitor_expires_unuploaded_deploys_and_removes_silent_sidecars(tmp_path: Path) -> None:
    env = {"DAGCAST_UPLOAD_EXPIRY_SECONDS": "2", "DAGCAST_PENDING_GRACE_SECONDS": "0", "DAGCAST_SIDECAR_EXPIRY_SECONDS": "3"}
    with local_stack(tmp_path / "state", sidecars=0, extra=["--janitor-interval", "0.5"], env=env) as info:
        api = Api(info)
        d = info["deployment"]
        pending = api.json("POST", f"/deployments/{d}/deploys", {"sha256": "a" * 64, "size": 10})["deploy"]
        reg = api.json("POST", f"/deployments/{d}/sidecars", {"name": "ghost", "component": "worker"})
        sqs = boto3.client("sqs", endpoint_url=info["aws_endpoint_url"], region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        assert reg["queue_url"] in sqs.list_queues().get("QueueUrls", [])

        until(lambda: api.json("GET", f"/deployments/{d}/deploys/{pending['deploy_id']}")["deploy"]["state"] == "EXPIRED")
        until(lambda: api.json("GET", f"/deployments/{d}/sidecars")["items"] == [])
        assert reg["queue_url"] not in sqs.list_queues().get("QueueUrls", [])
        renew = api.call("POST", f"/deployments/{d}/deploys/{pending['deploy_id']}/upload")
        assert renew.status_code == 409 and "EXPIRED" in renew.json()["error"]["message"]
