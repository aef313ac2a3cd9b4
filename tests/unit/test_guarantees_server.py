"""Guarantees of the server at its edges, on moto's in-process mock: a bundle key that a rollback shares
survives the janitor, a cancel that is refused changes nothing (and a cancelled rollback never deletes the
bundle it shares), two workers ingesting one S3 event publish one version, and a crash in the middle of a
delta build never leaves a version whose delta does not rebuild it.

Crash points are in-process stand-ins for a function dying (test-only): a method of the function's own
store or bundle storage is replaced for one call by one that raises (after doing part of its work, when
the point is "half written"), so the SQS message is redelivered, as Lambda does after a crash.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from boto3.dynamodb.conditions import Key
from chalice.test import Client
from helpers import files_of
from test_ingest import (
    GOOD,
    announcements,  # noqa: F401 (a fixture)
    dag,
    deploy_and_ingest,
    ingest,
    items,
    s3_notification,
    start_deploy,
    upload,
)
from test_janitor import Clock

import app as app_module
from chalicelib.bundle import Reuse, extract_bundle, extract_delta, files_digest
from chalicelib.exceptions import StorageError
from chalicelib.ingest import Ingest, Outcome, parse_notification
from chalicelib.manifest import decode_manifest
from chalicelib.models import DeployState, UpdateDeployment, Version
from chalicelib.notify import Notifier, SidecarQueues
from chalicelib.publish import Publisher
from chalicelib.service import ControlPlane, now_ms
from chalicelib.settings import get_settings
from chalicelib.storage import BundleStorage
from chalicelib.store import Store
from dagcast.bootstrap import StackOutputs

MakeBundle = Callable[[dict[str, bytes | str]], bytes]
Announcements = Callable[[], list[dict[str, Any]]]
DAY_MS = 86_400_000
WAIT = 60  # seconds an event may take before the test calls it a deadlock (never reached when it passes)
# Mostly unchanged from one version to the next, so every version after the first carries a delta.
ASSETS = {f"dags/sql/q{i}.sql": f"-- query {i}\n" + "select 1;\n" * 400 for i in range(4)}


class Crash(Exception):
    """A test-only stand-in for the function dying at a chosen point."""


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def bundle(n: int, **extra: str) -> dict[str, bytes | str]:
    return {**GOOD, **ASSETS, "dags/etl.py": dag("etl") + f"# v{n}\n", **extra}


def waited(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT), f"deadlock: {what} never happened"


def s3_versions(aws: StackOutputs) -> list[tuple[str, str, bool]]:
    """Every object version and delete marker in the bucket: (key, version id, is a delete marker)."""
    out = boto3.client("s3").list_object_versions(Bucket=aws.bucket)
    found = [(v["Key"], v["VersionId"], False) for v in out.get("Versions", [])]
    found += [(m["Key"], m["VersionId"], True) for m in out.get("DeleteMarkers", [])]
    return sorted(found)


def all_items(aws: StackOutputs, deployment: str) -> list[dict[str, Any]]:
    table = boto3.resource("dynamodb").Table(aws.table_name)
    return list(table.query(KeyConditionExpression=Key("pk").eq(f"DEPLOYMENT#{deployment}"), ConsistentRead=True)["Items"])


def object_versions(aws: StackOutputs, key: str) -> list[str]:
    out = boto3.client("s3").list_object_versions(Bucket=aws.bucket, Prefix=key)
    return [v["VersionId"] for v in out.get("Versions", []) if v["Key"] == key]


def fetch(url: str) -> bytes:
    """A presigned URL fetched as a sidecar does (moto answers requests made with `requests`)."""
    resp = requests.get(url, timeout=30)
    assert resp.status_code == 200, f"{resp.status_code}: {resp.text[:200]}"
    return resp.content


def version_view(client: Client, deployment: str, sidecar_token: str, which: str = "current") -> dict[str, Any]:
    resp = client.http.get(f"/deployments/{deployment}/versions/{which}", headers=auth(sidecar_token))
    assert resp.status_code == 200, resp.body
    view: dict[str, Any] = resp.json_body
    return view


def installs_exactly(client: Client, deployment: str, sidecar_token: str, files: dict[str, bytes | str], dest: Path) -> Version:
    """What a sidecar does with the live version: download it through its URL, check the sha256 the version
    vouches for, extract it with the version's limits; the files are exactly `files`."""
    view = version_view(client, deployment, sidecar_token)
    record = Version.model_validate(view["version"])
    data = fetch(view["download_url"])
    assert hashlib.sha256(data).hexdigest() == record.sha256 and len(data) == record.size
    extract_bundle(io.BytesIO(data), dest, record.limits)
    assert files_of(dest) == {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    return record


def worker(signer: Any) -> Ingest:
    """Another warm ingest function: its own clients, store, storage and publisher (as a second Lambda has)."""
    s = get_settings()
    store = Store(boto3.resource("dynamodb").Table(s.table_name))
    bundles = BundleStorage(boto3.client("s3"), s.bundles_bucket)
    publisher = Publisher(s, store, bundles, Notifier(boto3.client("sns"), s.topic_arn), now_ms, signer)
    return Ingest(s, store, bundles, publisher, now_ms)


def in_thread(fn: Callable[[], Outcome], results: dict[str, Any], name: str, done: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            results[name] = exc
        finally:
            done.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def rebuilds(base_bundle: bytes, delta_bytes: bytes, record: Version, full: bytes, tmp: Path) -> None:
    """A sidecar on the delta's base applies the delta (as the sidecar does, with extract_delta, which checks
    files_sha256): the result is the version's files, exactly, and the sha256 is the one vouched for."""
    delta = record.delta
    assert delta is not None
    assert hashlib.sha256(delta_bytes).hexdigest() == delta.sha256 and len(delta_bytes) == delta.size
    base_dir = tmp / "base"
    base = extract_bundle(io.BytesIO(base_bundle), base_dir)
    got = extract_delta(io.BytesIO(delta_bytes), tmp / "new", Reuse.from_manifest(base_dir, base.manifest),
                        delta.removed, delta.files_sha256, record.limits)
    whole = extract_bundle(io.BytesIO(full), tmp / "whole")
    assert files_digest(got.manifest) == delta.files_sha256 == files_digest(whole.manifest)
    assert files_of(tmp / "new") == files_of(tmp / "whole")


# --- 1. a bundle key a live rollback shares survives pruning ----------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def janitor_control(aws: StackOutputs, deployment: str, clock: Clock) -> ControlPlane:
    """The janitor on a clock of its own (the deploys are made through the app, on the real one)."""
    s = get_settings()
    queues = SidecarQueues(boto3.client("sqs"), boto3.client("sns"), s.topic_arn, s.sidecar_queue_prefix)
    return ControlPlane(s, app_module.get_store(), app_module.get_bundles(), queues, app_module.get_publisher(),
                        clock=clock, signer=app_module.get_signer())


def test_the_janitor_keeps_the_bundle_a_live_rollback_shares_with_a_version_it_prunes(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, admin_token: str, sidecar_token: str,
    make_bundle: MakeBundle, janitor_control: ControlPlane, clock: Clock, tmp_path: Path,
) -> None:
    janitor_control.update_deployment(deployment, UpdateDeployment(keep_versions=2, retention_days=1))
    contents = [bundle(n) for n in range(1, 5)]
    deploys = [deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(c)) for c in contents]
    store = app_module.get_store()
    first = store.get_version(deployment, 1)
    resp = client.http.post(f"/deployments/{deployment}/deploys/{deploys[0]['deploy_id']}/rollback", headers=auth(admin_token))
    assert resp.status_code == 201 and resp.json_body["state"] == "ACTIVE", resp.body
    live = store.get_version(deployment, 5)
    assert (live.key, live.object_version, live.sha256) == (first.key, first.object_version, first.sha256), \
        "the rollback serves v1's object, under v1's key"
    assert store.get_deployment(deployment).current_version == 5

    clock.now += 2 * DAY_MS  # every version is now older than retention_days
    report = janitor_control.janitor()
    janitor_control.janitor()  # and the next run, too
    assert first.object_version in object_versions(aws, first.key), "the live version's object is kept"
    record = installs_exactly(client, deployment, sidecar_token, contents[0], tmp_path / "installed")
    assert record.version == 5 and record.delta is None
    # v5 (live) and v4 are the two kept; v1's record is beyond them, but its key is the live one's.
    assert sorted(report.bundles_pruned) == [f"{deployment}/v2", f"{deployment}/v3"]
    assert [object_versions(aws, d["key"]) != [] for d in deploys] == [True, False, False, True]
    manifest = decode_manifest(fetch(version_view(client, deployment, sidecar_token)["manifest_url"]))
    assert sorted(e.path for e in manifest) == sorted(contents[0])


def test_a_rollback_to_a_version_whose_bundle_was_pruned_is_refused_and_changes_nothing(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, admin_token: str, sidecar_token: str,
    make_bundle: MakeBundle, janitor_control: ControlPlane, clock: Clock, tmp_path: Path,
) -> None:
    janitor_control.update_deployment(deployment, UpdateDeployment(keep_versions=1, retention_days=1))
    old = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(1)))
    deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(2)))
    clock.now += 2 * DAY_MS
    assert janitor_control.janitor().bundles_pruned == [f"{deployment}/v1"]
    records, objects = all_items(aws, deployment), s3_versions(aws)

    resp = client.http.post(f"/deployments/{deployment}/deploys/{old['deploy_id']}/rollback", headers=auth(admin_token))

    assert resp.status_code == 409, resp.body
    assert resp.json_body["error"]["code"] == "conflict"
    assert f"the bundle of deploy {old['deploy_id']} (v1) was removed by the retention policy" in resp.json_body["error"]["message"]
    assert all_items(aws, deployment) == records, "no version that nothing can install went live"
    assert s3_versions(aws) == objects
    installs_exactly(client, deployment, sidecar_token, bundle(2), tmp_path / "live")


