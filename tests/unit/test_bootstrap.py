"""The embedded stack (dagcast.bootstrap) creates what infra/resources.yaml declares."""
from __future__ import annotations

import copy
import json
from typing import Any

import boto3
import pytest

from chalicelib.ingest import parse_notification
from dagcast.bootstrap import CLOUD_ONLY, SUPPORTED, Resolver, StackOutputs, bootstrap, load_template

STACK = "unit"  # the stack name the `aws` fixture bootstraps


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def props(template: dict[str, Any], logical: str) -> dict[str, Any]:
    """Properties of the template's resource `logical`, with names resolved for this stack."""
    res = template["Resources"][logical]
    resolve = Resolver(STACK, "us-east-1", boto3.client("sts").get_caller_identity()["Account"])
    names = {"TableName", "TopicName", "QueueName", "BucketName"}
    return {k: (resolve(v) if k in names else v) for k, v in res["Properties"].items()}


def queue_props(template: dict[str, Any], logical: str) -> dict[str, Any]:
    res = template["Resources"][logical]
    assert res["Type"] == "AWS::SQS::Queue"
    return dict(res["Properties"])


def queue_attrs(url: str) -> dict[str, str]:
    attrs: dict[str, str] = boto3.client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return attrs


def test_every_resource_type_in_the_template_is_created_locally_or_declared_cloud_only(template: dict[str, Any]) -> None:
    kinds = {r["Type"] for r in template["Resources"].values() if "Type" in r}
    assert set(SUPPORTED) <= kinds, "every data resource the embedded stack creates comes from the template"
    assert kinds <= set(SUPPORTED) | set(CLOUD_ONLY), sorted(kinds - set(SUPPORTED) - set(CLOUD_ONLY))
    overrides = {name for name, r in template["Resources"].items() if "Type" not in r}
    assert overrides == {"APIHandler", "Ingest", "Janitor", "Webhooks", "RestAPI"}, \
        "type-less entries only complete Chalice's functions and API"


def test_bootstrap_refuses_a_resource_type_it_does_not_support(aws: StackOutputs, template: dict[str, Any]) -> None:
    extended = copy.deepcopy(template)
    extended["Resources"]["Worker"] = {"Type": "AWS::Lambda::Function", "Properties": {"FunctionName": "w"}}
    with pytest.raises(ValueError, match=r"Worker.*AWS::Lambda::Function"):
        bootstrap(boto3.session.Session(region_name="us-east-1"), "other", extended)


def test_outputs_name_the_template_resources(aws: StackOutputs, template: dict[str, Any]) -> None:
    assert aws.table_name == props(template, "StateTable")["TableName"]
    assert aws.bucket == props(template, "BundlesBucket")["BucketName"]
    topic_name = props(template, "VersionsTopic")["TopicName"]
    assert aws.topic_arn.endswith(f":{topic_name}")
    assert aws.topic_arn in [t["TopicArn"] for t in boto3.client("sns").list_topics()["Topics"]]
    resources = template["Resources"]
    ingest_name = Resolver(STACK, "", "")(resources["IngestQueue"]["Properties"]["QueueName"])
    dlq_name = Resolver(STACK, "", "")(resources["IngestDeadLetterQueue"]["Properties"]["QueueName"])
    assert aws.ingest_queue_url.endswith(f"/{ingest_name}")
    assert aws.dead_letter_queue_url.endswith(f"/{dlq_name}")


