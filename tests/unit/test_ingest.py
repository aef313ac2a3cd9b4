"""The ingest handler (S3 ObjectCreated -> SQS -> Lambda), invoked through Chalice's test client."""
from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.parse
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from boto3.dynamodb.conditions import Key
from chalice.test import Client
from helpers import files_of
from sidecar_calls import SidecarCalls

import app as app_module
from chalicelib.bundle import Limits, Reuse, extract_bundle, extract_delta
from chalicelib.ingest import parse_notification
from chalicelib.models import DeployState
from chalicelib.signing import Verifier
from dagcast.bootstrap import StackOutputs

MakeBundle = Callable[[dict[str, bytes | str]], bytes]


def dag(dag_id: str) -> str:
    return (
        "from datetime import datetime\n"
        "from airflow import DAG\n\n"
        f"with DAG({dag_id!r}, start_date=datetime(2024, 1, 1), schedule=None):\n"
        "    pass\n"
    )


GOOD = {"dags/etl.py": dag("etl"), "dags/include/helpers.py": "def helper():\n    return 1\n", "dags/sql/q.sql": "select 1;\n"}


def s3_notification(bucket: str, key: str, size: int, event_name: str = "ObjectCreated:Post") -> str:
    """The body S3 delivers to the ingest queue for one object, key URL-encoded like S3 does."""
    return json.dumps(
        {
            "Records": [
                {
                    "eventVersion": "2.1",
                    "eventSource": "aws:s3",
                    "awsRegion": "us-east-1",
                    "eventTime": "2024-01-01T00:00:00.000Z",
                    "eventName": event_name,
                    "userIdentity": {"principalId": "AWS:EXAMPLE"},
                    "requestParameters": {"sourceIPAddress": "127.0.0.1"},
                    "responseElements": {"x-amz-request-id": "REQ", "x-amz-id-2": "ID2"},
                    "s3": {
                        "s3SchemaVersion": "1.0",
                        "configurationId": "ingest",
                        "bucket": {"name": bucket, "ownerIdentity": {"principalId": "EXAMPLE"}, "arn": f"arn:aws:s3:::{bucket}"},
                        "object": {"key": urllib.parse.quote_plus(key), "size": size, "eTag": "etag", "sequencer": "0A1B"},
                    },
                }
            ]
        }
    )


def sqs_event(*bodies: str) -> dict[str, Any]:
    """A Lambda SQS event with one record per body, each with its own message id."""
    return {
        "Records": [
            {
                "messageId": f"msg-{i}",
                "receiptHandle": f"handle-{i}",
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1704067200000",
                    "SenderId": "s3",
                    "ApproximateFirstReceiveTimestamp": "1704067200000",
                },
                "messageAttributes": {},
                "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:unit-ingest",
                "awsRegion": "us-east-1",
            }
            for i, body in enumerate(bodies)
        ]
    }


def start_deploy(
    client: Client, deployment: str, token: str, data: bytes, *, sha256: str | None = None, size: int | None = None
) -> dict[str, Any]:
    body = {"sha256": sha256 or hashlib.sha256(data).hexdigest(), "size": len(data) if size is None else size}
    resp = client.http.post(
        f"/deployments/{deployment}/deploys",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=json.dumps(body),
    )
    assert resp.status_code == 201, resp.body
    deploy: dict[str, Any] = resp.json_body["deploy"]
    return deploy


def upload(aws: StackOutputs, key: str, data: bytes) -> None:
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=key, Body=data)


def ingest(client: Client, *bodies: str) -> dict[str, Any]:
    payload: dict[str, Any] = client.lambda_.invoke("ingest", sqs_event(*bodies)).payload
    return payload


def deploy_and_ingest(client: Client, aws: StackOutputs, deployment: str, token: str, data: bytes, **announce: Any) -> dict[str, Any]:
    deploy = start_deploy(client, deployment, token, data, **announce)
    upload(aws, deploy["key"], data)
    result = ingest(client, s3_notification(aws.bucket, deploy["key"], len(data)))
    assert result == {"batchItemFailures": []}
    return deploy


