"""Where a deploy's time goes, from the system's own records: the timestamps on a deploy, what
sidecars report, the `stages` the API computes from them, and the deploy long poll `--wait` uses."""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from chalice.test import Client
from conftest import Sidecars

import app as app_module
from chalicelib.exceptions import NotFound
from chalicelib.ingest import parse_notification
from chalicelib.models import CreateDeploy, Deploy, DeployState
from chalicelib.notify import SidecarQueues
from chalicelib.service import ControlPlane
from chalicelib.settings import get_settings
from dagcast.bootstrap import StackOutputs

STORED_AT = "2024-01-01T00:00:00.250Z"
STORED_MS = 1_704_067_200_250


def notification(bucket: str, key: str, size: int, event_time: str | None = STORED_AT) -> str:
    record: dict[str, Any] = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Post",
        "s3": {"bucket": {"name": bucket}, "object": {"key": urllib.parse.quote_plus(key), "size": size}},
    }
    if event_time is not None:
        record["eventTime"] = event_time
    return json.dumps({"Records": [record]})


def publish(control: ControlPlane, aws: StackOutputs, deployment: str, bundle: bytes) -> str:
    """Create a deploy, upload its bundle and run ingest on S3's notification (as the SQS event source would)."""
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(bundle).hexdigest(), size=len(bundle)), "t")
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=bundle)
    body = notification(aws.bucket, created.deploy.key, len(bundle))
    event = {"Records": [{
        "messageId": "m1", "receiptHandle": "r1", "body": body, "attributes": {}, "messageAttributes": {},
        "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:q", "awsRegion": "us-east-1",
    }]}
    assert app_module.ingest(event, None) == {"batchItemFailures": []}
    return created.deploy.deploy_id


@pytest.fixture
def live_deploy(control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], sidecars: Sidecars) -> str:
    """An ACTIVE v1 with two registered sidecars that have not run it yet."""
    for name in ("w1", "w2"):
        sidecars.register(name)
    return publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n", "q.sql": "select 1;\n"}))


# --- the record and the stages computed from it ----------------------------------------------


def test_stages_are_the_spans_between_the_deploys_own_timestamps() -> None:
    deploy = Deploy(
        deployment="d", deploy_id="0123456789a-abcdef", state=DeployState.ACTIVE, sha256="0" * 64, size=1, key="k",
        created_at=10_000, stored_at=10_400, uploaded_at=10_450, validation_ms=300, activated_at=10_900,
        notified={"a": 10_950, "b": 11_000}, activations={"a": 11_200, "b": 11_600}, converged_at=11_600,
    )
    st = deploy.stages()
    assert (st.upload_s, st.upload_to_ingest_s, st.validation_s, st.ingest_to_active_s) == (0.4, 0.05, 0.3, 0.45)
    assert (st.active_to_all_live_s, st.created_to_all_live_s) == (0.7, 1.6)
    assert [(s.name, s.notified_s, s.sync_s, s.live_s) for s in st.sidecars] == [("a", 0.05, 0.25, 0.3), ("b", 0.1, 0.6, 0.7)]


def test_a_stage_that_has_not_happened_is_none_not_zero() -> None:
    pending = Deploy(deployment="d", deploy_id="0123456789a-abcdef", state=DeployState.PENDING, sha256="0" * 64, size=1,
                     key="k", created_at=10_000)
    st = pending.stages()
    assert st.upload_s is None and st.upload_to_ingest_s is None and st.validation_s is None
    assert st.active_to_all_live_s is None and st.created_to_all_live_s is None and st.sidecars == []
    reconciled = pending.model_copy(update={"activated_at": 1, "activations": {"old-sidecar": 5}})
    assert [(s.notified_s, s.sync_s, s.live_s) for s in reconciled.stages().sidecars] == [(None, None, 0.004)]


def test_ingest_records_when_s3_stored_the_upload_and_keeps_it_on_a_redelivery(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes]
) -> None:
    deploy_id = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    stored = app_module.get_store().get_deploy(deployment, deploy_id)
    assert stored.stored_at == STORED_MS
    assert stored.uploaded_at is not None and stored.activated_at is not None
    assert stored.stages().upload_to_ingest_s == (stored.uploaded_at - STORED_MS) / 1000
    # a second delivery of the notification (with another eventTime) changes nothing
    assert app_module.get_store().start_validation(deployment, deploy_id, 1, stored_at=1) is None
    assert app_module.get_store().get_deploy(deployment, deploy_id).stored_at == STORED_MS


