"""Twenty deploys racing for one deployment on the embedded stack, then every S3 event delivered twice.

Each deploy goes the way `dagcast deploy` sends it: POST the deploy, upload to the presigned
POST (moto's S3 notifies the ingest queue), ingest validates and publishes. Version numbers
must come out gapless and unique, the pointer on the last one, no deploy lost; a second
delivery of each S3 event must change nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import httpx
import pytest
from helpers import Api, dag_source, write_dags

from chalicelib.bundle import write_bundle

DEPLOYMENT = "race"
DEPLOYS = 20
FINAL_LIVE = {"ACTIVE", "SUPERSEDED"}


def build_bundle(root: Path, n: int) -> bytes:
    files = {f"race_{n}.py": dag_source(f"race_{n}"), "common/settings.sql": f"select {n};\n"}
    write_dags(root, files)
    out = io.BytesIO()
    info = write_bundle(root, sorted(files), out)
    data = out.getvalue()
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)
    return data


def create_and_upload(api: Api, data: bytes, n: int, start: threading.Barrier) -> dict[str, Any]:
    """The client side of one deploy: announce it, then upload to the presigned POST (fields, then the file)."""
    start.wait(timeout=60)
    body = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "description": f"racer {n}"}
    resp = api.call("POST", f"/deployments/{DEPLOYMENT}/deploys", body)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    form = created["upload"]
    up = httpx.post(form["url"], data=form["fields"], files={"file": ("bundle.tar.gz", data, "application/gzip")}, timeout=60)
    assert up.status_code < 300, f"upload of racer {n} refused: {up.status_code} {up.text[:300]}"
    deploy: dict[str, Any] = created["deploy"]
    return deploy


def wait_live(api: Api, deploy_id: str, timeout: float = 120) -> dict[str, Any]:
    """Poll the deploy until it went live (it may already be SUPERSEDED by a later racer)."""
    deadline = time.monotonic() + timeout
    while True:
        deploy: dict[str, Any] = api.json("GET", f"/deployments/{DEPLOYMENT}/deploys/{deploy_id}")["deploy"]
        if deploy["state"] in FINAL_LIVE:
            return deploy
        assert deploy["state"] in ("PENDING", "VALIDATING"), f"deploy {deploy_id} ended {deploy['state']}: {deploy['errors']}"
        assert time.monotonic() < deadline, f"deploy {deploy_id} still {deploy['state']} after {timeout:g}s"
        time.sleep(0.2)


def run_racers(api: Api, bundles: list[bytes]) -> list[dict[str, Any]]:
    start = threading.Barrier(len(bundles))
    results: list[dict[str, Any] | None] = [None] * len(bundles)
    errors: list[BaseException] = []

    def racer(n: int) -> None:
        try:
            deploy = create_and_upload(api, bundles[n], n, start)
            results[n] = wait_live(api, deploy["deploy_id"])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=racer, args=(n,), name=f"racer-{n}") for n in range(len(bundles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a racer hung"
    if errors:
        raise errors[0]
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def snapshot(api: Api) -> dict[str, Any]:
    """Everything a duplicate delivery could touch: the deployment record, every deploy, every version."""
    dep = api.json("GET", f"/deployments/{DEPLOYMENT}")
    deploys = api.json("GET", f"/deployments/{DEPLOYMENT}/deploys?limit=100")
    versions = {}
    for n in range(1, dep["last_version"] + 1):
        resp = api.call("GET", f"/deployments/{DEPLOYMENT}/versions/{n}")
        assert resp.status_code == 200, f"version {n}: {resp.status_code} {resp.text}"
        versions[n] = resp.json()["version"]  # without the download URL: it is signed per request
    return {"deployment": dep, "deploys": deploys["items"], "next_cursor": deploys["next_cursor"], "versions": versions}


def aws_client(stack: dict[str, Any], service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=stack["aws_endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def queue_url_ending(sqs: Any, suffix: str) -> str:
    urls = [u for u in sqs.list_queues().get("QueueUrls", []) if u.rsplit("/", 1)[-1].endswith(suffix)]
    assert len(urls) == 1, f"expected one queue named *{suffix}, found {urls}"
    return str(urls[0])


def queue_depth(sqs: Any, url: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def wait_drained(sqs: Any, url: str, quiet: float = 2.0, timeout: float = 90) -> None:
    """Until the queue holds nothing, visible or in flight, for `quiet` seconds in a row."""
    deadline = time.monotonic() + timeout
    empty_since: float | None = None
    while True:
        now = time.monotonic()
        if queue_depth(sqs, url) == (0, 0):
            empty_since = empty_since if empty_since is not None else now
            if now - empty_since >= quiet:
                return
        else:
            empty_since = None
        assert now < deadline, f"ingest queue not drained after {timeout:g}s: {queue_depth(sqs, url)}"
        time.sleep(0.2)


def s3_created(bucket: str, key: str, size: int) -> str:
    return json.dumps(
        {
            "Records": [
                {
                    "eventVersion": "2.1",
                    "eventSource": "aws:s3",
                    "awsRegion": "us-east-1",
                    "eventTime": "2024-01-01T00:00:00.000Z",
                    "eventName": "ObjectCreated:Post",
                    "s3": {
                        "s3SchemaVersion": "1.0",
                        "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                        "object": {"key": quote_plus(key), "size": size},
                    },
                }
            ]
        }
    )


@pytest.fixture(scope="module")
def race(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fresh DAG-only deployment and the 20 racing deploys, each waited on until it went live."""
    api = Api(stack)
    resp = api.call("POST", "/deployments", {"name": DEPLOYMENT, "mechanism": "DAG_ONLY"})
    assert resp.status_code == 201, resp.text
    root = tmp_path_factory.mktemp("racers")
    bundles = [build_bundle(root / f"racer-{n}", n) for n in range(DEPLOYS)]
    assert len({hashlib.sha256(b).hexdigest() for b in bundles}) == DEPLOYS, "every racer uploads a distinct bundle"
    deploys = run_racers(api, bundles)
    return {"api": api, "deploys": deploys, "bundles": bundles}


