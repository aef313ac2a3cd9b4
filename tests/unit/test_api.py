"""The HTTP API through Chalice's test client, against dagcast's stack in moto."""
from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from chalice.test import Client
from sidecar_calls import SidecarCalls

import app as app_module
from chalicelib.auth import hash_token, new_token
from chalicelib.models import CreateDeployment, Mechanism, Role, Token
from chalicelib.service import ControlPlane
from dagcast.bootstrap import StackOutputs

SHA = hashlib.sha256(b"bundle").hexdigest()


def headers(token: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return h


def call(client: Client, method: str, path: str, token: str | None, body: Any = None, raw: str | None = None) -> Any:
    kwargs: dict[str, Any] = {"headers": headers(token)}
    if raw is not None:
        kwargs["body"] = raw
    elif body is not None:
        kwargs["body"] = json.dumps(body)
    return getattr(client.http, method.lower())(path, **kwargs)


def assert_error(resp: Any, status: int, code: str) -> str:
    assert resp.status_code == status, resp.body
    body = resp.json_body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["message"])


def create_deploy(client: Client, deployment: str, token: str, **body: Any) -> Any:
    payload = {"sha256": SHA, "size": 1234, **body}
    return call(client, "POST", f"/deployments/{deployment}/deploys", token, payload)


# --- unauthenticated routes ---------------------------------------------------------------


def test_healthz_answers_without_a_token(client: Client) -> None:
    resp = client.http.get("/healthz")
    assert resp.status_code == 200
    assert resp.json_body["status"] == "ok"
    assert resp.json_body["version"] == app_module.__version__


def test_openapi_document_lists_every_route_without_a_token(client: Client) -> None:
    resp = client.http.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.json_body
    assert doc["openapi"].startswith("3.")
    assert app_module.ROUTES, "the app registers routes"
    for route in app_module.ROUTES:
        assert route.path in doc["paths"], route.path
        op = doc["paths"][route.path][route.method.lower()]
        assert str(route.status) in op["responses"]
        assert ("security" in op) == (route.permission is not None), route.path
    schemas = doc["components"]["schemas"]
    assert {"CreateDeploy", "CreatedDeploy", "Error"} <= set(schemas)
    assert "sha256" in schemas["CreateDeploy"]["properties"]


# --- authentication and authorization ---------------------------------------------------


def test_missing_token_is_401(client: Client, deployment: str) -> None:
    msg = assert_error(call(client, "GET", f"/deployments/{deployment}", None), 401, "unauthorized")
    assert "missing" in msg.lower()


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer not-a-dagcast-token", "Basic dXNlcjpwYXNz", "Token dgc_" + "a" * 43, "dgc_" + "a" * 43],
)
def test_malformed_authorization_header_is_401(client: Client, deployment: str, header: str) -> None:
    resp = client.http.get(f"/deployments/{deployment}", headers={"Authorization": header})
    msg = assert_error(resp, 401, "unauthorized")
    assert "malformed" in msg


@pytest.mark.parametrize("token", ["dgc_short", "dgc_" + "a" * 100])
def test_a_token_of_the_right_shape_but_not_the_right_length_is_unknown_not_malformed(
    client: Client, deployment: str, token: str
) -> None:
    resp = client.http.get(f"/deployments/{deployment}", headers={"Authorization": f"Bearer {token}"})
    assert assert_error(resp, 401, "unauthorized") == "unknown token"


def test_unknown_token_is_401(client: Client, deployment: str) -> None:
    msg = assert_error(call(client, "GET", f"/deployments/{deployment}", new_token()), 401, "unauthorized")
    assert "unknown token" in msg


def test_revoked_token_is_401(client: Client, deployment: str) -> None:
    secret = new_token()
    app_module.get_store().put_token(
        Token(token_hash=hash_token(secret), name="old", role=Role.ADMIN, deployments=["*"], revoked=True)
    )
    msg = assert_error(call(client, "GET", f"/deployments/{deployment}", secret), 401, "unauthorized")
    assert "revoked" in msg


def test_only_the_token_hash_is_stored(client: Client, aws: StackOutputs, viewer_token: str) -> None:
    table = boto3.resource("dynamodb").Table(aws.table_name)
    item = table.get_item(Key={"pk": f"TOKEN#{hash_token(viewer_token)}", "sk": "META"})["Item"]
    assert item["role"] == "viewer"
    assert viewer_token not in json.dumps(item, default=str)