# --- 2. cancel --------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["ACTIVE", "SUPERSEDED", "REJECTED"])
def test_cancelling_a_decided_deploy_is_refused_with_409_and_changes_nothing(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, sidecar_token: str,
    make_bundle: MakeBundle, tmp_path: Path, state: str,
) -> None:
    first = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(1)))
    second = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(2)))
    rejected = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/bad.py": "def (\n"}))
    target = {"ACTIVE": second, "SUPERSEDED": first, "REJECTED": rejected}[state]
    assert app_module.get_store().get_deploy(deployment, target["deploy_id"]).state.value == state
    records, objects = all_items(aws, deployment), s3_versions(aws)

    resp = client.http.post(f"/deployments/{deployment}/deploys/{target['deploy_id']}/cancel", headers=auth(deployer_token))

    assert resp.status_code == 409, resp.body
    assert resp.json_body == {"error": {"code": "conflict", "message": (
        f"deploy {target['deploy_id']} is {state}; only a PENDING or VALIDATING deploy can be cancelled")}}
    assert all_items(aws, deployment) == records, "no record changed"
    assert s3_versions(aws) == objects, "no object was deleted"
    installs_exactly(client, deployment, sidecar_token, bundle(2), tmp_path / "live")


def test_cancelling_a_rollback_that_is_still_validating_never_deletes_the_bundle_it_shares(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, admin_token: str, sidecar_token: str,
    make_bundle: MakeBundle, control: ControlPlane, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    target = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(1)))
    deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(2)))
    store = app_module.get_store()
    v1 = store.get_version(deployment, 1)
    activate = store.activate
    failures: list[str] = []

    def throttled(*args: Any, **kwargs: Any) -> None:  # DynamoDB fails the rollback's transaction, once
        if not failures:
            failures.append("activate")
            raise StorageError("cannot activate version 3: ProvisionedThroughputExceededException")
        activate(*args, **kwargs)

    monkeypatch.setattr(store, "activate", throttled)
    rollback = f"/deployments/{deployment}/deploys/{target['deploy_id']}/rollback"
    failed = client.http.post(rollback, headers=auth(admin_token))
    assert failed.status_code == 503, failed.body
    [stuck] = [d for d in store.list_deploys(deployment, 10, None)[0] if d.rollback_of == target["deploy_id"]]
    assert stuck.state is DeployState.VALIDATING and stuck.key == v1.key

    resp = client.http.post(f"/deployments/{deployment}/deploys/{stuck.deploy_id}/cancel", headers=auth(deployer_token))
    assert resp.status_code == 200 and resp.json_body["state"] == "CANCELLED", resp.body
    assert object_versions(aws, v1.key) == [v1.object_version], "v1's bundle outlives the cancelled rollback to it"
    assert control.janitor().late_uploads_deleted == [], "a cancelled rollback has no upload of its own"
    assert object_versions(aws, v1.key) == [v1.object_version]

    again = client.http.post(rollback, headers=auth(admin_token))
    assert again.status_code == 201 and again.json_body["state"] == "ACTIVE", again.body
    record = installs_exactly(client, deployment, sidecar_token, bundle(1), tmp_path / "rolled-back")
    assert (record.version, record.key, record.object_version) == (3, v1.key, v1.object_version)


