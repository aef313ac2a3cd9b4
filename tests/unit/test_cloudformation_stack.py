"""The template's core resources created by (moto's) CloudFormation, and one deploy end to end on them.

moto's CloudFormation creates the bucket, queues, topic and table, but skips a bucket's
NotificationConfiguration and AWS::SQS::QueuePolicy without failing, and makes a KMS key
symmetric whatever its KeySpec: this test creates the bucket notification and the signing key
itself from the template's definitions, and says so; the queue policy
only matters to real S3, which moto's in-process delivery does not check. (Subscriptions
are made by the API when sidecars register.)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from awsmock import clear_app_caches as _clear_caches
from awsmock import fresh_session as _session
from chalice.test import Client
from moto import mock_aws

import app as app_module
from chalicelib.models import CreateDeployment, Mechanism, Role
from chalicelib.signing import Verifier
from dagcast.bootstrap import SUPPORTED, load_template

STACK = "cfn"


@pytest.fixture
def cfn_stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    _clear_caches()
    with mock_aws():
        boto3.DEFAULT_SESSION = _session()
        template = load_template()
        core = {name: res for name, res in template["Resources"].items() if res.get("Type") in SUPPORTED}
        # moto's CloudFormation makes every KMS key a symmetric one (it ignores KeySpec and KeyUsage): the signing
        # key is made below with the KMS API from the template's own definition, like the bucket notification.
        signing = core.pop("SigningKey")["Properties"]
        cfn = boto3.client("cloudformation")
        body = {"AWSTemplateFormatVersion": "2010-09-09", "Parameters": template["Parameters"], "Resources": core}
        cfn.create_stack(StackName=STACK, TemplateBody=json.dumps(body))
        listed = cfn.describe_stack_resources(StackName=STACK)["StackResources"]
        physical = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed if "PhysicalResourceId" in r}
        # moto's CloudFormation skips queue policies, and makes the event bus without reporting its physical id
        events = boto3.client("events")
        assert events.describe_event_bus(Name=f"{STACK}-events")["Name"] == f"{STACK}-events"
        skipped_by_moto = {name for name, res in core.items() if res["Type"] in ("AWS::SQS::QueuePolicy", "AWS::Events::EventBus")}
        assert set(physical) == set(core) - skipped_by_moto, "CloudFormation created every other core resource"
        sqs = boto3.client("sqs")
        ingest_url = sqs.get_queue_url(QueueName=f"{STACK}-ingest")["QueueUrl"]
        ingest_arn = sqs.get_queue_attributes(QueueUrl=ingest_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        # What moto's CloudFormation skips: the bucket notification. Made here from the template's own rules.
        [rule] = core["BundlesBucket"]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
        boto3.client("s3").put_bucket_notification_configuration(
            Bucket=physical["BundlesBucket"],
            NotificationConfiguration={"QueueConfigurations": [{
                "QueueArn": ingest_arn, "Events": [rule["Event"]],
                "Filter": {"Key": {"FilterRules": rule["Filter"]["S3Key"]["Rules"]}},
            }]},
        )
        names = {
            "DAGCAST_TABLE_NAME": physical["StateTable"],
            "DAGCAST_BUNDLES_BUCKET": physical["BundlesBucket"],
            "DAGCAST_TOPIC_ARN": physical["VersionsTopic"],
            "DAGCAST_SIDECAR_QUEUE_PREFIX": f"{STACK}-sidecar-",
            "DAGCAST_SIGNING_KEY_ARN": boto3.client("kms").create_key(
                KeySpec=signing["KeySpec"], KeyUsage=signing["KeyUsage"], Policy=json.dumps(signing["KeyPolicy"])
            )["KeyMetadata"]["Arn"],
        }
        for k, v in names.items():
            monkeypatch.setenv(k, v)
        try:
            yield {**names, "ingest_queue_url": ingest_url}
        finally:
            _clear_caches()


def test_one_deploy_goes_end_to_end_on_resources_made_by_cloudformation(
    cfn_stack: dict[str, str], make_bundle: Callable[..., bytes]
) -> None:
    control = app_module.get_control()
    control.create_deployment(CreateDeployment(name="prod", mechanism=Mechanism.DAG_ONLY))
    token = control.issue_token("ops", Role.ADMIN, ["*"])
    client = Client(app_module.app)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    reg = client.http.post("/deployments/prod/sidecars", headers=headers, body=json.dumps({"name": "w1"}))
    assert reg.status_code == 201
    bundle = make_bundle({"etl.py": "from airflow import DAG\nDAG('etl')\n"})
    created = client.http.post("/deployments/prod/deploys", headers=headers,
                               body=json.dumps({"sha256": hashlib.sha256(bundle).hexdigest(), "size": len(bundle)}))
    assert created.status_code == 201
    deploy = created.json_body["deploy"]
    boto3.client("s3").put_object(Bucket=cfn_stack["DAGCAST_BUNDLES_BUCKET"], Key=deploy["key"], Body=bundle)

    sqs = boto3.client("sqs")
    messages = sqs.receive_message(QueueUrl=cfn_stack["ingest_queue_url"], MaxNumberOfMessages=10)["Messages"]
    records = [_lambda_record(m) for m in messages if "ObjectCreated" in m["Body"]]
    assert records, "S3 notified the ingest queue"
    assert app_module.ingest({"Records": records}, None) == {"batchItemFailures": []}

    view = client.http.get(f"/deployments/prod/deploys/{deploy['deploy_id']}", headers=headers).json_body
    assert view["deploy"]["state"] == "ACTIVE" and view["deploy"]["version"] == 1
    announced = sqs.receive_message(QueueUrl=reg.json_body["queue_url"])["Messages"]
    body = json.loads(announced[0]["Body"])
    statement = json.loads(body["statement"])
    assert (statement["deployment"], statement["version"], statement["sha256"]) == ("prod", 1, hashlib.sha256(bundle).hexdigest())
    [key] = reg.json_body["signing_keys"]
    assert Verifier({key["key_id"]: key["public_key"]}).verify(body["key_id"], body["statement"].encode(), body["signature"])


def _lambda_record(m: dict[str, Any]) -> dict[str, Any]:
    return {"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"], "attributes": {},
            "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:cfn-ingest", "awsRegion": "us-east-1"}