def items(aws: StackOutputs, deployment: str, prefix: str) -> list[dict[str, Any]]:
    table = boto3.resource("dynamodb").Table(aws.table_name)
    out = table.query(KeyConditionExpression=Key("pk").eq(f"DEPLOYMENT#{deployment}") & Key("sk").begins_with(prefix))
    return list(out["Items"])


def state_of(deployment: str, deploy_id: str) -> DeployState:
    return app_module.get_store().get_deploy(deployment, deploy_id).state


@pytest.fixture
def announcements(aws: StackOutputs) -> Callable[[], list[dict[str, Any]]]:
    """Subscribe a queue to the versions topic (raw delivery); returns a reader of what was announced."""
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="unit-listener")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    boto3.client("sns").subscribe(
        TopicArn=aws.topic_arn, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"}
    )

    def read() -> list[dict[str, Any]]:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        for m in msgs:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        return [json.loads(m["Body"]) for m in msgs]

    return read


# --- the happy path ---------------------------------------------------------------------


def test_valid_bundle_becomes_version_1_and_is_announced(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle, announcements: Any
) -> None:
    data = make_bundle(GOOD)
    sha = hashlib.sha256(data).hexdigest()
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, data)

    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.ACTIVE
    assert stored.version == 1
    assert stored.files == 3
    assert stored.dag_ids == ["etl"]
    assert stored.errors == []
    assert stored.uploaded_at is not None and stored.activated_at is not None

    dep = app_module.get_store().get_deployment(deployment)
    assert (dep.current_version, dep.last_version, dep.current_deploy_id) == (1, 1, deploy["deploy_id"])

    versions = items(aws, deployment, "VERSION#")
    assert len(versions) == 1
    assert versions[0]["version"] == 1
    assert versions[0]["deploy_id"] == deploy["deploy_id"]
    assert versions[0]["sha256"] == sha
    assert versions[0]["key"] == deploy["key"]

    [announced] = announcements()
    url = announced.pop("download_url")
    statement = announced.pop("statement")
    signature, key_id = announced.pop("signature"), announced.pop("key_id")
    assert announced == {"deployment": deployment, "version": 1}, "routing fields only, outside the statement"
    signer = app_module.get_signer()
    assert key_id == signer.key_id
    assert Verifier({key_id: signer.public_key_pem}).verify(key_id, statement.encode(), signature)
    record = versions[0]
    assert json.loads(statement) == {
        "type": "dagcast.version", "deployment": deployment, "deployment_id": dep.uid, "version": 1,
        "deploy_id": deploy["deploy_id"], "sha256": sha, "size": len(data), "created_at": int(record["created_at"]),
        "object_version": record["object_version"], "limits": Limits().model_dump(), "delta": None, "parse_mode": "report",
    }
    assert urllib.parse.quote(deploy["key"], safe="/") in url and "X-Amz-Signature=" in url
    assert f"versionId={record['object_version']}" in url, "the download is pinned to the validated object version"


def test_current_version_is_served_with_a_download_url_after_activation(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, sidecar_token: str, make_bundle: MakeBundle
) -> None:
    data = make_bundle(GOOD)
    deploy_and_ingest(client, aws, deployment, deployer_token, data)
    headers = {"Authorization": f"Bearer {sidecar_token}", "Content-Type": "application/json"}
    for path in ("versions/current", "versions/1"):
        resp = client.http.get(f"/deployments/{deployment}/{path}", headers=headers)
        assert resp.status_code == 200, (path, resp.body)
        assert resp.json_body["version"]["version"] == 1
        assert resp.json_body["version"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert resp.json_body["download_url"].startswith("https://")
        assert urllib.parse.quote(resp.json_body["version"]["key"], safe="/") in resp.json_body["download_url"]


def test_second_valid_deploy_becomes_version_2(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle, announcements: Any
) -> None:
    first = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(GOOD))
    second_data = make_bundle({**GOOD, "dags/more.py": dag("more")})
    second = deploy_and_ingest(client, aws, deployment, deployer_token, second_data)

    store = app_module.get_store()
    assert store.get_deploy(deployment, first["deploy_id"]).version == 1
    assert store.get_deploy(deployment, first["deploy_id"]).state is DeployState.SUPERSEDED
    assert store.get_deploy(deployment, second["deploy_id"]).state is DeployState.ACTIVE
    assert store.get_deploy(deployment, second["deploy_id"]).version == 2
    assert store.get_deploy(deployment, second["deploy_id"]).dag_ids == ["etl", "more"]
    dep = store.get_deployment(deployment)
    assert (dep.current_version, dep.last_version, dep.current_deploy_id) == (2, 2, second["deploy_id"])
    assert sorted(v["version"] for v in items(aws, deployment, "VERSION#")) == [1, 2]
    assert [m["version"] for m in announcements()] == [1, 2]