def test_twenty_concurrent_deploys_get_versions_one_to_twenty_and_none_is_lost(race: dict[str, Any]) -> None:
    api: Api = race["api"]
    deploys: list[dict[str, Any]] = race["deploys"]
    ids = {d["deploy_id"] for d in deploys}
    assert len(ids) == DEPLOYS

    final = {i: api.json("GET", f"/deployments/{DEPLOYMENT}/deploys/{i}")["deploy"] for i in ids}
    by_version = {d["version"]: d for d in final.values()}
    assert sorted(d["version"] for d in final.values()) == list(range(1, DEPLOYS + 1)), "versions must be distinct and gapless"

    dep = api.json("GET", f"/deployments/{DEPLOYMENT}")
    assert dep["current_version"] == DEPLOYS
    assert dep["last_version"] == DEPLOYS
    assert dep["current_deploy_id"] == by_version[DEPLOYS]["deploy_id"]

    for n in range(1, DEPLOYS + 1):
        resp = api.call("GET", f"/deployments/{DEPLOYMENT}/versions/{n}")
        assert resp.status_code == 200, f"version {n}: {resp.text}"
        record = resp.json()["version"]
        assert record["version"] == n
        assert record["deploy_id"] == by_version[n]["deploy_id"]
        assert record["sha256"] == by_version[n]["sha256"] and record["key"] == by_version[n]["key"]
    assert api.call("GET", f"/deployments/{DEPLOYMENT}/versions/{DEPLOYS + 1}").status_code == 404
    current = api.json("GET", f"/deployments/{DEPLOYMENT}/versions/current")["version"]
    assert current["version"] == DEPLOYS and current["deploy_id"] == dep["current_deploy_id"]

    listed = api.json("GET", f"/deployments/{DEPLOYMENT}/deploys?limit=100")
    assert listed["next_cursor"] is None
    assert {d["deploy_id"] for d in listed["items"]} == ids, "every deploy is listed, none extra"
    states = {d["deploy_id"]: d["state"] for d in listed["items"]}
    assert [i for i, s in states.items() if s == "ACTIVE"] == [dep["current_deploy_id"]]
    assert sorted(states.values()).count("SUPERSEDED") == DEPLOYS - 1


def test_a_duplicate_delivery_of_every_s3_event_changes_nothing(race: dict[str, Any], stack: dict[str, Any]) -> None:
    api: Api = race["api"]
    sqs, s3 = aws_client(stack, "sqs"), aws_client(stack, "s3")
    ingest_url = queue_url_ending(sqs, "-ingest")
    dlq_url = queue_url_ending(sqs, "-ingest-dlq")
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"] if "bundles" in b["Name"]]
    assert len(buckets) == 1, buckets
    bucket = buckets[0]

    wait_drained(sqs, ingest_url)
    before = snapshot(api)
    dlq_before = queue_depth(sqs, dlq_url)
    assert before["deployment"]["current_version"] == DEPLOYS

    for deploy in race["deploys"]:
        head = s3.head_object(Bucket=bucket, Key=deploy["key"])  # the upload is really there, at this size
        assert head["ContentLength"] == deploy["size"]
        sqs.send_message(QueueUrl=ingest_url, MessageBody=s3_created(bucket, deploy["key"], deploy["size"]))
    wait_drained(sqs, ingest_url)

    after = snapshot(api)
    assert after == before, "a duplicate S3 event must not change deploys, versions or the pointer"
    assert after["deployment"]["last_version"] == DEPLOYS
    assert api.call("GET", f"/deployments/{DEPLOYMENT}/versions/{DEPLOYS + 1}").status_code == 404
    assert queue_depth(sqs, dlq_url) == dlq_before, "duplicates must be handled, not dead-lettered"