def test_viewer_can_read_but_cannot_create_deploys(client: Client, deployment: str, viewer_token: str) -> None:
    assert call(client, "GET", f"/deployments/{deployment}", viewer_token).status_code == 200
    msg = assert_error(create_deploy(client, deployment, viewer_token), 403, "forbidden")
    assert "viewer" in msg and "deploy" in msg
    listed = call(client, "GET", f"/deployments/{deployment}/deploys", viewer_token).json_body
    assert listed["items"] == []


def test_deployer_cannot_change_deployment_settings(client: Client, deployment: str, deployer_token: str) -> None:
    resp = call(client, "PATCH", f"/deployments/{deployment}", deployer_token, {"mechanism": "IMAGE"})
    assert_error(resp, 403, "forbidden")
    assert app_module.get_store().get_deployment(deployment).mechanism is Mechanism.DAG_ONLY


def test_token_scoped_to_another_deployment_is_403(client: Client, control: ControlPlane, deployment: str) -> None:
    control.create_deployment(CreateDeployment(name="other", mechanism=Mechanism.DAG_ONLY))
    other_deployer = control.issue_token("other-deployer", Role.DEPLOYER, ["other"])
    msg = assert_error(create_deploy(client, deployment, other_deployer), 403, "forbidden")
    assert deployment in msg
    assert_error(call(client, "GET", f"/deployments/{deployment}/deploys", other_deployer), 403, "forbidden")
    assert app_module.get_store().list_deploys(deployment, 10, None) == ([], None)
    # ...while its own deployment works.
    assert create_deploy(client, "other", other_deployer).status_code == 201


def test_list_deployments_shows_only_those_in_the_token_scope(client: Client, control: ControlPlane, viewer_token: str) -> None:
    control.create_deployment(CreateDeployment(name="other"))
    wildcard = control.issue_token("everything", Role.VIEWER, ["*"])
    scoped = call(client, "GET", "/deployments", viewer_token).json_body["items"]
    assert [d["name"] for d in scoped] == ["analytics"]
    everything = call(client, "GET", "/deployments", wildcard).json_body["items"]
    assert [d["name"] for d in everything] == ["analytics", "other"]


# --- deployments ------------------------------------------------------------------------


def test_admin_creates_a_deployment_with_image_mechanism_by_default(client: Client, admin_token: str) -> None:
    resp = call(client, "POST", "/deployments", admin_token, {"name": "reporting"})
    assert resp.status_code == 201, resp.body
    assert resp.json_body["name"] == "reporting"
    assert resp.json_body["mechanism"] == "IMAGE"
    assert resp.json_body["current_version"] == 0
    stored = app_module.get_store().get_deployment("reporting")
    assert stored.mechanism is Mechanism.IMAGE


def test_creating_an_existing_deployment_is_409(client: Client, deployment: str, admin_token: str) -> None:
    resp = call(client, "POST", "/deployments", admin_token, {"name": deployment})
    assert_error(resp, 409, "conflict")


def test_create_deployment_rejects_an_invalid_name(client: Client, admin_token: str) -> None:
    msg = assert_error(call(client, "POST", "/deployments", admin_token, {"name": "Not_Valid"}), 400, "invalid_request")
    assert "name" in msg


# --- create deploy ----------------------------------------------------------------------


def test_create_deploy_returns_a_pending_deploy_and_a_presigned_post(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str
) -> None:
    payload = {"sha256": SHA, "size": 4321, "description": "nightly", "git": {"sha": "abc123", "branch": "main"}}
    resp = call(client, "POST", f"/deployments/{deployment}/deploys", deployer_token, payload)
    assert resp.status_code == 201, resp.body
    deploy = resp.json_body["deploy"]
    deploy_id = deploy["deploy_id"]
    key = f"bundles/{deployment}/{deploy_id}.tar.gz"
    assert deploy["state"] == "PENDING"
    assert deploy["key"] == key
    assert deploy["sha256"] == SHA and deploy["size"] == 4321
    assert deploy["created_by"] == "unit-deployer"
    assert deploy["git"]["branch"] == "main"

    upload = resp.json_body["upload"]
    assert aws.bucket in upload["url"]
    fields = upload["fields"]
    assert fields["key"] == key
    checksum = base64.b64encode(bytes.fromhex(SHA)).decode()
    assert fields["x-amz-checksum-sha256"] == checksum
    assert upload["expires_at"] > deploy["created_at"]

    policy = json.loads(base64.b64decode(fields["policy"]))
    conditions = policy["conditions"]
    assert ["eq", "$key", key] in conditions or {"key": key} in conditions
    assert all(c == ["eq", "$key", key] for c in conditions if isinstance(c, list) and c[1] == "$key")
    assert all(c["key"] == key for c in conditions if isinstance(c, dict) and "key" in c)
    assert not any(isinstance(c, list) and c[0] == "starts-with" for c in conditions)
    assert ["content-length-range", 4321, 4321] in conditions
    assert {"x-amz-checksum-sha256": checksum} in conditions
    assert {"bucket": aws.bucket} in conditions

    stored = app_module.get_store().get_deploy(deployment, deploy_id)
    assert stored.state.value == "PENDING"
    assert stored.description == "nightly"