def test_deploy_view_converges_when_sidecars_report_the_new_version(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, sidecar_token: str, make_bundle: MakeBundle
) -> None:
    headers = {"Authorization": f"Bearer {sidecar_token}", "Content-Type": "application/json"}
    scheduler = SidecarCalls(client, deployment, sidecar_token, "scheduler")
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(GOOD))
    path = f"/deployments/{deployment}/deploys/{deploy['deploy_id']}"

    before = client.http.get(path, headers=headers).json_body
    assert (before["deploy"]["state"], before["sidecars_on_version"], before["converged"]) == ("ACTIVE", 0, False)
    for wrong in ({"version": 1}, {"version": 1, "sha256": "0" * 64, "deployment_id": scheduler.deployment_id},
                  {"version": 2, "sha256": deploy["sha256"], "deployment_id": scheduler.deployment_id},
                  {"version": 1, "sha256": deploy["sha256"], "deployment_id": "another-stack"}):
        assert scheduler.report(wrong).status_code == 200
        view = client.http.get(path, headers=headers).json_body
        assert (view["sidecars_on_version"], view["converged"]) == (0, False), f"{wrong} is not version 1"
    scheduler.report_running(1)
    after = client.http.get(path, headers=headers).json_body
    assert (after["live_sidecars"], after["sidecars_on_version"], after["converged"]) == (1, 1, True)
    assert after["sidecars"][0]["on_current"] is True


# --- deltas -----------------------------------------------------------------------------

ASSETS = {f"dags/sql/q{i}.sql": f"-- query {i}\n" + "select 1;\n" * 400 for i in range(6)}


def test_a_deploy_carries_a_delta_against_the_live_version_that_rebuilds_it_exactly(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, sidecar_token: str, make_bundle: MakeBundle,
    announcements: Any, tmp_path: Any,
) -> None:
    first_data = make_bundle({**GOOD, **ASSETS})
    deploy_and_ingest(client, aws, deployment, deployer_token, first_data)
    files = {k: v for k, v in {**GOOD, **ASSETS}.items() if k != "dags/include/helpers.py"}
    second_data = make_bundle({**files, "dags/etl.py": dag("etl") + "# changed\n"})
    second = deploy_and_ingest(client, aws, deployment, deployer_token, second_data)

    record = app_module.get_store().get_version(deployment, 2)
    assert app_module.get_store().get_version(deployment, 1).delta is None, "a first version has no base"
    delta = record.delta
    assert delta is not None
    assert (delta.base_version, delta.files, delta.removed) == (1, 1, ["dags/include/helpers.py"])
    assert delta.key == f"deltas/{deployment}/{second['deploy_id']}.tar.gz"
    archive = boto3.client("s3").get_object(Bucket=aws.bucket, Key=delta.key)["Body"].read()
    assert hashlib.sha256(archive).hexdigest() == delta.sha256 and len(archive) == delta.size < len(second_data)

    *_, announced = announcements()
    assert json.loads(announced["statement"])["delta"] == delta.model_dump(mode="json")
    assert delta.base_sha256 == hashlib.sha256(first_data).hexdigest()
    assert urllib.parse.quote(delta.key, safe="/") in announced["delta_url"]
    headers = {"Authorization": f"Bearer {sidecar_token}"}
    view = client.http.get(f"/deployments/{deployment}/versions/2", headers=headers).json_body
    assert view["version"]["delta"] == delta.model_dump(mode="json") and "X-Amz-Signature=" in view["delta_url"]

    base_dir = tmp_path / "v1"
    base = extract_bundle(io.BytesIO(first_data), base_dir)
    got = extract_delta(io.BytesIO(archive), tmp_path / "v2", Reuse.from_manifest(base_dir, base.manifest),
                        delta.removed, delta.files_sha256)
    full = extract_bundle(io.BytesIO(second_data), tmp_path / "full")
    assert [(e.path, e.sha256) for e in got.manifest] == [(e.path, e.sha256) for e in full.manifest]
    assert files_of(tmp_path / "v2") == files_of(tmp_path / "full")