# --- 3. two workers, one S3 event ---------------------------------------------------------


@pytest.mark.parametrize("race", ["both validate, one commits first", "one reads, the other finishes, then it starts"])
def test_two_workers_ingesting_the_same_event_at_once_publish_one_version_and_one_announcement(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle,
    announcements: Announcements, race: str,  # noqa: F811 (the fixture imported above)
) -> None:
    deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(1)))
    data = make_bundle(bundle(2))
    deploy = start_deploy(client, deployment, deployer_token, data)
    upload(aws, deploy["key"], data)
    [event] = parse_notification(s3_notification(aws.bucket, deploy["key"], len(data)))
    first, second = worker(app_module.get_signer()), worker(app_module.get_signer())
    first_done, second_waits, second_read, second_done = (threading.Event() for _ in range(4))
    results: dict[str, Any] = {}

    if race == "both validate, one commits first":
        # Both are past start_validation and have validated; the first commits while the second waits to.
        first_publish, second_publish = first._publisher.publish, second._publisher.publish

        def first_publishes(*args: Any, **kwargs: Any) -> Any:
            waited(second_waits, "the second worker reaching its publish")
            return first_publish(*args, **kwargs)

        def second_publishes(*args: Any, **kwargs: Any) -> Any:
            second_waits.set()
            waited(first_done, "the first worker finishing")
            return second_publish(*args, **kwargs)

        first._publisher.publish = first_publishes  # type: ignore[method-assign]
        second._publisher.publish = second_publishes  # type: ignore[method-assign]
        threads = [in_thread(lambda: first.handle(event), results, "first", first_done),
                   in_thread(lambda: second.handle(event), results, "second", second_waits)]  # or if it ends first
    else:
        # The second reads the deploy (not final yet), the first does everything, then the second's
        # PENDING|VALIDATING -> VALIDATING write comes.
        second_get, second_start = second._store.get_deploy, second._store.start_validation

        def second_reads(*args: Any, **kwargs: Any) -> Any:
            found = second_get(*args, **kwargs)
            second_read.set()
            return found

        def second_starts(*args: Any, **kwargs: Any) -> Any:
            waited(first_done, "the first worker finishing")
            return second_start(*args, **kwargs)

        second._store.get_deploy = second_reads  # type: ignore[method-assign]
        second._store.start_validation = second_starts  # type: ignore[method-assign]

        def first_after_the_read() -> Outcome:
            waited(second_read, "the second worker reading the deploy")
            return first.handle(event)

        threads = [in_thread(lambda: second.handle(event), results, "second", second_done),
                   in_thread(first_after_the_read, results, "first", first_done)]
    for t in threads:
        t.join(WAIT)
    assert (results.get("first"), results.get("second")) == (Outcome.ACTIVE, Outcome.IGNORED), results

    store = app_module.get_store()
    stored = store.get_deploy(deployment, deploy["deploy_id"])
    assert (stored.state, stored.version) == (DeployState.ACTIVE, 2)
    assert [v["version"] for v in items(aws, deployment, "VERSION#")] == [1, 2], "exactly one version for the event"
    dep = store.get_deployment(deployment)
    assert (dep.current_version, dep.last_version, dep.current_deploy_id) == (2, 2, deploy["deploy_id"])
    assert [m["version"] for m in announcements()] == [1, 2], "exactly one announcement for the event"
    record = store.get_version(deployment, 2)
    assert record.delta is not None
    served = boto3.client("s3").get_object(Bucket=aws.bucket, Key=record.delta.key, VersionId=record.delta.object_version)
    assert hashlib.sha256(served["Body"].read()).hexdigest() == record.delta.sha256