def test_create_deploy_while_mechanism_is_image_is_409_and_says_how_to_enable(
    client: Client, control: ControlPlane, deployment: str, admin_token: str
) -> None:
    control.create_deployment(CreateDeployment(name="legacy", mechanism=Mechanism.IMAGE))
    admin_all = control.issue_token("root", Role.ADMIN, ["*"])
    msg = assert_error(create_deploy(client, "legacy", admin_all), 409, "conflict")
    assert "legacy" in msg
    assert "IMAGE" in msg
    assert "enable" in msg
    assert "dagcast deployment update --deployment legacy --dag-deploy enabled" in msg
    assert app_module.get_store().list_deploys("legacy", 10, None) == ([], None)


def test_patch_mechanism_to_dag_only_then_create_deploy_works(client: Client, control: ControlPlane) -> None:
    control.create_deployment(CreateDeployment(name="legacy", mechanism=Mechanism.IMAGE))
    admin = control.issue_token("legacy-admin", Role.ADMIN, ["legacy"])
    deployer = control.issue_token("legacy-deployer", Role.DEPLOYER, ["legacy"])
    assert create_deploy(client, "legacy", deployer).status_code == 409

    resp = call(client, "PATCH", "/deployments/legacy", admin, {"mechanism": "DAG_ONLY"})
    assert resp.status_code == 200, resp.body
    assert resp.json_body["mechanism"] == "DAG_ONLY"
    assert app_module.get_store().get_deployment("legacy").mechanism is Mechanism.DAG_ONLY

    created = create_deploy(client, "legacy", deployer)
    assert created.status_code == 201, created.body
    assert created.json_body["deploy"]["state"] == "PENDING"


def test_patch_unknown_deployment_is_404(client: Client, control: ControlPlane) -> None:
    admin_all = control.issue_token("root", Role.ADMIN, ["*"])
    assert_error(call(client, "PATCH", "/deployments/nope", admin_all, {"mechanism": "DAG_ONLY"}), 404, "not_found")


def test_create_deploy_over_the_bundle_size_limit_is_400(client: Client, deployment: str, admin_token: str) -> None:
    resp = call(client, "PATCH", f"/deployments/{deployment}", admin_token, {"limits": {"max_bundle_bytes": 2 * 2**20}})
    assert resp.status_code == 200, resp.body
    msg = assert_error(create_deploy(client, deployment, admin_token, size=3 * 2**20), 400, "bundle_too_large")
    assert "3.0 MiB compressed, over the deployment's limit of 2.0 MiB" in msg
    assert create_deploy(client, deployment, admin_token, size=2 * 2**20).status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"sha256": "xyz", "size": 10}, "sha256"),
        ({"sha256": SHA.upper(), "size": 10}, "sha256"),
        ({"sha256": SHA[:-1], "size": 10}, "sha256"),
        ({"size": 10}, "sha256"),
        ({"sha256": SHA, "size": 0}, "size"),
        ({"sha256": SHA, "size": -5}, "size"),
        ({"sha256": SHA, "size": "lots"}, "size"),
        ({"sha256": SHA}, "size"),
        ({"sha256": SHA, "size": 10, "colour": "red"}, "colour"),
        ({"sha256": SHA, "size": 10, "git": {"sha": "a", "extra": 1}}, "git.extra"),
        ({"sha256": SHA, "size": 10, "description": "x" * 1025}, "description"),
        ([SHA, 10], "body"),
    ],
)
def test_create_deploy_with_a_bad_body_is_400_naming_the_field(
    client: Client, deployment: str, deployer_token: str, body: Any, field: str
) -> None:
    resp = call(client, "POST", f"/deployments/{deployment}/deploys", deployer_token, body)
    msg = assert_error(resp, 400, "invalid_request")
    assert f": {field}:" in msg, msg
    assert app_module.get_store().list_deploys(deployment, 10, None) == ([], None)


