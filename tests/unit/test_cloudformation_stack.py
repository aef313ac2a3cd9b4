"""The template's core resources created by (moto's) CloudFormation, and one deploy end to end on them.

moto's CloudFormation creates the bucket, queues, topic and table, but skips a bucket's
NotificationConfiguration and AWS::SQS::QueuePolicy without failing, and makes a KMS key
symmetric whatever its KeySpec: this test creates the bucket notification and the signing key
itself from the template's definitions, and says so; the queue policy
only matters to real S3, which moto's in-process delivery does not check. (Subscriptions
are made by the API when sidecars register.)

The stack also holds what a security review checks: both buckets and their policies, the log groups,
the functions' roles, and the three functions as plain AWS::Lambda::Function (Chalice's SAM
functions with the template's settings for them, and a stub for code). moto's CloudFormation applies
neither a bucket's VersioningConfiguration nor its LoggingConfiguration: the fixture applies both from
the template, as it does the notification, so the checks below still fail when the template drops them.
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
from dagcast.bootstrap import SUPPORTED, Resolver, load_template

STACK = "cfn"
FUNCTIONS = {"APIHandler": "app.app", "Ingest": "app.ingest", "Janitor": "app.janitor", "Webhooks": "app.webhooks"}
SAM_ONLY = ("Events",)  # Chalice's SQS and schedule events: SAM makes them into other resources


def cfn_template(template: dict[str, Any]) -> dict[str, Any]:
    """The template's resources that moto's CloudFormation can create, Chalice's functions as Lambda functions."""
    resources = template["Resources"]
    kinds = (*SUPPORTED, "AWS::Logs::LogGroup")
    body = {name: res for name, res in resources.items() if res.get("Type") in kinds}
    body |= {name: resources[name] for name in ("ApiRole", "IngestRole", "JanitorRole", "WebhookRole")}
    for name, handler in FUNCTIONS.items():
        props = {k: v for k, v in resources[name]["Properties"].items() if k not in SAM_ONLY}
        body[name] = {"Type": "AWS::Lambda::Function", "Properties": {
            **props, "Runtime": "python3.11", "Handler": handler, "Code": {"ZipFile": "def app(event, context): pass\n"}}}
    return {"AWSTemplateFormatVersion": "2010-09-09", "Parameters": template["Parameters"],
            "Conditions": template["Conditions"], "Resources": body}


