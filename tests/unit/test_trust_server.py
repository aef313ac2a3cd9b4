"""The server's side of the trust chain, on moto's in-process mock: signing, sidecar identity, roles,
limits, immutable bundles, late uploads and cancellation."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from chalice.test import Client
from conftest import Sidecars
from sidecar_calls import SidecarCalls

import app as app_module
from chalicelib.exceptions import Conflict
from chalicelib.ingest import Outcome
from chalicelib.models import CreateDeploy, DeployState, IngestEvent
from chalicelib.service import ControlPlane
from chalicelib.signing import FileSigner, KmsSigner, Verifier, signed_message
from dagcast.bootstrap import StackOutputs

MakeBundle = Callable[[dict[str, bytes | str]], bytes]


def publish(control: ControlPlane, aws: StackOutputs, deployment: str, data: bytes) -> Any:
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(data).hexdigest(), size=len(data)), "t")
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=data)
    assert app_module.get_ingest().handle(IngestEvent(bucket=aws.bucket, key=created.deploy.key, size=len(data))) is Outcome.ACTIVE
    return app_module.get_store().get_deploy(deployment, created.deploy.deploy_id)


# --- signing ---------------------------------------------------------------------------------


def test_a_file_key_is_created_private_and_signs_what_its_public_key_verifies(tmp_path: Path) -> None:
    signer = FileSigner(tmp_path / "state" / "key.pem")
    assert (tmp_path / "state" / "key.pem").stat().st_mode & 0o777 == 0o600
    again = FileSigner(tmp_path / "state" / "key.pem")
    assert again.key_id == signer.key_id, "the same key after a restart"
    verifier = Verifier({signer.key_id: signer.public_key_pem})
    statement = b'{"version": 3}'
    signature = signer.sign(statement)
    assert verifier.verify(signer.key_id, statement, signature)
    assert not verifier.verify(signer.key_id, b'{"version": 4}', signature)
    assert not verifier.verify("other", statement, signature)
    assert not verifier.verify(signer.key_id, statement, "not base64!")


def test_kms_and_a_key_file_sign_the_same_message_and_one_verifier_checks_both(aws: StackOutputs) -> None:
    kms = KmsSigner(boto3.client("kms"), aws.signing_key_arn)
    statement = b'{"deployment": "d", "version": 1}'
    signature = kms.sign(statement)
    assert Verifier({kms.key_id: kms.public_key_pem}).verify(kms.key_id, statement, signature)
    assert signed_message(statement).startswith(b"dagcast-announcement:v1:") and len(signed_message(statement)) < 4096


# --- sidecar identity --------------------------------------------------------------------------


def test_only_the_sidecar_itself_heartbeats_or_deregisters_and_an_admin_may_deregister(
    client: Client, deployment: str, sidecar_token: str, admin_token: str
) -> None:
    worker = SidecarCalls(client, deployment, sidecar_token, "worker")
    other = SidecarCalls(client, deployment, sidecar_token, "other")
    for secret in (None, other.secret, "x" * 43):
        resp = worker.report({"version": 5}, secret=secret)
        assert resp.status_code == 403 and resp.json_body["error"]["code"] == "forbidden", secret
        assert worker.deregister(secret=secret).status_code == 403
    assert worker.report({"version": 0}).status_code == 200
    headers = {"Authorization": f"Bearer {admin_token}"}
    assert client.http.delete(f"/deployments/{deployment}/sidecars/other", headers=headers).status_code == 204
    assert app_module.get_store().get_sidecar(deployment, "other") is None


def test_a_live_name_is_taken_back_only_with_its_secret_by_an_admin_or_once_it_went_silent(
    client: Client, control: ControlPlane, deployment: str, sidecar_token: str, admin_token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = SidecarCalls(client, deployment, sidecar_token, "worker")
    path = f"/deployments/{deployment}/sidecars"

    def register(token: str, secret: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}", **({"X-Dagcast-Sidecar-Secret": secret} if secret else {})}
        return client.http.post(path, headers=headers, body=json.dumps({"name": "worker"}))

    taken = register(sidecar_token)
    assert taken.status_code == 409 and "registered and live" in taken.json_body["error"]["message"]
    again = register(sidecar_token, first.secret)
    assert again.status_code == 201
    assert first.report({"version": 0}).status_code == 403, "the old secret no longer works"
    assert register(admin_token).status_code == 201
    clock = control._clock
    monkeypatch.setattr(control, "_clock", lambda: clock() + 91_000)  # silent for longer than sidecar_stale_seconds
    assert register(sidecar_token).status_code == 201


def test_a_token_limited_to_sidecar_names_registers_only_those(client: Client, admin_token: str, deployment: str) -> None:
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    made = client.http.post("/tokens", headers=headers, body=json.dumps(
        {"name": "workers", "role": "sidecar", "deployments": [deployment], "sidecar_names": ["worker-*"]}))
    assert made.status_code == 201 and made.json_body["info"]["sidecar_names"] == ["worker-*"]
    token = made.json_body["token"]
    assert SidecarCalls(client, deployment, token, "worker-3").secret
    ghost = client.http.post(f"/deployments/{deployment}/sidecars", headers={"Authorization": f"Bearer {token}"},
                             body=json.dumps({"name": "ghost"}))
    assert ghost.status_code == 403 and "worker-*" in ghost.json_body["error"]["message"]
    viewer = client.http.post("/tokens", headers=headers, body=json.dumps(
        {"name": "v2", "role": "viewer", "sidecar_names": ["x"]}))
    assert viewer.status_code == 400 and "sidecar tokens only" in viewer.json_body["error"]["message"]


def test_revoking_a_token_removes_the_sidecars_it_registered_and_their_queues(
    client: Client, deployment: str, sidecar_token: str, admin_token: str, aws: StackOutputs
) -> None:
    mine = SidecarCalls(client, deployment, sidecar_token, "mine")
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    others = client.http.post("/tokens", headers=headers, body=json.dumps(
        {"name": "others", "role": "sidecar", "deployments": [deployment]})).json_body["token"]
    SidecarCalls(client, deployment, others, "theirs")
    assert client.http.delete("/tokens/unit-sidecar", headers=headers).status_code == 200
    store = app_module.get_store()
    assert store.get_sidecar(deployment, "mine") is None and store.get_sidecar(deployment, "theirs") is not None
    queues = boto3.client("sqs").list_queues().get("QueueUrls", [])
    assert mine.registration["queue_url"] not in queues and any(q.endswith("--theirs") for q in queues)
    subs = boto3.client("sns").list_subscriptions_by_topic(TopicArn=aws.topic_arn)["Subscriptions"]
    assert len(subs) == 1


def test_a_report_counts_only_with_the_exact_number_sha256_and_deployment_id(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle, sidecars: Sidecars
) -> None:
    sidecars.register("w1")
    deploy = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    uid = app_module.get_store().get_deployment(deployment).uid
    from chalicelib.models import Heartbeat

    for wrong in (Heartbeat(version=1), Heartbeat(version=1, sha256="f" * 64, deployment_id=uid),
                  Heartbeat(version=1, sha256=deploy.sha256, deployment_id="0" * 16)):
        view = control.heartbeat(deployment, "w1", wrong, sidecars.secrets["w1"])
        assert not view.on_current
        assert app_module.get_store().get_deploy(deployment, deploy.deploy_id).activations == {}
    assert sidecars.report("w1", 1).on_current
    assert set(app_module.get_store().get_deploy(deployment, deploy.deploy_id).activations) == {"w1"}


# --- limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("max_member_bytes", 2 * 1024**3), ("max_py_bytes", 64 * 1024**2),
                                              ("max_path_bytes", 8192), ("max_bundle_bytes", 8 * 1024**3)])
def test_limits_above_the_hard_caps_are_refused(client: Client, admin_token: str, deployment: str, field: str, value: int) -> None:
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    resp = client.http.patch(f"/deployments/{deployment}", headers=headers, body=json.dumps({"limits": {field: value}}))
    assert resp.status_code == 400 and field in resp.json_body["error"]["message"]
    assert "less than or equal" in resp.json_body["error"]["message"]


def test_a_version_records_the_limits_it_was_validated_with(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle
) -> None:
    from chalicelib.bundle import Limits
    from chalicelib.models import UpdateDeployment

    raised = Limits(max_member_bytes=300 * 1024**2, max_py_bytes=12 * 1024**2)
    control.update_deployment(deployment, UpdateDeployment(limits=raised))
    deploy = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    assert app_module.get_store().get_version(deployment, deploy.version).limits == raised


def test_a_path_component_longer_than_a_file_name_can_be_is_rejected() -> None:
    import io
    import tarfile

    from chalicelib.bundle import validate_stream

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("d/" + "x" * 256 + ".py")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"x = 1\n"))
    buf.seek(0)
    report = validate_stream(buf)
    assert [e.code for e in report.errors] == ["path_too_long"] and "255 bytes" in report.errors[0].message


# --- immutable bundles and late uploads ------------------------------------------------------------------


def test_downloads_are_pinned_to_the_validated_object_version_even_after_an_overwrite(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle, sidecar_token: str, client: Client
) -> None:
    original = make_bundle({"a.py": "x = 1\n"})
    deploy = publish(control, aws, deployment, original)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=aws.bucket, Key=deploy.key, Body=make_bundle({"a.py": "x = 'evil'\n"}))  # no ingest runs
    view = client.http.get(f"/deployments/{deployment}/versions/{deploy.version}",
                           headers={"Authorization": f"Bearer {sidecar_token}"}).json_body
    record = app_module.get_store().get_version(deployment, deploy.version)
    assert record.object_version and f"versionId={record.object_version}" in view["download_url"]
    pinned = s3.get_object(Bucket=aws.bucket, Key=deploy.key, VersionId=record.object_version)["Body"].read()
    assert pinned == original


@pytest.mark.parametrize("with_version_id", [True, False])
def test_ingest_removes_a_second_write_to_a_decided_deploys_key(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle, with_version_id: bool
) -> None:
    original = make_bundle({"a.py": "x = 1\n"})
    deploy = publish(control, aws, deployment, original)
    s3 = boto3.client("s3")
    put = s3.put_object(Bucket=aws.bucket, Key=deploy.key, Body=make_bundle({"a.py": "x = 2\n"}))
    event = IngestEvent(bucket=aws.bucket, key=deploy.key, size=1, version_id=put["VersionId"] if with_version_id else None)
    assert app_module.get_ingest().handle(event) is Outcome.IGNORED
    assert s3.get_object(Bucket=aws.bucket, Key=deploy.key)["Body"].read() == original
    versions = s3.list_object_versions(Bucket=aws.bucket, Prefix=deploy.key)["Versions"]
    assert [v["VersionId"] for v in versions] == [app_module.get_store().get_version(deployment, 1).object_version]


def test_an_upload_for_a_cancelled_deploy_is_deleted_by_ingest(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle
) -> None:
    data = make_bundle({"a.py": "x = 1\n"})
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(data).hexdigest(), size=len(data)), "t")
    control.cancel_deploy(deployment, created.deploy.deploy_id, "t")
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=data)
    assert app_module.get_ingest().handle(IngestEvent(bucket=aws.bucket, key=created.deploy.key, size=len(data))) is Outcome.IGNORED
    assert boto3.client("s3").list_object_versions(Bucket=aws.bucket, Prefix=created.deploy.key).get("Versions") is None
    assert app_module.get_store().get_deployment(deployment).current_version == 0


@pytest.mark.parametrize("when", ["before the upload is read", "while it is validated"])
def test_a_deploy_cancelled_during_ingest_never_goes_live_and_its_upload_is_deleted(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle, monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    data = make_bundle({"a.py": "x = 1\n"})
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(data).hexdigest(), size=len(data)), "t")
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=data)
    ingest, publisher = app_module.get_ingest(), app_module.get_publisher()

    def cancel() -> None:  # the CLI's interrupt, racing the ingest
        assert app_module.get_store().get_deploy(deployment, created.deploy.deploy_id).state is DeployState.VALIDATING
        control.cancel_deploy(deployment, created.deploy.deploy_id, "ctrl-c")

    if when == "before the upload is read":
        validate = ingest._validate_and_publish
        monkeypatch.setattr(ingest, "_validate_and_publish", lambda d, v: (cancel(), validate(d, v))[1])
    else:
        publish = publisher.publish
        monkeypatch.setattr(publisher, "publish", lambda *a, **k: (cancel(), publish(*a, **k))[1])
    assert ingest.handle(IngestEvent(bucket=aws.bucket, key=created.deploy.key, size=len(data))) is Outcome.IGNORED
    store = app_module.get_store()
    assert store.get_deploy(deployment, created.deploy.deploy_id).state is DeployState.CANCELLED
    assert store.get_deployment(deployment).current_version == 0 and store.list_versions(deployment) == []
    assert boto3.client("s3").list_object_versions(Bucket=aws.bucket, Prefix=created.deploy.key).get("Versions") is None


def test_a_deploy_that_went_live_cannot_be_cancelled(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle
) -> None:
    deploy = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    with pytest.raises(Conflict, match="only a PENDING or VALIDATING deploy can be cancelled"):
        control.cancel_deploy(deployment, deploy.deploy_id, "t")


def test_the_janitor_deletes_a_late_upload_whose_notification_was_lost(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: MakeBundle
) -> None:
    data = make_bundle({"a.py": "x = 1\n"})
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(data).hexdigest(), size=len(data)), "t")
    control.cancel_deploy(deployment, created.deploy.deploy_id, "t")
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=data)  # no ingest: its event was lost
    report = control.janitor()
    assert report.late_uploads_deleted == [f"{deployment}/{created.deploy.deploy_id}"]
    assert boto3.client("s3").list_object_versions(Bucket=aws.bucket, Prefix=created.deploy.key).get("Versions") is None
    assert control.janitor().late_uploads_deleted == []


def test_announcement_urls_expire_within_the_documented_bound(aws: StackOutputs) -> None:
    from chalicelib.settings import get_settings

    assert get_settings().announce_url_expiry_seconds == 300
    url = app_module.get_bundles().presigned_download("bundles/d/x.tar.gz", get_settings().announce_url_expiry_seconds)
    assert "X-Amz-Expires=300" in url or "Expires=" in httpx.URL(url).query.decode()