# --- 4. a crash in the middle of a delta build ----------------------------------------------


@pytest.mark.parametrize("point", ["delta half written", "delta written, version not recorded"])
def test_after_a_crash_mid_delta_the_redelivery_goes_live_once_with_a_delta_that_rebuilds_the_bundle(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, sidecar_token: str,
    make_bundle: MakeBundle, announcements: Announcements, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    tmp_path: Path, point: str,
) -> None:
    base = make_bundle(bundle(1))
    deploy_and_ingest(client, aws, deployment, deployer_token, base)
    assert [m["version"] for m in announcements()] == [1]
    files = {k: v for k, v in bundle(2, **{"dags/new.py": dag("new")}).items() if k != "dags/include/helpers.py"}
    data = make_bundle(files)
    deploy = start_deploy(client, deployment, deployer_token, data)
    upload(aws, deploy["key"], data)
    body = s3_notification(aws.bucket, deploy["key"], len(data))
    bundles, store = app_module.get_bundles(), app_module.get_store()
    crashed: list[bytes] = []

    if point == "delta half written":
        put = bundles.put

        def torn(key: str, content: bytes, content_type: str) -> str | None:
            if not key.startswith("deltas/") or crashed:
                return put(key, content, content_type)
            crashed.append(content)
            put(key, content[: len(content) // 2], content_type)
            raise Crash("died while writing the delta")

        monkeypatch.setattr(bundles, "put", torn)
    else:
        activate = store.activate

        def dies(version: Version, *args: Any, **kwargs: Any) -> None:
            if not crashed:
                assert version.delta is not None
                crashed.append(boto3.client("s3").get_object(
                    Bucket=aws.bucket, Key=version.delta.key, VersionId=version.delta.object_version)["Body"].read())
                raise Crash("died after writing the delta, before the version record")
            activate(version, *args, **kwargs)

        monkeypatch.setattr(store, "activate", dies)

    with pytest.raises(BatchProcessingError, match="All records failed"):  # the invocation fails: SQS redelivers
        ingest(client, body)
    assert crashed and store.get_deploy(deployment, deploy["deploy_id"]).state is DeployState.VALIDATING
    assert [v["version"] for v in items(aws, deployment, "VERSION#")] == [1] and announcements() == []
    left = object_versions(aws, f"deltas/{deployment}/{deploy['deploy_id']}.tar.gz")
    assert len(left) == 1, "the crashed attempt left its delta object behind"

    later = time.time
    monkeypatch.setattr(time, "time", lambda: later() + 2)  # the redelivery comes later (the visibility timeout)
    assert ingest(client, body) == {"batchItemFailures": []}

    stored = store.get_deploy(deployment, deploy["deploy_id"])
    assert (stored.state, stored.version) == (DeployState.ACTIVE, 2)
    assert [v["version"] for v in items(aws, deployment, "VERSION#")] == [1, 2]
    [announced] = announcements()
    record = store.get_version(deployment, 2)
    delta = record.delta
    assert delta is not None and delta.base_version == 1 and delta.removed == ["dags/include/helpers.py"]
    assert json.loads(announced["statement"])["delta"] == delta.model_dump(mode="json")
    assert delta.object_version not in left, "the version references the redelivery's delta, not the crashed one"
    view = version_view(client, deployment, sidecar_token, "2")
    served = fetch(view["delta_url"])
    rebuilds(base, served, record, data, tmp_path)
    assert crashed == [served], "the redelivery built the same delta, byte for byte"
    if point == "delta half written":
        torn = boto3.client("s3").get_object(Bucket=aws.bucket, Key=delta.key, VersionId=left[0])["Body"].read()
        assert torn == served[: len(served) // 2], "the torn object is still there, and nothing references it"


def test_a_stale_worker_that_dies_writing_its_delta_after_the_deploy_went_live_changes_nothing_a_sidecar_gets(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, sidecar_token: str,
    make_bundle: MakeBundle, announcements: Announcements, tmp_path: Path,  # noqa: F811
) -> None:
    """Worker A took the event while v1 was live and stalled; v2 went live; worker B took a duplicate of the
    event and published the deploy as v3 with a delta against v2. Then A wakes up, writes its own delta
    (against v1) to the same key, and dies. Sidecars must still get B's delta, which v3 vouches for."""
    deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(bundle(1)))
    new = {"dags/new.py": dag("new")}  # in v2 and in the deploy: not in a delta against v2, in one against v1
    data = make_bundle(bundle(3, **new))
    deploy = start_deploy(client, deployment, deployer_token, data)
    upload(aws, deploy["key"], data)
    [event] = parse_notification(s3_notification(aws.bucket, deploy["key"], len(data)))
    stale, fresh = worker(app_module.get_signer()), worker(app_module.get_signer())
    based, resume = threading.Event(), threading.Event()
    live_base, put = stale._publisher.live_base, stale._bundles.put
    written: list[str | None] = []

    def stalls(*args: Any, **kwargs: Any) -> Any:
        base = live_base(*args, **kwargs)
        based.set()
        waited(resume, "the test resuming the stale worker")
        return base

    def writes_then_dies(key: str, content: bytes, content_type: str) -> str | None:
        object_version = put(key, content, content_type)
        if key.startswith("deltas/"):
            written.append(object_version)
            raise Crash("died after writing its delta")
        return object_version

    stale._publisher.live_base = stalls  # type: ignore[method-assign]
    stale._bundles.put = writes_then_dies  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    thread = in_thread(lambda: stale.handle(event), results, "stale", based)  # (set also if it ends early)
    waited(based, "the stale worker reading the live version")
    base = make_bundle(bundle(2, **new))
    deploy_and_ingest(client, aws, deployment, deployer_token, base)
    assert fresh.handle(event) is Outcome.ACTIVE
    resume.set()
    thread.join(WAIT)
    assert isinstance(results.get("stale"), Crash) and len(written) == 1, results

    store = app_module.get_store()
    stored = store.get_deploy(deployment, deploy["deploy_id"])
    assert (stored.state, stored.version) == (DeployState.ACTIVE, 3)
    assert [m["version"] for m in announcements()] == [1, 2, 3]
    record = store.get_version(deployment, 3)
    delta = record.delta
    assert delta is not None and delta.base_version == 2
    latest = boto3.client("s3").get_object(Bucket=aws.bucket, Key=delta.key)
    assert latest["VersionId"] == written[0] and hashlib.sha256(latest["Body"].read()).hexdigest() != delta.sha256, \
        "the stale worker's delta (against v1) is the key's latest object"
    served = fetch(version_view(client, deployment, sidecar_token, "3")["delta_url"])
    rebuilds(base, served, record, data, tmp_path)


# --- 5. an uploaded delta: the rebuilt bundle is validated before it is stored ---------------


def start_delta_deploy(client: Client, aws: StackOutputs, deployment: str, deployer_token: str,
                       make_bundle: MakeBundle, level: int = 6,
                       versions: tuple[dict[str, bytes | str], dict[str, bytes | str]] | None = None,
                       ) -> tuple[dict[str, Any], str, bytes, str]:
    """v1 live, then a deploy of v2 uploaded as a delta against it: (deploy, delta key, v2's bundle,
    the delta's S3 notification). `make_bundle` writes at `level` (6; the CLI's is 1)."""
    import io

    from chalicelib.bundle import DeltaCollector, validate_stream

    old, new = versions or (bundle(1), bundle(2, **{"dags/new.py": dag("new")}))
    base = make_bundle(old)
    deploy_and_ingest(client, aws, deployment, deployer_token, base)
    data = make_bundle(new)
    collect = DeltaCollector({f.path: f.sha256 for f in validate_stream(io.BytesIO(base)).manifest})
    report = validate_stream(io.BytesIO(data), check_python=False, collect=collect)
    built = collect.build(report.manifest, report.bytes)
    live = app_module.get_store().get_version(deployment, 1)
    assert built is not None
    body = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "delta": {
        "base_version": 1, "base_sha256": live.sha256, "sha256": built.sha256, "size": len(built.data),
        "files_sha256": built.files_sha256, "removed": built.removed, "compresslevel": level}}
    resp = client.http.post(f"/deployments/{deployment}/deploys", headers=auth(deployer_token), body=json.dumps(body))
    assert resp.status_code == 201, resp.body
    deploy = resp.json_body["deploy"]
    delta_key = resp.json_body["upload"]["fields"]["key"]
    assert delta_key != deploy["key"] and delta_key.endswith(".delta.tar.gz")
    upload(aws, delta_key, built.data)
    return deploy, delta_key, data, s3_notification(aws.bucket, delta_key, len(built.data))


@pytest.mark.parametrize("base", ["this validator", "another validator", "no object version"])
def test_a_delta_deploy_reuses_its_bases_verdicts_only_for_the_pinned_bytes_this_validator_passed(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle,
    monkeypatch: pytest.MonkeyPatch, base: str,  # noqa: F811
) -> None:
    """The files a delta leaves unchanged keep the base's verdicts only when its record names this
    validator and pins the object version read; else the rebuilt bundle is read and validated again."""
    import chalicelib.ingest as ingest_module
    from chalicelib.bundle import CompileCache

    deploy, _, data, notification = start_delta_deploy(client, aws, deployment, deployer_token, make_bundle)
    table = boto3.resource("dynamodb").Table(aws.table_name)
    key = {"pk": f"DEPLOYMENT#{deployment}", "sk": "VERSION#0000000001"}
    if base == "another validator":  # validated before an upgrade of Python or of the validator
        table.update_item(Key=key, UpdateExpression="SET validator = :v", ExpressionAttributeValues={":v": "cpython-39:v1"})
    elif base == "no object version":  # a record that pins nothing: the bytes read may not be the ones validated
        table.update_item(Key=key, UpdateExpression="REMOVE object_version")
    real = ingest_module.validate_stream
    read: list[bool] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        read.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "validate_stream", counted)
    assert ingest(client, notification) == {"batchItemFailures": []}
    store = app_module.get_store()
    assert store.get_deploy(deployment, deploy["deploy_id"]).state is DeployState.ACTIVE
    assert bool(read) is (base != "this validator")
    record = store.get_version(deployment, 2)
    assert record.validator == CompileCache.TAG
    served = boto3.client("s3").get_object(Bucket=aws.bucket, Key=deploy["key"], VersionId=record.object_version)
    assert served["Body"].read() == data