@pytest.mark.parametrize(("event_time", "expected"), [
    (STORED_AT, STORED_MS), ("2024-01-01T00:00:00Z", STORED_MS - 250), ("2024-01-01T00:00:00.250", STORED_MS),
    (None, None), ("yesterday", None),
])
def test_the_notifications_event_time_is_read_as_utc_epoch_ms(event_time: str | None, expected: int | None) -> None:
    [event] = parse_notification(notification("b", "bundles/d/0123456789a-abcdef.tar.gz", 5, event_time))
    assert event.stored_at == expected


def test_a_sidecar_reports_when_it_learned_of_a_version_and_the_deploy_keeps_it(
    control: ControlPlane, deployment: str, live_deploy: str, sidecars: Sidecars,
) -> None:
    view = sidecars.report("w1", 1, last_notified_at=1_000, last_sync_at=1_300)
    assert view.last_notified_at == 1_000
    deploy = app_module.get_store().get_deploy(deployment, live_deploy)
    assert deploy.notified == {"w1": 1_000} and deploy.activations == {"w1": 1_300}
    [w1] = [s for s in control.get_deploy(deployment, live_deploy).stages.sidecars if s.name == "w1"]
    assert w1.sync_s == 0.3
    # a later heartbeat never moves the first report
    sidecars.report("w1", 1, last_notified_at=5_000, last_sync_at=6_000)
    assert app_module.get_store().get_deploy(deployment, live_deploy).notified == {"w1": 1_000}


def test_a_deploy_recorded_before_notification_times_existed_still_records_activations(
    control: ControlPlane, aws: StackOutputs, deployment: str, live_deploy: str, sidecars: Sidecars,
) -> None:
    table = boto3.resource("dynamodb").Table(aws.table_name)
    table.update_item(Key={"pk": f"DEPLOYMENT#{deployment}", "sk": f"DEPLOY#{live_deploy}"}, UpdateExpression="REMOVE notified")
    sidecars.report("w1", 1, last_notified_at=1_000, last_sync_at=1_300)
    deploy = app_module.get_store().get_deploy(deployment, live_deploy)
    assert deploy.activations == {"w1": 1_300} and deploy.notified == {}


def test_the_api_serves_stages_with_a_deploy_and_in_the_history(
    client: Client, control: ControlPlane, deployment: str, live_deploy: str, viewer_token: str, sidecars: Sidecars,
) -> None:
    for name, notified, live in (("w1", 100, 400), ("w2", 150, 900)):
        sidecars.report(name, 1, last_notified_at=notified, last_sync_at=live)
    headers = {"Authorization": f"Bearer {viewer_token}"}
    view = client.http.get(f"/deployments/{deployment}/deploys/{live_deploy}", headers=headers).json_body
    assert view["converged"] is True
    assert view["deploy"]["converged_at"] == 900, "convergence is noted from the last sidecar's report, in this answer"
    assert view["stages"]["validation_s"] is not None
    assert [(s["name"], s["sync_s"]) for s in view["stages"]["sidecars"]] == [("w1", 0.3), ("w2", 0.75)]
    items = client.http.get(f"/deployments/{deployment}/deploys", headers=headers).json_body["items"]
    assert items[0]["deploy_id"] == live_deploy and items[0]["stages"] == view["stages"]


