"""infra/resources.yaml: least-privilege roles, and the packaged template passes cfn-lint."""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest

from chalicelib.telemetry import NAMESPACE, Telemetry
from dagcast.bootstrap import load_template

ROOT = Path(__file__).resolve().parents[2]
AWS_REQUIRES_STAR = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}  # no resource-level permissions exist


def roles() -> dict[str, list[dict[str, Any]]]:
    """The functions' roles (API Gateway's logging role has only its AWS-managed policy)."""
    template = load_template()
    out = {}
    for name, res in template["Resources"].items():
        if res.get("Type") == "AWS::IAM::Role" and name != "ApiGatewayLogsRole":
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


def alarms() -> dict[str, dict[str, Any]]:
    return {n: r["Properties"] for n, r in load_template()["Resources"].items() if r.get("Type") == "AWS::CloudWatch::Alarm"}


def emitted_metrics(capsys: pytest.CaptureFixture[str]) -> set[tuple[str, str, frozenset[tuple[str, str]]]]:
    """(namespace, metric, dimensions) of everything Telemetry prints as EMF, each of its methods called once."""
    telemetry = Telemetry()
    telemetry.deploy_accepted(1.0, 10, 1, 2.0)
    telemetry.deploy_rejected("syntax_error", 1.0)
    telemetry.sidecars_converged(1.0)
    telemetry.import_errors(2, 1, held=True)
    telemetry.stale_sidecars(0)
    telemetry.stuck_deploys(0)
    capsys.readouterr()
    telemetry.flush()
    found = set()
    for line in capsys.readouterr().out.splitlines():
        doc = json.loads(line)
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            for dims in directive["Dimensions"]:
                for metric in directive["Metrics"]:
                    found.add((directive["Namespace"], metric["Name"], frozenset((d, doc[d]) for d in dims)))
    return found


def test_alarms_cover_what_an_operator_pages_on() -> None:
    watched = {(a["Namespace"], a["MetricName"]) for a in alarms().values()}
    assert watched == {
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),  # the ingest dead-letter queue
        ("AWS/Lambda", "Errors"),  # ingest and janitor
        ("AWS/ApiGateway", "5XXError"),
        ("dagcast", "DeploysRejected"),
        ("dagcast", "StaleSidecars"),
        ("dagcast", "StuckDeploys"),
        ("dagcast", "NewImportErrors"),
    }
    functions = {a["Dimensions"][0]["Value"]["Ref"] for a in alarms().values() if a["MetricName"] == "Errors"}
    assert functions == {"Ingest", "Janitor"}
    queues = {a["Dimensions"][0]["Value"]["Fn::GetAtt"][0] for a in alarms().values()
              if a["MetricName"] == "ApproximateNumberOfMessagesVisible"}
    assert queues == {"IngestDeadLetterQueue", "WebhookDeadLetterQueue"}
    assert any(r.get("Type") == "AWS::CloudWatch::Dashboard" for r in load_template()["Resources"].values())


def test_alarms_on_dagcast_metrics_watch_names_and_dimensions_the_code_emits(capsys: pytest.CaptureFixture[str]) -> None:
    emitted = emitted_metrics(capsys)
    for name, a in alarms().items():
        if a["Namespace"] == NAMESPACE:
            dims = frozenset((d["Name"], d["Value"]) for d in a["Dimensions"])
            assert (a["Namespace"], a["MetricName"], dims) in emitted, name


def test_every_alarm_says_what_to_do_and_can_page() -> None:
    for name, a in alarms().items():
        assert len(a["AlarmDescription"].split()) >= 15, name
        assert a["AlarmActions"] == {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}, name


@pytest.mark.parametrize("role", ["ApiRole", "IngestRole", "JanitorRole"])
def test_roles_that_look_for_objects_may_list_the_bucket_so_a_missing_key_is_a_404(role: str) -> None:
    # without s3:ListBucket S3 answers 403 to a HEAD of a key that does not exist, and BundleStorage.exists()
    # (late uploads, pruned bundles) would fail instead of saying False
    granted = {a for st in roles()[role] for a in as_list(st["Action"])}
    assert "s3:ListBucket" in granted


@pytest.mark.parametrize("role", ["ApiRole", "IngestRole", "JanitorRole"])
def test_roles_that_emit_events_put_them_on_the_bus_and_queue_webhooks_only(role: str) -> None:
    by_sid = {st["Sid"]: st for st in roles()[role]}
    assert by_sid["LifecycleEvents"]["Action"] == ["events:PutEvents"]
    assert by_sid["LifecycleEvents"]["Resource"] == {"Fn::GetAtt": ["EventBus", "Arn"]}
    assert by_sid["QueueWebhookDeliveries"]["Action"] == ["sqs:SendMessage"]
    assert by_sid["QueueWebhookDeliveries"]["Resource"] == {"Fn::GetAtt": ["WebhookQueue", "Arn"]}


def test_the_webhooks_role_reads_webhooks_and_records_deliveries_but_never_tokens_or_bundles() -> None:
    statements = roles()["WebhookRole"]
    assert allows(statements, "dynamodb:GetItem", "DEPLOYMENT#prod")
    assert allows(statements, "dynamodb:PutItem", "DEPLOYMENT#prod")
    assert not allows(statements, "dynamodb:GetItem", "TOKEN#abc")
    assert not any(a.startswith(("s3:", "sns:", "kms:", "events:")) for st in statements for a in as_list(st["Action"]))