def level_one(tmp: Path) -> MakeBundle:
    """Bundles as the CLI writes them (level 1, whose gzip header says so: its segments are indexed)."""
    from chalicelib.bundle import write_bundle

    made = iter(range(10**6))

    def build(files: dict[str, bytes | str]) -> bytes:
        root = tmp / f"cli-{next(made)}"
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content.encode() if isinstance(content, str) else content)
        out = io.BytesIO()
        write_bundle(root, list(files), out, compresslevel=1)
        return out.getvalue()

    return build


@pytest.mark.parametrize("index", ["kept", "tampered", "unpinned base"])
def test_a_delta_deploy_copies_the_bases_unchanged_segments_by_the_index_ingest_kept_only_as_written(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, index: str,
) -> None:
    """Ingest keeps each version's segment index (learnt validating an upload, or written by a rebuild),
    with its sha256 on the deploy record; a delta's rebuild copies the base's unchanged segments by it
    only when the index is the one written and the base's bytes are the pinned ones."""
    import chalicelib.bundle.rebuild as rebuild_module
    from chalicelib.bundle.segments import SegmentIndex

    many = {f"dags/team_{i % 5}/q_{i:03}.sql": f"-- {i}\n" + "select 1;\n" * 40 for i in range(400)}
    old, new = {**bundle(1), **many}, {**bundle(2, **{"dags/new.py": dag("new")}), **many}
    deploy, _, data, notification = start_delta_deploy(client, aws, deployment, deployer_token, level_one(tmp_path),
                                                       level=1, versions=(old, new))
    store = app_module.get_store()
    base = store.get_deploy(deployment, store.get_version(deployment, 1).deploy_id)
    assert base.segments_key and base.segments_sha256
    s3 = boto3.client("s3")
    kept = SegmentIndex.decode(s3.get_object(Bucket=aws.bucket, Key=base.segments_key)["Body"].read())
    assert kept.level == 1 and sum(1 for s in kept.segments if s.key) > 5
    if index == "tampered":  # an S3 write the record does not know: the index is not used
        s3.put_object(Bucket=aws.bucket, Key=base.segments_key, Body=SegmentIndex(1, kept.segments[1:]).encode())
    elif index == "unpinned base":  # the bytes read may not be the ones validated: nothing is copied by it
        boto3.resource("dynamodb").Table(aws.table_name).update_item(
            Key={"pk": f"DEPLOYMENT#{deployment}", "sk": "VERSION#0000000001"}, UpdateExpression="REMOVE object_version")
    planned: list[bool] = []
    real = rebuild_module._IndexedRebuild
    monkeypatch.setattr(rebuild_module, "_IndexedRebuild", lambda *a: planned.append(True) or real(*a))
    assert ingest(client, notification) == {"batchItemFailures": []}
    assert store.get_deploy(deployment, deploy["deploy_id"]).state is DeployState.ACTIVE
    assert bool(planned) is (index == "kept")
    record = store.get_version(deployment, 2)
    assert s3.get_object(Bucket=aws.bucket, Key=deploy["key"], VersionId=record.object_version)["Body"].read() == data
    rebuilt = store.get_deploy(deployment, deploy["deploy_id"])
    assert rebuilt.segments_key and rebuilt.segments_sha256  # the next delta's base has one too