@pytest.fixture
def cfn_stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    _clear_caches()
    with mock_aws():
        boto3.DEFAULT_SESSION = _session()
        template = load_template()
        # moto's CloudFormation makes every KMS key a symmetric one (it ignores KeySpec and KeyUsage): the functions
        # here name that one, and the signing key the test signs with is made below with the KMS API from the
        # template's own definition, like the bucket notification.
        signing = template["Resources"]["SigningKey"]["Properties"]
        cfn = boto3.client("cloudformation")
        body = cfn_template(template)
        cfn.create_stack(StackName=STACK, TemplateBody=json.dumps(body))
        listed = cfn.describe_stack_resources(StackName=STACK)["StackResources"]
        physical = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed if "PhysicalResourceId" in r}
        # moto's CloudFormation skips queue policies, and makes the event bus without reporting its physical id
        assert boto3.client("events").describe_event_bus(Name=f"{STACK}-events")["Name"] == f"{STACK}-events"
        skipped_by_moto = {name for name, res in body["Resources"].items()
                           if res["Type"] in ("AWS::SQS::QueuePolicy", "AWS::Events::EventBus")}
        assert set(physical) == set(body["Resources"]) - skipped_by_moto, "CloudFormation created every other resource"
        s3 = boto3.client("s3")
        # What moto's CloudFormation skips, from the template: the access-log bucket's policy (moto has no
        # AWS::S3::BucketPolicy; the bundles bucket's is left out, as moto takes every request for plain HTTP and
        # its TLS-only statement would refuse them all), then versioning and access logging (which moto allows
        # only when the log bucket's policy lets the logging service write).
        resolve = Resolver(STACK, "us-east-1", boto3.client("sts").get_caller_identity()["Account"])
        resolve.refs.update(physical)
        props = resolve(template["Resources"]["AccessLogsBucketPolicy"]["Properties"])
        s3.put_bucket_policy(Bucket=props["Bucket"], Policy=json.dumps(props["PolicyDocument"]))
        for bucket in ("BundlesBucket", "AccessLogsBucket"):
            props = body["Resources"][bucket]["Properties"]
            if "VersioningConfiguration" in props:
                s3.put_bucket_versioning(Bucket=physical[bucket], VersioningConfiguration=props["VersioningConfiguration"])
            if "LoggingConfiguration" in props:
                target = props["LoggingConfiguration"]
                s3.put_bucket_logging(Bucket=physical[bucket], BucketLoggingStatus={"LoggingEnabled": {
                    "TargetBucket": physical[target["DestinationBucketName"]["Ref"]], "TargetPrefix": target["LogFilePrefix"]}})
        sqs = boto3.client("sqs")
        ingest_url = sqs.get_queue_url(QueueName=f"{STACK}-ingest")["QueueUrl"]
        ingest_arn = sqs.get_queue_attributes(QueueUrl=ingest_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        # What moto's CloudFormation skips: the bucket notification. Made here from the template's own rules.
        [rule] = body["Resources"]["BundlesBucket"]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
        s3.put_bucket_notification_configuration(
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
            yield {**names, **{f"physical:{k}": v for k, v in physical.items()}, "ingest_queue_url": ingest_url}
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


def test_both_buckets_are_versioned_encrypted_and_the_bundles_bucket_logs_its_accesses(cfn_stack: dict[str, str]) -> None:
    s3 = boto3.client("s3")
    bundles, logs = cfn_stack["physical:BundlesBucket"], cfn_stack["physical:AccessLogsBucket"]
    for bucket in (bundles, logs):
        assert s3.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled", bucket
        [rule] = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
        assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms"), bucket
    logging = s3.get_bucket_logging(Bucket=bundles)["LoggingEnabled"]
    assert logging["TargetBucket"] == logs and logging["TargetPrefix"] == "bundles-bucket/"


def test_the_queues_are_encrypted_at_rest(cfn_stack: dict[str, str]) -> None:
    # moto turns SQS-managed encryption on for every queue that does not say otherwise (as AWS does for new
    # queues): the template must say so itself, and with no KmsKeyArn it picks SQS-managed keys
    template = load_template()
    sqs = boto3.client("sqs")
    for name in ("IngestQueue", "IngestDeadLetterQueue", "WebhookQueue", "WebhookDeadLetterQueue"):
        declared = template["Resources"][name]["Properties"]
        assert declared["SqsManagedSseEnabled"] == {"Fn::If": ["HasKmsKey", {"Ref": "AWS::NoValue"}, True]}, name
        assert declared["KmsMasterKeyId"] == {"Fn::If": ["HasKmsKey", {"Ref": "KmsKeyArn"}, {"Ref": "AWS::NoValue"}]}, name
        attrs = sqs.get_queue_attributes(QueueUrl=cfn_stack[f"physical:{name}"], AttributeNames=["All"])["Attributes"]
        assert attrs["SqsManagedSseEnabled"] == "true", name


def test_every_log_group_has_the_retention_its_parameter_sets(cfn_stack: dict[str, str]) -> None:
    params = load_template()["Parameters"]
    want = {
        f"/aws/lambda/{STACK}-APIHandler": params["FunctionLogRetentionDays"]["Default"],
        f"/aws/lambda/{STACK}-Ingest": params["FunctionLogRetentionDays"]["Default"],
        f"/aws/lambda/{STACK}-Janitor": params["FunctionLogRetentionDays"]["Default"],
        f"/aws/lambda/{STACK}-Webhooks": params["FunctionLogRetentionDays"]["Default"],
        f"/aws/apigateway/{STACK}-access": params["ApiAccessLogRetentionDays"]["Default"],
    }
    groups = boto3.client("logs").describe_log_groups()["logGroups"]
    assert {g["logGroupName"]: g.get("retentionInDays") for g in groups} == want


def test_each_function_writes_to_its_own_log_group_and_has_its_reserved_concurrency(cfn_stack: dict[str, str]) -> None:
    template = load_template()
    params = template["Parameters"]
    want = {"APIHandler": "ApiReservedConcurrency", "Ingest": "IngestReservedConcurrency", "Janitor": "JanitorReservedConcurrency",
            "Webhooks": "WebhooksReservedConcurrency"}
    lam = boto3.client("lambda")
    for function, param in want.items():
        got = lam.get_function_concurrency(FunctionName=cfn_stack[f"physical:{function}"])
        assert got.get("ReservedConcurrentExecutions") == params[param]["Default"], function
        assert template["Resources"][function]["Properties"]["LoggingConfig"]["LogGroup"] == {"Ref": f"{function}LogGroup"}
