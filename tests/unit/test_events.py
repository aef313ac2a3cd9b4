"""Lifecycle events from the functions that see them, on moto's EventBridge; and that emitting never
fails the operation that caused it."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from awsmock import clear_app_caches
from botocore.exceptions import ClientError
from chalice.test import Client
from sidecar_calls import SidecarCalls
from test_ingest import dag, deploy_and_ingest

import app as app_module
from chalicelib.events import EventSink, EventType
from chalicelib.models import Heartbeat, RegisterSidecar, Role
from chalicelib.notify import SidecarQueues
from chalicelib.service import ControlPlane, now_ms
from chalicelib.settings import get_settings
from dagcast.bootstrap import StackOutputs


class Clock:
    def __init__(self) -> None:
        self.now = now_ms()

    def __call__(self) -> int:
        return self.now


class Events:
    """An EventBridge rule on the stack's bus with an SQS target, as a CI system would set it up."""

    def __init__(self, bus: str) -> None:
        self.sqs = boto3.client("sqs")
        self.url = self.sqs.create_queue(QueueName="unit-events")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events = boto3.client("events")
        events.put_rule(Name="all", EventBusName=bus, EventPattern=json.dumps({"source": ["dagcast"]}))
        events.put_targets(Rule="all", EventBusName=bus, Targets=[{"Id": "q", "Arn": arn}])

    def take(self) -> list[dict[str, Any]]:
        out = []
        while True:
            got = self.sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10).get("Messages", [])
            if not got:
                return out
            for m in got:
                out.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=m["ReceiptHandle"])


@pytest.fixture
def events(aws: StackOutputs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Events]:
    monkeypatch.setenv("DAGCAST_EVENT_BUS_NAME", aws.event_bus_name)
    clear_app_caches()
    yield Events(aws.event_bus_name)
    clear_app_caches()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def on_clock(events: Events, deployment: str, clock: Clock) -> ControlPlane:
    s = get_settings()
    queues = SidecarQueues(boto3.client("sqs"), boto3.client("sns"), s.topic_arn, s.sidecar_queue_prefix)
    return ControlPlane(s, app_module.get_store(), app_module.get_bundles(), queues, app_module.get_publisher(),
                        clock=clock, signer=app_module.get_signer())


def test_a_sidecar_gone_silent_is_announced_once_per_silence(on_clock: ControlPlane, events: Events, deployment: str,
                                                             clock: Clock) -> None:
    on_clock.issue_token("sc", Role.SIDECAR, [deployment])
    token = app_module.get_store().token_by_name("sc")
    assert token is not None
    reg = on_clock.register_sidecar(deployment, RegisterSidecar(name="worker-1", component="worker"), token, None)
    events.take()
    clock.now += (get_settings().sidecar_stale_seconds + 5) * 1000
    on_clock.janitor()
    on_clock.janitor()  # the same silence: no second event
    [stale] = [e for e in events.take() if e["detail"]["type"] == "sidecar.stale"]
    assert stale["detail-type"] == "Sidecar Stale" and stale["detail"]["sidecar"]["name"] == "worker-1"
    assert stale["detail"]["deployment"] == deployment
    first_id = stale["detail"]["id"]

    on_clock.heartbeat(deployment, "worker-1", Heartbeat(version=0), reg.secret)  # back ...
    clock.now += (get_settings().sidecar_stale_seconds + 5) * 1000  # ... and silent again
    on_clock.janitor()
    [again] = [e for e in events.take() if e["detail"]["type"] == "sidecar.stale"]
    assert again["detail"]["id"] != first_id


def test_new_import_errors_in_a_parse_report_are_an_event_naming_the_sidecar_and_files(
    client: Client, aws: StackOutputs, events: Events, deployment: str, deployer_token: str, sidecar_token: str,
    make_bundle: Any,
) -> None:
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/a.py": dag("a")}))
    sidecar = SidecarCalls(client, deployment, sidecar_token, "worker-1")
    body = {"version": 1, "sha256": deploy["sha256"], "status": "parsed", "files": 2, "dags": 1,
            "import_errors": [{"path": "dags/b.py", "line": 1, "type": "ModuleNotFoundError",
                               "message": "No module named 'pandas'"}],
            "import_errors_total": 1, "new_import_errors": ["dags/b.py"], "new_import_errors_total": 1}
    resp = sidecar._call("PUT", f"/deployments/{deployment}/sidecars/worker-1/parse", body)
    assert resp.status_code == 200, resp.body
    [found] = [e for e in events.take() if e["detail"]["type"] == "deploy.import_errors"]
    detail = found["detail"]
    assert found["detail-type"] == "Import Errors" and detail["deploy_id"] == deploy["deploy_id"]
    assert detail["sidecar"] == "worker-1" and detail["new_import_errors"] == ["dags/b.py"]
    assert detail["import_errors"][0]["type"] == "ModuleNotFoundError"
    assert detail["id"] == f"deploy.import_errors:{deployment}:{deploy['deploy_id']}:worker-1"
    # a clean report is no event
    clean = {**body, "import_errors": [], "import_errors_total": 0, "new_import_errors": [], "new_import_errors_total": 0}
    assert sidecar._call("PUT", f"/deployments/{deployment}/sidecars/worker-1/parse", clean).status_code == 200
    assert not [e for e in events.take() if e["detail"]["type"] == "deploy.import_errors"]


class _Failing:
    def put_events(self, **_: Any) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "PutEvents")

    def send_message_batch(self, **_: Any) -> dict[str, Any]:
        return {"Failed": [{"Id": "0", "Code": "KMS.AccessDenied", "Message": "no"}]}


def test_an_event_that_cannot_be_put_or_queued_is_counted_and_never_raised() -> None:
    failed: list[str] = []
    from chalicelib.models import Webhook

    hooks = [Webhook(deployment="d", webhook_id="0123456789ab", url="http://x", events=["*"])]
    sink = EventSink(_Failing(), "bus", _Failing(), "https://queue", lambda _d: hooks, on_failure=failed.append)
    sink.emit(EventType.LIVE, {"id": "deploy.live:d:x", "type": "deploy.live", "deployment": "d"})
    assert failed == ["deploy.live", "deploy.live"], "the put and the webhook queueing each counted once"


def test_webhooks_get_only_the_event_types_they_asked_for() -> None:
    from chalicelib.models import Webhook

    sent: list[dict[str, Any]] = []

    class Sqs:
        def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
            sent.extend(json.loads(e["MessageBody"]) for e in Entries)
            return {"Successful": []}

    hooks = [Webhook(deployment="d", webhook_id="a" * 12, url="http://x", events=["deploy.live"]),
             Webhook(deployment="d", webhook_id="b" * 12, url="http://x", events=["*"]),
             Webhook(deployment="d", webhook_id="c" * 12, url="http://x", events=["deploy.rejected"])]
    sink = EventSink(None, None, Sqs(), "https://queue", lambda _d: hooks)
    sink.emit(EventType.LIVE, {"id": "deploy.live:d:x", "type": "deploy.live", "deployment": "d"})
    assert sorted(m["webhook_id"] for m in sent) == ["a" * 12, "b" * 12]
    assert json.loads(sent[0]["body"])["id"] == "deploy.live:d:x"
