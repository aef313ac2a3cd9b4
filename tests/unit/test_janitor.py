"""The scheduled janitor: expiry of deploys never uploaded, silent sidecars, bundle retention."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from conftest import Sidecars

import app as app_module
from chalicelib.ingest import Outcome
from chalicelib.models import CreateDeploy, DeployState, IngestEvent, UpdateDeployment
from chalicelib.notify import SidecarQueues
from chalicelib.service import ControlPlane, now_ms
from chalicelib.settings import get_settings
from dagcast.bootstrap import StackOutputs

DAY_MS = 86_400_000


class Clock:
    def __init__(self) -> None:
        self.now = now_ms()

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def janitor_control(aws: StackOutputs, deployment: str, clock: Clock) -> ControlPlane:
    s = get_settings()
    queues = SidecarQueues(boto3.client("sqs"), boto3.client("sns"), s.topic_arn, s.sidecar_queue_prefix)
    return ControlPlane(s, app_module.get_store(), app_module.get_bundles(), queues, app_module.get_publisher(), clock=clock,
                        signer=app_module.get_signer())


@pytest.fixture
def sidecars(janitor_control: ControlPlane, deployment: str) -> Sidecars:
    """Sidecars that report on the janitor's clock."""
    return Sidecars(janitor_control, deployment)


def publish(control: ControlPlane, aws: StackOutputs, deployment: str, bundle: bytes) -> Any:
    import hashlib

    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(bundle).hexdigest(), size=len(bundle)), "t")
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=bundle)
    outcome = app_module.get_ingest().handle(IngestEvent(bucket=aws.bucket, key=created.deploy.key, size=len(bundle)))
    assert outcome is Outcome.ACTIVE
    return app_module.get_store().get_deploy(deployment, created.deploy.deploy_id)


def object_exists(bucket: str, key: str) -> bool:
    try:
        boto3.client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


def test_a_deploy_never_uploaded_expires_and_a_late_upload_is_never_validated(
    janitor_control: ControlPlane, aws: StackOutputs, deployment: str, clock: Clock, make_bundle: Callable[..., bytes]
) -> None:
    import hashlib

    bundle = make_bundle({"a.py": "x = 1\n"})
    created = janitor_control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(bundle).hexdigest(), size=len(bundle)), "t")
    s = get_settings()
    clock.now += (s.upload_expiry_seconds + s.pending_grace_seconds) * 1000 - 1000
    assert janitor_control.janitor().deploys_expired == []
    clock.now += 2000
    assert janitor_control.janitor().deploys_expired == [f"{deployment}/{created.deploy.deploy_id}"]
    store = app_module.get_store()
    assert store.get_deploy(deployment, created.deploy.deploy_id).state is DeployState.EXPIRED
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=bundle)
    late = app_module.get_ingest().handle(IngestEvent(bucket=aws.bucket, key=created.deploy.key, size=len(bundle)))
    assert late is Outcome.IGNORED
    assert store.get_deploy(deployment, created.deploy.deploy_id).state is DeployState.EXPIRED
    assert store.get_deployment(deployment).current_version == 0


def test_silent_sidecars_lose_their_queue_subscription_and_record(
    janitor_control: ControlPlane, deployment: str, clock: Clock, sidecars: Sidecars,
) -> None:
    sidecars.register("silent")
    silent = app_module.get_store().get_sidecar(deployment, "silent")
    assert silent is not None
    sidecars.register("chatty")
    clock.now += get_settings().sidecar_expiry_seconds * 1000 + 1000
    sidecars.report("chatty", 0)
    report = janitor_control.janitor()
    assert report.sidecars_removed == [f"{deployment}/silent"]
    assert [s.name for s in janitor_control.sidecar_views(deployment)] == ["chatty"]
    with pytest.raises(ClientError):
        boto3.client("sqs").get_queue_attributes(QueueUrl=silent.queue_url, AttributeNames=["QueueArn"])
    subs = boto3.client("sns").list_subscriptions()["Subscriptions"]
    assert silent.subscription_arn not in {s["SubscriptionArn"] for s in subs}
    assert len(subs) == 1


def test_bundles_beyond_retention_are_pruned_but_never_the_live_one_or_one_a_sidecar_runs(
    janitor_control: ControlPlane, aws: StackOutputs, deployment: str, clock: Clock, make_bundle: Callable[..., bytes], sidecars: Sidecars,
) -> None:
    janitor_control.update_deployment(deployment, UpdateDeployment(keep_versions=2, retention_days=1))
    asset = {"big.sql": "-- " + "x" * 5000 + "\n"}  # most of each bundle is unchanged: every version has a delta
    deploys = [publish(janitor_control, aws, deployment, make_bundle({**asset, "v.py": f"v = {i}\n"})) for i in range(1, 6)]
    deltas = [app_module.get_store().get_version(deployment, v).delta for v in range(1, 6)]
    assert deltas[0] is None and all(d is not None for d in deltas[1:])
    sidecars.register("old-worker")
    sidecars.report("old-worker", 1)
    assert janitor_control.janitor().bundles_pruned == [], "younger than retention_days: kept"
    clock.now += 2 * DAY_MS
    sidecars.report("old-worker", 1)
    report = janitor_control.janitor()
    assert sorted(report.bundles_pruned) == [f"{deployment}/v2", f"{deployment}/v3"]
    present = [object_exists(aws.bucket, d.key) for d in deploys]
    assert present == [True, False, False, True, True]
    assert [object_exists(aws.bucket, d.key) for d in deltas[1:] if d] == [False, False, True, True]


def test_a_deploy_left_validating_past_its_expiry_and_ingests_retries_is_counted_as_stuck(
    aws: StackOutputs, deployment: str, clock: Clock, make_bundle: Callable[..., bytes]
) -> None:
    import hashlib

    from chalicelib.telemetry import Telemetry

    s = get_settings()
    telemetry = Telemetry()
    queues = SidecarQueues(boto3.client("sqs"), boto3.client("sns"), s.topic_arn, s.sidecar_queue_prefix)
    control = ControlPlane(s, app_module.get_store(), app_module.get_bundles(), queues, app_module.get_publisher(), clock=clock,
                           signer=app_module.get_signer(), telemetry=telemetry)

    def stuck_after_janitor() -> list[float]:
        control.janitor()
        values: list[float] = telemetry.metrics.metric_set["StuckDeploys"]["Value"]
        telemetry.metrics.clear_metrics()
        return values

    bundle = make_bundle({"a.py": "x = 1\n"})
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(bundle).hexdigest(), size=len(bundle)), "t")
    # the upload arrived and ingest started, then never finished (its messages went to the dead-letter queue)
    assert app_module.get_store().start_validation(deployment, created.deploy.deploy_id, clock.now) is not None
    assert stuck_after_janitor() == [0]
    clock.now += (s.upload_expiry_seconds + s.pending_grace_seconds + s.stuck_after_seconds) * 1000 - 1000
    assert stuck_after_janitor() == [0], "not before ingest's retries could have finished it"
    clock.now += 2000
    assert stuck_after_janitor() == [1]
    assert app_module.get_store().get_deploy(deployment, created.deploy.deploy_id).state is DeployState.VALIDATING