def test_no_delta_when_most_of_the_bundle_changed(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(GOOD))
    deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/other.py": dag("other")}))
    assert app_module.get_store().get_version(deployment, 2).delta is None


def test_a_large_bundle_is_compiled_by_worker_processes_with_the_same_outcome(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import chalicelib.bundle.validate as validation
    import chalicelib.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "PARALLEL_MIN_BUNDLE", 0)
    monkeypatch.setattr(validation, "PARALLEL_AFTER", 0)
    monkeypatch.setattr(ingest_module, "_COMPILED", ingest_module.CompileCache())
    files = {f"dags/d{i}.py": dag(f"d{i}") for i in range(200)}
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(files))
    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.ACTIVE and stored.dag_ids == sorted(f"d{i}" for i in range(200))
    assert ingest_module._WORKERS._workers and all(w.alive() for w in ingest_module._WORKERS._workers)

    broken = deploy_and_ingest(client, aws, deployment, deployer_token,
                               make_bundle({**files, "dags/zz.py": "def f(:\n", "dags/new.py": dag("new")}))
    stored = app_module.get_store().get_deploy(deployment, broken["deploy_id"])
    assert stored.state is DeployState.REJECTED
    assert [(e.path, e.line, e.code) for e in stored.errors] == [("dags/zz.py", 1, "syntax_error")]


# --- rejections -------------------------------------------------------------------------


def test_bundle_with_a_syntax_error_is_rejected_naming_file_and_line(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle, announcements: Any
) -> None:
    broken = "x = 1\ny = 2\ndef oops(:\n    pass\n"
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({**GOOD, "dags/broken.py": broken}))

    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.REJECTED
    assert stored.version is None
    assert [(e.code, e.path, e.line) for e in stored.errors] == [("syntax_error", "dags/broken.py", 3)]
    assert "dags/broken.py" in stored.errors[0].message and "line 3" in stored.errors[0].message
    assert items(aws, deployment, "VERSION#") == []
    dep = app_module.get_store().get_deployment(deployment)
    assert (dep.current_version, dep.last_version) == (0, 0)
    assert announcements() == []