@pytest.mark.parametrize("raw", ["{not json", "", '{"sha256": ', "null"])
def test_create_deploy_with_invalid_json_is_400_not_500(client: Client, deployment: str, deployer_token: str, raw: str) -> None:
    resp = call(client, "POST", f"/deployments/{deployment}/deploys", deployer_token, raw=raw)
    msg = assert_error(resp, 400, "invalid_request")
    assert "invalid request body" in msg


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/deployments", {"name": "ok", "mechanism": "SOMETIMES"}),
        ("/deployments/analytics", {"keep_versions": 0}),
        ("/deployments/analytics", {"limits": {"max_members": 0}}),
        ("/deployments/analytics/sidecars", {"name": "UPPER"}),
    ],
)
def test_other_bad_bodies_are_400(client: Client, deployment: str, control: ControlPlane, path: str, body: Any) -> None:
    admin_all = control.issue_token("root", Role.ADMIN, ["*"])
    method = "PATCH" if path == "/deployments/analytics" else "POST"
    assert_error(call(client, method, path, admin_all, body), 400, "invalid_request")


# --- reading deploys --------------------------------------------------------------------


def test_get_deploy_shows_state_and_per_sidecar_versions(
    client: Client, deployment: str, deployer_token: str, sidecar_token: str, viewer_token: str
) -> None:
    deploy_id = create_deploy(client, deployment, deployer_token).json_body["deploy"]["deploy_id"]
    for name, version in (("scheduler", 0), ("worker", 3)):
        resp = SidecarCalls(client, deployment, sidecar_token, name).report({"version": version})
        assert resp.status_code == 200, resp.body

    resp = call(client, "GET", f"/deployments/{deployment}/deploys/{deploy_id}", viewer_token)
    assert resp.status_code == 200, resp.body
    view = resp.json_body
    assert view["deploy"]["deploy_id"] == deploy_id
    assert view["deploy"]["state"] == "PENDING"
    assert [(s["name"], s["version"], s["live"]) for s in view["sidecars"]] == [("scheduler", 0, True), ("worker", 3, True)]
    assert view["live_sidecars"] == 2
    assert view["sidecars_on_version"] == 0  # a pending deploy has no version yet
    assert view["converged"] is False


def test_get_unknown_deploy_is_404(client: Client, deployment: str, viewer_token: str) -> None:
    msg = assert_error(call(client, "GET", f"/deployments/{deployment}/deploys/0123456789a-abcdef", viewer_token), 404, "not_found")
    assert "0123456789a-abcdef" in msg


def test_get_deploy_of_unknown_deployment_is_404(client: Client, control: ControlPlane) -> None:
    viewer_all = control.issue_token("all", Role.VIEWER, ["*"])
    assert_error(call(client, "GET", "/deployments/missing/deploys", viewer_all), 404, "not_found")
    assert_error(call(client, "GET", "/deployments/missing", viewer_all), 404, "not_found")


@pytest.mark.parametrize(
    "path",
    [
        "/deployments/analytics/deploys/not-an-id",
        "/deployments/analytics/deploys/0123456789A-ABCDEF",
        "/deployments/analytics/deploys/0123456789a-abcdef0",
        "/deployments/Analytics_1/deploys",
        "/deployments/-analytics",
        "/deployments/analytics/versions/0",
        "/deployments/analytics/versions/01",
        "/deployments/analytics/versions/-1",
        "/deployments/analytics/versions/12345678901",
        "/deployments/analytics/sidecars/Bad_Name",
    ],
)
def test_malformed_path_params_are_404(client: Client, deployment: str, control: ControlPlane, path: str) -> None:
    admin_all = control.issue_token("all", Role.ADMIN, ["*"])
    method = "PUT" if "/sidecars/" in path else "GET"
    body = {"version": 1} if method == "PUT" else None
    msg = assert_error(call(client, method, path, admin_all, body), 404, "not_found")
    assert "no " in msg