@pytest.mark.parametrize("validated", ["as written", "read again"])
def test_a_rebuilt_bundle_is_stored_only_once_valid_and_a_crash_while_validating_it_is_finished_by_the_redelivery(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle,
    announcements: Announcements, monkeypatch: pytest.MonkeyPatch, validated: str,  # noqa: F811
) -> None:
    """Validated as it is written (the base's verdicts reused: its record names this validator), or
    read again once written (a base validated by another validator, as after an upgrade)."""
    import chalicelib.ingest as ingest_module
    from chalicelib.bundle import CompileCache, CompileWorkerError

    deploy, delta_key, data, notification = start_delta_deploy(client, aws, deployment, deployer_token, make_bundle)
    assert [m["version"] for m in announcements()] == [1]
    store = app_module.get_store()
    if validated == "read again":
        monkeypatch.setattr(CompileCache, "TAG", "another-python:v0")

    crashed: list[bool] = []
    real: Any = ingest_module.WrittenCheck.report if validated == "as written" else ingest_module.validate_stream

    def dies_once(*args: Any, **kwargs: Any) -> Any:
        crashed.append(True)
        if len(crashed) == 1:
            raise CompileWorkerError("killed mid-bundle")
        return real(*args, **kwargs)

    if validated == "as written":
        monkeypatch.setattr(ingest_module.WrittenCheck, "report", dies_once)
    else:
        monkeypatch.setattr(ingest_module, "validate_stream", dies_once)
    with pytest.raises(BatchProcessingError, match="All records failed"):  # the invocation fails: SQS redelivers
        ingest(client, notification)
    stored = store.get_deploy(deployment, deploy["deploy_id"])
    # checked as it was written, the rebuild itself failed (and the deploy waits for it); else it failed after
    expected = (DeployState.PENDING, False) if validated == "as written" else (DeployState.VALIDATING, True)
    assert crashed and (stored.state, stored.rebuilt_at is not None) == expected
    assert object_versions(aws, deploy["key"]) == [], "the rebuilt bundle was stored before it was validated"
    assert announcements() == []
    # a notification of the deploy's own key meanwhile (ingest's store of it arriving while the deploy is
    # VALIDATING, or anyone's write) starts no second validation: the delta's handler decides the deploy
    calls = len(crashed)
    assert ingest(client, s3_notification(aws.bucket, deploy["key"], len(data))) == {"batchItemFailures": []}
    assert len(crashed) == calls and store.get_deploy(deployment, deploy["deploy_id"]).state is expected[0]

    assert ingest(client, notification) == {"batchItemFailures": []}
    stored = store.get_deploy(deployment, deploy["deploy_id"])
    assert (stored.state, stored.version) == (DeployState.ACTIVE, 2)
    record = store.get_version(deployment, 2)
    assert object_versions(aws, deploy["key"]) == [record.object_version]
    served = boto3.client("s3").get_object(Bucket=aws.bucket, Key=deploy["key"], VersionId=record.object_version)
    assert served["Body"].read() == data, "the stored bundle is the one the deployer's folder makes"
    assert [m["version"] for m in announcements()] == [2]
    # the stored bundle's own notification arrives after: the deploy is decided, nothing changes
    assert ingest(client, s3_notification(aws.bucket, deploy["key"], len(data))) == {"batchItemFailures": []}
    assert [v["version"] for v in items(aws, deployment, "VERSION#")] == [1, 2]
    assert object_versions(aws, deploy["key"]) == [record.object_version]


