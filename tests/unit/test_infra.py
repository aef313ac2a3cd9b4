"""infra/resources.yaml: least-privilege roles, and the packaged template passes cfn-lint."""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

from dagcast.bootstrap import load_template

ROOT = Path(__file__).resolve().parents[2]
AWS_REQUIRES_STAR = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}  # no resource-level permissions exist


def roles() -> dict[str, list[dict[str, Any]]]:
    template = load_template()
    out = {}
    for name, res in template["Resources"].items():
        if res.get("Type") == "AWS::IAM::Role":
            out[name] = [st for pol in res["Properties"]["Policies"] for st in pol["PolicyDocument"]["Statement"]]
    return out


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def allows(statements: list[dict[str, Any]], action: str, leading_key: str) -> bool:
    """Whether some Allow statement grants `action` on the state table for an item whose partition key is `leading_key`."""
    for st in statements:
        if st["Effect"] != "Allow" or action not in as_list(st["Action"]):
            continue
        cond = st.get("Condition", {}).get("ForAllValues:StringLike", {}).get("dynamodb:LeadingKeys")
        if cond is None or any(fnmatch.fnmatchcase(leading_key, pattern) for pattern in cond):
            return True
    return False


def test_there_is_one_role_per_function() -> None:
    template = load_template()
    assert set(roles()) == {"ApiRole", "IngestRole", "JanitorRole", "WebhookRole"}
    functions = ("APIHandler", "Ingest", "Janitor", "Webhooks")
    wired = {name: template["Resources"][name]["Properties"]["Role"]["Fn::GetAtt"][0] for name in functions}
    assert wired == {"APIHandler": "ApiRole", "Ingest": "IngestRole", "Janitor": "JanitorRole", "Webhooks": "WebhookRole"}


@pytest.mark.parametrize("role", ["ApiRole", "IngestRole", "JanitorRole", "WebhookRole"])
def test_no_wildcard_actions_and_no_wildcard_resources_where_aws_does_not_require_them(role: str) -> None:
    for st in roles()[role]:
        actions = as_list(st["Action"])
        assert all("*" not in a for a in actions), (role, st["Sid"], actions)
        if "*" in as_list(st["Resource"]):
            assert set(actions) <= AWS_REQUIRES_STAR, (role, st["Sid"])


def test_the_ingest_role_cannot_write_auth_records_but_can_write_deployment_records() -> None:
    ingest = roles()["IngestRole"]
    for action in ("dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:GetItem"):
        assert not allows(ingest, action, "TOKEN#0123abcd"), action
        assert not allows(ingest, action, "TOKENNAME#first-admin"), action
    assert allows(ingest, "dynamodb:UpdateItem", "DEPLOYMENT#demo")
    assert allows(ingest, "dynamodb:PutItem", "DEPLOYMENT#demo")
    assert not allows(ingest, "dynamodb:Scan", "DEPLOYMENT#demo")


def test_ingest_may_write_the_bundle_it_rebuilds_from_a_delta() -> None:
    """Its put is of bundles/ only (then validated like an upload); the API role presigns, never writes them."""
    [st] = [s for s in roles()["IngestRole"] if s["Sid"] == "WriteRebuiltBundles"]
    assert st["Action"] == ["s3:PutObject"] and "/bundles/*" in str(st["Resource"])


def test_the_janitor_cannot_touch_tokens_and_only_the_api_manages_them() -> None:
    janitor, api = roles()["JanitorRole"], roles()["ApiRole"]
    for action in ("dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"):
        assert not allows(janitor, action, "TOKEN#0123abcd"), action
    assert allows(api, "dynamodb:PutItem", "TOKEN#0123abcd")


def test_sidecar_queue_rights_are_scoped_to_the_name_prefix() -> None:
    for role in ("ApiRole", "JanitorRole"):
        [st] = [s for s in roles()[role] if s["Sid"] == "SidecarQueues"]
        assert st["Resource"]["Fn::Sub"].endswith(":${AWS::StackName}-sidecar-*")


def test_the_bucket_blocks_public_access_encrypts_and_refuses_plain_http() -> None:
    res = load_template()["Resources"]
    props = res["BundlesBucket"]["Properties"]
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"]
    [deny] = res["BundlesBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"]["Bool"]["aws:SecureTransport"] == "false"
    assert res["IngestQueue"]["Properties"]["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["IngestDeadLetterQueue", "Arn"]}
    table = res["StateTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST" and table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]


def test_alarms_cover_the_dead_letter_queue_ingest_errors_rejections_stale_sidecars_and_api_5xx() -> None:
    res = load_template()["Resources"]
    alarms = {r["Properties"]["MetricName"] for r in res.values() if r.get("Type") == "AWS::CloudWatch::Alarm"}
    assert alarms == {"ApproximateNumberOfMessagesVisible", "Errors", "DeploysRejected", "StaleSidecars", "5XXError"}
    assert any(r.get("Type") == "AWS::CloudWatch::Dashboard" for r in res.values())


@pytest.mark.parametrize("role", ["ApiRole", "IngestRole", "JanitorRole"])
def test_roles_that_look_for_objects_may_list_the_bucket_so_a_missing_key_is_a_404(role: str) -> None:
    # without s3:ListBucket S3 answers 403 to a HEAD of a key that does not exist, and BundleStorage.exists()
    # (late uploads, pruned bundles) would fail instead of saying False
    granted = {a for st in roles()[role] for a in as_list(st["Action"])}
    assert "s3:ListBucket" in granted