def test_list_deploys_is_newest_first_with_cursor_pagination(client: Client, deployment: str, deployer_token: str) -> None:
    created = []
    for i in range(5):
        resp = create_deploy(client, deployment, deployer_token, description=f"deploy {i}")
        assert resp.status_code == 201
        created.append(resp.json_body["deploy"]["deploy_id"])
        time.sleep(0.002)  # ids are time-ordered to the millisecond
    expected = list(reversed(created))

    pages: list[list[str]] = []
    cursor = None
    for _ in range(5):
        path = f"/deployments/{deployment}/deploys?limit=2" + (f"&cursor={cursor}" if cursor else "")
        resp = call(client, "GET", path, deployer_token)
        assert resp.status_code == 200, resp.body
        pages.append([d["deploy_id"] for d in resp.json_body["items"]])
        cursor = resp.json_body["next_cursor"]
        if cursor is None:
            break
    assert pages == [expected[0:2], expected[2:4], expected[4:5]]
    assert [d for page in pages for d in page] == expected

    everything = call(client, "GET", f"/deployments/{deployment}/deploys", deployer_token).json_body
    assert [d["deploy_id"] for d in everything["items"]] == expected
    assert [d["description"] for d in everything["items"]] == [f"deploy {i}" for i in range(4, -1, -1)]
    assert everything["next_cursor"] is None


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=ten", "limit=-1", "cursor=%21%21not-a-cursor", "cursor=e30"])
def test_list_deploys_with_bad_query_is_400(client: Client, deployment: str, viewer_token: str, query: str) -> None:
    resp = call(client, "GET", f"/deployments/{deployment}/deploys?{query}", viewer_token)
    msg = assert_error(resp, 400, "invalid_request")
    assert ("limit" in msg) or ("cursor" in msg)


# --- versions ---------------------------------------------------------------------------


def test_current_version_is_404_before_any_version(client: Client, deployment: str, viewer_token: str) -> None:
    msg = assert_error(call(client, "GET", f"/deployments/{deployment}/versions/current", viewer_token), 404, "not_found")
    assert "no version yet" in msg
    assert_error(call(client, "GET", f"/deployments/{deployment}/versions/1", viewer_token), 404, "not_found")


# --- sidecars ---------------------------------------------------------------------------