def test_a_delta_deploy_cancelled_while_its_bundle_is_rebuilt_stores_nothing_and_never_goes_live(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, admin_token: str,
    make_bundle: MakeBundle, announcements: Announcements, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    import chalicelib.ingest as ingest_module

    deploy, delta_key, _, notification = start_delta_deploy(client, aws, deployment, deployer_token, make_bundle)
    real = ingest_module.rebuild_bundle

    def cancelled_meanwhile(*args: Any, **kwargs: Any) -> Any:
        info = real(*args, **kwargs)
        url = f"/deployments/{deployment}/deploys/{deploy['deploy_id']}/cancel"
        resp = client.http.post(url, headers=auth(admin_token))
        assert resp.status_code == 200, resp.body
        return info

    monkeypatch.setattr(ingest_module, "rebuild_bundle", cancelled_meanwhile)
    assert ingest(client, notification) == {"batchItemFailures": []}
    stored = app_module.get_store().get_deploy(deployment, deploy["deploy_id"])
    assert stored.state is DeployState.CANCELLED and stored.rebuilt_at is None and stored.version is None
    assert object_versions(aws, deploy["key"]) == [], "a cancelled deploy's rebuilt bundle was stored"
    assert object_versions(aws, delta_key) == [], "the cancelled deploy's delta was kept"
    assert [m["version"] for m in announcements()] == [1]


def test_a_rebuilt_bundle_is_in_storage_at_the_published_object_version_before_its_version_is_published(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle,
    announcements: Announcements, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    import chalicelib.publish as publish_module
    import chalicelib.storage as storage_module

    deploy, _, data, notification = start_delta_deploy(client, aws, deployment, deployer_token, make_bundle)
    real_put, real_publish = storage_module.BundleStorage.put_checked, publish_module.Publisher.publish
    seen: list[tuple[list[str], str | None]] = []

    def slow_put(self: Any, *args: Any, **kwargs: Any) -> Any:
        threading.Event().wait(0.3)  # the store takes longer than making the manifest and the delta
        return real_put(self, *args, **kwargs)

    def publish(self: Any, deploy_: Any, fields: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append((object_versions(aws, deploy["key"]), fields.get("object_version")))
        return real_publish(self, deploy_, fields, *args, **kwargs)

    monkeypatch.setattr(storage_module.BundleStorage, "put_checked", slow_put)
    monkeypatch.setattr(publish_module.Publisher, "publish", publish)
    assert ingest(client, notification) == {"batchItemFailures": []}
    [(stored, pinned)] = seen
    assert stored and pinned == stored[0], "published before the rebuilt bundle was stored, or pinned to another write"
    record = app_module.get_store().get_version(deployment, 2)
    served = boto3.client("s3").get_object(Bucket=aws.bucket, Key=deploy["key"], VersionId=record.object_version)
    assert served["Body"].read() == data
    assert [m["version"] for m in announcements()] == [1, 2]