def test_rejected_deploy_does_not_replace_the_current_version(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    good = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(GOOD))
    bad = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/bad.py": "def (\n"}))
    assert state_of(deployment, bad["deploy_id"]) is DeployState.REJECTED
    dep = app_module.get_store().get_deployment(deployment)
    assert (dep.current_version, dep.current_deploy_id) == (1, good["deploy_id"])


def test_bytes_differing_from_the_announced_sha256_are_rejected_as_checksum_mismatch(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle, announcements: Any
) -> None:
    announced = make_bundle(GOOD)
    uploaded = make_bundle({**GOOD, "dags/etl.py": dag("etl2")})
    assert len(uploaded) == len(announced)  # same size, other content
    deploy = start_deploy(client, deployment, deployer_token, announced)
    upload(aws, deploy["key"], uploaded)
    assert ingest(client, s3_notification(aws.bucket, deploy["key"], len(uploaded))) == {"batchItemFailures": []}

    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.REJECTED
    assert [e.code for e in stored.errors] == ["checksum_mismatch"]
    assert hashlib.sha256(uploaded).hexdigest() in stored.errors[0].message
    assert items(aws, deployment, "VERSION#") == []
    assert announcements() == []


def test_upload_of_a_different_size_is_rejected_as_size_mismatch(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    data = make_bundle(GOOD)
    deploy = start_deploy(client, deployment, deployer_token, data, size=len(data) + 10)
    upload(aws, deploy["key"], data)
    assert ingest(client, s3_notification(aws.bucket, deploy["key"], len(data))) == {"batchItemFailures": []}

    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.REJECTED
    assert [e.code for e in stored.errors] == ["size_mismatch"]
    assert str(len(data)) in stored.errors[0].message and str(len(data) + 10) in stored.errors[0].message
    assert items(aws, deployment, "VERSION#") == []


def test_bundle_over_a_deployment_limit_is_rejected_with_the_limit(
    client: Client, aws: StackOutputs, deployment: str, admin_token: str, make_bundle: MakeBundle
) -> None:
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    resp = client.http.patch(f"/deployments/{deployment}", headers=headers, body=json.dumps({"limits": {"max_members": 2}}))
    assert resp.status_code == 200, resp.body
    deploy = deploy_and_ingest(client, aws, deployment, admin_token, make_bundle(GOOD))  # 3 files (+ directories)
    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.REJECTED
    assert [e.code for e in stored.errors] == ["too_many_members"]


def test_large_bundle_over_a_member_size_limit_is_rejected_with_the_limit_not_a_checksum_mismatch(
    client: Client, aws: StackOutputs, deployment: str, admin_token: str, make_bundle: MakeBundle
) -> None:
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    limits = {"limits": {"max_member_bytes": 1024 * 1024}}
    assert client.http.patch(f"/deployments/{deployment}", headers=headers, body=json.dumps(limits)).status_code == 200
    data = make_bundle({"dags/etl.py": dag("etl"), "dags/data/blob.bin": os.urandom(3 * 1024 * 1024)})
    assert len(data) > 2 * 1024 * 1024
    deploy = deploy_and_ingest(client, aws, deployment, admin_token, data)
    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.REJECTED
    assert [e.code for e in stored.errors] == ["member_too_large"]


# --- at-least-once delivery -------------------------------------------------------------


def test_duplicate_delivery_keeps_exactly_one_version(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle, announcements: Any
) -> None:
    data = make_bundle(GOOD)
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, data)
    before = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    body = s3_notification(aws.bucket, deploy["key"], len(data))

    assert ingest(client, body) == {"batchItemFailures": []}
    assert ingest(client, body, body) == {"batchItemFailures": []}

    after = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert after == before
    assert [v["version"] for v in items(aws, deployment, "VERSION#")] == [1]
    dep = app_module.get_store().get_deployment(deployment)
    assert (dep.current_version, dep.last_version) == (1, 1)
    assert [m["version"] for m in announcements()] == [1]


def test_duplicate_delivery_of_a_rejected_deploy_leaves_it_rejected(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    data = make_bundle({"dags/bad.py": "def (\n"})
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, data)
    before = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert before.state is DeployState.REJECTED
    assert ingest(client, s3_notification(aws.bucket, deploy["key"], len(data))) == {"batchItemFailures": []}
    assert app_module.get_store().get_deploy(deployment, deploy["deploy_id"]) == before
    assert items(aws, deployment, "VERSION#") == []


def test_delivery_after_a_crash_mid_validation_finishes_the_deploy(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle, announcements: Any
) -> None:
    data = make_bundle(GOOD)
    deploy = start_deploy(client, deployment, deployer_token, data)
    upload(aws, deploy["key"], data)
    # The first delivery got as far as PENDING -> VALIDATING, then the function died.
    assert app_module.get_store().start_validation(deployment, deploy["deploy_id"], 1)
    assert state_of(deployment, deploy["deploy_id"]) is DeployState.VALIDATING

    assert ingest(client, s3_notification(aws.bucket, deploy["key"], len(data))) == {"batchItemFailures": []}

    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.ACTIVE
    assert stored.version == 1
    assert stored.uploaded_at == 1  # kept from the first attempt
    assert [v["version"] for v in items(aws, deployment, "VERSION#")] == [1]
    assert [m["version"] for m in announcements()] == [1]


# --- what ingest ignores, and how it reports failures -----------------------------------


def test_s3_test_event_is_ignored(client: Client, aws: StackOutputs, deployment: str) -> None:
    body = json.dumps(
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2024-01-01T00:00:00.000Z", "Bucket": aws.bucket, "RequestId": "R"}
    )
    assert ingest(client, body) == {"batchItemFailures": []}
    assert items(aws, deployment, "VERSION#") == []


@pytest.mark.parametrize(
    "key",
    [
        "readme.txt",
        "bundles/analytics/notes.txt",
        "bundles/analytics/extra/0123456789a-abcdef.tar.gz",
        "bundles/analytics/0123456789a-abcdef.tar.gz",  # bundle-shaped, but no such deploy
        "other/analytics/0123456789a-abcdef.tar.gz",
    ],
)
def test_objects_that_are_not_bundles_of_a_deploy_are_ignored(client: Client, aws: StackOutputs, deployment: str, key: str) -> None:
    upload(aws, key, b"not a bundle")
    assert ingest(client, s3_notification(aws.bucket, key, 12)) == {"batchItemFailures": []}
    assert items(aws, deployment, "VERSION#") == []
    assert items(aws, deployment, "DEPLOY#") == []


def test_notification_for_another_bucket_is_ignored(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    data = make_bundle(GOOD)
    deploy = start_deploy(client, deployment, deployer_token, data)
    upload(aws, deploy["key"], data)
    assert ingest(client, s3_notification("someone-elses-bucket", deploy["key"], len(data))) == {"batchItemFailures": []}
    assert state_of(deployment, deploy["deploy_id"]) is DeployState.PENDING


def test_non_create_events_and_non_json_bodies_are_ignored(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    data = make_bundle(GOOD)
    deploy = start_deploy(client, deployment, deployer_token, data)
    upload(aws, deploy["key"], data)
    removed = s3_notification(aws.bucket, deploy["key"], len(data), event_name="ObjectRemoved:Delete")
    assert ingest(client, removed, "not json at all", "[1, 2]") == {"batchItemFailures": []}
    assert state_of(deployment, deploy["deploy_id"]) is DeployState.PENDING


@pytest.mark.parametrize("key", ["bundles/a b+c/x.tar.gz", "bundles/analytics/0123456789a-abcdef.tar.gz", "bundles/é~%/x.tar.gz"])
def test_notification_keys_are_url_decoded(key: str) -> None:
    # Deployment names cannot hold characters S3 escapes, so the decoding is checked on the parsed event.
    [event] = parse_notification(s3_notification("bucket", key, 5))
    assert (event.bucket, event.key, event.size) == ("bucket", key, 5)


def test_batch_reports_only_the_record_that_failed(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    good_data = make_bundle(GOOD)
    good = start_deploy(client, deployment, deployer_token, good_data)
    upload(aws, good["key"], good_data)
    missing_data = make_bundle({"dags/other.py": dag("other")})
    missing = start_deploy(client, deployment, deployer_token, missing_data)  # announced, never uploaded

    result = ingest(
        client,
        s3_notification(aws.bucket, missing["key"], len(missing_data)),
        s3_notification(aws.bucket, good["key"], len(good_data)),
        json.dumps({"Event": "s3:TestEvent"}),
    )

    assert result == {"batchItemFailures": [{"itemIdentifier": "msg-0"}]}
    assert state_of(deployment, good["deploy_id"]) is DeployState.ACTIVE
    assert state_of(deployment, missing["deploy_id"]) is DeployState.VALIDATING  # redelivery will finish it
    assert [v["deploy_id"] for v in items(aws, deployment, "VERSION#")] == [good["deploy_id"]]

    # The redelivery, once the object exists, completes the failed record.
    upload(aws, missing["key"], missing_data)
    assert ingest(client, s3_notification(aws.bucket, missing["key"], len(missing_data))) == {"batchItemFailures": []}
    assert state_of(deployment, missing["deploy_id"]) is DeployState.ACTIVE
    assert app_module.get_store().get_deployment(deployment).current_version == 2