def test_register_sidecar_creates_a_queue_subscribed_to_the_topic_with_a_deployment_filter(
    client: Client, aws: StackOutputs, deployment: str, sidecar_token: str
) -> None:
    resp = call(client, "POST", f"/deployments/{deployment}/sidecars", sidecar_token, {"name": "scheduler", "component": "scheduler"})
    assert resp.status_code == 201, resp.body
    queue_url = resp.json_body["queue_url"]
    sidecar = resp.json_body["sidecar"]
    assert sidecar["component"] == "scheduler"
    assert "secret_hash" not in sidecar and "queue_url" not in sidecar, "a registration shows the sidecar's view only"
    assert len(resp.json_body["secret"]) >= 32
    assert resp.json_body["deployment_id"] == app_module.get_store().get_deployment(deployment).uid
    assert [k["algorithm"] for k in resp.json_body["signing_keys"]] == ["ECDSA_P256_SHA256"]

    sqs = boto3.client("sqs")
    sns = boto3.client("sns")
    assert queue_url in sqs.list_queues(QueueNamePrefix="dagcast-sidecar-")["QueueUrls"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.loads(sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["Policy"])["Attributes"]["Policy"])
    assert policy["Statement"][0]["Condition"]["ArnEquals"]["aws:SourceArn"] == aws.topic_arn

    subs = sns.list_subscriptions_by_topic(TopicArn=aws.topic_arn)["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subs] == [("sqs", queue_arn)]
    attrs = sns.get_subscription_attributes(SubscriptionArn=subs[0]["SubscriptionArn"])["Attributes"]
    assert attrs["RawMessageDelivery"] == "true"
    assert json.loads(attrs["FilterPolicy"]) == {"deployment": [deployment]}

    stored = app_module.get_store().get_sidecar(deployment, "scheduler")
    assert stored is not None and stored.queue_url == queue_url
    assert stored.subscription_arn == subs[0]["SubscriptionArn"]
    assert stored.registered_by == "unit-sidecar" and stored.secret_hash == hash_token(resp.json_body["secret"])


def test_sidecar_queue_receives_only_its_deployments_announcements(
    client: Client, aws: StackOutputs, deployment: str, sidecar_token: str
) -> None:
    queue_url = call(client, "POST", f"/deployments/{deployment}/sidecars", sidecar_token, {"name": "scheduler"}).json_body["queue_url"]
    sns = boto3.client("sns")
    sqs = boto3.client("sqs")
    for dep in ("other", deployment):
        sns.publish(
            TopicArn=aws.topic_arn,
            Message=json.dumps({"deployment": dep}),
            MessageAttributes={"deployment": {"DataType": "String", "StringValue": dep}},
        )
    msgs = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
    assert [json.loads(m["Body"]) for m in msgs] == [{"deployment": deployment}]


def test_registering_a_sidecar_twice_keeps_one_queue_and_one_subscription(
    client: Client, aws: StackOutputs, deployment: str, sidecar_token: str
) -> None:
    path = f"/deployments/{deployment}/sidecars"
    first = SidecarCalls(client, deployment, sidecar_token, "scheduler")
    uid = first.deployment_id
    assert first.report({"version": 4, "sha256": "a" * 64, "deployment_id": uid}).status_code == 200
    headers = {"Authorization": f"Bearer {sidecar_token}", "X-Dagcast-Sidecar-Secret": first.secret}
    second = client.http.post(path, headers=headers, body=json.dumps({"name": "scheduler"}))
    assert second.status_code == 201, second.body
    assert second.json_body["queue_url"] == first.registration["queue_url"]
    assert second.json_body["sidecar"]["version"] == 4  # the live version survives re-registration
    assert second.json_body["secret"] != first.secret
    subs = boto3.client("sns").list_subscriptions_by_topic(TopicArn=aws.topic_arn)["Subscriptions"]
    assert len(subs) == 1


def test_heartbeat_updates_the_sidecar_version(client: Client, deployment: str, sidecar_token: str, viewer_token: str) -> None:
    path = f"/deployments/{deployment}/sidecars"
    worker = SidecarCalls(client, deployment, sidecar_token, "worker")
    resp = worker.report({"version": 7, "last_sync_at": 1234, "last_error": "disk full"})
    assert resp.status_code == 200, resp.body
    assert resp.json_body["version"] == 7
    assert resp.json_body["live"] is True
    assert resp.json_body["last_error"] == "disk full"

    stored = app_module.get_store().get_sidecar(deployment, "worker")
    assert stored is not None and stored.version == 7 and stored.last_sync_at == 1234
    listed = call(client, "GET", path, viewer_token).json_body["items"]
    assert [(s["name"], s["version"]) for s in listed] == [("worker", 7)]


def test_heartbeat_of_unregistered_sidecar_is_404(client: Client, deployment: str, sidecar_token: str) -> None:
    headers = {"Authorization": f"Bearer {sidecar_token}", "X-Dagcast-Sidecar-Secret": "s" * 43}
    resp = client.http.put(f"/deployments/{deployment}/sidecars/ghost", headers=headers, body=json.dumps({"version": 1}))
    msg = assert_error(resp, 404, "not_found")
    assert "register" in msg
    assert app_module.get_store().get_sidecar(deployment, "ghost") is None


def test_heartbeat_with_negative_version_is_400(client: Client, deployment: str, sidecar_token: str) -> None:
    worker = SidecarCalls(client, deployment, sidecar_token, "worker")
    msg = assert_error(worker.report({"version": -1}), 400, "invalid_request")
    assert "version" in msg


def test_deployer_cannot_register_sidecars(client: Client, deployment: str, deployer_token: str) -> None:
    resp = call(client, "POST", f"/deployments/{deployment}/sidecars", deployer_token, {"name": "scheduler"})
    assert_error(resp, 403, "forbidden")
    assert boto3.client("sqs").list_queues(QueueNamePrefix="dagcast-sidecar-").get("QueueUrls", []) == []


def test_deregister_removes_the_queue_subscription_and_record(
    client: Client, aws: StackOutputs, deployment: str, sidecar_token: str
) -> None:
    scheduler = SidecarCalls(client, deployment, sidecar_token, "scheduler")
    queue_url = scheduler.registration["queue_url"]
    resp = scheduler.deregister()
    assert resp.status_code == 204
    sqs = boto3.client("sqs")
    assert sqs.list_queues(QueueNamePrefix="dagcast-sidecar-").get("QueueUrls", []) == []
    with pytest.raises(ClientError):
        sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    assert boto3.client("sns").list_subscriptions_by_topic(TopicArn=aws.topic_arn)["Subscriptions"] == []
    assert app_module.get_store().get_sidecar(deployment, "scheduler") is None
    # Deregistering again is harmless.
    assert scheduler.deregister().status_code == 204