def test_the_last_live_sidecars_heartbeat_notes_convergence_with_nobody_reading_the_deploy(
    deployment: str, live_deploy: str, sidecars: Sidecars, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No CLI waits and no console is open: the heartbeats alone record when every live sidecar ran the
    version, at the last one's report, and say so once (the LIVE event); no heartbeat reads a full view
    of the deploy for it."""
    store = app_module.get_store()
    sidecars.register("w3")  # registered, then stale: it never counts
    table = boto3.resource("dynamodb").Table(get_settings().table_name)
    table.update_item(Key={"pk": f"DEPLOYMENT#{deployment}", "sk": "SIDECAR#w3"},
                      UpdateExpression="SET last_heartbeat = :t", ExpressionAttributeValues={":t": 1})
    activated_at = store.get_deploy(deployment, live_deploy).activated_at
    assert activated_at is not None
    full_views: list[str] = []
    real = ControlPlane._deploy_view

    def counted(self: ControlPlane, *args: Any, **kwargs: Any) -> Any:
        full_views.append(args[1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ControlPlane, "_deploy_view", counted)
    said: list[dict[str, Any]] = []
    events = app_module.get_control()._events
    emit = events.emit
    monkeypatch.setattr(events, "emit", lambda kind, detail: (said.append(detail), emit(kind, detail))[1])
    sidecars.report("w1", 1, last_sync_at=activated_at + 30)
    assert store.get_deploy(deployment, live_deploy).converged_at is None and said == []
    sidecars.report("w2", 1, last_sync_at=activated_at + 70)
    assert store.get_deploy(deployment, live_deploy).converged_at == activated_at + 70
    assert [(d["type"], d["deploy_id"], d["sidecars"]) for d in said] == [("deploy.live", live_deploy, ["w1", "w2"])]
    assert said[0]["stages"]["active_to_all_live_s"] == 0.07
    sidecars.report("w1", 1, last_sync_at=activated_at + 30)
    sidecars.report("w2", 1, last_sync_at=activated_at + 70)
    assert len(said) == 1, "nothing more to note once converged"
    assert full_views == [], "the heartbeats read no full view of the deploy"


def test_heartbeats_that_report_at_once_check_convergence_once_and_miss_no_activation(
    deployment: str, live_deploy: str, sidecars: Sidecars, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sidecars going live together: while one heartbeat's convergence check is in flight, another leaves
    it a note instead of reading the same records again; the check in flight, whose reads predate that
    activation, then runs once more, so the last activation is seen and convergence noted."""
    store = app_module.get_store()
    activated_at = store.get_deploy(deployment, live_deploy).activated_at
    assert activated_at is not None
    runs: list[bool] = []
    inside, release = threading.Event(), threading.Event()
    real = ControlPlane._converge

    def converge(self: ControlPlane, *args: Any) -> bool:
        out = real(self, *args)
        runs.append(out)
        if len(runs) == 1:  # w1's check read its records (w2 not on the version yet) and is still in flight
            inside.set()
            assert release.wait(10)
        return out

    monkeypatch.setattr(ControlPlane, "_converge", converge)
    first = threading.Thread(target=sidecars.report, args=("w1", 1), kwargs={"last_sync_at": activated_at + 10})
    first.start()
    assert inside.wait(10)
    sidecars.report("w2", 1, last_sync_at=activated_at + 20)  # finds w1's check in flight: a note, no reads
    assert runs == [False] and store.get_deploy(deployment, live_deploy).converged_at is None
    release.set()
    first.join(10)
    assert runs == [False, True], "the check in flight ran once more, and saw w2"
    assert store.get_deploy(deployment, live_deploy).converged_at == activated_at + 20
    assert app_module.get_control()._checks == {}


def test_a_view_read_between_a_heartbeat_and_its_activation_record_notes_the_sidecars_own_time(
    client: Client, deployment: str, live_deploy: str, viewer_token: str, sidecars: Sidecars,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeat writes the sidecar's row, then the deploy's activation: a view read in between sees
    the sidecar on the version with no activation yet. Convergence is then noted from the time that
    sidecar reported going live (the one its activation will hold), not from the reader's clock."""
    store = app_module.get_store()
    activated_at = store.get_deploy(deployment, live_deploy).activated_at
    assert activated_at is not None
    sidecars.report("w1", 1, last_notified_at=activated_at + 10, last_sync_at=activated_at + 40)
    monkeypatch.setattr(type(store), "record_activation", lambda *a, **k: None)
    sidecars.report("w2", 1, last_notified_at=activated_at + 15, last_sync_at=activated_at + 90)
    monkeypatch.undo()
    headers = {"Authorization": f"Bearer {viewer_token}"}
    view = client.http.get(f"/deployments/{deployment}/deploys/{live_deploy}", headers=headers).json_body
    assert view["converged"] is True
    assert view["deploy"]["converged_at"] == activated_at + 90
    store.record_activation(deployment, live_deploy, "w2", activated_at + 90, activated_at + 15)
    deploy = store.get_deploy(deployment, live_deploy)
    assert deploy.converged_at == max(deploy.activations.values())


def test_a_sidecar_already_on_the_version_counts_as_live_from_the_deploy_going_active(
    client: Client, deployment: str, live_deploy: str, viewer_token: str, sidecars: Sidecars,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One with no activation that went live before the deploy did (it had the version already)."""
    store = app_module.get_store()
    activated_at = store.get_deploy(deployment, live_deploy).activated_at
    assert activated_at is not None
    monkeypatch.setattr(type(store), "record_activation", lambda *a, **k: None)
    for name in ("w1", "w2"):
        sidecars.report(name, 1, last_sync_at=activated_at - 5_000)
    monkeypatch.undo()
    headers = {"Authorization": f"Bearer {viewer_token}"}
    view = client.http.get(f"/deployments/{deployment}/deploys/{live_deploy}", headers=headers).json_body
    assert view["converged"] is True and view["deploy"]["converged_at"] == activated_at
    assert view["stages"]["active_to_all_live_s"] == 0


# --- the long poll -----------------------------------------------------------------------


class Ticks:
    """A clock that moves only when the long poll sleeps; `then` runs at the given sleep."""

    def __init__(self, then: dict[int, Callable[[], object]] | None = None) -> None:
        self.now = 1_000_000
        self.sleeps: list[float] = []
        self.then = then or {}

    def clock(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += int(seconds * 1000)
        action = self.then.get(len(self.sleeps))
        if action is not None:
            action()


def waiting_control(ticks: Ticks) -> ControlPlane:
    s = get_settings()
    queues = SidecarQueues(boto3.client("sqs"), boto3.client("sns"), s.topic_arn, s.sidecar_queue_prefix)
    return ControlPlane(s, app_module.get_store(), app_module.get_bundles(), queues, app_module.get_publisher(),
                        clock=ticks.clock, sleep=ticks.sleep)


def test_the_long_poll_answers_when_a_sidecar_reports_the_version(
    control: ControlPlane, deployment: str, live_deploy: str, sidecars: Sidecars
) -> None:
    ticks = Ticks({3: lambda: sidecars.report("w1", 1, last_sync_at=5)})
    view = waiting_control(ticks).get_deploy(deployment, live_deploy, wait_seconds=10)
    assert len(ticks.sleeps) == 3, "it answered at the first look after the report, not at the end of the wait"
    assert view.sidecars_on_version == 1 and not view.converged
    assert set(ticks.sleeps) == {get_settings().wait_check_active_seconds}


def test_the_long_poll_answers_at_once_when_there_is_nothing_to_wait_for(
    control: ControlPlane, deployment: str, live_deploy: str, sidecars: Sidecars,
) -> None:
    for name in ("w1", "w2"):
        sidecars.report(name, 1)
    ticks = Ticks()
    assert waiting_control(ticks).get_deploy(deployment, live_deploy, wait_seconds=10).converged
    assert ticks.sleeps == []


def test_the_long_poll_gives_the_unchanged_view_when_the_time_is_up(
    control: ControlPlane, deployment: str, live_deploy: str
) -> None:
    ticks = Ticks()
    view = waiting_control(ticks).get_deploy(deployment, live_deploy, wait_seconds=2)
    assert not view.converged and view.sidecars_on_version == 0
    assert sum(ticks.sleeps) == pytest.approx(2, abs=0.06)


@pytest.mark.parametrize("wait", ["21", "-1", "1.5", "soon"])
def test_a_wait_out_of_range_is_400(client: Client, deployment: str, live_deploy: str, viewer_token: str, wait: str) -> None:
    resp = client.http.get(f"/deployments/{deployment}/deploys/{live_deploy}?wait={wait}",
                           headers={"Authorization": f"Bearer {viewer_token}"})
    assert resp.status_code == 400 and resp.json_body["error"]["code"] == "invalid_request"


# --- cheaper reads on the way ----------------------------------------------------------------


def test_reading_some_fields_of_a_deploy_reads_only_those(deployment: str, live_deploy: str) -> None:
    store = app_module.get_store()
    fields = store.get_deploy_fields(deployment, live_deploy, ["state", "manifest_key", "converged_at"])
    assert fields == {"state": "ACTIVE", "manifest_key": store.get_deploy(deployment, live_deploy).manifest_key}
    with pytest.raises(NotFound):
        store.get_deploy_fields(deployment, "0123456789a-abcdef", ["state"])


def test_a_manifest_just_written_is_read_back_without_s3_and_the_cache_is_bounded(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes]
) -> None:
    from chalicelib.publish import CACHED_MANIFESTS

    publisher = app_module.get_publisher()
    keys = []
    for i in range(CACHED_MANIFESTS + 1):
        deploy_id = publish(control, aws, deployment, make_bundle({"a.py": f"x = {i}\n"}))
        keys.append(app_module.get_store().get_deploy(deployment, deploy_id).manifest_key)
    s3 = boto3.client("s3")
    originals = {k: s3.get_object(Bucket=aws.bucket, Key=k)["Body"].read() for k in keys}
    for key in keys:
        s3.delete_object(Bucket=aws.bucket, Key=key)
    assert publisher.load_manifest(keys[-1]) is not None, "the newest manifests are kept in memory"
    assert publisher.load_manifest(keys[0]) is None, "older ones are not: read from S3, which no longer has it"
    s3.put_object(Bucket=aws.bucket, Key=keys[0], Body=originals[keys[0]])
    manifest = publisher.load_manifest(keys[0])
    assert manifest is not None and [f.path for f in manifest] == ["a.py"]