def test_table_key_schema_and_billing_match_the_template(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = props(template, "StateTable")
    table = boto3.client("dynamodb").describe_table(TableName=aws.table_name)["Table"]
    assert table["KeySchema"] == want["KeySchema"]
    assert sorted(table["AttributeDefinitions"], key=lambda a: a["AttributeName"]) == sorted(
        want["AttributeDefinitions"], key=lambda a: a["AttributeName"]
    )
    assert table["BillingModeSummary"]["BillingMode"] == want["BillingMode"]


def test_table_time_to_live_matches_the_template(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = props(template, "StateTable")["TimeToLiveSpecification"]
    ttl = boto3.client("dynamodb").describe_time_to_live(TableName=aws.table_name)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == want["AttributeName"]
    assert ttl["TimeToLiveStatus"] == ("ENABLED" if want["Enabled"] else "DISABLED")


def test_table_point_in_time_recovery_and_encryption_match_the_template(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = props(template, "StateTable")
    ddb = boto3.client("dynamodb")
    backups = ddb.describe_continuous_backups(TableName=aws.table_name)["ContinuousBackupsDescription"]
    pitr = backups["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"]
    assert pitr == ("ENABLED" if want["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] else "DISABLED")
    sse = ddb.describe_table(TableName=aws.table_name)["Table"].get("SSEDescription", {})
    assert (sse.get("Status") == "ENABLED") == want["SSESpecification"]["SSEEnabled"]


def test_ingest_queue_redrives_to_the_dead_letter_queue_as_the_template_says(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = queue_props(template, "IngestQueue")
    attrs = queue_attrs(aws.ingest_queue_url)
    dlq_arn = queue_attrs(aws.dead_letter_queue_url)["QueueArn"]
    redrive = json.loads(attrs["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == dlq_arn
    assert int(redrive["maxReceiveCount"]) == want["RedrivePolicy"]["maxReceiveCount"]
    assert int(attrs["VisibilityTimeout"]) == want["VisibilityTimeout"]
    assert int(attrs["MessageRetentionPeriod"]) == want["MessageRetentionPeriod"]


def test_dead_letter_queue_attributes_match_the_template(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = queue_props(template, "IngestDeadLetterQueue")
    attrs = queue_attrs(aws.dead_letter_queue_url)
    assert int(attrs["MessageRetentionPeriod"]) == want["MessageRetentionPeriod"]
    assert "RedrivePolicy" not in attrs


def test_ingest_queue_policy_lets_only_the_bundles_bucket_send(aws: StackOutputs) -> None:
    attrs = queue_attrs(aws.ingest_queue_url)
    [statement] = json.loads(attrs["Policy"])["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Resource"] == attrs["QueueArn"]
    assert statement["Condition"]["ArnLike"]["aws:SourceArn"] == f"arn:aws:s3:::{aws.bucket}"


def test_bucket_notifications_target_the_ingest_queue_with_the_template_filter(aws: StackOutputs, template: dict[str, Any]) -> None:
    [want] = props(template, "BundlesBucket")["NotificationConfiguration"]["QueueConfigurations"]
    config = boto3.client("s3").get_bucket_notification_configuration(Bucket=aws.bucket)
    [got] = config["QueueConfigurations"]
    assert got["QueueArn"] == queue_attrs(aws.ingest_queue_url)["QueueArn"]
    assert got["Events"] == [want["Event"]]
    rules = {(r["Name"].lower(), r["Value"]) for r in got["Filter"]["Key"]["FilterRules"]}
    assert rules == {(r["Name"].lower(), r["Value"]) for r in want["Filter"]["S3Key"]["Rules"]}
    assert not config.get("TopicConfigurations") and not config.get("LambdaFunctionConfigurations")


def test_bucket_encryption_matches_the_template(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = props(template, "BundlesBucket")["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    rules = boto3.client("s3").get_bucket_encryption(Bucket=aws.bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert [r["ApplyServerSideEncryptionByDefault"] for r in rules] == [w["ServerSideEncryptionByDefault"] for w in want]


def test_bucket_public_access_block_matches_the_template(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = props(template, "BundlesBucket")["PublicAccessBlockConfiguration"]
    got = boto3.client("s3").get_public_access_block(Bucket=aws.bucket)["PublicAccessBlockConfiguration"]
    assert got == want


def _drain(url: str) -> list[str]:
    sqs = boto3.client("sqs")
    bodies: list[str] = []
    while True:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not msgs:
            return bodies
        for m in msgs:
            bodies.append(m["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def test_uploaded_bundles_and_only_bundles_reach_the_ingest_queue(aws: StackOutputs) -> None:
    _drain(aws.ingest_queue_url)  # the s3:TestEvent sent when notifications were configured
    s3 = boto3.client("s3")
    for key in ("bundles/analytics/0123456789a-abcdef.tar.gz", "bundles/analytics/notes.txt", "other/x.tar.gz"):
        s3.put_object(Bucket=aws.bucket, Key=key, Body=b"12345")
    events = [e for body in _drain(aws.ingest_queue_url) for e in parse_notification(body)]
    assert [(e.bucket, e.key, e.size) for e in events] == [(aws.bucket, "bundles/analytics/0123456789a-abcdef.tar.gz", 5)]


def test_bucket_versioning_matches_the_template(aws: StackOutputs, template: dict[str, Any]) -> None:
    want = template["Resources"]["BundlesBucket"]["Properties"]["VersioningConfiguration"]["Status"]
    assert want == "Enabled"
    assert boto3.client("s3").get_bucket_versioning(Bucket=aws.bucket)["Status"] == want


def test_the_signing_key_is_an_asymmetric_p256_key_for_signing(aws: StackOutputs, template: dict[str, Any]) -> None:
    props = template["Resources"]["SigningKey"]["Properties"]
    meta = boto3.client("kms").describe_key(KeyId=aws.signing_key_arn)["KeyMetadata"]
    assert (meta["KeySpec"], meta["KeyUsage"]) == (props["KeySpec"], props["KeyUsage"]) == ("ECC_NIST_P256", "SIGN_VERIFY")


def test_the_queues_are_encrypted_as_the_template_says(aws: StackOutputs) -> None:
    for url in (aws.ingest_queue_url, aws.dead_letter_queue_url):
        attrs = queue_attrs(url)
        assert attrs["SqsManagedSseEnabled"] == "true" and not attrs.get("KmsMasterKeyId"), url


def test_conditions_pick_a_branch_and_no_value_leaves_the_property_out(template: dict[str, Any]) -> None:
    queue = template["Resources"]["IngestQueue"]["Properties"]
    by_default = Resolver(STACK, "us-east-1", "123456789012")
    defaults = {name: p.get("Default") for name, p in template["Parameters"].items()}
    by_default.refs.update({**defaults, "SubnetIds": []})
    by_default.evaluate(template["Conditions"])
    assert by_default.conditions["HasKmsKey"] is False and by_default.conditions["InVpc"] is False
    resolved = by_default({k: queue[k] for k in ("SqsManagedSseEnabled", "KmsMasterKeyId")})
    assert resolved == {"SqsManagedSseEnabled": True}
    cmk = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with_key = Resolver(STACK, "us-east-1", "123456789012")
    with_key.refs.update({**defaults, "KmsKeyArn": cmk, "SubnetIds": ["subnet-1"]})
    with_key.evaluate(template["Conditions"])
    assert with_key({k: queue[k] for k in ("SqsManagedSseEnabled", "KmsMasterKeyId")}) == {"KmsMasterKeyId": cmk}
    assert with_key.conditions["InVpc"] is True
